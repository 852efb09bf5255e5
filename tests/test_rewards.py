"""Rewards: answer extraction, math equivalence on real formats, junk, time limit, real data."""
from __future__ import annotations

import random
import time

import pyarrow.parquet as pq
import pytest

from steer_megatron.rewards import (
    RewardScorer,
    extract_final_answer,
    get_reward_fn,
    register_data_source,
    register_reward,
)
from steer_megatron.rewards.registry import reward_by_name

DATASETS = "/work/shared/datasets"


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(timeout_s=3.0, num_workers=2) as s:
        yield s


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} first, then \\boxed{\\sqrt{2}}", "\\sqrt{2}"),  # the last box counts
        ("nested \\boxed{\\left\\{1,\\frac{2}{3}\\right\\}}", "\\left\\{1,\\frac{2}{3}\\right\\}"),
        ("work...\nAnswer: 42", "42"),
        ("Answer: $\\dfrac{3}{4}$.", "\\dfrac{3}{4}"),
        ("**Answer:** 7", "7"),
        ("\\boxed{3}\nAnswer: 5", "5"),  # the later form is the final word
        ("Answer: 5\nso \\boxed{6}", "6"),
        ("\\boxed 9", "9"),
        ("\\boxed{unbalanced", None),
        ("no answer here", None),
        ("", None),
        ("Answer: " + "1" * 5000, None),  # absurdly long answers are refused
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


# (ground truth, completion, expected reward): formats seen in the benchmark parquets.
FORMAT_TABLE = [
    ("\\frac{1}{2}", "\\boxed{0.5}", 1.0),
    ("\\frac{1}{2}", "Answer: 1/2", 1.0),
    ("\\frac{1}{2}", "Answer: $\\dfrac{1}{2}$", 1.0),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", 0.0),
    ("34", "Answer: 34", 1.0),
    ("34", "Answer: 35", 0.0),
    ("-3", "\\boxed{-3}", 1.0),
    ("-3", "\\boxed{3}", 0.0),
    ("5", "Answer: 5 cm", 1.0),
    ("5", "\\boxed{5\\text{ cm}}", 1.0),
    ("(1,2]", "\\boxed{(1, 2]}", 1.0),
    ("(1,2]", "\\boxed{[1,2]}", 0.0),
    ("[-2,7]", "Answer: [-2, 7]", 1.0),
    ("\\{1,2\\}", "\\boxed{\\{2,1\\}}", 1.0),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", 1.0),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{2}}", 0.0),
    ("\\frac{1}{2 n+2}", "\\boxed{\\frac{1}{2(n+1)}}", 1.0),
    ("4.5e33", "\\boxed{4.5\\times 10^{33}}", 1.0),
    ("4.5e33", "\\boxed{4.5\\times 10^{32}}", 0.0),
    ("\\text{(C)}", "Answer: \\text{(C)}", 1.0),
    ("10", "\\boxed{10^{100000}}", 0.0),
]


def test_answer_format_table(scorer):
    gts = [g for g, _, _ in FORMAT_TABLE]
    comps = [c for _, c, _ in FORMAT_TABLE]
    res = scorer.score(["math500"] * len(gts), comps, gts)
    got = {(g, c): s for g, c, s in zip(gts, comps, res.scores)}
    want = {(g, c): e for g, c, e in FORMAT_TABLE}
    assert got == want
    assert res.n_timeouts == 0 and res.n_errors == 0


JUNK = [
    "",
    "\\boxed{",
    "\\boxed{}}}}{{{",
    "Answer: \\frac{",
    "Answer: }{\\left(",
    "\\boxed{\\begin{matrix} 1 & \\end{pmatrix}}",
    "Answer: 10^{100000}",
    "\\x00\\xff" * 100,
    "\\boxed{" + "(" * 400 + "}",
    "a" * 200_000,
]


def test_junk_scores_zero_without_error(scorer):
    res = scorer.score(["aime24"] * len(JUNK), JUNK, ["42"] * len(JUNK))
    assert res.scores == [0.0] * len(JUNK)


def test_non_string_inputs_score_zero_and_are_counted(scorer):
    res = scorer.score(["math500", "synthetic_sort"], [None, 12], ["1", "12"])
    assert res.scores == [0.0, 0.0] and res.n_errors == 2


