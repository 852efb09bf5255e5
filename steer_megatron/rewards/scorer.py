"""Score completions with the registered reward functions, never raising and never hanging.

Sandboxed rewards (sympy-based math) run in worker processes. Each call has a hard time
limit: when it passes, the worker is killed and replaced and the completion scores 0. We do
not rely on math-verify's own timeouts: they use SIGALRM, which only fires in the main
thread and cannot interrupt a long C-level computation (big-integer powers), so the limit
would not hold inside a trainer thread or on the worst inputs.
"""
from __future__ import annotations

import importlib
import math
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Mapping, Sequence

from steer_megatron.rewards.registry import RewardSpec, get_reward_fn


@dataclass
class ScoreResult:
    scores: list[float]
    reward_names: list[str]
    n_timeouts: int = 0
    n_errors: int = 0  # the reward function raised or returned a non-number: scored 0
    # Why each score is what it is, for rewards that say (the code reward); None otherwise.
    # The scorer's own failures read "reward_timeout" / "reward_error".
    reasons: list[str | None] = field(default_factory=list)

    def reason_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.reasons:
            if r is not None:
                out[r] = out.get(r, 0) + 1
        return out


@dataclass
class ScorerStats:
    scored: int = 0
    timeouts: int = 0
    errors: int = 0
    worker_restarts: int = 0
    by_reward: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)


def _reward_and_reason(value) -> tuple[Any, str | None]:
    """A reward function's return value: a number, or an object with .reward and .reason."""
    if hasattr(value, "reward"):
        return value.reward, getattr(value, "reason", None)
    return value, None


def _worker_main(conn: Connection, modules: list[str], options: dict | None = None) -> None:
    """Worker loop: import the reward modules, warm each sandboxed reward once, then serve."""
    import logging

    from steer_megatron.rewards import registry

    # math-verify warns on every call that its own timeouts are off; that is intended here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    for mod in modules:
        importlib.import_module(mod)
    registry._ensure_builtins()
    for name, opts in (options or {}).items():
        registry.reward_by_name(name).configure(opts)
    for spec in list(registry._REWARDS.values()):
        if spec.sandboxed:  # pay the sympy import before the first timed call
            try:
                spec.fn("\\boxed{1/2}", "0.5")
            except Exception:
                pass
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        name, completion, ground_truth = msg
        try:
            value, reason = _reward_and_reason(registry.reward_by_name(name).fn(completion, ground_truth))
            conn.send(("ok", (float(value), reason)))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, scored 0
            conn.send(("error", f"{type(exc).__name__}: {exc}"[:500]))


