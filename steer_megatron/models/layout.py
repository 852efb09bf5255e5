"""The HF <-> Megatron name and tensor-layout map (one place, used by import, export and tools).

Layouts (../shared/DESIGN.md section 3):
- linear_qkv [(nh + 2 ng) hd, H]: per query group g, [q heads of g | k_g | v_g]; TP takes
  contiguous chunks of groups. Bias alike. (Plain [q; k; v] is wrong.)
- linear_fc1 [2F, H] = [gate; up]; a TP rank holds [gate_r; up_r].
- word_embeddings / output_layer: contiguous rows of the padded vocabulary.
- linear_proj / linear_fc2: split along dim 1. Norms are replicated.
Both layer specs are handled: the TE spec fuses the norms into linear_qkv / linear_fc1 as
`layer_norm_weight`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import torch

from steer_megatron.models.hf_config import HFArch, VocabInfo


class Kind(str, Enum):
    VOCAB = "vocab"  # rows of the (padded) vocabulary, TP split along dim 0
    QKV = "qkv"  # per-group interleaved q/k/v, TP split over groups
    FC1 = "fc1"  # [gate; up], TP split within each half
    ROW = "row"  # TP split along dim 1 (linear_proj, linear_fc2)
    REPLICATED = "replicated"  # norms


@dataclass(frozen=True)
class Entry:
    """One Megatron parameter and the HF tensors it is made of."""

    stage: int  # pipeline stage that owns it
    mcore_name: str  # name inside the stage's GPTModel (layer index local to the stage)
    kind: Kind
    hf_names: tuple[str, ...]


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Megatron suffix within a layer -> (kind, HF suffixes within model.layers.{i}.)
_LAYER_PARAMS_LOCAL = {
    "input_layernorm.weight": (Kind.REPLICATED, ("input_layernorm.weight",)),
    "pre_mlp_layernorm.weight": (Kind.REPLICATED, ("post_attention_layernorm.weight",)),
}
_LAYER_PARAMS_TE = {
    "self_attention.linear_qkv.layer_norm_weight": (Kind.REPLICATED, ("input_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": (Kind.REPLICATED, ("post_attention_layernorm.weight",)),
}
_LAYER_PARAMS_COMMON = {
    "self_attention.linear_qkv.weight": (
        Kind.QKV, ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    "self_attention.linear_qkv.bias": (
        Kind.QKV, ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
    "self_attention.linear_proj.weight": (Kind.ROW, ("self_attn.o_proj.weight",)),
    "mlp.linear_fc1.weight": (Kind.FC1, ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": (Kind.ROW, ("mlp.down_proj.weight",)),
}


def layer_param_map(te_spec: bool, qkv_bias: bool) -> dict[str, tuple[Kind, tuple[str, ...]]]:
    table = dict(_LAYER_PARAMS_TE if te_spec else _LAYER_PARAMS_LOCAL)
    for key, val in _LAYER_PARAMS_COMMON.items():
        if key.endswith(".bias") and not qkv_bias:
            continue
        table[key] = val
    return table


def plan(arch: HFArch, pp: int, te_spec: bool = False) -> list[Entry]:
    """Every Megatron parameter of the model at pipeline size pp, in HF order."""
    if arch.num_layers % pp:
        raise ValueError(f"pp={pp} does not divide num_hidden_layers={arch.num_layers}")
    per_stage = arch.num_layers // pp
    table = layer_param_map(te_spec, arch.qkv_bias)
    entries = [Entry(0, "embedding.word_embeddings.weight", Kind.VOCAB, ("model.embed_tokens.weight",))]
    for layer in range(arch.num_layers):
        stage, local = divmod(layer, per_stage)
        for suffix, (kind, hf_suffixes) in table.items():
            entries.append(Entry(
                stage, f"decoder.layers.{local}.{suffix}", kind,
                tuple(f"model.layers.{layer}.{s}" for s in hf_suffixes),
            ))
    entries.append(Entry(pp - 1, "decoder.final_layernorm.weight", Kind.REPLICATED, ("model.norm.weight",)))
    if not arch.tie_word_embeddings:
        entries.append(Entry(pp - 1, "output_layer.weight", Kind.VOCAB, ("lm_head.weight",)))
    elif pp > 1:
        # Tied at PP>1: the last stage keeps its own copy of the embedding (kept equal by
        # megatron's embedding group). It is loaded from embed_tokens but never exported.
        entries.append(Entry(pp - 1, "output_layer.weight", Kind.VOCAB, ("model.embed_tokens.weight",)))
    return entries


def hf_shapes(arch: HFArch) -> dict[str, tuple[int, ...]]:
    """The HF tensor names and shapes config.json implies (what a checkpoint must contain)."""
    h, hd = arch.hidden_size, arch.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (arch.num_attention_heads * hd, h)
        shapes[p + "self_attn.k_proj.weight"] = (arch.num_kv_heads * hd, h)
        shapes[p + "self_attn.v_proj.weight"] = (arch.num_kv_heads * hd, h)
        if arch.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (arch.num_attention_heads * hd,)
            shapes[p + "self_attn.k_proj.bias"] = (arch.num_kv_heads * hd,)
            shapes[p + "self_attn.v_proj.bias"] = (arch.num_kv_heads * hd,)
        shapes[p + "self_attn.o_proj.weight"] = (h, arch.num_attention_heads * hd)
        shapes[p + "mlp.gate_proj.weight"] = (arch.ffn_hidden_size, h)
        shapes[p + "mlp.up_proj.weight"] = (arch.ffn_hidden_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, arch.ffn_hidden_size)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    return shapes


def is_te_model(model: torch.nn.Module) -> bool:
    return any(n.endswith("layer_norm_weight") for n, _ in model.named_parameters())


# ---------------------------------------------------------------------------------------------
# TP-shard <-> full-tensor transforms. `rows` are HF tensors (or slices of them).


def qkv_local_ranges(arch: HFArch, tp: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Row ranges of (q_proj, k_proj/v_proj) that TP rank `rank` owns (contiguous query groups)."""
    groups = arch.num_kv_heads // tp
    g0, g1 = rank * groups, (rank + 1) * groups
    qrows = arch.heads_per_group * arch.head_dim
    return (g0 * qrows, g1 * qrows), (g0 * arch.head_dim, g1 * arch.head_dim)


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: HFArch) -> torch.Tensor:
    """HF q/k/v (rows for some whole query groups) -> Megatron's per-group [q | k | v] rows."""
    hd = arch.head_dim
    groups = k.shape[0] // hd
    tail = q.shape[1:]
    q = q.reshape(groups, arch.heads_per_group * hd, *tail)
    k = k.reshape(groups, hd, *tail)
    v = v.reshape(groups, hd, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, arch: HFArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of interleave_qkv for a full (all groups) tensor."""
    hd = arch.head_dim
    tail = qkv.shape[1:]
    per_group = (arch.heads_per_group + 2) * hd
    x = qkv.reshape(-1, per_group, *tail)
    q, k, v = torch.split(x, [arch.heads_per_group * hd, hd, hd], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def vocab_range(vocab: VocabInfo, tp: int, rank: int) -> tuple[int, int]:
    """Rows [start, end) of the padded vocabulary that TP rank `rank` owns."""
    per = vocab.padded_size // tp
    return rank * per, (rank + 1) * per


def merge_tp(kind: Kind, shards: list[torch.Tensor], arch: HFArch, vocab: VocabInfo) -> list[torch.Tensor]:
    """TP shards (rank order) of one Megatron parameter -> its HF tensors, in Entry.hf_names order."""
    if kind is Kind.REPLICATED:
        return [shards[0]]
    if kind is Kind.ROW:
        return [_cat(shards, dim=1)]
    if kind is Kind.VOCAB:
        return [_cat(shards, dim=0)[: vocab.size]]
    if kind is Kind.FC1:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    if kind is Kind.QKV:
        return list(split_qkv(_cat(shards, dim=0), arch))
    raise AssertionError(kind)


def _cat(shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    # torch.cat copies even a single tensor; at TP=1 that would double the largest tensor.
    return shards[0] if len(shards) == 1 else torch.cat(shards, dim=dim)
