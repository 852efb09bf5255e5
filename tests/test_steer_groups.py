"""STEER's normalisation group and the batch layout: steer.group=mini_batch gives the same weights
whatever the micro-batch split and DP size (gloo ranks), trainer.balance_batch mixes prompts across
micro-batches, and algorithm.token_mean_over=micro_batch is the release's aggregation."""
import math

import pytest
import torch
import torch.distributed as dist

from steer_megatron.loss import old_policy_omega_range, steer_weights
from steer_megatron.parallel import spawn_ranks
from steer_megatron.train.balance import balanced_order, row_lengths
from tests.models_helpers import update_gradients

ROWS, TOKENS, W_MIN = 8, 24, 0.8


def _rows(seed=0):
    """Per-token float64 inputs of ROWS sequences: advantages, current/old log-probs, old entropy, mask."""
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(ROWS, 1, generator=g, dtype=torch.float64).expand(ROWS, TOKENS).contiguous()
    old = -torch.rand(ROWS, TOKENS, generator=g, dtype=torch.float64) * 3
    lp = (old + 0.2 * torch.randn(ROWS, TOKENS, generator=g, dtype=torch.float64)).clamp(max=0)
    ent = torch.rand(ROWS, TOKENS, generator=g, dtype=torch.float64) * 2
    mask = torch.zeros(ROWS, TOKENS, dtype=torch.bool)
    for i in range(ROWS):
        mask[i, 2: 6 + 2 * i] = True  # different lengths
    return adv, lp, old, ent, mask


def _weights(rows, micro: int, group: str, dp_group=None):
    adv, lp, old, ent, mask = rows
    rng = None
    if group == "mini_batch":
        rng = old_policy_omega_range(adv, old, ent, mask, form="release", dp_group=dp_group)
    return torch.cat([steer_weights(adv[i:i + micro], lp[i:i + micro], old[i:i + micro], ent[i:i + micro],
                                    mask[i:i + micro], w_min=W_MIN, group=group, omega_range=rng)
                      for i in range(0, len(adv), micro)])


def dp_worker(micro):
    dist.init_process_group("gloo")  # spawn_ranks set the rendezvous environment
    rank, world = dist.get_rank(), dist.get_world_size()
    per = ROWS // world
    mine = tuple(t[rank * per:(rank + 1) * per] for t in _rows())
    return _weights(mine, micro, "mini_batch", dp_group=dist.group.WORLD)


def test_mini_batch_group_weights_do_not_depend_on_the_split_or_dp():
    rows = _rows()
    adv, lp, old, ent, mask = rows
    ref = _weights(rows, 4, "mini_batch")
    assert torch.equal(_weights(rows, 2, "mini_batch"), ref) and torch.equal(_weights(rows, 8, "mini_batch"), ref)
    dp2 = torch.cat(spawn_ranks(dp_worker, 2, 2))  # DP = 2 ranks x micro-batches of 2 (gloo)
    assert torch.equal(dp2, ref)
    # against the float64 formula: release |Omega| at the current p, k from the old pass's max over all tokens
    p, p_old = lp.exp(), old.exp()
    cur = (adv / p_old * p * (1 - p) * (lp + ent)).abs()
    hi = (adv * (1 - p_old) * (old + ent)).abs()[mask].max().item()  # p = p_old: A / p_old * p_old (1 - p_old) L
    k = -math.log(W_MIN) / max(hi, 0.02)
    want = torch.where(mask, torch.exp(-k * cur).clamp(W_MIN, 1.0), torch.zeros_like(cur))
    torch.testing.assert_close(ref, want.float(), rtol=1e-5, atol=1e-6)  # omega() computes in float32
    # the micro-batch group (as released) does depend on the split: the test above can fail
    assert not torch.allclose(_weights(rows, 2, "micro_batch"), _weights(rows, 4, "micro_batch"))


def test_balanced_order_mixes_prompts_and_balances_tokens():
    n, mbs = 8, 4  # 4 prompts x n = 8 samples, prompt order, lengths similar within a prompt
    g = torch.Generator().manual_seed(0)
    prompt = torch.arange(32) // n
    lengths = 100 * (prompt + 1) + torch.randint(0, 20, (32,), generator=g)
    order = balanced_order(lengths, mbs)
    assert sorted(order.tolist()) == list(range(32))  # a permutation
    chunks = order.view(-1, mbs)
    for c in chunks:
        assert c.tolist() == sorted(c.tolist())  # rows keep their order inside a micro-batch
        assert len(set(prompt[c].tolist())) == 4  # every micro-batch mixes all 4 prompts
    totals = lengths[chunks].sum(1)
    assert int(totals.max() - totals.min()) <= int(lengths.max() - lengths.min())  # snake dealing balances
    assert torch.equal(order, balanced_order(lengths, mbs))  # deterministic
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2:4] = True
    assert row_lengths(mask).tolist() == [5, 1]  # position t predicts token t + 1: 5 tokens up to the last
    with pytest.raises(ValueError, match="micro-batches of 3"):
        balanced_order(lengths, 3)


