"""Benchmark metrics from per-sample correctness: mean@k and unbiased pass@k (Chen et al. 2021).

Samples are grouped by (benchmark, problem id). Benchmarks such as aime24 ship 32 copies of
each problem as separate rows; those copies share a problem id and so count as 32 samples.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from math import comb
from typing import Hashable, Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them correct, is correct)
    = 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass(frozen=True)
class EvalSample:
    benchmark: str
    problem_id: Hashable
    correct: bool


def benchmark_metrics(samples: Iterable[EvalSample], ks: Sequence[int] = (1,)) -> dict[str, dict[str, float]]:
    """Per benchmark: mean@n (n = samples per problem; the smallest n when it varies), pass@k
    for each k in ks (and k = n) not above n, the number of problems and n."""
    by_problem: dict[str, dict[Hashable, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        by_problem[s.benchmark][s.problem_id].append(bool(s.correct))
    out: dict[str, dict[str, float]] = {}
    for bench, problems in sorted(by_problem.items()):
        counts = [(len(v), sum(v)) for v in problems.values()]
        n_min = min(n for n, _ in counts)
        m = {f"mean@{n_min}": sum(c / n for n, c in counts) / len(counts)}
        for k in sorted({*ks, n_min}):
            if k <= n_min:
                m[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
        m["num_problems"] = float(len(counts))
        m["samples_per_problem"] = float(n_min)
        out[bench] = m
    return out


def flatten_metrics(per_benchmark: dict[str, dict[str, float]], prefix: str = "eval") -> dict[str, float]:
    """{"aime24": {"mean@32": x}} -> {"eval/aime24/mean@32": x} for the metrics logger."""
    return {f"{prefix}/{b}/{k}": v for b, ms in per_benchmark.items() for k, v in ms.items()}