class _Worker:
    def __init__(self, ctx, modules: list[str], options: dict | None = None):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, modules, options), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.task: int | None = None
        self.deadline = math.inf

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class RewardScorer:
    """Batch scorer. `timeout_s` is the hard limit per sandboxed call (unless the reward sets its
    own budget, as the code reward does); `num_workers` processes. `reward_options` maps a
    reward name to its options (the config's reward.<name>), applied in every worker.

    Use as a context manager (or call close()) so the worker processes end with the run.
    """

    def __init__(self, timeout_s: float = 5.0, num_workers: int = 2, startup_timeout_s: float = 120.0,
                 reward_options: Mapping[str, Mapping[str, Any]] | None = None, routes: dict[str, str] | None = None):
        if timeout_s <= 0:
            raise ValueError(f"reward timeout_s must be > 0, got {timeout_s}")
        if num_workers < 1:
            raise ValueError(f"reward num_workers must be >= 1, got {num_workers}")
        self.timeout_s = timeout_s
        self.num_workers = num_workers
        self.startup_timeout_s = startup_timeout_s
        self.routes = dict(routes or {})  # data_source glob -> reward name, before the registry's routes
        self.stats = ScorerStats()
        self._ctx = mp.get_context("spawn")  # fork after torch threads start is unsafe
        self._workers: list[_Worker] = []
        self.reward_options = {k: dict(v) for k, v in (reward_options or {}).items()}
        for name, opts in self.reward_options.items():
            spec = self._spec(name)
            if spec.configure is None:
                raise ValueError(f"reward.{name}: the {name!r} reward takes no options; remove them")
            spec.configure(opts)  # here too: a bad key fails now, and inline calls see the options

    @staticmethod
    def _spec(name: str) -> RewardSpec:
        from steer_megatron.rewards.registry import reward_by_name

        return reward_by_name(name)

    def preflight(self, data_sources: Sequence[str], styles: Sequence[str | None] | None = None) -> list[str]:
        """Check that every reward these rows route to can run here (e.g. the code sandbox);
        raises with the fix if one cannot. Returns the reward names used."""
        names = sorted({get_reward_fn(ds, None if styles is None else styles[i], self.routes).name for i, ds in enumerate(data_sources)})
        for name in names:
            spec = self._spec(name)
            if spec.preflight is not None:
                spec.preflight(self.reward_options.get(name, {}))
        return names

    def _limit_s(self, spec: RewardSpec) -> float:
        if spec.time_budget_s is not None:
            return float(spec.time_budget_s(self.reward_options.get(spec.name, {})))
        return self.timeout_s

    # -- public API -------------------------------------------------------------------------
    def score(
        self,
        data_sources: Sequence[str],
        completions: Sequence[str],
        ground_truths: Sequence[str],
        styles: Sequence[str | None] | None = None,
    ) -> ScoreResult:
        n = len(completions)
        if not (len(data_sources) == n == len(ground_truths)) or (styles is not None and len(styles) != n):
            raise ValueError(
                f"score(): lengths differ: data_sources {len(data_sources)}, completions {n}, "
                f"ground_truths {len(ground_truths)}, styles {None if styles is None else len(styles)}"
            )
        specs = [get_reward_fn(ds, None if styles is None else styles[i], self.routes) for i, ds in enumerate(data_sources)]
        res = ScoreResult(scores=[0.0] * n, reward_names=[s.name for s in specs], reasons=[None] * n)
        sandboxed: list[int] = []
        for i, spec in enumerate(specs):
            if spec.sandboxed:
                sandboxed.append(i)
            else:
                self._score_inline(spec, completions[i], ground_truths[i], i, res)
        if sandboxed:
            self._score_in_workers(sandboxed, specs, completions, ground_truths, res)
        self.stats.scored += n
        self.stats.timeouts += res.n_timeouts
        self.stats.errors += res.n_errors
        for s in specs:
            self.stats.by_reward[s.name] = self.stats.by_reward.get(s.name, 0) + 1
        for r, c in res.reason_counts().items():
            self.stats.reasons[r] = self.stats.reasons.get(r, 0) + c
        return res

    def start(self) -> None:
        """Start the workers now and wait until each has imported its rewards (otherwise the
        first sandboxed batch pays that start-up)."""
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        deadline = time.monotonic() + self.startup_timeout_s
        while not all(w.ready for w in self._workers):
            waiting = [w.conn for w in self._workers if not w.ready]
            for conn in wait(waiting, timeout=max(0.0, deadline - time.monotonic())):
                w = next(w for w in self._workers if w.conn is conn)
                try:
                    kind, _ = conn.recv()
                except (EOFError, OSError):
                    raise RuntimeError("a reward worker died while starting; see its stderr above") from None
                w.ready = kind == "ready"
            if time.monotonic() > deadline:
                raise RuntimeError(f"reward workers did not start within {self.startup_timeout_s:.0f} s")

    def score_one(self, data_source: str, completion: str, ground_truth: str, style: str | None = None) -> float:
        return self.score([data_source], [completion], [ground_truth], None if style is None else [style]).scores[0]

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=5)
            w.conn.close()
        self._workers = []

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- internals --------------------------------------------------------------------------
    @staticmethod
    def _record(res: ScoreResult, i: int, value, reason: str | None = None) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            res.scores[i] = float(value)
            res.reasons[i] = reason
        else:
            res.n_errors += 1
            res.reasons[i] = "reward_error"

    def _score_inline(self, spec: RewardSpec, completion, ground_truth, i: int, res: ScoreResult) -> None:
        if not isinstance(completion, str) or not isinstance(ground_truth, str):
            res.n_errors += 1
            res.reasons[i] = "reward_error"
            return
        try:
            self._record(res, i, *_reward_and_reason(spec.fn(completion, ground_truth)))
        except Exception:
            res.n_errors += 1
            res.reasons[i] = "reward_error"

    def _modules(self) -> list[str]:
        from steer_megatron.rewards import registry

        registry._ensure_builtins()
        return sorted({s.fn.__module__ for s in registry._REWARDS.values() if s.sandboxed})

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self._modules(), self.reward_options)

    def _score_in_workers(self, idx: list[int], specs, completions, ground_truths, res: ScoreResult) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        pending = [i for i in idx if isinstance(completions[i], str) and isinstance(ground_truths[i], str)]
        res.n_errors += len(idx) - len(pending)
        for i in set(idx) - set(pending):
            res.reasons[i] = "reward_error"
        pending.reverse()  # pop() from the end keeps the original order
        busy = 0
        started = time.monotonic()
        while pending or busy:
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    i = pending.pop()
                    w.conn.send((specs[i].name, completions[i], ground_truths[i]))
                    w.task, w.deadline = i, time.monotonic() + self._limit_s(specs[i])
                    busy += 1
            if not any(w.ready for w in self._workers) and now - started > self.startup_timeout_s:
                raise RuntimeError(f"reward workers did not start within {self.startup_timeout_s:.0f} s")
            deadline = min((w.deadline for w in self._workers if w.task is not None), default=now + 1.0)
            ready = wait([w.conn for w in self._workers], timeout=max(0.0, deadline - time.monotonic()))
            for k, w in enumerate(self._workers):
                if w.conn in ready:
                    try:
                        kind, payload = w.conn.recv()
                    except (EOFError, OSError):  # the worker died (e.g. out of memory)
                        if w.task is not None:
                            res.n_errors += 1
                            res.reasons[w.task] = "reward_error"
                            w.task = None
                            busy -= 1
                        self._replace(k)
                        continue
                    if kind == "ready":
                        w.ready = True
                        started = time.monotonic()
                    elif kind == "ok":
                        self._record(res, w.task, *payload)
                        w.task, w.deadline = None, math.inf
                        busy -= 1
                    else:
                        res.n_errors += 1
                        res.reasons[w.task] = "reward_error"
                        w.task, w.deadline = None, math.inf
                        busy -= 1
                elif w.task is not None and time.monotonic() >= w.deadline:
                    res.n_timeouts += 1
                    res.reasons[w.task] = "reward_timeout"
                    busy -= 1
                    self._replace(k)

    def _replace(self, k: int) -> None:
        self._workers[k].kill()
        self._workers[k] = self._spawn()
        self.stats.worker_restarts += 1
