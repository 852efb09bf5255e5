#!/usr/bin/env python
"""Time and peak extra memory of per-token log-prob + entropy (forward + backward) on one device.

Compares steer_megatron's token_stats (log p, entropy, sum p^2 terms; entropy with gradient)
against plain PyTorch and megatron-core's vocab_parallel_cross_entropy (log p only) on the same
inputs, and reports each as a ratio to plain PyTorch and to the memory-traffic floor (read the
logits forward, read them and write their gradient backward, at the copy bandwidth measured in
the same run). On a CPU each case runs in a fresh process so its peak memory (ru_maxrss growth)
is its own.

    python tools/bench_loss.py                       # CPU defaults (or the GPU suite where CUDA is)
    python tools/bench_loss.py --device cuda         # the GPU suite (one process; see below)
    python tools/bench_loss.py --device cuda --sizes 16384x152064 --cases steer_triton liger_ce

--device cuda runs every case in ONE process (a process per case costs seconds of CUDA start-up),
measures the floors in the same run (device copy bandwidth; bf16 matmul rate) and reports each
case as a ratio to its floor: 3 N V bytes-per-element / bandwidth for logits cases (read forward,
read + write backward), 6 N H V / matmul rate for LM-head cases (and 8 N H V, the floor of a
fused head that recomputes logits in backward). Peak extra memory = max_memory_allocated above
what was allocated before the case. Missing liger-kernel / megatron-core are reported, not fatal.
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


def _plain(logits, target, w):
    import torch

    lf = logits.float()
    logp = torch.log_softmax(lf, -1)
    lp_t = logp.gather(-1, target[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return (w * lp_t).sum() + 1e-3 * ent.sum()


def _run_case(case, n, v, dtype, reps, chunk, queue):
    """One CPU case in its own process: median ms and ru_maxrss growth."""
    import torch

    torch.manual_seed(0)
    logits = (torch.randn(n, v) * 3).to(getattr(torch, dtype)).requires_grad_()
    target = torch.randint(0, v, (n,))
    w = torch.randn(n)
    try:
        fn = _logits_case(case, logits, target, w, {}, chunk)

        def step():
            fn()
            logits.grad = None

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()  # the first call sets the peak; glibc returns big blocks to the OS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        queue.put({"case": case, "ms": statistics.median(times), "peak_extra_GiB": peak / 2**30})
    except Exception as e:  # noqa: BLE001 - a case that cannot run is reported, not fatal
        queue.put({"case": case, "error": f"{type(e).__name__}: {str(e)[:160]}"})


def _copy_bandwidth() -> float:
    """Bytes/s of a large CPU tensor copy (read + write)."""
    import torch

    n = 1 << 28
    a = torch.empty(n, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return 2 * n / min(times)

# --------------------------------------------------------------------------------------------
# --device cuda: the GPU suite of issue #8, one process, floors measured in the same run

GPU_CASES = (  # torch_compile last: its compile is the slowest part of a run
    "steer_triton", "steer_triton_inplace", "steer_torch", "plain_pytorch",
    "megatron_vocab_parallel_ce", "liger_ce", "torch_compile",
)
LMHEAD_CASES = ("steer_fused_token_loss", "steer_fused_lm_head", "lmhead_steer_triton", "liger_fused_linear_ce")
GPU_SIZES = ["4096x152064", "4096x38016", "16384x152064", "16384x38016"]


def _bench_ms(fn, rep_ms):
    from triton.testing import do_bench

    return do_bench(fn, warmup=min(50.0, rep_ms / 4), rep=rep_ms, return_mode="median")


def gpu_floors():
    """(copy bytes/s counting read + write, bf16 matmul FLOP/s), measured now on this GPU."""
    import torch

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    bw = 2 * n / (_bench_ms(lambda: b.copy_(a), 200) * 1e-3)
    del a, b
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    y = torch.randn_like(x)
    tf = 2 * 8192**3 / (_bench_ms(lambda: x @ y, 200) * 1e-3)
    del x, y
    torch.cuda.empty_cache()
    return bw, tf


def _logits_case(case, logits, target, w, state, chunk=None):
    """A closure running forward + backward of one case (CPU and GPU suites alike); logits.grad
    is cleared by the caller. `state` keeps one-time set-up (compiled function, process groups)."""
    import torch

    if case == "steer_token_stats":  # the default kernel for the device, as the trainer runs it
        from steer_megatron.loss import token_stats

        def fn():
            st = token_stats(logits, target, chunk_tokens=chunk, check_inputs=False)
            ((w * st.logprob).sum() + 1e-3 * st.entropy.sum()).backward()
    elif case in ("steer_triton", "steer_torch"):
        from steer_megatron.loss import token_stats

        kernel = "triton" if case == "steer_triton" else "torch"

        def fn():
            st = token_stats(logits, target, kernel=kernel, check_inputs=False)
            ((w * st.logprob).sum() + 1e-3 * st.entropy.sum()).backward()
    elif case == "steer_triton_inplace":
        from steer_megatron.loss import token_stats

        # in place: the gradient overwrites the logits (as Megatron's output buffer allows); the
        # values drift between repetitions, the memory traffic does not
        def fn():
            st = token_stats(logits, target, kernel="triton", check_inputs=False, inplace_backward=True)
            ((w * st.logprob).sum() + 1e-3 * st.entropy.sum()).backward()
    elif case == "plain_pytorch":
        def fn():
            _plain(logits, target, w).backward()
    elif case == "torch_compile":
        if "compiled" not in state:  # recompiles itself for each new shape
            state["compiled"] = torch.compile(_plain, dynamic=False)
        compiled = state["compiled"]

        def fn():
            compiled(logits, target, w).backward()
    elif case == "megatron_vocab_parallel_ce":
        from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

        if "mcore" not in state:
            from steer_megatron.parallel import init_parallel

            init_parallel()
            state["mcore"] = True
        n, v = logits.shape

        def fn():
            loss = vocab_parallel_cross_entropy(logits.view(n, 1, v), target.view(n, 1))
            (w.view(n, 1) * loss).sum().backward()
    elif case == "liger_ce":
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        ce = LigerCrossEntropyLoss(reduction="sum")  # log-prob only; grad written into the logits

        def fn():
            _first(ce(logits, target)).backward()
    else:
        raise ValueError(f"unknown case {case!r}; choose from {sorted(set(CASES) | set(GPU_CASES))}")
    return fn


def _first(out):
    """Liger returns (loss, z_loss) in some versions and a bare loss in others."""
    return out[0] if isinstance(out, tuple) else out


def _gpu_lmhead_case(case, hidden, weight, target, w, chunk=None):
    if case == "steer_fused_token_loss":
        from steer_megatron.loss import fused_linear_token_loss

        def token_loss(st, rows):  # the same loss as every other case, one token chunk at a time
            return (w[rows] * st.logprob).sum() + 1e-3 * st.entropy.sum()

        def fn():
            fused_linear_token_loss(hidden, weight, target, token_loss, chunk_tokens=chunk, check_inputs=False)[0].backward()
    elif case == "steer_fused_lm_head":
        from steer_megatron.loss import fused_linear_token_stats

        def fn():
            st = fused_linear_token_stats(hidden, weight, target, check_inputs=False)
            ((w * st.logprob).sum() + 1e-3 * st.entropy.sum()).backward()
    elif case == "lmhead_steer_triton":
        from steer_megatron.loss import token_stats

        def fn():
            st = token_stats(hidden @ weight.t(), target, kernel="triton", check_inputs=False, inplace_backward=True)
            ((w * st.logprob).sum() + 1e-3 * st.entropy.sum()).backward()
    elif case == "liger_fused_linear_ce":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def fn():
            _first(flce(weight, hidden, target)).backward()
    else:
        raise ValueError(f"unknown case {case!r}")
    return fn


def _measure(make, leaves, rep_ms):
    """(median ms, peak extra GiB) of make()'s closure; grads of `leaves` are cleared each call."""
    import torch

    fn = make()

    def step():
        fn()
        for t in leaves:
            t.grad = None

    step()  # warm-up: Triton compile, torch.compile, cuBLAS heuristics
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return _bench_ms(step, rep_ms), peak


