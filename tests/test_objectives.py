"""GSPO, CISPO, their STEER-weighted forms, W-REINFORCE, GTPO and rollout correction against their
references: verl 0.9.1's own functions (loaded from the wheel, tests/verl_reference.py) and float64
re-derivations of the papers' formulas."""
import math

import pytest
import torch

from steer_megatron.algorithms.advantages import gtpo_token_advantages, psr_nsr_advantages, w_reinforce_advantages
from steer_megatron.loss import PolicyLossConfig, PolicyLossInputs, SteerConfig, get_policy_loss
from steer_megatron.loss.rollout_correction import RolloutCorrection, mismatch_metrics
from steer_megatron.parallel import spawn_ranks
from tests.verl_reference import actor_config, load

CLIP = dict(clip_low=0.2, clip_high=0.28)


def _inputs(seed=0, shape=(6, 11), spread=0.5, row_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g, dtype=torch.float64) * 3 - 0.3
    shift = spread * torch.randn(shape, generator=g, dtype=torch.float64)
    shift = shift + row_shift * torch.randn(shape[0], 1, generator=g, dtype=torch.float64)  # moves sequence ratios
    lp = (old + shift).clamp(max=-1e-3).requires_grad_()
    adv = torch.randn(shape[0], 1, generator=g, dtype=torch.float64).expand(shape).contiguous()
    mask = torch.rand(shape, generator=g) > 0.2
    mask[:, 0] = True
    rollout = old + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)
    old_ent = torch.rand(shape, generator=g, dtype=torch.float64) * 2
    return PolicyLossInputs(log_prob=lp, old_log_prob=old, advantages=adv, mask=mask, old_entropy=old_ent,
                            rollout_log_prob=rollout)


def _ours_and_grad(name, inp, cfg):
    inp.log_prob.grad = None
    loss, metrics = get_policy_loss(name)(inp, cfg)
    loss.backward()
    return loss.detach(), inp.log_prob.grad.clone(), metrics


def _verl_and_grad(fn, inp, agg="token-mean", weights=None, mask=None, **cfg):
    lp = inp.log_prob.detach().clone().requires_grad_()
    m = (inp.mask if mask is None else mask).to(torch.float64)
    loss, metrics = fn(inp.old_log_prob, lp, inp.advantages, m, agg, actor_config(**cfg), rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), lp.grad, metrics


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_gspo_equals_verl(agg):
    inp = _inputs(1, spread=0.3, row_shift=0.3)
    ref, ref_g, ref_m = _verl_and_grad(load().core_algos.compute_policy_loss_gspo, inp, agg, clip_ratio_low=0.2,
                                       clip_ratio_high=0.28)
    loss, grad, m = _ours_and_grad("gspo", inp, PolicyLossConfig(loss_agg_mode=agg, **CLIP))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-7)  # verl divides a sequence by (count + 1e-8)
    torch.testing.assert_close(grad, ref_g, rtol=1e-7, atol=1e-12)
    assert m["clipfrac"].item() == pytest.approx(ref_m["actor/pg_clipfrac"])
    assert 0 < m["clipfrac"].item() < 1  # both branches exercised


def test_cispo_equals_verl_and_keeps_gradient_on_clipped_tokens():
    inp = _inputs(2, spread=0.6)
    ref, ref_g, ref_m = _verl_and_grad(load().core_algos.compute_policy_loss_cispo, inp, clip_ratio_low=0.2,
                                       clip_ratio_high=0.28)
    loss, grad, m = _ours_and_grad("cispo", inp, PolicyLossConfig(**CLIP))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(grad, ref_g, rtol=1e-10, atol=1e-14)
    assert m["clipfrac"].item() == pytest.approx(ref_m["actor/pg_clipfrac"]) and m["clipfrac"] > 0
    # REINFORCE-style: d loss / d log p = -clip(r) A / n on every valid token, clipped or not
    r = (inp.log_prob - inp.old_log_prob).exp().detach().clamp(0.8, 1.28)
    want = torch.where(inp.mask, -r * inp.advantages / inp.mask.sum(), torch.zeros_like(r))
    torch.testing.assert_close(grad, want)


