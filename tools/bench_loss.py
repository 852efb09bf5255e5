#!/usr/bin/env python
"""Time and peak extra memory of per-token log-prob + entropy (forward + backward) on one device.

Compares steer_megatron's token_stats (log p, entropy, sum p^2 terms; entropy with gradient)
against plain PyTorch and megatron-core's vocab_parallel_cross_entropy (log p only) on the same
inputs, and reports each as a ratio to plain PyTorch and to the memory-traffic floor (read the
logits forward, read them and write their gradient backward, at the copy bandwidth measured in
the same run). Each case runs in a fresh process so peak memory is its own:
CUDA max_memory_allocated on a GPU, ru_maxrss growth on a CPU.

    python tools/bench_loss.py                       # CPU defaults
    python tools/bench_loss.py --sizes 16384x152064 16384x38016 --dtype bf16   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = ("steer_token_stats", "plain_pytorch", "megatron_vocab_parallel_ce", "torch_compile")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _plain(logits, target, w):
    import torch

    lf = logits.float()
    logp = torch.log_softmax(lf, -1)
    lp_t = logp.gather(-1, target[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return (w * lp_t).sum() + 1e-3 * ent.sum()


def _make_fn(case, logits, target, w, chunk):
    import torch

    if case == "steer_token_stats":
        from steer_megatron.loss import token_stats

        def fn():
            st = token_stats(logits, target, chunk_tokens=chunk, check_inputs=False)
            ((w * st.logprob).sum() + 1e-3 * st.entropy.sum()).backward()
    elif case == "plain_pytorch":
        def fn():
            _plain(logits, target, w).backward()
    elif case == "torch_compile":
        compiled = torch.compile(_plain, dynamic=False)

        def fn():
            compiled(logits, target, w).backward()
    elif case == "megatron_vocab_parallel_ce":
        from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
        from steer_megatron.parallel import init_parallel

        init_parallel()
        n, v = logits.shape

        def fn():
            loss = vocab_parallel_cross_entropy(logits.view(n, 1, v), target.view(n, 1))
            (w.view(n, 1) * loss).sum().backward()
    else:
        raise ValueError(f"unknown case {case!r}; choose from {CASES}")
    return fn


def _run_case(case, n, v, dtype, device, reps, chunk, queue):
    import torch

    torch.manual_seed(0)
    logits = (torch.randn(n, v, device=device) * 3).to(getattr(torch, dtype)).requires_grad_()
    target = torch.randint(0, v, (n,), device=device)
    w = torch.randn(n, device=device)
    try:
        fn = _make_fn(case, logits, target, w, chunk)

        def step():
            fn()
            logits.grad = None

        if device == "cuda":
            step()  # warm-up (kernels, compile)
            _sync(device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            _sync(device)
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            step()  # the first call sets the peak; glibc returns big blocks to the OS
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        queue.put({"case": case, "ms": statistics.median(times), "peak_extra_GiB": peak / 2**30})
    except Exception as e:  # noqa: BLE001 - a case that cannot run is reported, not fatal
        queue.put({"case": case, "error": f"{type(e).__name__}: {str(e)[:160]}"})


def _copy_bandwidth(device) -> float:
    """Bytes/s of a large tensor copy (read + write)."""
    import torch

    n = (1 << 30) if device == "cuda" else (1 << 28)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n / min(times)


def main(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    ap.add_argument("--sizes", nargs="+", default=["16384x152064", "16384x38016"] if on_gpu else ["2048x32768", "4096x38016"],
                    help="NxV cases: tokens x vocab shard columns")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if on_gpu else "fp32", help="logits dtype")
    ap.add_argument("--cases", nargs="+", choices=CASES,
                    default=list(CASES) if on_gpu else ["steer_token_stats", "plain_pytorch", "megatron_vocab_parallel_ce"],
                    help="what to run (torch_compile is off by default on CPU: minutes of compile)")
    ap.add_argument("--reps", type=int, default=5 if not on_gpu else 20, help="timed repetitions (median reported)")
    ap.add_argument("--chunk", type=int, default=None, help="token chunk of token_stats (default: its own, 64 MiB per temporary)")
    ap.add_argument("--json", type=Path, help="also write all rows to this JSON file")
    args = ap.parse_args(argv)
    device = "cuda" if on_gpu else "cpu"
    dtype = DTYPES[args.dtype]
    bw = _copy_bandwidth(device)
    elem = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    name = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(json.dumps({"device": name, "torch": torch.__version__, "copy_GBps": round(bw / 1e9, 1), "dtype": args.dtype}))
    rows = []
    ctx = mp.get_context("spawn")
    for size in args.sizes:
        n, v = (int(x) for x in size.lower().split("x"))
        floor_ms = 3 * n * v * elem / bw * 1e3  # read fwd + read & write bwd
        base_ms = None
        for case in args.cases:
            q = ctx.Queue()
            p = ctx.Process(target=_run_case, args=(case, n, v, dtype, device, args.reps, args.chunk, q))
            p.start()
            row = q.get()
            p.join()
            row.update(N=n, V=v, floor_ms=round(floor_ms, 3), logits_GiB=round(n * v * elem / 2**30, 3))
            if "ms" in row:
                if case == "plain_pytorch":
                    base_ms = row["ms"]
                row["x_floor"] = round(row["ms"] / floor_ms, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
        for row in rows[-len(args.cases):]:
            if "ms" in row and base_ms:
                row["x_plain"] = round(row["ms"] / base_ms, 3)
    print(f"\n{'case':28s} {'N':>6s} {'V':>7s} {'ms':>9s} {'x plain':>8s} {'x floor':>8s} {'peak GiB':>9s}")
    for r in rows:
        if "ms" in r:
            print(f"{r['case']:28s} {r['N']:6d} {r['V']:7d} {r['ms']:9.2f} {r.get('x_plain', float('nan')):8.3f} "
                  f"{r['x_floor']:8.2f} {r['peak_extra_GiB']:9.3f}")
        else:
            print(f"{r['case']:28s} {r['N']:6d} {r['V']:7d}  error: {r['error']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
