"""The demo's verifiable task: multi-digit addition/subtraction, as verl-layout parquets.

Each row is one prompt in exactly the layout of ../shared/datasets (data_source, prompt as
chat messages, ability, reward_model {ground_truth, style}, extra_info {index, split}), so
the demo exercises the same data path as the real runs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DATA_SOURCE = "synthetic_arith"


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str  # "+" or "-"

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def question(self) -> str:
        return f"What is {self.a} {self.op} {self.b}?"

    @property
    def solution(self) -> str:
        """What the warm-up teaches: just the `Answer:` line (an echoed equation only slows a tiny model)."""
        return f"Answer: {self.answer}"


def problem_space(max_operand: int) -> list[Problem]:
    """Every a + b and every a - b with a >= b (no negative answers), operands in [0, max_operand]."""
    r = range(max_operand + 1)
    return [Problem(a, b, "+") for a in r for b in r] + [Problem(a, b, "-") for a in r for b in r if a >= b]


def make_splits(max_operand: int, n_train: int, n_test: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Disjoint seeded train/test draws from the problem space (test problems are never trained on).

    Small operands are deliberate: a tiny model on 2 CPU cores learns part of this table in a
    short warm-up, which leaves accuracy in the middle for RL to improve.
    """
    space = problem_space(max_operand)
    if n_train + n_test > len(space):
        raise ValueError(
            f"demo.n_train + demo.n_test = {n_train + n_test} exceeds the {len(space)} distinct problems "
            f"with operands <= {max_operand}; raise demo.max_operand or lower the counts"
        )
    random.Random(seed).shuffle(space)
    return space[:n_train], space[n_train : n_train + n_test]


def to_rows(problems: list[Problem], split: str) -> list[dict]:
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": p.question}],
            "ability": "ARITH",
            "reward_model": {"ground_truth": str(p.answer), "style": "rule"},
            "extra_info": {"index": i, "split": split},
        }
        for i, p in enumerate(problems)
    ]


def write_parquet(problems: list[Problem], split: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(to_rows(problems, split)), path)
    return path