def _release_weights_f64(inp, w_min):
    """The STEER release's weights, written out in float64 (DESIGN.md section 1)."""
    p = inp.log_prob.detach().exp().clamp(1e-8, 1 - 1e-8)
    p_old = inp.old_log_prob.exp().clamp(1e-8, 1.0)
    metric = (inp.advantages / p_old * p * (1 - p) * (p.log() + inp.old_entropy)).abs()
    k = -math.log(w_min) / max(metric[inp.mask].max().item(), 0.02)
    return torch.where(inp.mask, (-k * metric).exp().clamp(w_min, 1.0), torch.zeros_like(metric))


@pytest.mark.parametrize("base,fn", [("gspo", "compute_policy_loss_gspo"), ("cispo", "compute_policy_loss_cispo")])
def test_steer_composed_objective_is_the_objective_times_release_weights(base, fn):
    inp = _inputs(3, spread=0.4, row_shift=0.3)
    w = _release_weights_f64(inp, 0.7)
    ref, ref_g, _ = _verl_and_grad(getattr(load().core_algos, fn), inp, weights=w, clip_ratio_low=0.2, clip_ratio_high=0.28)
    cfg = PolicyLossConfig(steer=SteerConfig(form="release", w_min=0.7), **CLIP)
    loss, grad, m = _ours_and_grad(f"steer_{base}", inp, cfg)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-7)
    torch.testing.assert_close(grad, ref_g, rtol=1e-7, atol=1e-12)
    assert m["weight_min"].item() == pytest.approx(0.7) and m["weight_max"].item() <= 1.0
    with pytest.raises(ValueError, match="steer.form=release or paper"):
        get_policy_loss(f"steer_{base}")(inp, PolicyLossConfig(steer=SteerConfig(form="exact")))


def test_w_reinforce_equals_the_reference_formula():
    """RLVR-Decomposed: advantage lambda * r for a correct sample, r - 1 for a wrong one (r in {0, 1}),
    then the PPO clip (their runs: symmetric 0.2, no dual clip), token mean."""
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    adv_seq = w_reinforce_advantages(rewards, lam=0.1).flatten().double()
    assert adv_seq.tolist() == pytest.approx([0.1, -1, -1, 0.1, -1, -1, 0.1, -1])
    assert w_reinforce_advantages(2 * rewards - 1, lam=0.1).tolist() == w_reinforce_advantages(rewards, 0.1).tolist()
    inp = _inputs(4, shape=(8, 7), spread=0.4)
    inp.advantages = adv_seq[:, None].expand(8, 7).contiguous()
    loss, _, _ = _ours_and_grad("w_reinforce", inp, PolicyLossConfig(clip_low=0.2, clip_high=0.2, dual_clip_c=None))
    want, n = 0.0, 0
    for (a, lp, old, keep) in zip(inp.advantages.flatten().tolist(), inp.log_prob.detach().flatten().tolist(),
                                  inp.old_log_prob.flatten().tolist(), inp.mask.flatten().tolist()):
        if keep:
            r = math.exp(lp - old)
            want += max(-a * r, -a * min(max(r, 0.8), 1.2))
            n += 1
    assert loss.item() == pytest.approx(want / n, rel=1e-12)