def _graph_ms(make, leaves, rep_ms):
    """Median ms of the same step replayed as a CUDA graph: device time without the host's
    launch overhead (which eager timing includes whenever the host is the slower side)."""
    from triton.testing import do_bench_cudagraph

    fn = make()

    def step():
        fn()
        for t in leaves:
            t.grad = None

    return do_bench_cudagraph(step, rep=rep_ms, return_mode="median")


def _gpu_row(row, make, leaves, rep_ms, graph=False):
    import torch

    try:
        ms, peak = _measure(make, leaves, rep_ms)
        row.update(ms=round(ms, 3), peak_extra_GiB=round(peak, 3), x_floor=round(ms / row["floor_ms"], 3))
    except Exception as e:  # noqa: BLE001 - a case that cannot run (OOM, missing wheel) is a row
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
    if graph and "ms" in row:
        try:
            g_ms = _graph_ms(make, leaves, rep_ms)
            row.update(graph_ms=round(g_ms, 3), x_floor_graph=round(g_ms / row["floor_ms"], 3))
        except Exception as e:  # noqa: BLE001 - e.g. a case that syncs with the host cannot be captured
            row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def gpu_main(args):
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_loss --device cuda: no CUDA device here")
    dtype = getattr(torch, DTYPES[args.dtype])
    sizes = args.sizes or GPU_SIZES
    cases = [c for c in (args.cases or GPU_CASES) if c in GPU_CASES]
    lm_cases = [c for c in (args.cases or LMHEAD_CASES) if c in LMHEAD_CASES]
    lmheads = ["16384x3584x152064"] if args.lmhead is None else args.lmhead
    bw, tf = gpu_floors()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_TBps": round(bw / 1e12, 3),
            "bf16_TFLOPs": round(tf / 1e12, 1), "dtype": str(dtype).replace("torch.", "")}
    for mod in ("triton", "liger_kernel", "megatron.core"):
        try:
            m = __import__(mod, fromlist=["_"])
            info[mod] = getattr(m, "__version__", "present")
        except Exception as e:  # noqa: BLE001
            info[mod] = f"missing ({type(e).__name__})"
    print(json.dumps(info), flush=True)
    rows, state = [], {}
    elem = torch.empty((), dtype=dtype).element_size()

    def record(row):  # rewritten after every row: a part killed by its time limit keeps what it measured
        rows.append(row)
        if args.json:
            args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=1))

    # case-major with fresh inputs per case: in-place cases overwrite the logits, and our cases run
    # before megatron-core and liger are imported or initialised in this process
    for case in cases:
        for size in sizes:
            n, v = (int(x) for x in size.lower().split("x"))
            gen = torch.Generator(device="cuda").manual_seed(0)
            logits = (torch.randn(n, v, device="cuda", generator=gen) * 3).to(dtype).requires_grad_()
            target = torch.randint(0, v, (n,), device="cuda", generator=gen)
            w = torch.randn(n, device="cuda", generator=gen)
            floor_ms = 3 * n * v * elem / bw * 1e3  # read forward; read + write the gradient backward
            row = {"case": case, "N": n, "V": v, "floor_ms": round(floor_ms, 3),
                   "grad_GiB": round(n * v * elem / 2**30, 3)}
            record(_gpu_row(row, lambda: _logits_case(case, logits, target, w, state), [logits], args.rep_ms,
                            graph=args.graph))
            del logits
            torch.cuda.empty_cache()
    for spec in lmheads:
        n, h, v = (int(x) for x in spec.lower().split("x"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        hidden = (torch.randn(n, h, device="cuda", generator=gen) * 0.5).to(dtype).requires_grad_()
        weight = (torch.randn(v, h, device="cuda", generator=gen) * 0.02).to(dtype).requires_grad_()
        target = torch.randint(0, v, (n,), device="cuda", generator=gen)
        w = torch.randn(n, device="cuda", generator=gen)
        floor_ms = 6 * n * h * v / tf * 1e3
        for case in lm_cases:
            for chunk in (args.token_chunks if case == "steer_fused_token_loss" else [None]):
                chunk = chunk or None  # 0: the function's default chunk
                label = case if case != "steer_fused_token_loss" else f"{case}@{chunk or 'default'}"
                row = {"case": label, "N": n, "H": h, "V": v,
                       "floor_ms": round(floor_ms, 3), "floor_8NHV_ms": round(floor_ms * 8 / 6, 3)}
                record(_gpu_row(row, lambda: _gpu_lmhead_case(case, hidden, weight, target, w, chunk),
                                [hidden, weight], args.rep_ms))
        del hidden, weight
        torch.cuda.empty_cache()
    _gpu_table(info, rows)
    return rows


def _gpu_table(info, rows):
    print(f"\n{info['device']}: copy {info['copy_TBps']} TB/s, bf16 matmul {info['bf16_TFLOPs']} TFLOP/s "
          "(floors measured in this run; LM-head floor = 6 N H V at that rate)")
    print(f"{'case':28s} {'N':>6s} {'H':>5s} {'V':>7s} {'ms':>9s} {'x floor':>8s} {'graph ms':>9s} {'x floor':>8s} "
          f"{'peak GiB':>9s} {'grad GiB':>9s}")
    for r in rows:
        head = f"{r['case']:28s} {r['N']:6d} {r.get('H', 0) or '':>5} {r['V']:7d}"
        if "ms" in r:
            print(f"{head} {r['ms']:9.2f} {r['x_floor']:8.2f} {r.get('graph_ms', ''):>9} {r.get('x_floor_graph', ''):>8} "
                  f"{r['peak_extra_GiB']:9.3f} {r.get('grad_GiB', ''):>9}")
        else:
            print(f"{head}  error: {r['error']}")


def main(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    ap.add_argument("--sizes", nargs="+", default=None,
                    help="NxV cases: tokens x vocab shard columns (default: CPU 2048x32768 4096x38016; "
                         "cuda the four of issue #8, N 4096 and 16384 x V 152064 and 38016)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if on_gpu else "fp32", help="logits dtype")
    ap.add_argument("--cases", nargs="+", choices=sorted(set(CASES) | set(GPU_CASES) | set(LMHEAD_CASES)),
                    default=None,
                    help="what to run (torch_compile is off by default on CPU: minutes of compile)")
    ap.add_argument("--reps", type=int, default=5, help="cpu: timed repetitions (median reported)")
    ap.add_argument("--chunk", type=int, default=None, help="token chunk of token_stats (default: its own, 64 MiB per temporary)")
    ap.add_argument("--json", type=Path, help="also write all rows to this JSON file")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="cuda: the GPU suite in one process (gpu cases, floors measured in the run); "
                         "auto: cuda where a GPU is")
    ap.add_argument("--lmhead", nargs="*", default=None,
                    help="cuda: NxHxV LM-head cases (default 16384x3584x152064; none to skip)")
    ap.add_argument("--rep-ms", type=float, default=200.0, help="cuda: do_bench time budget per case")
    ap.add_argument("--graph", action="store_true",
                    help="cuda: also time each logits case replayed as a CUDA graph (device time, no launch overhead)")
    ap.add_argument("--token-chunks", type=int, nargs="+", default=[1024, 1280],
                    help="cuda: token chunks tried for steer_fused_token_loss (one row each; 0 = its default)")
    args = ap.parse_args(argv)
    if args.device == "cuda" or (args.device == "auto" and on_gpu):
        return gpu_main(args)
    args.sizes = args.sizes or ["2048x32768", "4096x38016"]
    args.cases = args.cases or ["steer_token_stats", "plain_pytorch", "megatron_vocab_parallel_ce"]
    if set(args.cases) - set(CASES):
        ap.error(f"cases {sorted(set(args.cases) - set(CASES))} run only with --device cuda")
    dtype = DTYPES[args.dtype]
    bw = _copy_bandwidth()
    elem = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    name = f"CPU ({torch.get_num_threads()} threads)"
    print(json.dumps({"device": name, "torch": torch.__version__, "copy_GBps": round(bw / 1e9, 1), "dtype": args.dtype}))
    rows = []
    ctx = mp.get_context("spawn")
    for size in args.sizes:
        n, v = (int(x) for x in size.lower().split("x"))
        floor_ms = 3 * n * v * elem / bw * 1e3  # read fwd + read & write bwd
        base_ms = None
        for case in args.cases:
            q = ctx.Queue()
            p = ctx.Process(target=_run_case, args=(case, n, v, dtype, args.reps, args.chunk, q))
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