def test_time_limit_holds_on_pathological_input():
    # Evaluating a power tower makes sympy run far past the limit (math-verify's own default
    # limit is 5 s and, being SIGALRM-based, would not even fire off the main thread).
    tower = ["Answer: 9^{9^{9^{9}}}", "\\boxed{10^{10^{10^{10}}}}"]
    with RewardScorer(timeout_s=1.0, num_workers=2) as s:
        s.start()  # both workers imported and warm
        t0 = time.monotonic()
        res = s.score(["math500"] * 2, tower, ["1", "1"])
        elapsed = time.monotonic() - t0
        assert res.scores == [0.0, 0.0] and res.n_timeouts == 2
        # both run in parallel on the two workers; killing them takes well under a second
        assert 1.0 <= elapsed < 1.0 + 2.0
        assert s.stats.worker_restarts == 2
        # the replacement workers serve the next call
        assert s.score(["math500"] * 2, ["\\boxed{3}", "Answer: 0.5"], ["3", "\\frac12"]).scores == [1.0, 1.0]


def test_registry_routes_and_errors():
    assert get_reward_fn("aime_2024_dapo_boxed").name == "math"
    assert get_reward_fn("math_dapo").name == "math"
    assert get_reward_fn("synthetic_sort").name == "integer"
    assert get_reward_fn("my_new_source", "rule-lighteval/MATH_v2").name == "math"  # style fallback
    with pytest.raises(KeyError, match="my_new_source"):
        get_reward_fn("my_new_source", "llm_judge")


def test_custom_reward_registration_runs_inline():
    @register_reward("test_len_parity", sandboxed=False)
    def parity(completion: str, ground_truth: str) -> float:
        return float(len(completion) % 2 == int(ground_truth))

    register_data_source("test_parity_source", "test_len_parity")
    with RewardScorer(timeout_s=1.0, num_workers=1) as s:
        res = s.score(["test_parity_source"] * 2, ["ab", "abc"], ["0", "0"])
    assert res.scores == [1.0, 0.0]
    assert not s._workers  # inline rewards never start a worker process


def test_integer_reward():
    fn = get_reward_fn("synthetic_sort").fn
    assert fn("37 + 48 = 85\nAnswer: 85", "85") == 1.0
    assert fn("Answer: 1,085", "1085") == 1.0
    assert fn("Answer: 86", "85") == 0.0
    assert fn("Answer: 85.0", "85") == 0.0
    assert fn("Answer: 9" * 10_000, "85") == 0.0


def test_last_integer_reward_and_route():
    fn = reward_by_name("last_integer").fn
    assert fn("7 + 6 is 13.", "13") == 1.0  # no answer line: the reply's last integer
    assert fn("13, or rather 1,300", "1300") == 1.0
    assert fn("-5", "-5") == 1.0 and fn("x = 5", "-5") == 0.0
    assert fn("Answer: 12\nor 13", "13") == 0.0  # an answer line wins over later numbers
    assert fn("Answer: 13", "13") == 1.0 and fn("no number", "1") == 0.0
    with RewardScorer(timeout_s=1.0, num_workers=1, routes={"synthetic_arith": "last_integer"}) as s:
        assert s.score(["synthetic_arith", "synthetic_sort"], ["it is 9", "it is 9"], ["9", "9"]).scores == [1.0, 0.0]


def _rows(path: str, n: int, seed: int) -> list[dict]:
    table = pq.read_table(path, columns=["data_source", "reward_model"])
    idx = random.Random(seed).sample(range(table.num_rows), n)
    return table.take(idx).to_pylist()


@pytest.mark.parametrize("name, n", [("DAPO-Math-17k", 60), ("math500", 60)])
def test_real_data_ground_truth_scores_one_and_wrong_zero(scorer, name, n):
    rows = _rows(f"{DATASETS}/{name}.parquet", n, seed=0)
    srcs, comps, gts, want = [], [], [], []
    for k, r in enumerate(rows):
        gt = r["reward_model"]["ground_truth"]
        other = rows[(k + 1) % len(rows)]["reward_model"]["ground_truth"]
        cases = [(f"Let me think.\nThe final answer follows.\nAnswer: {gt}", 1.0), (f"So \\boxed{{{gt}}}", 1.0),
                 ("I do not know.", 0.0)]
        if other.replace(" ", "") != gt.replace(" ", ""):
            cases.append((f"Answer: {other}", 0.0))
        for c, w in cases:
            srcs.append(r["data_source"]); comps.append(c); gts.append(gt); want.append(w)
    res = scorer.score(srcs, comps, gts)
    bad = [(g, c, s) for g, c, s, w in zip(gts, comps, res.scores, want) if s != w]
    assert not bad, f"{len(bad)} mismatches, e.g. {bad[:5]}"