@pytest.mark.parametrize("mode", ["psr", "nsr"])
def test_psr_nsr_equal_the_reference_on_the_subset(mode):
    """RLVR-Decomposed keeps only the correct (PSR, advantage r = 1) or wrong (NSR, r - 1 = -1) samples
    and runs the PPO clip on that sub-batch: here the other rows leave the mask instead."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    adv, kept = psr_nsr_advantages(rewards, mode)
    inp = _inputs(11, shape=(8, 7), spread=0.4)
    inp.advantages = adv.double()[:, None].expand(8, 7).contiguous()
    inp.mask = inp.mask & kept[:, None]
    loss, _, _ = _ours_and_grad(mode, inp, PolicyLossConfig(clip_low=0.2, clip_high=0.2, dual_clip_c=None))
    sign = 1.0 if mode == "psr" else -1.0
    rows = [i for i in range(8) if (rewards[i] > 0.5) == (mode == "psr")]
    want, n = 0.0, 0
    for i in rows:
        for j in range(7):
            if inp.mask[i, j]:
                r = math.exp(inp.log_prob[i, j].item() - inp.old_log_prob[i, j].item())
                want += max(-sign * r, -sign * min(max(r, 0.8), 1.2))
                n += 1
    assert loss.item() == pytest.approx(want / n, rel=1e-12)


def _gtpo_reference(rewards, entropy, mask, n, a1, a2, eps=1e-6):
    """Eqs. 3 and 5 of arXiv 2508.04349 with explicit loops; eq. 6 with verl's own masked_whiten."""
    vf = load().torch_functional
    b, t = entropy.shape
    shaped = torch.zeros(b, t, dtype=torch.float64)
    for g0 in range(0, b, n):
        rows = range(g0, g0 + n)
        for pos in range(t):
            act = [i for i in rows if mask[i, pos]]
            good = [i for i in act if rewards[i] > 0.5]
            bad = [i for i in act if rewards[i] <= 0.5]
            sum_h = sum(float(entropy[i, pos]) for i in good)
            sum_inv = sum(1 / (float(entropy[i, pos]) + eps) for i in bad)
            for i in good:
                shaped[i, pos] = a1 + a2 * float(entropy[i, pos]) / (sum_h + eps) * len(good)
            for i in bad:
                shaped[i, pos] = -a1 - a2 * (1 / (float(entropy[i, pos]) + eps)) / (sum_inv + eps) * len(bad)
    ok = torch.tensor([r > 0.5 for r in rewards.tolist()])[:, None] & mask
    bad = ~torch.tensor([r > 0.5 for r in rewards.tolist()])[:, None] & mask
    out = vf.masked_whiten(shaped * ok, ok.double()) * ok + vf.masked_whiten(shaped * bad, bad.double()) * bad
    return out


