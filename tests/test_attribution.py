"""STEER's attribution form: each token's first-order share of the batch's entropy change.

Checked against brute force on a tiny megatron model: an SGD step on one token alone (its
advantage kept, every other zeroed) changes the batch's summed entropy by lr * dH_total_j;
the sum over tokens matches the change of the full step. TP=2 and DP=2 give the TP=1 values.
"""
import pytest
import torch

VOCAB = 150
SPANS = [(4, 12 + i % 3) for i in range(8)]  # 8 sequences, 8-10 response tokens each


def _weights():
    from tests.tiny_gpt import build_tiny_gpt

    torch.manual_seed(0)
    return {n: p.detach().clone() for n, p in build_tiny_gpt(1, VOCAB).named_parameters()}


def _actor(weights, tp: int, tp_rank: int, optimizer: str = "sgd", lr: float = 1.0, policy_loss: str = "grpo",
           mini: int = 8, distributed: bool = False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from steer_megatron.loss import PolicyLossConfig
    from steer_megatron.train.actor import ActorConfig, MegatronActor
    from tests.tiny_gpt import build_tiny_gpt, shard

    model = build_tiny_gpt(tp, VOCAB)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(shard(n, weights[n], tp, tp_rank))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    # no weight decay, no clipping, no momentum: the step is exactly -lr * P * grad(loss)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer=optimizer, lr=lr, weight_decay=0.0, clip_grad=0.0,
                                                 sgd_momentum=0.0, use_distributed_optimizer=distributed), [ddp])
    loss = PolicyLossConfig(steer={"form": "attribution", "group": "mini_batch"})
    return MegatronActor(ddp, opt, ActorConfig(vocab_size=VOCAB, micro_batch_size=4, mini_batch_size=mini,
                                               policy_loss=policy_loss, loss=loss))


def _batch():
    from tests.tiny_gpt import rl_batch

    return rl_batch(VOCAB, SPANS, seed=5)


def _summed_entropy(actor, batch) -> float:
    _, h = actor.compute_log_probs(batch)
    return float(h[batch.loss_mask].double().sum())


def _central(change, lr):
    """(f(+lr) - f(-lr)) / (2 lr): the first order, free of the second-order term (O(lr^2) left)."""
    return (change(lr) - change(-lr)) / (2 * lr)


def brute_force_worker(n_tokens: int, token_step: float, lr_full: float):
    from dataclasses import replace

    from steer_megatron.diagnostics.measure import TrainingSnapshot, _set_lr
    from steer_megatron.parallel import ParallelLayout, init_parallel
    from steer_megatron.train.attribution import entropy_attribution
    from tests.tool_modules import load_tool

    init_parallel(ParallelLayout(), seed=3)
    actor = _actor(_weights(), 1, 0)
    batch = _batch()
    actor.old_pass(batch)
    mask, adv = batch.loss_mask, batch.advantages
    n = int(mask.sum())
    before = {k: p.detach().clone() for k, p in actor.model.named_parameters()}
    attr, _ = entropy_attribution(actor, batch, n)
    restored = all(torch.equal(before[k], p) for k, p in actor.model.named_parameters())

    # Per token, in plain torch on the bare model (not the actor's path; the function
    # tools/attribution_check.py runs on real models): the SGD step of token j's term of the
    # token-mean surrogate alone, +-s A_j / N grad log p_j, and the change of the batch's summed
    # entropy from float64 log-softmax of the raw logits.
    tool = load_tool("attribution_check")
    single = tool.per_token_brute_force(actor, batch, attr, VOCAB, n_tokens, token_step, seed=0)
    gpt = actor.model.module

    def h_total():
        return tool.plain_entropy_sum(gpt, batch, VOCAB)

    h0 = h_total()

    # The full step through the actor's own update (megatron's SGD, the GRPO loss), both signs.
    def full_change(lr):
        snap = TrainingSnapshot(actor)
        _set_lr(actor, abs(lr))
        actor.update(replace(batch, advantages=adv if lr > 0 else -adv))
        dh = h_total() - h0
        snap.restore()
        return dh

    full = _central(full_change, lr_full)
    return dict(single=single, full=full, restored=restored, attr_sum=float(attr.double().sum()))


def test_attribution_matches_per_token_sgd_steps_and_the_full_step():
    from steer_megatron.parallel import spawn_ranks

    (out,) = spawn_ranks(brute_force_worker, 1, 30, 1e-3, 1e-3)
    assert out["restored"], "the perturbed forward did not restore the weights bit for bit"
    single = out["single"]
    assert single["weights_restored"] and single["tokens"] == 30
    print("per token", {k: v for k, v in single.items() if k != "rows"}, "sum of the attribution", out["attr_sum"],
          "measured full step", out["full"])
    assert single["pearson"] >= 0.95
    assert out["attr_sum"] == pytest.approx(out["full"], rel=0.02)


