"""MegatronActor: megatron schedule + DDP + optimizer. DP=2 equals DP=1; updates lower the loss."""
import torch

from steer_megatron.loss import PolicyLossConfig
from steer_megatron.parallel import ParallelLayout, init_parallel, spawn_ranks
from steer_megatron.train.actor import ActorBatch, ActorConfig, MegatronActor
from steer_megatron.train.optim import OptimSettings, wrap_for_training
from tests.tiny_gpt import build_tiny_gpt, rl_batch, shard

VOCAB = 150


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (8, 16), generator=g)
    mask = torch.zeros(8, 15, dtype=torch.bool)
    for i in range(8):
        mask[i, 5 : 7 + i] = True  # responses of different lengths after a 6-token prompt
    adv = torch.where(torch.arange(8) % 2 == 0, 1.0, -1.0)[:, None].expand(8, 15).contiguous()
    return ActorBatch(input_ids=ids, loss_mask=mask, advantages=adv)


def _actor(tp, weights=None, lr=1e-2, adam_eps=1e-8):
    from megatron.core import parallel_state as ps

    model = build_tiny_gpt(tp, VOCAB)
    if weights is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(shard(n, weights[n], tp, ps.get_tensor_model_parallel_rank()))
    ddp, opt, sched = wrap_for_training(model, OptimSettings(lr=lr, weight_decay=0.0, clip_grad=0.0, adam_eps=adam_eps))
    cfg = ActorConfig(vocab_size=VOCAB, micro_batch_size=2, mini_batch_size=8 // ps.get_data_parallel_world_size(),
                      loss=PolicyLossConfig())
    return model, MegatronActor(ddp, opt, cfg, sched)


def _one_update(weights):
    from megatron.core import parallel_state as ps

    # Adam with a large eps is ~ SGD on the first step: well-conditioned to compare, where plain
    # Adam turns rounding noise in near-zero gradients into full-size +-lr steps.
    model, actor = _actor(1, weights, lr=1.0, adam_eps=1.0)
    batch = _batch()
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n = len(batch) // dp
    local = batch.slice(rank * n, (rank + 1) * n)
    local.old_log_prob, local.old_entropy = actor.compute_log_probs(local)
    metrics = actor.update(local)
    return {k: p.detach().clone() for k, p in model.named_parameters()}, metrics


def init_worker():
    init_parallel(ParallelLayout(), seed=3)
    return {n: p.detach().clone() for n, p in build_tiny_gpt(1, VOCAB).named_parameters()}


def dp_worker(weights):
    init_parallel(ParallelLayout(), seed=3)
    return _one_update(weights)


def test_dp2_update_equals_dp1_update():
    weights = spawn_ranks(init_worker, 1)[0]
    (w1, m1), = spawn_ranks(dp_worker, 1, weights)
    dp_results = spawn_ranks(dp_worker, 2, weights)
    for w2, _ in dp_results:
        for name in w1:
            torch.testing.assert_close(w2[name], w1[name], atol=2e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    changed = sum(int(not torch.equal(w1[n], weights[n])) for n in w1)
    assert changed == len(w1)  # every parameter moved
    assert m1["weight_mean"] < 1.0 and m1["grad_norm"] > 0


def tp_worker(steps):
    init_parallel(ParallelLayout(tp=2), seed=3)
    _, actor = _actor(2, lr=3e-3)
    batch = _batch()
    batch.old_log_prob, batch.old_entropy = actor.compute_log_probs(batch)
    losses = [actor.update(batch)["pg_loss"] for _ in range(steps)]
    after, _ = actor.compute_log_probs(batch)
    return losses, (after - batch.old_log_prob)[batch.loss_mask], batch.advantages[batch.loss_mask]


def test_tp2_updates_decrease_loss_and_move_logprobs_with_advantage():
    (losses, dlogp, adv), _ = spawn_ranks(tp_worker, 2, 4)
    assert losses[-1] < losses[0]
    assert (dlogp[adv > 0].mean() > 0) and (dlogp[adv < 0].mean() < 0)


def fused_worker(tp, tie, full):
    """Same weights, same batch: one update with the logits path and one with fused_lm_head."""
    from megatron.core import parallel_state as ps

    init_parallel(ParallelLayout(tp=tp), seed=3)
    rank = ps.get_tensor_model_parallel_rank()
    out = {}
    for fused in (False, True):
        model = build_tiny_gpt(tp, VOCAB, tie=tie)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(shard(n, full[n], tp, rank))
        ddp, opt, sched = wrap_for_training(model, OptimSettings(lr=1.0, weight_decay=0.0, clip_grad=0.0, adam_eps=1.0))
        actor = MegatronActor(ddp, opt, ActorConfig(vocab_size=VOCAB, micro_batch_size=2, mini_batch_size=8,
                                                    loss=PolicyLossConfig(), fused_lm_head=fused), sched)
        batch = _batch()
        batch.old_log_prob, batch.old_entropy = actor.compute_log_probs(batch)
        metrics = actor.update(batch)
        out[fused] = (batch.old_log_prob, batch.old_entropy, metrics,
                      {n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def full_weights_worker(tie):
    init_parallel(ParallelLayout(), seed=11)
    return {n: p.detach().clone() for n, p in build_tiny_gpt(1, VOCAB, tie=tie).named_parameters()}


def _check_fused_matches(results):
    for out in results:
        lp0, h0, m0, w0 = out[False]
        lp1, h1, m1, w1 = out[True]
        torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-5)
        assert abs(m1["pg_loss"] - m0["pg_loss"]) < 1e-5 and abs(m1["grad_norm"] - m0["grad_norm"]) < 1e-4 * m0["grad_norm"]
        for name in w0:  # the updates, weight by weight (output layer and the layers below it)
            torch.testing.assert_close(w1[name], w0[name], atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        assert m0["grad_norm"] > 0


def test_fused_lm_head_update_equals_logits_path_tp2():
    """TP=2 with a padded vocab (150 of 256 columns): the fused head's statistics, loss, gradient
    norm and updated weights equal the logits path's, so the grad of the hidden states is summed
    over the vocab shards exactly once."""
    full = spawn_ranks(full_weights_worker, 1, False)[0]
    _check_fused_matches(spawn_ranks(fused_worker, 2, 2, False, full))


def test_fused_lm_head_update_equals_logits_path_tied_embeddings():
    full = spawn_ranks(full_weights_worker, 1, True)[0]
    _check_fused_matches(spawn_ranks(fused_worker, 1, 1, True, full))


def test_padded_rows_are_masked_copies_of_the_first():
    """How a short last micro-batch is filled up under pipeline parallelism (the PP = 2 trainer
    run in tests/test_trainer.py goes through it with the parity probe's 2 prompts)."""
    batch = rl_batch(50, [(2, 6), (3, 9), (1, 4)], seq=10)
    batch.old_log_prob = torch.randn(3, 9)
    out = batch.padded(2)
    assert len(out) == 5 and out.rollout_log_prob is None
    for name in ("input_ids", "advantages", "old_log_prob"):
        t = getattr(out, name)
        assert torch.equal(t[:3], getattr(batch, name)) and torch.equal(t[3], t[0]) and torch.equal(t[4], t[0])
    assert torch.equal(out.loss_mask[:3], batch.loss_mask) and not out.loss_mask[3:].any()
    assert batch.loss_mask[0].any()  # the original is untouched
