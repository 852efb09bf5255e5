"""A real megatron-core GPTModel (tiny Qwen2-like) + STEER loss: TP = 2 equals TP = 1.

Same weights at both layouts (sliced by the Megatron TP layout), same batch: loss, per-token
statistics and every parameter gradient (gathered back to the TP = 1 layout) must agree.
"""
import torch

from steer_megatron.loss import PolicyLossInputs, get_policy_loss, padded_vocab_size, token_stats
from steer_megatron.parallel import ParallelLayout, init_parallel, spawn_ranks

VOCAB, HIDDEN, HEADS, GROUPS, FFN = 200, 64, 4, 2, 96


def _build(tp):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS, ffn_hidden_size=FFN,
        tensor_model_parallel_size=tp, normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
    )
    return GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=padded_vocab_size(VOCAB, tp),
                    max_sequence_length=64, position_embedding_type="rope", rotary_base=10000,
                    share_embeddings_and_output_weights=False)


def _shard(name, full, tp, rank):
    """The TP-rank slice of a full (TP = 1) parameter, in megatron's layouts (DESIGN.md section 3)."""
    if "linear_fc1.weight" in name:  # [gate; up] -> [gate_r; up_r]
        gate, up = full.chunk(2, 0)
        return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]])
    if any(k in name for k in ("linear_qkv", "word_embeddings", "output_layer")):
        return full.chunk(tp, 0)[rank]  # qkv rows are grouped per query group: contiguous chunks
    if any(k in name for k in ("linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(tp, 1)[rank]
    return full  # norms are replicated


def _unshard(name, shards):
    if "linear_fc1.weight" in name:
        pairs = [s.chunk(2, 0) for s in shards]
        return torch.cat([torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])])
    if any(k in name for k in ("linear_qkv", "word_embeddings", "output_layer")):
        return torch.cat(shards, 0)
    if any(k in name for k in ("linear_proj.weight", "linear_fc2.weight")):
        return torch.cat(shards, 1)
    return shards[0]


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    adv = torch.randn(3, 11, generator=g)
    mask = torch.rand(3, 11, generator=g) > 0.2
    old_shift = 0.1 * torch.randn(3, 11, generator=g)
    old_ent = torch.rand(3, 11, generator=g) * 4
    return ids, adv, mask, old_shift, old_ent


def _steer_step(model, tp_group):
    ids, adv, mask, old_shift, old_ent = _batch()
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    logits = model(ids, pos, None)  # [b, s, V_pad / tp]: vocab-parallel
    st = token_stats(logits[:, :-1].contiguous(), ids[:, 1:], vocab_size=VOCAB, tp_group=tp_group)
    inp = PolicyLossInputs(log_prob=st.logprob, old_log_prob=st.logprob.detach() + old_shift, advantages=adv,
                           mask=mask, entropy=st.entropy, old_entropy=old_ent)
    loss, _ = get_policy_loss("steer")(inp)
    loss.backward()
    return loss.detach(), torch.stack([st.logprob, st.entropy]).detach()


def tp1_worker():
    init_parallel(ParallelLayout(tp=1), seed=7)
    model = _build(1)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, stats = _steer_step(model, None)
    return weights, loss, stats, {n: p.grad.clone() for n, p in model.named_parameters()}


def tp2_worker(weights):
    init_parallel(ParallelLayout(tp=2), seed=7)
    from megatron.core import parallel_state as ps

    model = _build(2)
    rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(_shard(n, weights[n], 2, rank))
    loss, stats = _steer_step(model, ps.get_tensor_model_parallel_group())
    return loss, stats, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gptmodel_tp2_steer_loss_and_gradients_match_tp1():
    weights, loss1, stats1, grads1 = spawn_ranks(tp1_worker, 1)[0]
    ranks = spawn_ranks(tp2_worker, 2, weights)
    for loss2, stats2, _ in ranks:
        torch.testing.assert_close(loss2, loss1, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(stats2, stats1, atol=1e-5, rtol=1e-5)
    assert set(ranks[0][2]) == set(grads1)
    for name, g1 in grads1.items():
        g2 = _unshard(name, [r[2][name] for r in ranks])
        assert g2.shape == g1.shape, name
        torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in grads1.values())
