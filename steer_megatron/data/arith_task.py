"""Arithmetic word problems with exact integer answers, in a mix of difficulties, as verl-layout
parquets: a verifiable task for a small pretrained instruct model (SmolLM2-135M-Instruct).

    python -m steer_megatron.data.arith_task --out data/arith --n-train 2000 --n-test 200

Levels (drawn uniformly): 1 one-digit addition, 2 two-digit addition or subtraction, 3 two
steps (a + b - c), 4 one-digit times two-digit, 5 a two-step word problem. Rows carry
data_source "synthetic_arith" (routed to the exact integer reward) and extra_info.level, so
accuracy can be read per level. The prompt asks for a final "Answer: <number>" line, which
the reward reads from the assistant's reply only.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

DATA_SOURCE = "synthetic_arith"
INSTRUCTION = "Solve it and end your reply with a line of the form 'Answer: <number>'."
NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay")
ITEMS = ("apples", "books", "marbles", "stamps", "shells")


def make_problem(level: int, rng: random.Random) -> tuple[str, int]:
    """(question, answer) of one problem at `level` (1-5)."""
    r = rng.randint
    if level == 1:
        a, b = r(1, 9), r(1, 9)
        return f"What is {a} + {b}?", a + b
    if level == 2:
        a, b = r(10, 99), r(10, 99)
        if rng.random() < 0.5:
            return f"What is {a} + {b}?", a + b
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", a - b
    if level == 3:
        a, b = r(10, 60), r(10, 60)
        c = r(1, a + b)
        return f"What is {a} + {b} - {c}?", a + b - c
    if level == 4:
        a, b = r(2, 9), r(11, 30)
        return f"What is {a} * {b}?", a * b
    if level == 5:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        boxes, per = r(2, 6), r(3, 12)
        given = r(1, min(9, boxes * per - 1))  # never more than they have
        return (f"{name} has {boxes} boxes with {per} {item} in each box and gives away {given} {item}. "
                f"How many {item} does {name} have left?", boxes * per - given)
    raise ValueError(f"level must be 1-5, got {level}")


def make_rows(n: int, seed: int, split: str, levels=(1, 2, 3, 4, 5)) -> list[dict]:
    rng = random.Random(f"{seed}/{split}")
    rows = []
    for i in range(n):
        level = levels[i % len(levels)]  # an even mix, in a fixed order
        question, answer = make_problem(level, rng)
        rows.append({
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
            "ability": "ARITH",
            "reward_model": {"ground_truth": str(answer), "style": "rule"},
            "extra_info": {"index": i, "split": split, "level": level},
        })
    return rows


def write_parquet(rows: list[dict], path: str | Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for train.parquet and test.parquet")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", default="1,2,3,4,5", help="comma-separated levels to include (default all)")
    args = p.parse_args(argv)
    levels = tuple(int(x) for x in args.levels.split(","))
    for split, n in (("train", args.n_train), ("test", args.n_test)):
        print(write_parquet(make_rows(n, args.seed, split, levels), Path(args.out) / f"{split}.parquet"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
