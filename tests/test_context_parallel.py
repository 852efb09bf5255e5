"""Context parallelism without TE: each CP rank's share of the sequence (the load-balanced split of
steer_megatron.train.context_parallel) gives losses that sum to the CP=1 loss, statistics that place
back to CP=1's, and CP=1's gradients.

Two levels: the loss arithmetic with the ranks simulated in one process, and MegatronActor itself at
CP=2 on two gloo ranks (its split, labels, loss scale, statistics gather, STEER group reductions,
metrics) against the same actor at CP=1. megatron-core runs context-parallel attention only with
Transformer Engine, which cannot run here, so the second test stands a documented all-gather in
for TE's attention (_ContextParallelStandIn); everything else is the real actor, DDP and optimizer."""

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


# -- MegatronActor at CP=2 on gloo ranks --------------------------------------------------------------

VOCAB = 150
ARCH = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0)
# (policy loss, steer group, form, mapping): STEER's three groups reduce over different process groups
# under CP; the linear mapping uses both ends of the group's |Omega| range (exp's floor can hide the max)
ACTOR_CASES = [("grpo", "micro_batch", "release", "exp"), ("steer", "micro_batch", "exact", "linear"),
               ("steer", "dp", "release", "linear"), ("steer", "mini_batch", "paper", "exp")]


def _actor_batch():
    """8 sequences of 9..23 tokens right-padded to 24 (a multiple of 2 * cp = 4), unequal advantages."""
    from steer_megatron.train.actor import ActorBatch

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (8, 24), generator=g)
    mask = torch.zeros(8, 23, dtype=torch.bool)
    for i, stop in enumerate([7, 21, 9, 15, 8, 19, 12, 22]):
        mask[i, 5:stop + 1] = True
    adv = torch.randn(8, generator=g)[:, None] * mask
    return ActorBatch(input_ids=ids, loss_mask=mask, advantages=adv)


class _ContextParallelStandIn:
    """Stands in for Transformer Engine's context-parallel attention (megatron-core 0.16 asserts
    "Context parallelism is only supported by TEDotProductAttention" on the local spec, and TE runs
    neither on this CPU nor on the lent GPU). Hooks on our GPT instance, built at CP=1: the forward
    pre-hook all-gathers the CP group's shares of the input ids into the whole sequences, the local
    model runs on them, and the forward hook returns this rank's positions of the logits. Those are
    the values TE computes (its ring attention is exact attention over the whole sequence), and the
    gradient reaches the weights only through this rank's share, as with TE."""

    def __init__(self, gpt):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        self.group, self.cp = ps.get_context_parallel_group(), ps.get_context_parallel_world_size()
        singles = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every rank creates every group
        gpt.rotary_pos_emb.cp_group = singles[dist.get_rank()]  # RoPE over the whole gathered sequence
        self.index = None
        gpt.register_forward_pre_hook(self.gather, with_kwargs=True)
        gpt.register_forward_hook(self.select)

    def gather(self, module, args, kwargs):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        ids = args[0]
        parts = [torch.empty_like(ids) for _ in range(self.cp)]
        dist.all_gather(parts, ids.contiguous(), group=self.group)
        s = ids.shape[1] * self.cp
        full = ids.new_zeros(ids.shape[0], s)
        for r, part in enumerate(parts):
            full[:, cp_index(s, r, self.cp)] = part
        self.index = cp_index(s, ps.get_context_parallel_rank(), self.cp)
        assert torch.equal(args[1][0], self.index)  # the actor hands the model its share's positions
        pos = torch.arange(s)[None].expand_as(full)
        return (full, pos) + tuple(args[2:]), kwargs

    def select(self, module, args, output):
        return output.index_select(1, self.index)


def _actor_run(case, weights, standin):
    """old pass + one update, capturing the reduced gradients: (stats, grads, metrics, weights)."""
    from megatron.core import parallel_state as ps

    from steer_megatron.models.hf_config import build_gpt_model, parse_hf_config
    from steer_megatron.train.actor import ActorConfig, MegatronActor
    from steer_megatron.train.optim import OptimSettings, wrap_for_training
    from tests.models_helpers import update_gradients

    name, group, form, mapping = case
    model, _ = build_gpt_model(parse_hf_config(ARCH), context_parallel_size=1)
    if standin:
        _ContextParallelStandIn(model)
    if weights is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(weights[n])
    ddp, opt, sched = wrap_for_training(model, OptimSettings(lr=1.0, weight_decay=0.0, clip_grad=0.0))
    assert ps.get_data_parallel_world_size() == 1
    cfg = ActorConfig(vocab_size=VOCAB, micro_batch_size=4, mini_batch_size=8, policy_loss=name,
                      loss=PolicyLossConfig(steer=SteerConfig(group=group, form=form, mapping=mapping)))
    actor = MegatronActor(ddp, opt, cfg, sched)
    batch = _actor_batch()
    actor.old_pass(batch)
    grads, metrics = update_gradients(actor, model, batch)
    stats = (batch.old_log_prob, batch.old_entropy)
    return stats, grads, metrics, {n: p.detach().clone() for n, p in model.named_parameters()}


