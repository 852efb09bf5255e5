#!/usr/bin/env python
"""Benchmark HF <-> Megatron conversion of a ~1B-parameter-shape random model: wall time and
peak RSS of each tool run as a user runs it (a fresh process each), plus a bitwise check.

The random HF model (Llama-3.2-1B shape by default: hidden 2048, 16 layers, 32/8 heads,
FFN 8192, vocab 128256, tied embeddings, bf16, ~1.24e9 parameters) is written tensor by
tensor, so generating it needs little memory either. Peak RSS is the kernel's ru_maxrss of
the tool's process tree leader, read with os.wait4.

Example:
  python tools/bench_convert.py --workdir /tmp/steer_bench --write-docs docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import subprocess
import sys
import time

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import parse_size

SHAPES = {
    # name: (hidden, layers, heads, kv_heads, ffn, vocab, tied)
    "llama-1b": (2048, 16, 32, 8, 8192, 128256, True),
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "tiny": (256, 4, 8, 4, 512, 32000, False),
}
TOOLS = os.path.dirname(os.path.abspath(__file__))


def write_random_hf(out: str, shape: str, dtype_name: str, shard_bytes: int) -> dict:
    """A random HF Llama checkpoint written tensor by tensor (sharded, with index)."""
    import torch

    from steer_megatron.models.hf_config import parse_hf_config
    from steer_megatron.models.hf_export import save_hf_checkpoint
    from steer_megatron.models.layout import hf_shapes

    hidden, layers, heads, kv, ffn, vocab, tied = SHAPES[shape]
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": tied, "hidden_act": "silu",
        "dtype": dtype_name, "bos_token_id": 1, "eos_token_id": 2,
    }
    arch = parse_hf_config(cfg)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name, shp in hf_shapes(arch).items():
            t = torch.empty(shp, dtype=dtype)
            rows = max(1, (64 * 2**20) // (4 * max(1, math.prod(shp[1:]))))
            for r in range(0, shp[0], rows):  # fill in blocks: no full fp32 temporary
                t[r:r + rows] = torch.randn((min(rows, shp[0] - r), *shp[1:]), generator=gen) * 0.02
            yield name, t

    save_hf_checkpoint(tensors(), out, arch, max_shard_bytes=shard_bytes, overwrite=True)
    shapes = hf_shapes(arch)
    return dict(params=sum(math.prod(s) for s in shapes.values()),
                largest=max(math.prod(s) for s in shapes.values()) * dtype.itemsize)


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, output tail) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # wait4 gives this child's own rusage (ru_maxrss in KiB on Linux)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    text = out.decode(errors="replace")
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    return wall, usage.ru_maxrss * 1024, text.strip().splitlines()[-1] if text.strip() else ""


def bitwise_equal(a: str, b: str) -> bool:
    """Compare two HF dirs tensor by tensor (one tensor in memory at a time)."""
    import torch

    from steer_megatron.models.hf_import import HFReader

    with HFReader(a) as ra, HFReader(b) as rb:
        if set(ra.weight_map) != set(rb.weight_map):
            return False
        return all(torch.equal(ra.read(n), rb.read(n)) for n in ra.weight_map)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/steer_bench_convert", help="scratch dir (needs ~3x the model size on disk)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b", help="model shape (default llama-1b)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="weights dtype (default bfloat16)")
    p.add_argument("--max-shard-size", default="1GiB", help="HF shard size for the source and the output (default 1GiB)")
    p.add_argument("--write-docs", metavar="MD", default=None, help="append/replace the conversion section in this markdown file")
    p.add_argument("--keep", action="store_true", help="keep the scratch files")
    args = p.parse_args(argv)
    shard = parse_size(args.max_shard_size)
    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    src, ckpt, back = (os.path.join(work, n) for n in ("hf_src", "ckpt", "hf_back"))

    t0 = time.perf_counter()
    info = write_random_hf(src, args.shape, args.dtype, shard)
    print(f"random {args.shape}: {info['params'] / 1e9:.3f}e9 params, largest tensor {info['largest'] / 2**20:.0f} MiB, "
          f"written in {time.perf_counter() - t0:.1f} s", flush=True)
    py = sys.executable
    # Fixed cost of a tool process: the imports and a 1-rank megatron init, no model.
    base_wall, base_rss, _ = run_measured([py, "-c", "import sys; sys.path.insert(0, %r); "
                                           "import steer_megatron.models.convert as c; c._require_single_process_state()"
                                           % os.path.dirname(TOOLS)])
    rows = []
    for label, cmd in (
        ("HF -> Megatron (stream)", [py, os.path.join(TOOLS, "convert_hf_to_megatron.py"), "--hf", src, "--out", ckpt]),
        ("Megatron -> HF (stream)", [py, os.path.join(TOOLS, "convert_megatron_to_hf.py"), "--ckpt", ckpt, "--out", back,
                                     "--max-shard-size", str(shard)]),
    ):
        wall, rss, last = run_measured(cmd)
        rows.append((label, wall, rss))
        print(f"{label}: {wall:.1f} s, peak RSS {rss / 2**20:.0f} MiB ({last})", flush=True)
    same = bitwise_equal(src, back)
    limit = 1.5 * info["largest"] + shard
    print(f"bitwise round trip: {same}; limit 1.5 x largest + one shard = {limit / 2**20:.0f} MiB; "
          f"imports + init only: {base_rss / 2**20:.0f} MiB")
    if args.write_docs:
        write_docs(args, info, rows, base_rss, limit, shard, same)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    ok = same and all(rss < limit for _, _, rss in rows)
    return 0 if ok else 1


SECTION = "## Checkpoint conversion (tools/bench_convert.py)"


def write_docs(args, info, rows, base_rss, limit, shard, same) -> None:
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    lines = [
        SECTION, "",
        f"Machine: {os.cpu_count()}-core CPU, {platform.machine()}, Python {platform.python_version()}, no GPU, "
        f"other jobs may run alongside (wall times are noisy; RSS is not). Date: {datetime.date.today().isoformat()}.",
        f"Command: `python tools/bench_convert.py --shape {args.shape} --dtype {args.dtype} "
        f"--max-shard-size {args.max_shard_size}`", "",
        f"Model: random {args.shape} shape, {info['params'] / 1e9:.3f}e9 parameters, {args.dtype}; "
        f"largest tensor (embedding) {mib(info['largest'])}; HF shards {mib(shard)}.", "",
        "| direction | wall time | peak RSS | limit (1.5 x largest tensor + one shard) |",
        "|---|---|---|---|",
    ]
    for label, wall, rss in rows:
        lines.append(f"| {label} | {wall:.1f} s | {mib(rss)} | {mib(limit)} |")
    lines += [
        "",
        f"Round trip bitwise identical: {'yes' if same else 'NO'}. A tool process that has only imported "
        f"torch + megatron-core and initialised a 1-rank group already has {mib(base_rss)} RSS; the rest is about one tensor "
        "(HF -> Megatron: the padded embedding being written; Megatron -> HF: one layer or the embedding). "
        "Both directions run in one process and never hold the model, so a model far larger than RAM "
        "converts (disk is the limit).", "",
    ]
    text = ""
    if os.path.exists(args.write_docs):
        with open(args.write_docs) as f:
            text = f.read()
    if SECTION in text:  # replace our section only, up to the next "## " heading
        head, rest = text.split(SECTION, 1)
        nxt = rest.find("\n## ")
        text = head + "\n".join(lines) + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        if not text:
            text = "# Benchmarks\n\n"
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines)
    with open(args.write_docs, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