def layout_worker(tp: int, distributed: bool, weights=None):
    """After one Adam update with the attribution form (Adam then has statistics: P is not the
    identity), the attribution of the whole batch on this layout, and its finite-difference eps."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from steer_megatron.parallel import ParallelLayout, init_parallel
    from steer_megatron.train.attribution import entropy_attribution

    init_parallel(ParallelLayout(tp=tp), seed=3)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    weights = _weights() if weights is None else weights  # full (TP = 1) weights: built on one rank
    actor = _actor(weights, tp, ps.get_tensor_model_parallel_rank(), optimizer="adam", lr=1e-3,
                   policy_loss="steer", mini=8 // dp, distributed=distributed)
    batch = _batch().dp_slice(dp_rank, dp)
    actor.old_pass(batch)
    actor.update(batch)  # the steer loss with form=attribution: exercises the whole update path
    actor.old_pass(batch)
    attr, stats = entropy_attribution(actor, batch, _batch().loss_mask.sum())
    if dp > 1:
        pieces = [torch.empty_like(attr) for _ in range(dp)]
        dist.all_gather(pieces, attr, group=ps.get_data_parallel_group())
        attr = torch.cat(pieces)
    return dict(attr=attr, eps=stats["attr_eps"], logp=batch.old_log_prob, weights=weights)


def test_attribution_is_the_same_under_tp2_and_dp2_with_the_distributed_optimizer():
    from steer_megatron.parallel import spawn_ranks

    (ref,) = spawn_ranks(layout_worker, 1, 1, False)
    tp2 = spawn_ranks(layout_worker, 2, 2, False, ref["weights"])
    dp2 = spawn_ranks(layout_worker, 2, 1, True, ref["weights"])
    mask = _batch().loss_mask
    adv = _batch().advantages
    # Each D_j is a difference of two fp32 log-probs divided by eps; a layout's different
    # reduction order moves each log-prob by a few fp32 ulps of |log p| (values ~ 5), so
    # |dA_j| <~ 8 ulp * |log p| / eps * |A_j| / N, plus the same relative error on the step itself.
    ulp = torch.finfo(torch.float32).eps
    n = float(mask.sum())
    bound = 8 * ulp * float(ref["logp"][mask].abs().max()) / ref["eps"] * float(adv.abs().max()) / n
    spread = float(ref["attr"][mask].abs().max())
    print("bound", bound, "max |attr|", spread)
    assert bound < 0.05 * spread, "the tolerance would not test anything"
    for name, out in (("tp2", tp2), ("dp2+distopt", dp2)):
        for rank_out in out:
            diff = float((rank_out["attr"] - ref["attr"])[mask].abs().max())
            print(name, "max diff", diff)
            assert diff <= bound, f"{name}: max |attribution - TP=1's| = {diff:.3g} > {bound:.3g}"


def test_attribution_floor_is_relative_and_omega_refuses_the_model_form():
    from steer_megatron.loss.steer import SteerConfig, omega, weights_from_omega

    vals = torch.tensor([1e-6, 4e-6, 2e-6, 0.0])  # attribution scale: far below the tabular floor 0.02
    mask = torch.tensor([True, True, True, False])
    w = weights_from_omega(vals, mask, SteerConfig(form="attribution", w_min=0.5))
    # relative: the largest contributor gets w_min, the others exp(-ln(1/w_min) |v| / max|v|)
    torch.testing.assert_close(w, torch.tensor([0.5 ** 0.25, 0.5, 0.5 ** 0.5, 0.0]))
    tabular = weights_from_omega(vals, mask, SteerConfig(form="release", w_min=0.5))
    assert float(tabular[:3].min()) > 0.999  # 0.02 floor: these values would barely move a weight
    pinned = weights_from_omega(vals, mask, SteerConfig(form="attribution", w_min=0.5, omega_floor=8e-6))
    assert float(pinned[1]) == pytest.approx(0.5 ** 0.5)
    assert torch.equal(weights_from_omega(torch.zeros(3), torch.ones(3, dtype=torch.bool),
                                          SteerConfig(form="attribution")), torch.ones(3))
    with pytest.raises(ValueError, match="computed from the model"):
        omega(vals, vals, vals, vals, form="attribution")


def test_attribution_refuses_bf16_weights():
    from steer_megatron.train.attribution import check_supported

    with pytest.raises(ValueError, match="fp32"):
        check_supported(torch.nn.Linear(2, 2).to(torch.bfloat16))
