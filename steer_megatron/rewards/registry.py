"""Reward functions by name, and which one each data source (or reward style) uses.

A reward function is `fn(completion: str, ground_truth: str) -> float`, or an object with
`.reward` (float) and `.reason` (str, why it is not 1; counted per reason in the step metrics).
`sandboxed=True` marks functions that may run unboundedly long (sympy, running programs) so
the scorer isolates them in a worker process with a hard time limit; inline ones must be
bounded-time by construction.

Optional hooks, each given the reward's options (the config's `reward.<name>` mapping):
`configure` applies them in every process that calls fn (raising on a bad key), `preflight`
raises when the reward cannot run here (checked before training starts), `time_budget_s`
returns the scorer's hard limit per call instead of its general timeout.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

RewardFn = Callable[[str, str], Any]
Options = Mapping[str, Any]


@dataclass(frozen=True)
class RewardSpec:
    name: str
    fn: RewardFn
    sandboxed: bool
    configure: Optional[Callable[[Options], None]] = None
    preflight: Optional[Callable[[Options], None]] = None
    time_budget_s: Optional[Callable[[Options], float]] = None


_REWARDS: dict[str, RewardSpec] = {}
# (glob pattern on data_source, reward name), first match wins; user registrations go first.
_SOURCES: list[tuple[str, str]] = []
_STYLES: list[tuple[str, str]] = []


def register_reward(name: str, *, sandboxed: bool = True, configure: Optional[Callable[[Options], None]] = None,
                    preflight: Optional[Callable[[Options], None]] = None,
                    time_budget_s: Optional[Callable[[Options], float]] = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register `fn(completion, ground_truth) -> float` under `name`.

    A sandboxed function runs in worker processes that import its module by name, so it
    must be a module-level function registered when that module is imported."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in _REWARDS and _REWARDS[name].fn is not fn:
            raise ValueError(f"reward {name!r} is already registered by {_REWARDS[name].fn.__module__}")
        _REWARDS[name] = RewardSpec(name, fn, sandboxed, configure, preflight, time_budget_s)
        return fn

    return deco


def register_data_source(pattern: str, reward_name: str) -> None:
    """Route data sources matching the glob `pattern` (e.g. "aime*") to reward `reward_name`."""
    _SOURCES.insert(0, (pattern, reward_name))


def register_style(pattern: str, reward_name: str) -> None:
    """Fallback route by reward_model.style (e.g. "rule*") for data sources with no route."""
    _STYLES.insert(0, (pattern, reward_name))


def reward_by_name(name: str) -> RewardSpec:
    _ensure_builtins()
    try:
        return _REWARDS[name]
    except KeyError:
        raise KeyError(f"no reward function named {name!r}; registered: {sorted(_REWARDS)}") from None


def get_reward_fn(data_source: str, style: str | None = None, routes: dict[str, str] | None = None) -> RewardSpec:
    """The reward for a row: by `routes` (a run's reward.routes: data_source glob -> reward name) first,
    then the registered data_source globs, then reward_model.style."""
    _ensure_builtins()
    for pattern, name in (routes or {}).items():
        if fnmatch.fnmatchcase(data_source, pattern):
            return reward_by_name(name)
    for pattern, name in _SOURCES:
        if fnmatch.fnmatchcase(data_source, pattern):
            return reward_by_name(name)
    if style is not None:
        for pattern, name in _STYLES:
            if fnmatch.fnmatchcase(style, pattern):
                return reward_by_name(name)
    raise KeyError(
        f"no reward for data_source={data_source!r} style={style!r}; known sources "
        f"{[p for p, _ in _SOURCES]}, styles {[p for p, _ in _STYLES]}. Register one with "
        f"steer_megatron.rewards.register_data_source(pattern, reward_name)"
    )


_builtins_loaded = False


def _ensure_builtins() -> None:
    # Deferred so that registry <-> math imports do not cycle.
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    import steer_megatron.rewards.code_reward  # noqa: F401  (registers "code")
    import steer_megatron.rewards.dapo  # noqa: F401  (registers "dapo_strict_box" and "dapo_answer")
    import steer_megatron.rewards.math_rules  # noqa: F401  (registers "math", "integer", "last_integer")

    for pattern in (
        "math_dapo", "aime*", "amc*", "math500", "math", "minerva_math", "olympiadbench*",
        "gsm8k*", "omni*", "lighteval/MATH*",
    ):
        _SOURCES.append((pattern, "math"))
    _SOURCES.append(("synthetic_*", "integer"))  # the CPU demo's tasks
    # Coding sets (verl / rllm data_source names); a code row's reward_model.style is "code"
    # in ArcherCodeR-style data, so that routes too.
    for pattern in ("livecodebench*", "lcb*", "humaneval*", "mbpp*", "taco*", "apps*", "codeforces*",
                    "code_contests*", "archer*", "deepcoder*", "primeintellect*", "leetcode*", "kodcode*"):
        _SOURCES.append((pattern, "code"))
    _STYLES.append(("rule*", "math"))
    _STYLES.append(("code*", "code"))
