"""The `code` reward: extract a program from a response, run it against the row's tests in the
sandbox (steer_megatron.rewards.sandbox), score 1 when every test passes.

Ground truth (`reward_model.ground_truth`, a dict or its JSON string), three layouts:
  stdin/stdout  {"inputs": [str, ...], "outputs": [str, ...]}           (LiveCodeBench, TACO, ArcherCodeR)
                or a list of {"input": str, "output": str}              (one dict per test)
  call-based    the same plus "fn_name": the function (or Solution method) each input's
                arguments are passed to; an input is a list of arguments or LiveCodeBench's
                one-JSON-value-per-line string, an output the JSON value returned
  script        {"test": str | [assert, ...], "entry_point": str, "prefix"?: str}  (HumanEval, MBPP):
                runs prefix + program + test (+ `check(entry_point)` when the test defines check);
                passes when it exits 0
A 0 carries its reason: no_code, syntax_error, wrong_answer, runtime_error, timeout, memory,
output_limit, sandbox_error, bad_ground_truth.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from steer_megatron.rewards.registry import register_reward
from steer_megatron.rewards.sandbox import SandboxSettings, resolve_isolation, run_tests

REASONS = ("pass", "partial", "no_code", "syntax_error", "wrong_answer", "runtime_error", "timeout", "memory",
           "output_limit", "sandbox_error", "bad_ground_truth")
EXTRACT_MODES = ("last_block", "first_block", "whole", "last_block_or_whole")
# A response's program is refused (no_code) beyond this: no judge needs a megabyte of source.
MAX_PROGRAM_CHARS = 100_000

# A fenced block: ``` or ```python (any info string), up to the next closing fence. An
# unterminated block at the end (a truncated response) is not taken.
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
_NOT_PYTHON = {"text", "txt", "output", "console", "bash", "sh", "shell", "json", "plaintext", "cpp", "c", "java",
               "c++", "javascript", "js", "go", "rust", "markdown", "md", "input"}


@dataclass(frozen=True)
class CodeRewardSettings:
    extract: str = "last_block"  # last_block | first_block | whole | last_block_or_whole
    partial_credit: bool = False  # reward = passed / tests (and every test runs) instead of all-or-nothing
    sandbox: SandboxSettings = SandboxSettings()

    def __post_init__(self) -> None:
        if self.extract not in EXTRACT_MODES:
            raise ValueError(f"code reward extract={self.extract!r}: must be one of {EXTRACT_MODES}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "CodeRewardSettings":
        """From a flat mapping (the config's reward.code): sandbox limits and the reward's own keys."""
        own = {f.name for f in fields(cls)} - {"sandbox"}
        box = {f.name for f in fields(SandboxSettings)}
        unknown = set(options) - own - box
        if unknown:
            raise ValueError(f"reward.code: unknown key(s) {sorted(unknown)}; known: {sorted(own | box)}")
        sb = {k: (tuple(v) if k == "extra_binds" else v) for k, v in options.items() if k in box}
        return cls(**{k: v for k, v in options.items() if k in own}, sandbox=SandboxSettings(**sb))


@dataclass(frozen=True)
class CodeScore:
    reward: float
    reason: str  # "pass", or why the reward is below 1 (the first failing test's reason)
    passed: int = 0
    total: int = 0
    detail: str = ""

    def __float__(self) -> float:
        return self.reward


# -- extraction -------------------------------------------------------------------------------------
def extract_program(response: str, mode: str = "last_block") -> str | None:
    """The program in a response, or None. Blocks tagged as another language are skipped."""
    if not isinstance(response, str):
        return None
    text = response.split("</think>")[-1]  # reasoning models: the answer follows the thinking
    if mode == "whole":
        code = text
    else:
        blocks = [m.group(2) for m in _FENCE.finditer(text) if m.group(1).lower() not in _NOT_PYTHON]
        if blocks:
            code = blocks[0] if mode == "first_block" else blocks[-1]
        elif mode == "last_block_or_whole":
            code = text
        else:
            return None
    code = code.strip("\n")
    if not code.strip() or len(code) > MAX_PROGRAM_CHARS:
        return None
    return code


# -- ground truth -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TestSpec:
    mode: str  # stdio | call | script
    tests: list
    fn_name: str | None = None
    test_code: str = ""
    entry_point: str | None = None
    prefix: str = ""


def _as_args(x) -> list:
    if isinstance(x, str):  # LiveCodeBench functional: one JSON value per line
        return [json.loads(line) for line in x.splitlines() if line.strip()]
    if isinstance(x, list):
        return x
    raise ValueError(f"a call-based input must be a list of arguments or JSON lines, got {type(x).__name__}")


def parse_ground_truth(gt) -> TestSpec:
    """The tests of a row (see the module docstring). Raises ValueError naming what is wrong."""
    if isinstance(gt, (bytes, str)):
        try:
            gt = json.loads(gt)
        except ValueError as exc:
            raise ValueError(f"ground_truth is not JSON: {exc}") from None
    if isinstance(gt, list):  # [{"input", "output", "testtype"?, "metadata"?}]
        if not gt or not all(isinstance(t, Mapping) and "input" in t and "output" in t for t in gt):
            raise ValueError("ground_truth list: expected [{'input': ..., 'output': ...}, ...]")
        fn = None
        meta = gt[0].get("metadata") or {}
        if gt[0].get("testtype") == "functional":
            meta = json.loads(meta) if isinstance(meta, str) else meta
            fn = meta.get("func_name")
            if not fn:
                raise ValueError("ground_truth: functional tests need metadata.func_name")
        gt = {"inputs": [t["input"] for t in gt], "outputs": [t["output"] for t in gt], "fn_name": fn}
    if not isinstance(gt, Mapping):
        raise ValueError(f"ground_truth: expected a dict or a list of tests, got {type(gt).__name__}")
    if "test" in gt or "test_list" in gt:
        test = gt.get("test", gt.get("test_list"))
        if isinstance(test, (list, tuple)):
            test = "\n".join(map(str, test))
        if not isinstance(test, str) or not test.strip():
            raise ValueError("ground_truth.test: expected test code (a string or a list of asserts)")
        ep = gt.get("entry_point")
        if ep is not None and not (isinstance(ep, str) and ep.isidentifier()):
            raise ValueError(f"ground_truth.entry_point: expected a function name, got {ep!r}")
        prefix = gt.get("prefix", gt.get("test_setup_code", "")) or ""
        return TestSpec("script", [{"input": ""}], test_code=test, entry_point=ep, prefix=prefix)
    ins, outs = gt.get("inputs"), gt.get("outputs")
    if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs) or not ins:
        raise ValueError("ground_truth: expected equally long non-empty 'inputs' and 'outputs' lists "
                         "(stdin/stdout tests) or 'test' + 'entry_point' (function tests)")
    fn = gt.get("fn_name")
    if fn:
        if not isinstance(fn, str) or not fn.isidentifier():
            raise ValueError(f"ground_truth.fn_name: expected a function name, got {fn!r}")
        tests = []
        for i, o in zip(ins, outs):
            want = json.loads(o) if isinstance(o, str) else o
            tests.append({"input": json.dumps(_as_args(i)), "output": want})
        return TestSpec("call", tests, fn_name=fn)
    if not all(isinstance(x, str) for x in ins + outs):
        raise ValueError("ground_truth: stdin/stdout tests need string inputs and outputs")
    return TestSpec("stdio", [{"input": i, "output": o} for i, o in zip(ins, outs)])


def _call_harness(fn: str) -> str:
    # Appended to the program: call the function (or a LeetCode-style Solution method) on the
    # JSON arguments from stdin and print the JSON result on the last line.
    return (
        "\n\nimport json as _sj, sys as _ss\n"
        f"_sf = globals().get({fn!r})\n"
        f"if _sf is None and 'Solution' in globals(): _sf = getattr(Solution(), {fn!r})\n"
        "_sr = _sf(*_sj.loads(_ss.stdin.read()))\n"
        "print(); print(_sj.dumps(_sr, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else list(o)))\n"
    )


def build_source(program: str, spec: TestSpec) -> str:
    if spec.mode == "call":
        return program + _call_harness(spec.fn_name)
    if spec.mode == "script":
        run = ""
        if spec.entry_point and re.search(r"^def check\s*\(", spec.test_code, re.M):
            run = f"\n\ncheck({spec.entry_point})\n"
        return f"{spec.prefix}\n{program}\n\n{spec.test_code}{run}"
    return program


# -- scoring ----------------------------------------------------------------------------------------
_settings = CodeRewardSettings()
_isolated: dict[SandboxSettings, bool] = {}


def configure(options: Mapping[str, Any]) -> None:
    """Set this process's code reward settings from reward.code (the scorer calls it in workers)."""
    global _settings
    _settings = CodeRewardSettings.from_options(options)


def preflight(options: Mapping[str, Any]) -> None:
    """Refuse to start when the sandbox is unavailable (and the fallback not allowed)."""
    resolve_isolation(CodeRewardSettings.from_options(options).sandbox)


def time_budget_s(options: Mapping[str, Any]) -> float:
    """The hard limit the scorer applies to one code reward call: the program budget plus the
    judge's grace, plus a few seconds for the isolation probe on a worker's first call."""
    from steer_megatron.rewards.sandbox import JUDGE_GRACE_S

    return CodeRewardSettings.from_options(options).sandbox.program_budget_s + JUDGE_GRACE_S + 15.0


def score_code(response_text: str, ground_truth, settings: CodeRewardSettings | None = None,
               **overrides) -> CodeScore:
    """Score one response against its tests. `ground_truth` is the row's reward_model.ground_truth
    (a dict or its JSON string). `overrides` replace fields of the settings (e.g. partial_credit)."""
    s = settings or _settings
    if overrides:
        s = replace(s, **overrides)
    try:
        spec = parse_ground_truth(ground_truth)
    except (ValueError, TypeError) as exc:
        return CodeScore(0.0, "bad_ground_truth", detail=str(exc)[:300])
    n = len(spec.tests)
    program = extract_program(response_text, s.extract)
    if program is None:
        return CodeScore(0.0, "no_code", total=n)
    try:
        ast.parse(program)  # parse only: no constant folding, bounded by the program's length
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return CodeScore(0.0, "syntax_error", total=n, detail=str(exc)[:300])
    if s.sandbox not in _isolated:
        _isolated[s.sandbox] = resolve_isolation(s.sandbox)
    report = run_tests(build_source(program, spec), spec.tests, spec.mode, s.sandbox,
                       isolate=_isolated[s.sandbox], stop_on_fail=not s.partial_credit)
    passed = sum(v == "pass" for v in report.verdicts)
    failed = [(v, d) for v, d in zip(report.verdicts, report.details) if v != "pass"]
    if passed == n and not failed:
        return CodeScore(1.0, "pass", passed, n)
    reason, detail = failed[0] if failed else ("wrong_answer", "")
    reward = passed / n if s.partial_credit else 0.0
    return CodeScore(reward, reason, passed, n, detail[:300])


@register_reward("code", sandboxed=True, configure=configure, preflight=preflight, time_budget_s=time_budget_s)
def code_reward(completion: str, ground_truth: str) -> CodeScore:
    return score_code(completion, ground_truth)
