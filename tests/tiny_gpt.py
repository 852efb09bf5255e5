"""A tiny Qwen2-like megatron-core GPTModel for tests, and its TP slicing (DESIGN.md section 3)."""
import torch

from steer_megatron.loss import padded_vocab_size

HIDDEN, HEADS, GROUPS, FFN = 64, 4, 2, 96


def build_tiny_gpt(tp: int, vocab: int, layers: int = 2, pp: int = 1, tie: bool = False, **config_overrides):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=layers, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS, ffn_hidden_size=FFN,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, normalization="RMSNorm", layernorm_epsilon=1e-6,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        **config_overrides,
    )
    return GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=padded_vocab_size(vocab, tp),
                    max_sequence_length=64, position_embedding_type="rope", rotary_base=10000,
                    share_embeddings_and_output_weights=tie)


def shard(name, full, tp, rank):
    """The TP-rank slice of a full (TP = 1) parameter."""
    if "linear_fc1.weight" in name:  # [gate; up] -> [gate_r; up_r]
        gate, up = full.chunk(2, 0)
        return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]])
    if any(k in name for k in ("linear_qkv", "word_embeddings", "output_layer")):
        return full.chunk(tp, 0)[rank]  # qkv rows are grouped per query group: contiguous chunks
    if any(k in name for k in ("linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(tp, 1)[rank]
    return full  # norms are replicated


def unshard(name, shards):
    if "linear_fc1.weight" in name:
        pairs = [s.chunk(2, 0) for s in shards]
        return torch.cat([torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])])
    if any(k in name for k in ("linear_qkv", "word_embeddings", "output_layer")):
        return torch.cat(shards, 0)
    if any(k in name for k in ("linear_proj.weight", "linear_fc2.weight")):
        return torch.cat(shards, 1)
    return shards[0]


def rl_batch(vocab: int, spans: list[tuple[int, int]], seq: int = 16, seed: int = 1):
    """Random token ids for len(spans) sequences of `seq` tokens, a response mask over
    [start, stop) of the seq - 1 predicted positions, and one random advantage per sequence."""
    from steer_megatron.train.actor import ActorBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(spans), seq), generator=g)
    mask = torch.zeros(len(spans), seq - 1, dtype=torch.bool)
    for i, (start, stop) in enumerate(spans):
        mask[i, start:stop] = True
    return ActorBatch(input_ids=ids, loss_mask=mask, advantages=torch.randn(len(spans), generator=g)[:, None] * mask)


@torch.no_grad()
def plain_entropy(model, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Float64 entropy at every predicted position, from the model's raw logits (padded vocab
    columns dropped): an independent reference for token_stats."""
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    logits = model(ids, pos, None)[:, :-1, :vocab].double()
    lp = torch.log_softmax(logits, -1)
    return -(lp.exp() * lp).sum(-1)
