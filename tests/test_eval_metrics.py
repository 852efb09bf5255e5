"""mean@k / pass@k against brute-force enumeration of k-subsets."""
from __future__ import annotations

import itertools
import random

import pytest

from steer_megatron.eval import EvalSample, benchmark_metrics, flatten_metrics, pass_at_k


def brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_brute_force(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="n=4 c=5 k=1"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(4, 1, 5)


def test_benchmark_metrics_per_benchmark():
    rng = random.Random(0)
    truth = {
        ("aime", p): [rng.random() < 0.3 for _ in range(8)] for p in range(5)
    } | {("math500", p): [rng.random() < 0.7 for _ in range(4)] for p in range(6)}
    samples = [EvalSample(b, p, c) for (b, p), outs in truth.items() for c in outs]
    rng.shuffle(samples)  # grouping must not depend on order
    got = benchmark_metrics(samples, ks=(1, 4))
    for bench, n in (("aime", 8), ("math500", 4)):
        outs = [v for (b, _), v in truth.items() if b == bench]
        assert got[bench][f"mean@{n}"] == pytest.approx(sum(sum(o) / n for o in outs) / len(outs))
        for k in {1, 4, n}:
            assert got[bench][f"pass@{k}"] == pytest.approx(sum(brute_pass_at_k(o, k) for o in outs) / len(outs))
        assert got[bench]["num_problems"] == len(outs) and got[bench]["samples_per_problem"] == n
    assert "pass@8" not in got["math500"]  # k above the samples per problem is not reported
    assert flatten_metrics(got)["eval/aime/pass@4"] == got["aime"]["pass@4"]
