"""Throughput of the code reward through the scorer's worker pool (docs/benchmarks.md).

    python tools/bench_code_reward.py                 # all three measurements, a JSON summary at the end
    python tools/bench_code_reward.py --quick         # smaller counts (a smoke run)

1. short correct programs (a + b, one stdin test each): programs per second for each pool size;
2. programs that run into the per-test timeout (sleeping, and spinning on the CPU): programs per
   second, and how many timeouts overlap (throughput x timeout; 1 would mean they serialise);
3. the trainer's reward stage for one step of the CPU demo's size (32 prompts x 8 samples = 256
   completions) when every row is a coding task with 5 stdin tests, with a mix of outcomes.
Worker start-up and each worker's first call (the isolation probe) are excluded from the timings.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402,F401  (puts the checkout on sys.path)

from steer_megatron.rewards import RewardScorer, score_code  # noqa: E402
from steer_megatron.rewards.code_reward import CodeRewardSettings  # noqa: E402
from steer_megatron.rewards.sandbox import SandboxSettings, probe_isolation  # noqa: E402

ADD = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
SLEEP = "```python\nimport time\ntime.sleep(600)\n```"
SPIN = "```python\nwhile True:\n    pass\n```"


def add_tests(k: int, rng: random.Random) -> str:
    pairs = [(rng.randint(-10**6, 10**6), rng.randint(-10**6, 10**6)) for _ in range(k)]
    return json.dumps({"inputs": [f"{a} {b}\n" for a, b in pairs], "outputs": [f"{a + b}\n" for a, b in pairs]})


# The reward stage's mix of replies (fraction, reply); a wrong answer fails its first test.
MIX = [
    (0.50, ADD),
    (0.20, "```python\na, b = map(int, input().split())\nprint(a - b)\n```"),
    (0.10, "I think the answer is to add the numbers."),
    (0.10, "```python\na, b = map(int, input().split())\nprint(a + b / 0)\n```"),
    (0.05, "```python\nprint(int(input()\n```"),
    (0.05, SLEEP),
]


def timed_score(scorer: RewardScorer, comps: list[str], gts: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    res = scorer.score(["livecodebench"] * len(comps), comps, gts)
    return time.perf_counter() - t0, res.reason_counts()


def warm(scorer: RewardScorer, workers: int, rng: random.Random) -> None:
    scorer.start()
    scorer.score(["livecodebench"] * workers, [ADD] * workers, [add_tests(1, rng)] * workers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8], help="pool sizes for measurement 1")
    ap.add_argument("--timeout-workers", type=int, default=8)
    ap.add_argument("--stage-workers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--timeout", type=float, default=1.0, help="per-test timeout (s) for measurement 2")
    ap.add_argument("--stage-timeout", type=float, default=2.0, help="per-test timeout (s) for measurement 3")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rng = random.Random(0)
    n_short, n_to, n_stage = (16, 8, 64) if args.quick else (96, 32, 256)
    # Short programs get a generous limit: on a loaded machine a 1 s limit would turn some into timeouts.
    opts = {"timeout_s": 10.0, "program_budget_s": 30.0}
    rep = probe_isolation(SandboxSettings(**opts))
    print(f"sandbox: {rep.summary()}; {os.cpu_count()} CPUs; load {os.getloadavg()}", flush=True)
    if not rep.isolated:
        opts["allow_unisolated"] = True
    out: dict = {"isolated": rep.isolated, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}

    # 0. one program alone, in this process (judge start + one sandboxed run)
    s = CodeRewardSettings(sandbox=SandboxSettings(**opts))
    gt1 = add_tests(1, rng)
    lat = []
    for _ in range(10):
        t0 = time.perf_counter()
        assert score_code(ADD, gt1, settings=s).reason == "pass"
        lat.append(time.perf_counter() - t0)
    out["single_program_latency_s"] = round(statistics.median(lat), 4)
    print(f"one short program alone: {out['single_program_latency_s'] * 1000:.0f} ms (median of 10)", flush=True)

    # 1. short correct programs
    out["short_correct"] = {}
    for w in args.workers:
        with RewardScorer(num_workers=w, reward_options={"code": opts}) as scorer:
            warm(scorer, w, rng)
            wall, reasons = timed_score(scorer, [ADD] * n_short, [add_tests(1, rng) for _ in range(n_short)])
        assert reasons == {"pass": n_short}, reasons
        out["short_correct"][w] = round(n_short / wall, 2)
        print(f"short correct programs, {w} workers: {n_short / wall:.1f} programs/s ({n_short} in {wall:.1f} s)", flush=True)

    # 2. timeouts
    w = args.timeout_workers
    out["timeouts"] = {"timeout_s": args.timeout}
    with RewardScorer(num_workers=w, reward_options={"code": {**opts, "timeout_s": args.timeout}}) as scorer:
        warm(scorer, w, rng)
        for name, reply in (("sleep", SLEEP), ("spin", SPIN)):
            wall, reasons = timed_score(scorer, [reply] * n_to, [add_tests(1, rng) for _ in range(n_to)])
            assert reasons == {"timeout": n_to}, reasons
            rate = n_to / wall
            out["timeouts"][name] = {"programs_per_s": round(rate, 2), "overlap": round(rate * args.timeout, 2)}
            print(f"{name} past a {args.timeout:.1f} s timeout, {w} workers: {rate:.2f} programs/s "
                  f"({rate * args.timeout:.1f} timeouts overlap; serialised would be 1)", flush=True)

    # 3. the reward stage of one CPU-demo-sized step
    comps = []
    for frac, reply in MIX:
        comps += [reply] * round(frac * n_stage)
    comps = (comps + [ADD] * n_stage)[:n_stage]
    rng.shuffle(comps)
    gts = [add_tests(5, rng) for _ in comps]
    out["reward_stage"] = {"completions": n_stage, "tests_per_program": 5, "timeout_s": args.stage_timeout}
    for w in args.stage_workers:
        with RewardScorer(num_workers=w, reward_options={"code": {**opts, "timeout_s": args.stage_timeout}}) as scorer:
            warm(scorer, w, rng)
            wall, reasons = timed_score(scorer, comps, gts)
        out["reward_stage"][f"{w}_workers_s"] = round(wall, 2)
        out["reward_stage"]["reasons"] = reasons
        print(f"reward stage, {n_stage} completions x 5 tests ({args.stage_timeout:.0f} s test timeout), {w} workers: "
              f"{wall:.1f} s {reasons}", flush=True)
    out["loadavg_end"] = os.getloadavg()
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        pass
    print(json.dumps(out))


if __name__ == "__main__":
    main()
