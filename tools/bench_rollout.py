"""Rollout throughput and latency of a fleet, through sglang-router and directly to workers.

    python tools/bench_rollout.py                       # 2 CPU workers, the tests' tiny Qwen2
    python tools/bench_rollout.py --model HF_DIR --workers 2 --prompts 64 --n 4 --max-new-tokens 64
    python tools/bench_rollout.py --engine sglang --model Qwen/Qwen2.5-0.5B --workers 8   # GPU nodes

Reports generated tokens/s (completion tokens over wall time of the whole rollout) and the
p50/p90/p99 latency of /generate requests (one request = one prompt with its n samples).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from steer_megatron.parallel import free_port  # noqa: E402
from steer_megatron.rollout import Fleet, FleetConfig, RolloutClient, RolloutConfig, RouterConfig, SamplingConfig  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run(endpoints: list[str], prompts: list[list[int]], sampling: SamplingConfig, concurrency: int, tag: str) -> dict:
    client = RolloutClient(endpoints, RolloutConfig(run_id=f"bench-{tag}", concurrency=concurrency))
    t0 = time.perf_counter()
    result = client.generate_sync(prompts, sampling)
    wall = time.perf_counter() - t0
    tokens = sum(s.length for s in result.flat())
    latencies = [g[0].latency_s for g in result.samples]
    return {"mode": tag, "prompts": len(prompts), "n": sampling.n, "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "p50_ms": round(1e3 * percentile(latencies, 50), 1),
            "p90_ms": round(1e3 * percentile(latencies, 90), 1), "p99_ms": round(1e3 * percentile(latencies, 99), 1),
            "retries": result.attempts - len(prompts)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model dir (default: build the tests' tiny random Qwen2)")
    p.add_argument("--engine", choices=["cpu", "sglang"], default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads per CPU worker")
    p.add_argument("--cpu-max-batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed rollouts per mode (the best is kept)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        from tests.fixtures_models import build_tiny_qwen2

        model = str(build_tiny_qwen2(Path(tmp.name) / "tiny_qwen2"))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 250) for _ in range(args.prompt_len)] for _ in range(args.prompts)]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, n=args.n, temperature=args.temperature, ignore_eos=True)
    base = free_port()
    cfg = FleetConfig(model_path=model, num_workers=args.workers, engine=args.engine, tp_size=args.tp,
                      base_port=base, port_stride=10 if args.engine == "sglang" else 1,
                      router=RouterConfig(port=free_port(), prometheus_port=free_port(), policy="round_robin"), cpu_threads=args.cpu_threads,
                      cpu_max_batch_size=args.cpu_max_batch_size, log_dir=str(Path(tmp.name) / "logs"))
    results = []
    with Fleet(cfg) as fleet:
        run(fleet.endpoints, prompts[: max(2, args.workers)], sampling, args.concurrency, "warmup")
        for tag, endpoints in [("router", fleet.endpoints), ("direct", fleet.live_urls)]:
            best = max((run(endpoints, prompts, sampling, args.concurrency, tag) for _ in range(args.repeats)),
                       key=lambda r: r["tokens_per_s"])
            results.append(best)
    header = f"{'mode':<8}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'retries':>9}"
    print(f"engine={args.engine} workers={args.workers} prompts={args.prompts} n={args.n} "
          f"max_new_tokens={args.max_new_tokens} concurrency={args.concurrency}")
    print(header)
    for r in results:
        print(f"{r['mode']:<8}{r['tokens']:>8}{r['wall_s']:>9}{r['tokens_per_s']:>9}{r['p50_ms']:>9}{r['p90_ms']:>9}{r['p99_ms']:>9}{r['retries']:>9}")
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json), "model": model}, "results": results}, indent=1))
    tmp.cleanup()


if __name__ == "__main__":
    main()
