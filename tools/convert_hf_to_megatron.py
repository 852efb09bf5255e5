#!/usr/bin/env python
"""Convert a HuggingFace Qwen2/Qwen2.5/Llama checkpoint into a megatron-core dist checkpoint.

The result is a model-only training checkpoint (CKPT_DIR/iter_0000000 + CKPT_DIR/latest) that
steer_megatron.models.checkpoint.load_checkpoint reads at any TP x PP x DP layout.

Examples:
  python tools/convert_hf_to_megatron.py --hf /models/Qwen2.5-Math-7B --out ckpt/qwen-math --tp 4
  python tools/convert_hf_to_megatron.py --hf HF_DIR --out CKPT --tp 2 --pp 2 --method ranks
"""
from __future__ import annotations

import argparse
import os
import time

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import DTYPE_CHOICES, dtype_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, metavar="HF_DIR",
                   help="HF model directory: config.json + model.safetensors or sharded *.safetensors + index json")
    p.add_argument("--out", required=True, metavar="CKPT_DIR",
                   help="checkpoint root to write; the checkpoint goes to CKPT_DIR/iter_<step> and CKPT_DIR/latest")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size the checkpoint is prepared for: checked against the heads and sets "
                        "the vocabulary padding (128 * tp); load at another TP with the same padding (default 1)")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline-parallel size: checked to divide the layer count (default 1)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="parameter dtype stored in the checkpoint; auto = the dtype in config.json (default auto)")
    p.add_argument("--method", choices=("stream", "ranks"), default="stream",
                   help="stream: one process, one tensor in memory at a time (any model size, default); "
                        "ranks: launch tp*pp gloo/NCCL ranks that each load their HF slices into a real "
                        "megatron model and save it (checks that the model builds at that layout)")
    p.add_argument("--step", type=int, default=0, help="step number recorded in the checkpoint (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint of the same step")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from steer_megatron.models.checkpoint import iter_dir_name
    from steer_megatron.models.hf_config import parse_hf_config

    arch = parse_hf_config(args.hf)  # fails early, with the reason, on an unsupported model
    arch.check_layout(args.tp, args.pp)
    target = os.path.join(os.path.abspath(args.out), iter_dir_name(args.step))
    if os.path.exists(target) and not args.overwrite:
        raise SystemExit(f"{target} exists; pass --overwrite or choose another --out / --step")
    start = time.perf_counter()
    if args.method == "stream":
        from steer_megatron.models.convert import DTYPE_NAMES, _tqdm_progress, hf_to_dist_checkpoint
        from steer_megatron.models.hf_import import HFReader

        with HFReader(args.hf) as reader:
            total = sum(reader.info(n).nbytes for n in reader.weight_map)
        progress, close = _tqdm_progress(total, "hf->megatron")
        dtype = dtype_arg(args.dtype)
        path = hf_to_dist_checkpoint(args.hf, args.out, tp=args.tp, pp=args.pp, step=args.step,
                                     dtype=DTYPE_NAMES[dtype] if dtype else None, progress=progress)
        close()
    else:
        from steer_megatron.models.convert import hf_to_megatron_rank
        from steer_megatron.parallel import spawn_ranks

        print(f"launching {args.tp * args.pp} ranks (tp={args.tp}, pp={args.pp}) ...", flush=True)
        path = spawn_ranks(hf_to_megatron_rank, args.tp * args.pp, args.hf, args.out, args.tp, args.pp,
                           dtype_arg(args.dtype), args.step)[0]
    print(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":  # dist_checkpointing and spawned ranks need the guard
    raise SystemExit(main())