def _gtpo_problem(seed=5, groups=3, n=4, t=9):
    g = torch.Generator().manual_seed(seed)
    rewards = (torch.rand(groups * n, generator=g) > 0.5).double() * 2 - 1  # +1 / -1 as the DAPO scorer gives
    ent = torch.rand(groups * n, t, generator=g, dtype=torch.float64) * 2 + 0.01
    lengths = torch.randint(2, t + 1, (groups * n,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    return rewards, ent, mask, n


def test_gtpo_advantages_equal_the_papers_formulas():
    rewards, ent, mask, n = _gtpo_problem()
    got = gtpo_token_advantages(rewards, ent, mask, n, alpha1=1.0, alpha2=0.1).double()
    want = _gtpo_reference(rewards, ent, mask, n, 1.0, 0.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float32 output
    assert torch.all(got[~mask] == 0)
    with pytest.raises(ValueError, match="whole prompt groups"):
        gtpo_token_advantages(rewards[:-1], ent[:-1], mask[:-1], n)


def gtpo_dp_worker():
    import torch.distributed as dist

    dist.init_process_group("gloo")  # plain gloo: the whitening needs nothing from megatron

    rewards, ent, mask, n = _gtpo_problem(groups=4)
    rank, half = dist.get_rank(), 8
    sl = slice(rank * half, (rank + 1) * half)
    return gtpo_token_advantages(rewards[sl], ent[sl], mask[sl], n, dp_group=dist.group.WORLD)


def test_gtpo_whitening_spans_the_data_parallel_group():
    parts = spawn_ranks(gtpo_dp_worker, 2)
    rewards, ent, mask, n = _gtpo_problem(groups=4)
    torch.testing.assert_close(torch.cat(parts), gtpo_token_advantages(rewards, ent, mask, n), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- rollout correction


def _verl_corrected(inp, is_level, is_threshold, rs=None, rs_threshold=None):
    corr = load().rollout_corr
    weights_proto, keep, _ = corr.compute_rollout_correction_and_rejection_mask(
        inp.old_log_prob, inp.rollout_log_prob, inp.mask.double(), rollout_is=is_level,
        rollout_is_threshold=is_threshold, rollout_rs=rs, rollout_rs_threshold=rs_threshold)
    ref, _, _ = _verl_and_grad(load().core_algos.compute_policy_loss_vanilla, inp, weights=weights_proto.tensors["rollout_is_weights"],
                               mask=keep, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=10.0)
    return ref


@pytest.mark.parametrize("rc,is_level,is_thr,rs,rs_thr", [
    (RolloutCorrection("truncate", "token", 1.5), "token", 1.5, None, None),
    (RolloutCorrection("truncate", "sequence", 2.0), "sequence", 2.0, None, None),
    (RolloutCorrection("icepop", "token", 2.0, 0.5), "token", "0.5_2.0", None, None),
    # masked IS: verl's rejection keeps lower <= rollout/old <= upper, so its band is ours inverted;
    # the IS weight (rho <= upper inside the band) is untouched by verl's truncation at the same upper
    (RolloutCorrection("mask", "token", 1.6, 0.7), "token", 1.6, "token_k1", f"{1 / 1.6}_{1 / 0.7}"),
    (RolloutCorrection("mask", "sequence", 3.0, 0.4), "sequence", 3.0, "seq_sum_k1", f"{1 / 3.0}_{1 / 0.4}"),
])
def test_rollout_correction_equals_verl(rc, is_level, is_thr, rs, rs_thr):
    inp = _inputs(6, shape=(8, 5), spread=0.3)
    if is_level == "sequence":  # short sequences, so that some products stay inside the band
        inp.rollout_log_prob = inp.old_log_prob + 0.25 * torch.randn(inp.old_log_prob.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    loss, _, m = _ours_and_grad("grpo", inp, PolicyLossConfig(rollout_correction=rc, **CLIP))
    ref = _verl_corrected(inp, is_level, is_thr, rs, rs_thr)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    w = m["rollout_is_weight_mean"].item()
    assert 0 < w and (rc.mode == "truncate" or w != pytest.approx(1.0))


def test_masked_is_drops_tokens_from_the_denominator_and_icepop_does_not():
    inp = _inputs(7, shape=(6, 8), spread=0.0)  # ratio 1: the loss is -mean(A * weight)
    band = dict(level="token", upper=1.3, lower=0.8)
    rho = (inp.old_log_prob - inp.rollout_log_prob).exp()
    inside = (rho >= 0.8) & (rho <= 1.3) & inp.mask
    assert 0 < inside.sum() < inp.mask.sum()
    icepop, _, _ = _ours_and_grad("grpo", inp, PolicyLossConfig(rollout_correction=RolloutCorrection("icepop", **band)))
    masked, _, _ = _ours_and_grad("grpo", inp, PolicyLossConfig(rollout_correction=RolloutCorrection("mask", **band)))
    num = (-inp.advantages * rho * inside).sum()
    assert icepop.item() == pytest.approx((num / inp.mask.sum()).item(), rel=1e-12)
    assert masked.item() == pytest.approx((num / inside.sum()).item(), rel=1e-12)


def test_geometric_level_uses_the_mean_log_ratio():
    inp = _inputs(8, shape=(5, 6), spread=0.0)
    rc = RolloutCorrection("mask", "geometric", 1.2, 0.85)
    m = inp.mask.double()
    geo = (((inp.old_log_prob - inp.rollout_log_prob) * m).sum(-1) / m.sum(-1)).exp()
    keep_seq = (geo >= 0.85) & (geo <= 1.2)
    assert 0 < keep_seq.sum() < len(geo)
    loss, _, _ = _ours_and_grad("grpo", inp, PolicyLossConfig(rollout_correction=rc))
    keep = inp.mask & keep_seq[:, None]
    want = (-inp.advantages * geo[:, None] * keep).sum() / keep.sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_tis_cap_is_token_truncation_and_refuses_a_second_correction():
    inp = _inputs(9)
    a, _, ma = _ours_and_grad("grpo", inp, PolicyLossConfig(tis_cap=1.4))
    b, _, _ = _ours_and_grad("grpo", inp, PolicyLossConfig(rollout_correction=RolloutCorrection("truncate", "token", 1.4)))
    assert a.item() == b.item() and "tis_weight_mean" in ma
    with pytest.raises(ValueError, match="both correct for the rollout policy: keep one"):
        PolicyLossConfig(tis_cap=1.4, rollout_correction=RolloutCorrection("icepop"))


def test_mismatch_metrics_equal_verl():
    inp = _inputs(10)
    ref = load().rollout_corr.compute_offpolicy_metrics(inp.old_log_prob, inp.rollout_log_prob, inp.mask.double())
    got = mismatch_metrics(inp.old_log_prob, inp.rollout_log_prob, inp.mask)
    for ours, theirs in (("mismatch_kl", "kl"), ("mismatch_k3", "k3_kl"), ("ppl_trainer", "training_ppl"),
                         ("ppl_rollout", "rollout_ppl"), ("log_ppl_diff", "log_ppl_diff")):
        # verl divides by (count + 1e-8): a relative 1e-8 / count apart from the exact mean
        assert got[ours] == pytest.approx(ref[theirs], rel=1e-8, abs=1e-12), ours
