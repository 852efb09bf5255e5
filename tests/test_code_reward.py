"""The code reward: extraction, ground-truth layouts, verdicts, reasons through the scorer, its
own time budget, the refusal without isolation, config checks.

These run real programs. Where the isolated sandbox is unavailable they run in the unisolated
fallback (they are well-behaved programs); the hostile corpus is tests/test_sandbox_hostile.py.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from steer_megatron.config import ConfigError, load_config
from steer_megatron.rewards import (
    CodeRewardSettings,
    RewardScorer,
    SandboxSettings,
    SandboxUnavailable,
    get_reward_fn,
    score_code,
)
from steer_megatron.rewards import code_reward, sandbox
from steer_megatron.rewards.code_reward import extract_program, parse_ground_truth
from steer_megatron.data.rl_dataset import _check_row

SB = SandboxSettings(timeout_s=2.0, program_budget_s=20.0, memory_mb=512, allow_unisolated=True)
S = CodeRewardSettings(sandbox=SB)
ADD = {"inputs": ["1 2\n", "10 -3\n"], "outputs": ["3\n", "7\n"]}


def fenced(code: str, lang: str = "python") -> str:
    return f"Here is my solution.\n```{lang}\n{code}\n```\nDone."


@pytest.mark.parametrize("text, mode, expected", [
    (fenced("print(1)"), "last_block", "print(1)"),
    ("```python\nprint(1)\n```\nthen\n```python\nprint(2)\n```", "last_block", "print(2)"),
    ("```python\nprint(1)\n```\nthen\n```python\nprint(2)\n```", "first_block", "print(1)"),
    ("```python\nprint(1)\n```\nsample output:\n```text\n1\n```", "last_block", "print(1)"),  # not code
    ("```\nprint(3)\n```", "last_block", "print(3)"),  # untagged block
    ("<think>```python\nprint(0)\n```</think>\n```py\nprint(4)\n```", "first_block", "print(4)"),
    ("print(5)", "last_block", None),
    ("print(5)", "last_block_or_whole", "print(5)"),
    ("print(5)", "whole", "print(5)"),
    ("```python\nprint(6)\n", "last_block", None),  # truncated: an unterminated block is not taken
    ("", "whole", None),
])
def test_extract_program(text, mode, expected):
    assert extract_program(text, mode) == expected


def test_ground_truth_layouts():
    assert parse_ground_truth(json.dumps(ADD)).mode == "stdio"
    assert parse_ground_truth(ADD).tests == [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -3\n", "output": "7\n"}]
    lst = [{"input": "1\n2", "output": "3", "testtype": "functional", "metadata": {"func_name": "add"}}]
    spec = parse_ground_truth(json.dumps(lst))
    assert (spec.mode, spec.fn_name, spec.tests) == ("call", "add", [{"input": "[1, 2]", "output": 3}])
    spec = parse_ground_truth({"inputs": [[1, 2]], "outputs": [[3]], "fn_name": "add"})
    assert spec.tests == [{"input": "[1, 2]", "output": [3]}]
    spec = parse_ground_truth({"test": ["assert f(1) == 2"], "entry_point": "f"})
    assert (spec.mode, spec.test_code) == ("script", "assert f(1) == 2")
    for bad, words in [("not json", "not JSON"), ({"inputs": ["1"], "outputs": []}, "equally long"),
                       ({"test": ""}, "ground_truth.test"), ({"inputs": ["1"], "outputs": ["1"], "fn_name": "a b"}, "fn_name"),
                       (7, "expected a dict")]:
        with pytest.raises(ValueError, match=words):
            parse_ground_truth(bad)


# (response, ground truth, expected (reward, reason)); ground truths in each layout.
ADD_SRC = "a, b = map(int, input().split())\nprint(a + b)"
CASES = [
    (fenced(ADD_SRC), ADD, (1.0, "pass")),
    (fenced("a, b = map(int, input().split())\nprint(a - b)"), ADD, (0.0, "wrong_answer")),
    (fenced("print(int(input().split()[0]) // 0)"), ADD, (0.0, "runtime_error")),
    (fenced("print(1"), ADD, (0.0, "syntax_error")),
    ("I cannot solve this.", ADD, (0.0, "no_code")),
    (fenced(ADD_SRC), {"inputs": ["1 2"]}, (0.0, "bad_ground_truth")),
    # output comparison: trailing spaces / blank lines ignored, floats within float_tol
    (fenced("print(' 3  ')\nprint()\nprint()"), {"inputs": [""], "outputs": ["3"]}, (1.0, "pass")),
    (fenced("print(1/3)"), {"inputs": [""], "outputs": ["0.333333333"]}, (1.0, "pass")),
    (fenced("print(0.34)"), {"inputs": [""], "outputs": ["0.333333333"]}, (0.0, "wrong_answer")),
    (fenced("print('3 4')"), {"inputs": [""], "outputs": ["34"]}, (0.0, "wrong_answer")),
    (fenced("exit(0)\nprint(1)"), {"inputs": [""], "outputs": [""]}, (1.0, "pass")),  # exit() as with site
    (fenced("import os, tempfile\nopen(os.devnull, 'w').write('x')\nwith tempfile.TemporaryFile() as f:\n"
            "    f.write(b'1')\n    f.seek(0)\n    print(f.read().decode())"), {"inputs": [""], "outputs": ["1"]}, (1.0, "pass")),
    # call-based: a function, a LeetCode Solution method, LiveCodeBench functional tests
    (fenced("def add(a, b):\n    return a + b"), {"inputs": [[1, 2], [3, 4]], "outputs": [3, 7], "fn_name": "add"}, (1.0, "pass")),
    (fenced("class Solution:\n    def add(self, a, b):\n        return [a, b]"),
     {"inputs": [[1, 2]], "outputs": [[[1, 2]]], "fn_name": "add"}, (1.0, "pass")),
    (fenced("def add(a, b):\n    return a * b"), {"inputs": [[1, 2]], "outputs": [3], "fn_name": "add"}, (0.0, "wrong_answer")),
    (fenced("def add(a, b):\n    return a + b"),
     [{"input": "1\n2", "output": "3", "testtype": "functional", "metadata": '{"func_name": "add"}'}], (1.0, "pass")),
    # script: HumanEval check(candidate), MBPP assert list
    (fenced("def inc(x):\n    return x + 1"), {"test": "def check(candidate):\n    assert candidate(1) == 2\n", "entry_point": "inc"}, (1.0, "pass")),
    (fenced("def inc(x):\n    return x"), {"test": "def check(candidate):\n    assert candidate(1) == 2\n", "entry_point": "inc"}, (0.0, "wrong_answer")),
    (fenced("def inc(x):\n    return x + 1"), {"test_list": ["assert inc(1) == 2", "assert inc(-1) == 0"]}, (1.0, "pass")),
    (fenced("def inc(x):\n    raise ValueError"), {"test_list": ["assert inc(1) == 2"]}, (0.0, "runtime_error")),
]


def test_verdicts_and_reasons():
    got = [score_code(r, g if isinstance(g, (str, list)) else json.dumps(g), settings=S) for r, g, _ in CASES]
    assert [(x.reward, x.reason) for x in got] == [e for _, _, e in CASES]


def test_partial_credit_and_all_or_nothing():
    gt = {"inputs": ["1\n", "2\n", "3\n"], "outputs": ["1\n", "4\n", "10\n"]}
    src = fenced("x = int(input())\nprint(x * x)")  # right on 1 and 2, wrong on 3
    full = score_code(src, gt, settings=S)
    part = score_code(src, gt, settings=S, partial_credit=True)
    assert (full.reward, full.reason, full.passed) == (0.0, "wrong_answer", 2)
    assert (part.reward, part.reason, part.passed, part.total) == (pytest.approx(2 / 3), "wrong_answer", 2, 3)


def test_routes_to_the_code_reward():
    for ds in ("livecodebench", "humaneval", "taco_verified", "archer_code"):
        assert get_reward_fn(ds).name == "code"
    assert get_reward_fn("some_code_set", "code").name == "code"
    assert get_reward_fn("math500").name == "math"


def test_refuses_to_start_without_isolation_unless_allowed(monkeypatch):
    fake = sandbox.IsolationReport(False, "no namespaces in this test", {})
    monkeypatch.setattr(sandbox, "probe_isolation", lambda s: fake)
    strict = SandboxSettings(timeout_s=2.0, uid_base=1_500_000_000)
    with pytest.raises(SandboxUnavailable, match="allow_unisolated=true"):
        score_code(fenced(ADD_SRC), ADD, settings=CodeRewardSettings(sandbox=strict))
    with pytest.raises(SandboxUnavailable, match="no namespaces"):
        code_reward.preflight({"uid_base": 1_500_000_000})
    # Allowed: the program runs with limits only (outside any PID namespace), and is still scored.
    # As root the fallback still drops to the sandbox uid, which needs an interpreter it can reach.
    python = _interpreter_for_any_user()
    if python is None:
        pytest.skip("no interpreter outside root-only directories for the unisolated fallback")
    loose = CodeRewardSettings(sandbox=SandboxSettings(timeout_s=2.0, uid_base=1_500_000_000, allow_unisolated=True,
                                                       python=python))
    assert score_code(fenced(ADD_SRC), ADD, settings=loose).reason == "pass"
    pid_src = fenced("import os\nprint('ns' if os.getpid() == 1 else 'host')")
    assert score_code(pid_src, {"inputs": [""], "outputs": ["host"]}, settings=loose).reason == "pass"


def test_unisolated_fallback_still_bounds_time():
    python = _interpreter_for_any_user()
    if python is None:
        pytest.skip("no interpreter outside root-only directories for the unisolated fallback")
    sb = SandboxSettings(timeout_s=1.0, uid_base=1_800_000_000, allow_unisolated=True, python=python)
    code_reward._isolated[sb] = False  # as where namespaces are unavailable
    s = CodeRewardSettings(sandbox=sb)
    for src, reason in [("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)", "timeout"),
                        ("while True:\n    pass", "timeout"), ("print('x' * (64 << 20))", "output_limit"),
                        ("print('x')", "pass")]:
        t0 = time.monotonic()
        assert score_code(fenced(src), {"inputs": [""], "outputs": ["x"]}, settings=s).reason == reason
        assert time.monotonic() - t0 < sb.timeout_s + 4.0


def _interpreter_for_any_user() -> str | None:
    for exe in (SB.interpreter(), "/usr/bin/python3"):
        real = os.path.realpath(exe)
        dirs = [p for p in Path(real).parents]
        if os.path.exists(real) and all(os.stat(d).st_mode & 0o001 for d in dirs):
            return real
    return None


def test_scorer_reasons_own_budget_and_parallel_timeouts():
    # The general reward timeout (0.5 s) is shorter than a code test's (1.5 s): the code reward's
    # own budget applies, so the sleepers end as the code reward's "timeout", not the scorer's.
    opts = {"timeout_s": 1.5, "program_budget_s": 5.0, "memory_mb": 512, "allow_unisolated": True}
    sleeper = fenced("import time\ntime.sleep(30)")
    comps = [sleeper] * 4 + [fenced(ADD_SRC)] * 4 + ["\\boxed{2}"]
    sources = ["livecodebench"] * 8 + ["math500"]
    gts = [json.dumps(ADD)] * 8 + ["2"]
    with RewardScorer(timeout_s=0.5, num_workers=4, reward_options={"code": opts}) as scorer:
        scorer.start()
        scorer.score(["livecodebench"], [fenced(ADD_SRC)], [json.dumps(ADD)])  # each worker's first call probes
        t0 = time.monotonic()
        res = scorer.score(sources, comps, gts)
        wall = time.monotonic() - t0
        assert res.scores == [0.0] * 4 + [1.0] * 4 + [1.0]
        assert res.reasons == ["timeout"] * 4 + ["pass"] * 4 + [None]
        assert res.reason_counts() == {"timeout": 4, "pass": 4} and res.n_timeouts == 0
        assert scorer.stats.reasons["timeout"] == 4 and scorer.stats.worker_restarts == 0
        # 4 workers: the four 1.5 s timeouts overlap instead of queueing (serial would be > 6 s)
        assert wall < 2 * opts["timeout_s"] + 1.5


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown key"):
        CodeRewardSettings.from_options({"timeout": 3})
    with pytest.raises(ValueError, match="takes no options"):
        RewardScorer(reward_options={"math": {"x": 1}})
    with pytest.raises(ConfigError, match="reward.code: .*extract"):
        load_config(None, ["reward.code.extract=everything"])
    with pytest.raises(ConfigError, match="reward.code: .*memory_mb"):
        load_config(None, ["reward.code.memory_mb=8"])
    with pytest.raises(ConfigError, match="eval.benchmarks"):
        load_config(None, ["eval.benchmarks=[humaneval2]"])
    cfg = load_config(None, ["reward.code.timeout_s=3", "eval.benchmarks=[humaneval]"])
    assert cfg.reward.code.timeout_s == 3 and cfg.eval.benchmarks == ["humaneval"]


def test_parquet_rows_may_store_tests_as_a_struct():
    row = {"data_source": "taco", "prompt": [{"role": "user", "content": "x"}],
           "reward_model": {"ground_truth": {"inputs": ["1"], "outputs": ["1"]}, "style": "code"}}
    assert _check_row(row, "prompt") is None
    assert json.loads(row["reward_model"]["ground_truth"]) == {"inputs": ["1"], "outputs": ["1"]}


def test_coding_run_configs(monkeypatch, tmp_path):
    from steer_megatron.config import CONFIG_DIR, validate_config

    monkeypatch.setenv("STEER_CODE_DATA_DIR", str(tmp_path))
    grpo = load_config(CONFIG_DIR / "qwen2.5-coder-7b_grpo.yaml")
    steer = load_config(CONFIG_DIR / "qwen2.5-coder-7b_steer.yaml")
    for cfg in (grpo, steer):
        assert cfg.data.train_files == [f"{tmp_path}/archercoder_train.parquet"]
        assert cfg.eval.files == [f"{tmp_path}/livecodebench_v5.jsonl"] and cfg.eval.benchmarks == ["humaneval"]
        assert (cfg.data.max_response_len, cfg.rollout.max_new_tokens, cfg.eval.n) == (8192, 8192, 4)
        assert cfg.reward.code.timeout_s == 6.0 and not cfg.reward.code.allow_unisolated
        assert (cfg.trainer.rollout_batch_size, cfg.rollout.n, cfg.optim.lr) == (512, 8, 1e-6)
        # the data paths are the user's: training refuses to start while they do not exist
        with pytest.raises(ConfigError, match="does not exist"):
            validate_config(cfg, check_paths=True)
    assert grpo.algorithm.policy_loss == "grpo" and steer.algorithm.policy_loss == "steer"
    assert steer.algorithm.steer.w_min == 0.8


def test_eval_counts_a_code_sample_correct_only_when_it_passes():
    # The driver's evaluate with stand-ins for generation: partial credit (0.6) is not a solve.
    import types

    import torch

    from steer_megatron.rewards.scorer import ScoreResult
    from steer_megatron.train.driver import Driver

    d = Driver.__new__(Driver)
    d.cfg = types.SimpleNamespace(eval=types.SimpleNamespace(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8))
    d._sampling = lambda *a: None
    d.eval_sets = {"humaneval": [types.SimpleNamespace(index="a"), types.SimpleNamespace(index="b")]}
    sc = ScoreResult(scores=[1.0, 0.6, 0.0, 1.0], reward_names=["code"] * 4,
                     reasons=["pass", "wrong_answer", "no_code", "pass"])
    d._generate_and_score = lambda e, s, t: (None, torch.tensor(sc.scores).view(2, 2), sc)
    m = d.evaluate(1)
    assert (m["eval/humaneval/mean@2"], m["eval/humaneval/pass@2"]) == (0.5, 1.0)


def test_scorer_preflight_refuses_code_rows_without_a_sandbox(monkeypatch):
    fake = sandbox.IsolationReport(False, "no namespaces in this test", {})
    monkeypatch.setattr(sandbox, "probe_isolation", lambda s: fake)
    scorer = RewardScorer(reward_options={"code": {"uid_base": 1_700_000_000}})
    assert scorer.preflight(["math500", "synthetic_sort"]) == ["integer", "math"]  # no code rows: nothing probed
    with pytest.raises(SandboxUnavailable, match="allow_unisolated"):
        scorer.preflight(["math500", "livecodebench"])
    loose = RewardScorer(reward_options={"code": {"uid_base": 1_700_000_000, "allow_unisolated": True}})
    assert loose.preflight(["livecodebench"], ["code"]) == ["code"]


@pytest.mark.parametrize("got, want, same", [
    ("3\n", "3", True), ("1\n\n2\n", "1\n2", True), ("  1   2 \n", "1 2", True), ("1 2", "12", False),
    ("1\n2", "1\n3", False), ("", "1", False), ("0.3333333334", "0.333333333", True), ("1e-9", "0", True),
    ("nan", "nan", True), ("inf", "1e308", False), ("1000001", "1000000", True), ("1000002", "1000000", False),
])
def test_stdout_comparison(got, want, same):
    from steer_megatron.rewards._judge import stdout_matches

    assert stdout_matches(got, want, 1e-6) is same
