#!/usr/bin/env python
"""Sweep the tile sizes of the Triton token-stat kernels on this GPU (tile = columns per loop
step, warps per program), forward and backward separately, at N tokens x each vocab shard.

Each config is checked against the default config's output (a wrong tile must not win) and timed
with triton's do_bench (median, L2 flushed between runs); times are reported against the memory
floor measured in the same run (forward reads N V logits, backward reads them and writes the
gradient, at the device copy bandwidth). Prints the winner per pass as environment settings
(STEER_TRITON_{FWD,BWD}_{BLOCK,WARPS}) and writes them to --env so later runs can `source` them.

    python tools/tune_kernels.py --n 16384 --vocab 152064 38016 --env tuned.env --json tune.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (block, warps, rows per program): 8 to 64 bf16 values per thread per tile. Backward has no
# reductions, so it keeps one row per program and sweeps only the tile.
BWD_CONFIGS = [(2048, 4, 1), (2048, 8, 1), (4096, 4, 1), (4096, 8, 1), (4096, 16, 1), (8192, 8, 1), (8192, 16, 1),
               (8192, 32, 1), (16384, 16, 1), (16384, 32, 1), (32768, 32, 1)]
FWD_CONFIGS = BWD_CONFIGS + [(1024, 4, 4), (2048, 4, 4), (2048, 8, 2), (2048, 8, 4), (4096, 8, 2), (4096, 16, 2),
                             (4096, 16, 4), (8192, 16, 2)]


def main(argv=None):
    import torch
    from triton.testing import do_bench

    from steer_megatron.loss.kernels import triton_stats as T
    from steer_megatron.loss.vocab_parallel import merge_stats as _merge

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384, help="tokens")
    ap.add_argument("--vocab", type=int, nargs="+", default=[152064, 38016], help="vocab shard widths")
    ap.add_argument("--rep-ms", type=float, default=40.0, help="do_bench budget per config")
    ap.add_argument("--budget-s", type=float, default=100.0,
                    help="stop sweeping after this many seconds and report the best so far")
    ap.add_argument("--env", type=Path, help="write the winners as shell exports here")
    ap.add_argument("--json", type=Path, help="write every timing here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_kernels: needs a CUDA GPU")

    t_start = time.time()
    n_copy = 1 << 30
    a = torch.empty(n_copy, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    bw = 2 * n_copy / (do_bench(lambda: b.copy_(a), warmup=20, rep=100, return_mode="median") * 1e-3)
    del a, b
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = []
    score = {"fwd": {}, "bwd": {}}  # config -> its x-floor at each vocab width
    data = {}
    for v in args.vocab:  # every width resident at once: the sweep is config-major (see --budget-s)
        g = torch.Generator(device="cuda").manual_seed(v)
        logits = (torch.randn(args.n, v, device="cuda", generator=g) * 3).to(torch.bfloat16)
        target = torch.randint(0, v, (args.n,), device="cuda", generator=g)
        w_lp = torch.randn(args.n, device="cuda", generator=g)
        w_h = torch.randn(args.n, device="cuda", generator=g)
        ref_stats = T.local_stats(logits, target, v, 0, True)
        log_z, ent = _merge(ref_stats[None])[:2]
        ref_grad = T.grad_logits(logits, target, log_z, ent, w_lp, w_h, v, 0, torch.empty_like(logits))
        data[v] = (logits, target, w_lp, w_h, ref_stats, log_z, ent, ref_grad, torch.empty_like(logits))
    # interleaved, so a spent budget leaves both passes with some configs measured
    pairs = itertools.zip_longest([("fwd", c) for c in FWD_CONFIGS], [("bwd", c) for c in BWD_CONFIGS])
    todo = [x for pair in pairs for x in pair if x is not None]
    for pas, (block, warps, nrows) in todo:
        if time.time() - t_start > args.budget_s:
            print(f"tune_kernels: {args.budget_s} s budget spent; not measured: {pas} {block}/{warps}/{nrows}")
            continue
        for v in args.vocab:
            logits, target, w_lp, w_h, ref_stats, log_z, ent, ref_grad, grad = data[v]
            nbytes = args.n * v * logits.element_size()
            row = {"pass": pas, "V": v, "N": args.n, "block": block, "warps": warps, "rows": nrows}
            try:
                if pas == "fwd":
                    def fn():
                        return T.local_stats(logits, target, v, 0, True, block=block, warps=warps, rows=nrows)
                    err = ((fn() - ref_stats).abs() / ref_stats.abs().clamp(min=1)).max().item()
                    moved = nbytes
                else:
                    def fn():
                        return T.grad_logits(logits, target, log_z, ent, w_lp, w_h, v, 0, grad, block=block, warps=warps)
                    err = (fn().float() - ref_grad.float()).abs().max().item() / ref_grad.float().abs().max().item()
                    moved = 2 * nbytes
                if not err < 1e-3:  # NaN fails too
                    raise AssertionError(f"differs from the default config by {err:.3g}")
                ms = do_bench(fn, warmup=10, rep=args.rep_ms, return_mode="median")
                row.update(ms=round(ms, 4), x_floor=round(ms * 1e-3 * bw / moved, 3),
                           TBps=round(moved / (ms * 1e-3) / 1e12, 3))
                score[pas].setdefault((block, warps, nrows), []).append(row["x_floor"])
            except Exception as e:  # noqa: BLE001 - a config that fails to compile or run is reported
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                score[pas].setdefault((block, warps, nrows), []).append(float("inf"))
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = []
    for pas in ("fwd", "bwd"):
        for v in args.vocab:  # the best per width, for the record
            per_v = [r for r in rows if r["pass"] == pas and r["V"] == v and "ms" in r]
            if per_v:
                b = min(per_v, key=lambda r: r["ms"])
                print(f"best {pas} at V={v}: block {b['block']}, {b['warps']} warps, {b['rows']} rows: "
                      f"{b['ms']:.3f} ms, {b['x_floor']:.3f}x floor, {b['TBps']:.2f} TB/s")
        full = {c: x for c, x in score[pas].items() if len(x) == len(args.vocab)}  # measured at every width
        if not full:
            print(f"no {pas} config measured at every width")
            continue
        (block, warps, nrows), xs = min(full.items(), key=lambda kv: sum(kv[1]))
        print(f"best {pas} overall: block {block}, {warps} warps, {nrows} rows, mean {sum(xs) / len(xs):.3f}x floor")
        lines += [f"export STEER_TRITON_{pas.upper()}_BLOCK={block}", f"export STEER_TRITON_{pas.upper()}_WARPS={warps}"]
        if pas == "fwd":
            lines.append(f"export STEER_TRITON_FWD_ROWS={nrows}")
    print("\n".join(lines))
    if args.env:
        args.env.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_TBps": bw / 1e12, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
