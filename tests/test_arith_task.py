"""steer_megatron.data.arith_task: every answer is the exact value of its problem (recomputed
independently from the text), rows route to the integer reward, and an 'Answer:' reply scores."""
from __future__ import annotations

import re

from steer_megatron.data.arith_task import INSTRUCTION, make_rows
from steer_megatron.rewards import get_reward_fn


def _recompute(question: str) -> int:
    m = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)(?: ([-+]) (\d+))?\?", question)
    if m:
        a, op, b, op2, c = m.groups()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        return value if op2 is None else value + (int(c) if op2 == "+" else -int(c))
    m = re.fullmatch(r"\w+ has (\d+) boxes with (\d+) \w+ in each box and gives away (\d+) \w+\. .*", question)
    boxes, per, given = map(int, m.groups())
    return boxes * per - given


def test_answers_levels_and_reward():
    rows = make_rows(200, seed=3, split="train")
    assert {r["extra_info"]["level"] for r in rows} == {1, 2, 3, 4, 5}
    for r in rows:
        text = r["prompt"][0]["content"]
        assert text.endswith(INSTRUCTION)
        truth = int(r["reward_model"]["ground_truth"])
        assert _recompute(text[: -len(INSTRUCTION) - 1]) == truth and truth >= 0
    fn = get_reward_fn(rows[0]["data_source"], "rule").fn
    gt = rows[0]["reward_model"]["ground_truth"]
    assert fn(f"Let me add.\nAnswer: {gt}", gt) == 1.0 and fn(f"Answer: {int(gt) + 1}", gt) == 0.0
    assert make_rows(10, seed=3, split="test") != make_rows(10, seed=3, split="train")
    assert make_rows(10, seed=3, split="test") == make_rows(10, seed=3, split="test")
