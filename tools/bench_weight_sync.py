"""Seconds per GB of each weight-sync transport, into a live fleet, in one run.

    python tools/bench_weight_sync.py                          # 2 CPU workers, a random 58M-parameter Qwen2
    python tools/bench_weight_sync.py --hidden 1024 --layers 16 --workers 2 --repeats 5
    python tools/bench_weight_sync.py --engine sglang --model /models/Qwen2.5-7B --workers 8   # GPU nodes

Each transport is built by `make_weight_sync` exactly as the trainer builds it from
`rollout.weight_sync` and pushes the same fp32 state dict `--repeats` times (pause, push, flush,
bump the version, continue; no parity probe, so only the transport is timed). Reports the median
seconds per sync, seconds per GB, and the ratio of each transport to `disk`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from steer_megatron.parallel import free_port, free_port_block  # noqa: E402
from steer_megatron.rollout import Fleet, FleetConfig, RouterConfig  # noqa: E402
from steer_megatron.rollout.weight_sync import TRANSPORTS, TransportSettings, make_weight_sync  # noqa: E402


def random_model(out: Path, hidden: int, layers: int, vocab: int) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                      max_position_embeddings=256, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).to(torch.float32).save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model dir (default: a random Qwen2 of --hidden/--layers/--vocab)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--engine", choices=["cpu", "sglang"], default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--bucket-mb", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--transports", default=",".join(TRANSPORTS))
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    import torch
    from safetensors.torch import load_file

    tmp = tempfile.TemporaryDirectory()
    model = Path(args.model) if args.model else random_model(Path(tmp.name) / "model", args.hidden, args.layers, args.vocab)
    state = {}
    for f in sorted(model.glob("*.safetensors")):
        state.update(load_file(f))
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    base = free_port()
    cfg = FleetConfig(model_path=str(model), num_workers=args.workers, engine=args.engine, base_port=base,
                      port_stride=10 if args.engine == "sglang" else 1,
                      router=RouterConfig(port=free_port(), prometheus_port=free_port(), policy="round_robin"),
                      cpu_threads=1, log_dir=str(Path(tmp.name) / "logs"), startup_timeout_s=600)
    results = []
    with Fleet(cfg) as fleet:
        for name in args.transports.split(","):
            settings = TransportSettings(export_root=Path(tmp.name) / "rollout_weights", source_dir=model,
                                         master_port=free_port_block(32), bucket_bytes=args.bucket_mb << 20,
                                         backend="gloo" if args.engine == "cpu" else "nccl")
            sync = make_weight_sync(name, fleet, settings)
            times = []
            for i in range(args.repeats + 1):  # the first builds the group / warms the page cache
                t0 = time.perf_counter()
                sync.sync(lambda: iter(state.items()), version=f"{name}-{i}")
                if i:
                    times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            results.append({"transport": name, "gb": round(nbytes / 1e9, 4), "workers": args.workers,
                            "median_s": round(med, 3), "s_per_gb": round(med / (nbytes / 1e9), 3),
                            "times_s": [round(t, 3) for t in times]})
            print(json.dumps(results[-1]), flush=True)
    disk = next((r for r in results if r["transport"] == "disk"), None)
    if disk:
        for r in results:
            r["vs_disk"] = round(r["median_s"] / disk["median_s"], 3)
    print(json.dumps({"torch": torch.__version__, "results": results}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
