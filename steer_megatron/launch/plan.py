"""Per-GPU memory plan of a training config, before a job is submitted.

    python -m steer_megatron.launch.plan configs/qwen2.5-math-7b_steer.yaml --gpu-mem-gib 80 [key=value ...]
    python -m steer_megatron.launch.plan CONFIG --model-config path/to/config.json   # plan without the weights

Prints, for the most loaded GPU (the first pipeline stage holds the embedding and, under 1F1B,
`pp` micro-batches of activations; the last holds the logits): parameters, gradients,
optimizer state, activations at `trainer.micro_batch_size` x (max_prompt_len + max_response_len)
with and without recompute, the logits and loss temporaries, and the total against the GPU.

The activation model counts the tensors megatron-core's local layer spec saves for backward,
per token and layer (checked against saved-tensor hooks on a real forward in
tests/test_plan.py, and against an H200 measurement: README / docs/benchmarks.md):
  two RMSNorms       2 x (input, normalised input, 1 / rms), in fp32 whatever the dtype
  linear inputs      qkv h, proj a*hd, fc1 h, fc2 f         (h / tp under sequence parallelism)
  attention core     q, k, v expanded to a heads, 3 a*hd; softmax output a*s in fp32 plus
                     its copy in the activation dtype; the causal mask s*s bytes per layer
  SwiGLU             fc1 output 2f, SiLU output f, the product f, one more f: 5f
Selective recompute drops the attention core's softmax and mask; full recompute keeps each
layer's input (h) and re-creates one layer's activations at a time in backward.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from steer_megatron.config import ConfigError, RunConfig, load_config
from steer_megatron.models.hf_config import HFArch, parse_hf_config

GIB = 1 << 30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The loss path's fp32 [chunk, V_local] temporaries (loss.vocab_parallel.CHUNK_BYTES each, a few alive).
_LOSS_TEMPS = 4 * (64 << 20)


@dataclass(frozen=True)
class Shape:
    """The sizes the plan needs; from an HF architecture and a run config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def of(cls, arch: HFArch) -> "Shape":
        return cls(arch.hidden_size, arch.num_layers, arch.num_attention_heads, arch.num_kv_heads, arch.head_dim,
                   arch.ffn_hidden_size, arch.vocab_size, arch.tie_word_embeddings, arch.qkv_bias)

    def layer_params(self) -> int:
        q, kv = self.heads * self.head_dim, 2 * self.kv_heads * self.head_dim
        qkv = self.hidden * (q + kv) + ((q + kv) if self.qkv_bias else 0)
        return qkv + q * self.hidden + 3 * self.hidden * self.ffn + 2 * self.hidden


def layer_activation_bytes_per_token(s: Shape, seq: int, tp: int, sp: bool, e: int, recompute: str) -> float:
    """Bytes one layer keeps for backward per token (mask excluded: see activation_bytes)."""
    h_local = s.hidden / tp if sp else s.hidden
    ahd = s.heads * s.head_dim / tp
    if recompute == "full":
        return h_local * e
    norms = 2 * (2 * h_local * 4 + 4)  # torch's RMSNorm keeps x, x * rstd and rstd in fp32 for any input dtype
    linears = (2 * h_local + ahd + s.ffn / tp) * e  # qkv, fc1, proj, fc2 inputs
    qkv_core = 3 * ahd * e
    probs = 0 if recompute == "selective" else s.heads * seq / tp * (4 + (e if e < 4 else 0))
    mlp = 4 * s.ffn / tp * e  # fc1 output 2f + SiLU output f + one more f (the product is fc2's input)
    return norms + linears + qkv_core + probs + mlp


def activation_bytes(s: Shape, *, mbs: int, seq: int, tp: int, pp: int, sp: bool, e: int, recompute: str) -> float:
    """Activations of the first pipeline stage: its layers x `pp` micro-batches in flight (1F1B)."""
    tokens = mbs * seq
    stage_layers = s.layers // pp
    in_flight = pp
    per_layer = layer_activation_bytes_per_token(s, seq, tp, sp, e, recompute) * tokens
    mask = 0 if recompute in ("selective", "full") else seq * seq
    total = in_flight * stage_layers * (per_layer + mask)
    if recompute == "full":  # backward re-creates one layer's activations at a time
        total += layer_activation_bytes_per_token(s, seq, tp, sp, e, "none") * tokens + seq * seq
    return total


