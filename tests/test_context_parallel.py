"""Context parallelism's loss arithmetic without TE: each CP rank's share of the sequence (the
load-balanced split of steer_megatron.train.context_parallel) gives losses that sum to the CP=1
loss, statistics that place back to CP=1's, and CP=1's gradient share. The ranks are simulated in
one process: the split and the global token normaliser are all CP adds to the loss path."""

import pytest
import torch

from steer_megatron.loss import get_policy_loss, token_stats
from steer_megatron.loss.policy_losses import PolicyLossInputs, loss_needs
from steer_megatron.loss.schema import PolicyLossConfig, SteerConfig
from steer_megatron.train.context_parallel import cp_index, split_for_cp


def test_cp_index_layout():
    # s=8, cp=2: chunks of 2; rank 0 keeps chunks 0 and 3, rank 1 keeps chunks 1 and 2
    assert cp_index(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert cp_index(8, 1, 2).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError):
        cp_index(6, 0, 2)


def _loss(name, logits, data, normalizer, cfg, omega_range=None):
    st = token_stats(logits, data["labels"], vocab_size=logits.shape[-1])
    inp = PolicyLossInputs(log_prob=st.logprob, old_log_prob=data["old_log_prob"], advantages=data["advantages"],
                           mask=data["loss_mask"], entropy=st.entropy, old_entropy=data["old_entropy"],
                           sum_p2=st.sum_p2, sum_p2_logp=st.sum_p2_logp, token_normalizer=normalizer, omega_range=omega_range)
    loss, _ = get_policy_loss(name)(inp, cfg)
    return loss, st


@pytest.mark.parametrize("name", ["grpo", "steer"])
def test_cp2_matches_cp1(name):
    torch.manual_seed(0)
    b, s, v, cp = 2, 16, 11, 2
    input_ids = torch.randint(0, v, (b, s))
    full = {
        "labels": input_ids.roll(-1, dims=1),  # built on the full sequence, before the split
        "loss_mask": torch.rand(b, s) > 0.3,
        "old_log_prob": -torch.rand(b, s) * 3,
        "advantages": torch.randn(b, s),
        "old_entropy": torch.rand(b, s),
    }
    full["loss_mask"][:, -1] = False  # the wrapped last label takes no part
    logits = torch.randn(b, s, v, dtype=torch.float32, requires_grad=True)
    # STEER with group=mini_batch: the |Omega| range comes from the old pass over the full sequence
    # (the actor's _mini_batch_stat runs before any split), so every CP rank uses the same range.
    # group=micro_batch/dp take min/max over the tensors they are given: under CP that would be one
    # rank's share, which is why this test uses mini_batch (see README).
    cfg = PolicyLossConfig(steer=SteerConfig(group="mini_batch"))
    stat = loss_needs(name, cfg).mini_batch_stat
    omega = None if stat is None else stat(PolicyLossInputs(
        log_prob=full["old_log_prob"], old_log_prob=full["old_log_prob"], advantages=full["advantages"],
        mask=full["loss_mask"], old_entropy=full["old_entropy"]), cfg)
    normalizer = full["loss_mask"].sum().double()  # the global count: full sequence, all CP ranks

    ref, ref_st = _loss(name, logits, full, normalizer, cfg, omega)
    (ref_grad,) = torch.autograd.grad(ref, logits)

    total = torch.zeros((), dtype=torch.float64)
    placed = torch.zeros(b, s)
    grad = torch.zeros_like(logits)
    for r in range(cp):
        idx = cp_index(s, r, cp)
        share = split_for_cp(full, r, cp)
        part = logits.detach()[:, idx].clone().requires_grad_(True)
        loss, st = _loss(name, part, share, normalizer, cfg, omega)
        (g,) = torch.autograd.grad(loss, part)
        total += loss.double()
        placed[:, idx] = st.logprob.detach()
        grad[:, idx] = g

    eps = torch.finfo(torch.float32).eps
    tol = 8 * eps * (b * s) * max(1.0, abs(ref.item()))  # fp32 sums over b*s tokens in another order
    assert abs(total.item() - ref.item()) <= tol
    torch.testing.assert_close(placed, ref_st.logprob.detach(), rtol=0, atol=8 * eps * v)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=8 * eps * v)
