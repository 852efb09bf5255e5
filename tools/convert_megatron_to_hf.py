#!/usr/bin/env python
"""Convert a megatron-core dist checkpoint (from training or convert_hf_to_megatron.py) into a
HuggingFace directory: sharded safetensors + index, config.json, generation_config.json and the
tokenizer files of the source model. Loads with transformers.AutoModelForCausalLM and SGLang.

Examples:
  python tools/convert_megatron_to_hf.py --ckpt runs/exp1/checkpoints --out hf/exp1 --hf-config /models/Qwen2.5-Math-7B
  python tools/convert_megatron_to_hf.py --ckpt CKPT/iter_0000200 --out HF_OUT --method ranks --tp 2
"""
from __future__ import annotations

import argparse
import math
import time

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import DTYPE_CHOICES, dtype_arg, parse_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, metavar="CKPT_DIR",
                   help="a checkpoint root (its `latest` checkpoint is used) or one iter_XXXXXXX directory")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--hf-config", metavar="HF_DIR", default=None,
                   help="source HF model dir: config.json, generation_config.json and tokenizer files are taken "
                        "from it (default: the config stored in the checkpoint, tokenizer from the model it was "
                        "converted from if that path still exists)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype of the HF weights; auto = the dtype in config.json (default auto)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--method", choices=("stream", "ranks"), default="stream",
                   help="stream: one process reading one layer at a time (any model size, default); "
                        "ranks: launch tp*pp gloo/NCCL ranks, load the checkpoint into a megatron model and export "
                        "through iter_hf_weights (the rollout weight-sync path)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size for --method ranks (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size for --method ranks (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    max_shard = parse_size(args.max_shard_size)
    start = time.perf_counter()
    if args.method == "stream":
        from steer_megatron.models.checkpoint import read_meta
        from steer_megatron.models.convert import DTYPE_NAMES, _tqdm_progress, dist_checkpoint_to_hf
        from steer_megatron.models.hf_config import parse_hf_config
        from steer_megatron.models.hf_export import hf_dtype
        from steer_megatron.models.layout import hf_shapes

        arch = parse_hf_config(args.hf_config) if args.hf_config else parse_hf_config(read_meta(args.ckpt).hf_config)
        dtype = DTYPE_NAMES[dtype_arg(args.dtype)] if dtype_arg(args.dtype) else hf_dtype(arch)
        total = sum(math.prod(s) for s in hf_shapes(arch).values()) * dtype.itemsize
        progress, close = _tqdm_progress(total, "megatron->hf")
        dist_checkpoint_to_hf(args.ckpt, args.out, hf_config_dir=args.hf_config, dtype=dtype,
                              max_shard_bytes=max_shard, overwrite=args.overwrite, progress=progress)
        close()
    else:
        from steer_megatron.models.convert import megatron_to_hf_rank
        from steer_megatron.parallel import spawn_ranks

        print(f"launching {args.tp * args.pp} ranks (tp={args.tp}, pp={args.pp}) ...", flush=True)
        spawn_ranks(megatron_to_hf_rank, args.tp * args.pp, args.ckpt, args.out, args.tp, args.pp, args.hf_config,
                    dtype_arg(args.dtype), max_shard, args.overwrite, True)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":  # dist_checkpointing and spawned ranks need the guard
    raise SystemExit(main())