@dataclass(frozen=True)
class MemoryPlan:
    rows: dict[str, float]  # bytes per GPU
    gpu_bytes: float | None
    notes: tuple[str, ...]

    @property
    def total(self) -> float:
        return sum(v for k, v in self.rows.items() if not k.startswith("("))

    @property
    def fits(self) -> bool:
        return self.gpu_bytes is None or self.total <= self.gpu_bytes

    def table(self) -> str:
        lines = [f"{'per GPU':<44} {'GiB':>9}"]
        for k, v in self.rows.items():
            lines.append(f"{k:<44} {v / GIB:>9.2f}")
        lines.append(f"{'total':<44} {self.total / GIB:>9.2f}")
        if self.gpu_bytes is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"{'GPU memory':<44} {self.gpu_bytes / GIB:>9.2f}   {verdict} ({self.total / self.gpu_bytes:.0%})")
        return "\n".join(lines + [f"- {n}" for n in self.notes])


def plan_memory(cfg: RunConfig, arch: HFArch, *, dp: int, gpu_mem_gib: float | None = None) -> MemoryPlan:
    s = Shape.of(arch)
    par, tr = cfg.parallel, cfg.trainer
    tp, pp, sp = par.tp, par.pp, par.sequence_parallel
    e = _DTYPE_BYTES[cfg.model.dtype]
    seq = cfg.data.max_prompt_len + cfg.data.max_response_len
    v_local = arch.vocab(tp).padded_size // tp

    layer_p = s.layer_params() / tp * (s.layers // pp)
    embed_p = v_local * s.hidden
    # the first stage holds the embedding; the last the output layer (a copy of it when tied and pp > 1)
    first = layer_p + embed_p + (0 if pp > 1 or s.tied else embed_p)
    last = layer_p + (embed_p if (pp > 1 or not s.tied) else 0)
    params = max(first, last)
    optimizer_per_param = (8 + (4 if e < 4 else 0)) / (dp if par.distributed_optimizer else 1)  # Adam m, v (+ fp32 main)
    rows = {
        "parameters": params * e,
        "gradients (fp32 reduce buffer)": params * 4,
        "optimizer state (Adam, fp32 main weights)": params * optimizer_per_param,
    }
    act = dict(mbs=tr.micro_batch_size, seq=seq, tp=tp, pp=pp, sp=sp, e=e)
    rows[f"activations, recompute={cfg.model.recompute}"] = activation_bytes(s, recompute=cfg.model.recompute, **act)
    tokens = tr.micro_batch_size * seq
    if cfg.algorithm.fused_lm_head:
        rows["LM head + loss temporaries (fused head)"] = tokens * s.hidden * e + _LOSS_TEMPS
    else:
        rows["logits + their gradient + loss temporaries"] = 2 * tokens * v_local * e + _LOSS_TEMPS
    for other in ("none", "selective", "full"):
        if other != cfg.model.recompute:
            rows[f"(activations if recompute={other})"] = activation_bytes(s, recompute=other, **act)
    notes = (f"layout tp={tp} pp={pp} dp={dp} sequence_parallel={sp} distributed_optimizer={par.distributed_optimizer}; "
             f"micro-batch {tr.micro_batch_size} x {seq} tokens, {cfg.model.dtype}",
             "rows in parentheses are alternatives, not part of the total; the CUDA allocator and NCCL "
             "buffers need a few GiB more")
    return MemoryPlan(rows, None if gpu_mem_gib is None else gpu_mem_gib * GIB, notes)


def load_arch(cfg: RunConfig, model_config: str | None) -> HFArch:
    path = model_config or cfg.model.hf_path
    if path is None:
        raise ConfigError("no model architecture: set model.hf_path or pass --model-config CONFIG_JSON")
    p = Path(path)
    if p.is_file():  # a bare config.json
        return parse_hf_config(p.parent) if p.name == "config.json" else _arch_from_file(p)
    if not (p / "config.json").is_file():
        raise ConfigError(f"{p} has no config.json: pass --model-config with the model's HF config.json "
                          f"(configs/model_shapes/ has the recipes' models)")
    return parse_hf_config(p)


def _arch_from_file(path: Path) -> HFArch:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(path.read_text())
        return parse_hf_config(d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steer_megatron.launch.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--gpu-mem-gib", type=float, help="memory of one GPU (e.g. 80 for an H100, 141 for an H200)")
    ap.add_argument("--world-size", type=int, help="trainer GPUs in all (default: tp x pp x cp, i.e. dp = 1)")
    ap.add_argument("--model-config", help="an HF config.json (or a dir with one) to plan without the weights")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        arch = load_arch(cfg, args.model_config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    model_ranks = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp
    dp = (args.world_size or model_ranks) // model_ranks
    plan = plan_memory(cfg, arch, dp=dp, gpu_mem_gib=args.gpu_mem_gib)
    if args.json:
        print(json.dumps({"rows_gib": {k: v / GIB for k, v in plan.rows.items()}, "total_gib": plan.total / GIB,
                          "fits": plan.fits}, indent=1))
    else:
        print(plan.table())
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
