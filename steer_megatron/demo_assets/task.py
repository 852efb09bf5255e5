"""The demo's verifiable task: sort a few digits ("Sort 3 1 4 2" -> "Answer: 1234"), as verl-layout parquets.

Sorting is an algorithm, not a lookup table: a tiny transformer learns it from a short warm-up
well enough to be mostly right greedily yet often wrong when sampling, and what RL sharpens on the
training prompts carries over to unseen ones. (A first version used `a + b` with small operands:
there a 64-wide model can only memorise the table, every step that helps some prompts hurts
others, and GRPO did not raise accuracy at any learning rate; see docs/benchmarks.md.)

Each row is one prompt in exactly the layout of ../shared/datasets (data_source, prompt as
chat messages, ability, reward_model {ground_truth, style}, extra_info {index, split}), so
the demo exercises the same data path as the real runs. The answer, the sorted digits read as
one integer (digits are 1-9, so no leading zeros), is scored by exact integer match.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DATA_SOURCE = "synthetic_sort"
DIGITS = range(1, 10)


@dataclass(frozen=True)
class Problem:
    digits: tuple[int, ...]

    @property
    def answer(self) -> int:
        return int("".join(map(str, sorted(self.digits))))

    @property
    def question(self) -> str:
        return "Sort " + " ".join(map(str, self.digits))

    @property
    def solution(self) -> str:
        """What the warm-up teaches: just the `Answer:` line."""
        return f"Answer: {self.answer}"


def space_size(num_digits: int) -> int:
    return len(DIGITS) ** num_digits


def make_splits(num_digits: int, n_train: int, n_test: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Disjoint seeded draws of distinct digit tuples (repeats allowed within a tuple); test
    problems are never trained on."""
    if num_digits < 2:
        raise ValueError(f"demo.num_digits={num_digits}: sorting needs at least 2 digits")
    size = space_size(num_digits)
    if n_train + n_test > size:
        raise ValueError(
            f"demo.n_train + demo.n_test = {n_train + n_test} exceeds the {size} distinct problems "
            f"with {num_digits} digits; raise demo.num_digits or lower the counts"
        )
    rng = random.Random(seed)
    picked = rng.sample(range(size), n_train + n_test)  # tuple index in base 9: no rejection loop
    problems = [Problem(tuple(DIGITS[(i // len(DIGITS) ** k) % len(DIGITS)] for k in range(num_digits))) for i in picked]
    return problems[:n_train], problems[n_train:]


def to_rows(problems: list[Problem], split: str) -> list[dict]:
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": p.question}],
            "ability": "SORT",
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
