"""The DAPO scorers against verl's math_dapo (loaded from the verl 0.9.1 wheel), and reward routes."""
import random

import pyarrow.parquet as pq
import pytest

from steer_megatron.rewards import RewardScorer, get_reward_fn, reward_by_name
from tests.verl_reference import load

DAPO = "/work/shared/datasets/DAPO-Math-17k.parquet"

COMPLETIONS = [
    "so the answer is \\boxed{34}", "\\boxed{34}.", "\\boxed{ 34 }", "\\boxed{34} and then \\boxed{35}",
    "\\boxed{\\frac{1}{2}}", "\\boxed{\\frac12}", "\\boxed{unbalanced", "no answer", "",
    "Answer: 34", "answer : 34 cm", "Answer: $34$.", "Answer: \\frac12", "Answer: 1,000", "Answer: 35\nAnswer: 34",
    "Answer: x = 34", "Answer: \\boxed{34}", "Answer: \\text{34}", "Answer: 34 degrees", "Answer: 34^\\circ",
    "x" * 400 + "\\boxed{34}", "\\boxed{34}" + "x" * 95, "\\boxed{34}" + "x" * 400 + "Answer: 34",
]
TRUTHS = ["34", "\\frac{1}{2}", "1000", "1,000"]


def _cases():
    rng = random.Random(0)
    rows = pq.read_table(DAPO, columns=["reward_model"]).to_pylist()
    real = [r["reward_model"]["ground_truth"] for r in rng.sample(rows, 40)]
    out = [(c, t) for c in COMPLETIONS for t in TRUTHS]
    for gt in real:  # the data's own answers, boxed / on an Answer line, right and wrong
        out += [(f"work\n\\boxed{{{gt}}}", gt), (f"Answer: {gt}", gt), (f"\\boxed{{{gt}1}}", gt), (f"Answer: ${gt}$", gt)]
    return out


def test_strict_box_equals_the_release_default():
    """The STEER release calls math_dapo.compute_score(solution, ground_truth) with its default
    strict_box_verify=True; verl 0.9.1's strict-box branch scores identically (only the pred it
    reports for a missing box differs)."""
    verl = load().math_dapo
    fn = reward_by_name("dapo_strict_box").fn
    cases = _cases()
    got = [fn(c, t) for c, t in cases]
    want = [verl.compute_score(c, t, strict_box_verify=True)["score"] for c, t in cases]
    assert got == want
    assert 0.1 < got.count(1.0) / len(got) < 0.9


def test_answer_line_equals_minerva_rule():
    verl = load().math_dapo
    fn = reward_by_name("dapo_answer").fn
    cases = _cases()
    got = [fn(c, t) for c, t in cases]
    want = [1.0 if verl.is_correct_minerva(c[-300:], t)[0] else -1.0 for c, t in cases]
    assert got == want
    assert 0.1 < got.count(1.0) / len(got) < 0.9


def test_routes_pick_the_dapo_scorer_for_dapo_data_only():
    routes = {"math_dapo": "dapo_strict_box"}
    assert get_reward_fn("math_dapo", "rule", routes).name == "dapo_strict_box"
    assert get_reward_fn("math_dapo", "rule").name == "math"
    assert get_reward_fn("aime_2024_dapo_boxed", "rule", routes).name == "math"
    with RewardScorer(num_workers=1, routes=routes) as scorer:  # inline scorer: no worker starts
        res = scorer.score(["math_dapo"] * 3, ["\\boxed{7}", "\\boxed{8}", "Answer: 7"], ["7"] * 3)
    assert res.scores == [1.0, -1.0, -1.0] and res.reward_names == ["dapo_strict_box"] * 3