def cp_actor_worker(cp, weights):
    from steer_megatron.parallel import ParallelLayout, init_parallel

    init_parallel(ParallelLayout(cp=cp), seed=3)
    out = {}
    for case in ACTOR_CASES:  # every case from the same weights (the first model's when none are given)
        out[case] = _actor_run(case, weights, standin=cp > 1)
        weights = out[case][3] if weights is None else weights
    return out


def test_actor_at_cp2_equals_cp1_on_gloo_ranks():
    """The actor's CP path on two gloo ranks: old-pass statistics (gathered back to whole sequences on
    every CP rank), the reduced gradient of one update (megatron's schedule multiplies each share's
    loss by cp, DDP averages over DP x CP) and the loss metric (a sum over the shares) equal CP=1's for
    GRPO and STEER with each of its groups (micro_batch: min/max over the CP group; dp: over DP x CP;
    mini_batch: the old pass's range of the whole sequences). Tolerances: both runs compute the same
    fp32 values, the CP run's reductions in another order (the same bounds as tests/test_packing.py:
    atol 2e-5 on per-token statistics, rtol 1e-4 / atol 1e-5 x the largest entry on gradients)."""
    from steer_megatron.parallel import spawn_ranks

    (ref,) = spawn_ranks(cp_actor_worker, 1, 1, None)
    weights = ref[ACTOR_CASES[0]][3]
    ranks = spawn_ranks(cp_actor_worker, 2, 2, weights)
    mask = _actor_batch().loss_mask
    for case in ACTOR_CASES:
        (lp, ent), ref_grads, ref_metrics, _ = ref[case]
        scale = max(float(v.abs().max()) for v in ref_grads.values())
        assert scale > 0
        for out in ranks:
            (got_lp, got_ent), grads, metrics, _ = out[case]
            torch.testing.assert_close(got_lp[mask], lp[mask], atol=2e-5, rtol=0)
            torch.testing.assert_close(got_ent[mask], ent[mask], atol=2e-5, rtol=0)
            for k in ref_grads:
                torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5 * scale,
                                           msg=lambda m, k=k: f"{case} {k}: {m}")
            assert abs(metrics["pg_loss"] - ref_metrics["pg_loss"]) < 2e-5, (case, metrics, ref_metrics)
            if case[0] == "steer":  # max over the shares is the whole micro-batch's max
                assert abs(metrics["omega_absmax"] - ref_metrics["omega_absmax"]) <= 1e-5 * ref_metrics["omega_absmax"]


def test_actor_refuses_what_context_parallelism_does_not_split():
    from steer_megatron.loss.policy_losses import context_parallel_blocker

    assert context_parallel_blocker("steer", PolicyLossConfig(), "mini_batch") is None
    assert "per-sequence" in context_parallel_blocker("gspo", PolicyLossConfig(), "mini_batch")
    assert "per-sequence" in context_parallel_blocker("clip_cov", PolicyLossConfig(), "mini_batch")
    assert "token-mean" in context_parallel_blocker("grpo", PolicyLossConfig(loss_agg_mode="seq-mean-token-mean"),
                                                    "mini_batch")
    assert "token-mean" in context_parallel_blocker("grpo", PolicyLossConfig(), "micro_batch")
    attribution = PolicyLossConfig(steer=SteerConfig(form="attribution"))
    assert "attribution" in context_parallel_blocker("steer", attribution, "mini_batch")


def test_config_refuses_context_parallelism_for_a_loss_it_cannot_split():
    from pathlib import Path

    from steer_megatron.config import ConfigError, load_config, validate_config

    recipe = Path(__file__).resolve().parent.parent / "configs" / "qwen2.5-math-7b_steer.yaml"
    split = ["parallel.cp=2", "algorithm.token_mean_over=mini_batch"]  # the recipe normalises per micro-batch
    for extra, match in [(["algorithm.policy_loss=gspo"], "per-sequence"),
                         (["algorithm.token_mean_over=micro_batch"], "token-mean over mini_batch"),
                         (["algorithm.fused_lm_head=true"], "fused_lm_head"),
                         ([], "Transformer Engine")]:  # a loss CP can split, then no TE here
        with pytest.raises(ConfigError, match=match):
            validate_config(load_config(recipe, split + extra), check_paths=False)
