"""Vocab-parallel statistics, STEER loss and logit gradients at TP = 2 and 4 (gloo) versus TP = 1."""
import pytest
import torch

from steer_megatron.loss import PolicyLossConfig, PolicyLossInputs, SteerConfig, get_policy_loss, padded_vocab_size, token_stats
from steer_megatron.parallel import ParallelLayout, init_parallel, spawn_ranks
from tests.reference_math import dense_stats

N_TOK = 48


def _problem(vocab, tp, seed=0):
    """Identical on every rank: full padded logits (garbage in the padding), targets, RL inputs."""
    v_pad = padded_vocab_size(vocab, tp)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N_TOK, v_pad, generator=g) * 3
    logits[:, vocab:] = 1e4  # must never leak into the statistics
    target = torch.randint(0, vocab, (N_TOK,), generator=g)
    adv = torch.randn(6, 8, generator=g)
    old_shift = 0.2 * torch.randn(6, 8, generator=g)
    old_ent = torch.rand(6, 8, generator=g) * 3
    mask = torch.rand(6, 8, generator=g) > 0.2
    return logits, target, adv, old_shift, old_ent, mask


def _loss_and_grad(logits_shard, target, vocab, group, adv, old_shift, old_ent, mask, form):
    x = logits_shard.clone().requires_grad_()
    st = token_stats(x, target, vocab_size=vocab, tp_group=group, chunk_tokens=5)
    shape = adv.shape
    lp = st.logprob.view(shape)
    inp = PolicyLossInputs(log_prob=lp, old_log_prob=lp.detach() + old_shift, advantages=adv, mask=mask,
                           entropy=st.entropy.view(shape), old_entropy=old_ent,
                           sum_p2=st.sum_p2.view(shape), sum_p2_logp=st.sum_p2_logp.view(shape))
    cfg = PolicyLossConfig(steer=SteerConfig(form=form))
    loss, metrics = get_policy_loss("steer")(inp, cfg)
    (loss + 0.01 * st.entropy.sum()).backward()  # exercise the entropy gradient too
    stats = torch.stack([st.logprob, st.entropy, st.sum_p2, st.sum_p2_logp]).detach()
    return stats, loss.detach(), x.grad, {k: v.item() for k, v in metrics.items()}


def tp_worker(tp, vocab, form):
    init_parallel(ParallelLayout(tp=tp))
    from megatron.core import parallel_state as ps

    logits, target, *rl = _problem(vocab, tp)
    rank, v_local = ps.get_tensor_model_parallel_rank(), logits.shape[1] // tp
    shard = logits[:, rank * v_local : (rank + 1) * v_local]
    return _loss_and_grad(shard, target, vocab, ps.get_tensor_model_parallel_group(), *rl, form)


@pytest.mark.parametrize("tp,vocab,form", [(2, 1000, "exact"), (4, 300, "release")])
def test_tensor_parallel_matches_tp1(tp, vocab, form):
    """vocab=300 at TP=4 pads to 512: rank 2 holds 44 real columns and rank 3 none at all."""
    results = spawn_ranks(tp_worker, tp, tp, vocab, form)
    logits, target, *rl = _problem(vocab, tp)
    ref_stats, ref_loss, ref_grad, ref_metrics = _loss_and_grad(logits, target, vocab, None, *rl, form)
    dense = torch.stack(dense_stats(logits, target, vocab)).float()
    torch.testing.assert_close(ref_stats, dense, atol=2e-5, rtol=2e-5)
    for stats, loss, _, metrics in results:
        torch.testing.assert_close(stats, ref_stats, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
        for k in ref_metrics:
            assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-4, abs=1e-6), k
    grad = torch.cat([r[2] for r in results], dim=1)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)
    assert torch.all(grad[:, vocab:] == 0)


def dp_worker():
    init_parallel(ParallelLayout(tp=1))
    from megatron.core import parallel_state as ps
    from steer_megatron.loss import steer_weights

    rank = ps.get_data_parallel_rank()
    adv, lp, old, ent, mask = _dp_batches()[rank]
    return steer_weights(adv, lp, old, ent, mask, group="dp", dp_group=ps.get_data_parallel_group())


def _dp_batches():
    g = torch.Generator().manual_seed(5)
    out = []
    for scale in (1.0, 10.0):  # rank 1 holds the larger |Omega|: rank 0's weights must feel it
        adv = torch.randn(3, 7, generator=g) * scale
        lp = -torch.rand(3, 7, generator=g) * 3
        out.append((adv, lp, lp - 0.1, torch.rand(3, 7, generator=g) * 2, torch.rand(3, 7, generator=g) > 0.2))
    return out


def test_steer_weight_group_over_data_parallel_ranks():
    from steer_megatron.loss import steer_weights

    got = spawn_ranks(dp_worker, 2)
    batches = _dp_batches()
    joined = [torch.cat([b[i] for b in batches]) for i in range(5)]
    want = steer_weights(*joined).split(3)
    local = steer_weights(*batches[0])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert not torch.allclose(got[0], local)  # the group really changed rank 0's weights