# -- the same through MegatronActor.update (tiny GPT, fp32) ------------------------------------------


def _update_grads(weights, **cfg):
    """main_grad of every parameter after one update of tests.test_actor's batch (the optimizer step
    is replaced by a capture, so the gradient is what the loss and the schedule produced)."""
    from dataclasses import replace

    from megatron.core import parallel_state as ps

    from steer_megatron.loss import PolicyLossConfig, SteerConfig, get_policy_loss
    from tests.test_actor import _actor, _batch

    model, actor = _actor(1, weights)
    group = cfg.pop("group", "micro_batch")
    actor.cfg = replace(actor.cfg, loss=PolicyLossConfig(steer=SteerConfig(group=group)), **cfg)
    actor.loss_fn = get_policy_loss(actor.cfg.policy_loss)
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batch = _batch()
    batch.advantages = batch.advantages * torch.linspace(0.5, 1.5, len(batch))[:, None]  # unequal per row
    n = len(batch) // dp
    local = batch.slice(rank * n, (rank + 1) * n)
    actor.old_pass(local)
    return update_gradients(actor, model, local)[0]


def _reference_grads(weights, micro: int, over: str):
    """Plain autograd on the unwrapped model: the grpo loss at ratio 1 (-A r per token), token-mean
    over the whole batch (over='mini_batch') or per micro-batch then averaged (the release)."""
    from tests.test_actor import VOCAB, _batch
    from tests.tiny_gpt import build_tiny_gpt

    model = build_tiny_gpt(1, VOCAB)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(weights[k])
    batch = _batch()
    adv = batch.advantages * torch.linspace(0.5, 1.5, len(batch))[:, None]
    pos = torch.arange(batch.input_ids.shape[1])[None].expand_as(batch.input_ids)
    logits = model(batch.input_ids, pos, None)[:, :-1, :VOCAB].double()
    lp = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    per_token = -adv * torch.exp(lp - lp.detach()) * batch.loss_mask
    m = batch.loss_mask.double()
    if over == "mini_batch":
        loss = per_token.sum() / m.sum()
    else:
        loss = torch.stack([per_token[i:i + micro].sum() / m[i:i + micro].sum()
                            for i in range(0, len(adv), micro)]).mean()
    loss.backward()
    return {k: p.grad.detach().float() for k, p in model.named_parameters()}


def layouts_worker():
    from steer_megatron.parallel import ParallelLayout, init_parallel
    from tests.test_actor import VOCAB
    from tests.tiny_gpt import build_tiny_gpt

    init_parallel(ParallelLayout(), seed=3)
    weights = {n: p.detach().clone() for n, p in build_tiny_gpt(1, VOCAB).named_parameters()}
    out = {"weights": weights}
    out.update({"ref_" + over: _reference_grads(weights, 2, over) for over in ("mini_batch", "micro_batch")})
    for over in ("mini_batch", "micro_batch"):
        out["grpo_" + over] = _update_grads(weights, policy_loss="grpo", micro_batch_size=2, token_mean_over=over)
    for group in ("mini_batch", "micro_batch"):
        for mbs in (2, 4):
            out[f"steer_{group}_{mbs}"] = _update_grads(weights, policy_loss="steer", micro_batch_size=mbs, group=group)
    return out


def layouts_dp_worker(weights):
    from steer_megatron.parallel import ParallelLayout, init_parallel

    init_parallel(ParallelLayout(), seed=3)
    return _update_grads(weights, policy_loss="steer", micro_batch_size=2, group="mini_batch")


def _close(a, b):
    scale = max(float(v.abs().max()) for v in b.values())
    return all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5 * scale) for k in b)  # fp32 sums in another order


def test_actor_aggregation_and_group_through_the_schedule():
    (out,) = spawn_ranks(layouts_worker, 1)
    # token_mean_over: ours divides by the mini-batch's tokens, the release's averages micro-batch means
    assert _close(out["grpo_mini_batch"], out["ref_mini_batch"])
    assert _close(out["grpo_micro_batch"], out["ref_micro_batch"])
    assert not _close(out["ref_micro_batch"], out["ref_mini_batch"])  # the batch's rows have unequal lengths
    # steer.group=mini_batch: the same gradient for micro-batches of 2 and 4 and on DP = 2 ...
    assert _close(out["steer_mini_batch_2"], out["steer_mini_batch_4"])
    for dp_grads in spawn_ranks(layouts_dp_worker, 2, out["weights"]):
        assert _close(dp_grads, out["steer_mini_batch_4"])
    # ... where the release's micro-batch group changes with the split
    assert not _close(out["steer_micro_batch_2"], out["steer_micro_batch_4"])
