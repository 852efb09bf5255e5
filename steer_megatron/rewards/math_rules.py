"""Rule-based math rewards: 1.0 when the final answer equals the ground truth, else 0.0.

`math_reward` uses math-verify (sympy) and can take unbounded time on adversarial input
(e.g. `9^{9^{9^{9}}}`), so it is registered as sandboxed: the scorer runs it in a worker
process under a hard time limit. `integer_reward` is a bounded-time exact match for the
synthetic demo task and runs inline.
"""
from __future__ import annotations

import re

from steer_megatron.rewards.extract import extract_final_answer
from steer_megatron.rewards.registry import register_reward

# "4.5e33" is read by the LaTeX parser as 4.5 * e * 33; rewrite plain scientific notation first.
_SCI = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)[eE]([-+]?\d+)\s*$")


def _normalise(ans: str) -> str:
    m = _SCI.match(ans)
    if m:
        return f"{m.group(1)}\\times 10^{{{int(m.group(2))}}}"
    return ans.strip()


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s).strip("$")


@register_reward("math", sandboxed=True)
def math_reward(completion: str, ground_truth: str) -> float:
    answer = extract_final_answer(completion)
    if answer is None:
        return 0.0
    if _squash(answer) == _squash(ground_truth):  # the common case needs no sympy
        return 1.0
    # Imported here: workers pay the sympy import once, the parent process never does.
    from math_verify import parse, verify

    # Wrapping both in \boxed{} makes math-verify's extraction take exactly our string. Its
    # own signal-based timeouts are off (None): the scorer's process kill is the time limit.
    gold = parse("\\boxed{" + _normalise(ground_truth) + "}", parsing_timeout=None)
    pred = parse("\\boxed{" + _normalise(answer) + "}", parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0


_INT = re.compile(r"^[-+]?\d{1,30}$")


@register_reward("integer", sandboxed=False)
def integer_reward(completion: str, ground_truth: str) -> float:
    """Exact integer match (the CPU demo's synthetic tasks); anything that is not an integer scores 0."""
    answer = extract_final_answer(completion)
    if answer is None:
        return 0.0
    answer = answer.replace(",", "").strip("$ ")
    if not _INT.match(answer) or not _INT.match(ground_truth.strip()):
        return 0.0
    return 1.0 if int(answer) == int(ground_truth) else 0.0


_LAST_INT = re.compile(r"[-+]?\d[\d,]{0,40}")


@register_reward("last_integer", sandboxed=False)
def last_integer_reward(completion: str, ground_truth: str) -> float:
    """`integer`, but a reply without an "Answer:" line or \\boxed{} is read at its last integer.

    For a small instruct model whose replies rarely follow the requested answer format (SmolLM2-135M
    on the arithmetic task): the strict reward spends a short CPU run teaching the format, this one
    scores the arithmetic. Route a task to it with `reward.routes: {synthetic_arith: last_integer}`.
    """
    if extract_final_answer(completion) is not None:
        return integer_reward(completion, ground_truth)
    numbers = _LAST_INT.findall(completion)
    if not numbers or not _INT.match(ground_truth.strip()):
        return 0.0
    answer = numbers[-1].replace(",", "")
    return 1.0 if _INT.match(answer) and int(answer) == int(ground_truth) else 0.0
