"""A real megatron-core GPTModel (tiny Qwen2-like) + STEER loss: TP = 2 equals TP = 1.

Same weights at both layouts (sliced by the Megatron TP layout), same batch: loss, per-token
statistics and every parameter gradient (gathered back to the TP = 1 layout) must agree.
"""
import torch

from steer_megatron.loss import PolicyLossInputs, get_policy_loss, token_stats
from steer_megatron.parallel import ParallelLayout, init_parallel, spawn_ranks
from tests.tiny_gpt import build_tiny_gpt, shard, unshard

VOCAB = 200


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
    model = build_tiny_gpt(1, VOCAB)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, stats = _steer_step(model, None)
    return weights, loss, stats, {n: p.grad.clone() for n, p in model.named_parameters()}


def tp2_worker(weights):
    init_parallel(ParallelLayout(tp=2), seed=7)
    from megatron.core import parallel_state as ps

    model = build_tiny_gpt(2, VOCAB)
    rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(shard(n, weights[n], 2, rank))
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
        g2 = unshard(name, [r[2][name] for r in ranks])
        assert g2.shape == g1.shape, name
        torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in grads1.values())
