"""Policy losses against slow element-wise references."""
import math

import pytest
import torch

from steer_megatron.loss.schema import ClipCovConfig, EntropyAdvConfig, KlCovConfig
from steer_megatron.loss import (
    AGG_MODES, PolicyLossConfig, PolicyLossInputs, SteerConfig, aggregate, get_policy_loss, kl_penalty,
    policy_loss_names, register_policy_loss, steer_weights,
)
from tests.reference_math import ppo_dual_clip_reference


def _inputs(seed=0, shape=(4, 9), spread=0.6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    lp = (old + spread * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(max=0).requires_grad_()
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) > 0.25
    ent = (torch.rand(shape, generator=g, dtype=torch.float64) * 2).requires_grad_()
    old_ent = torch.rand(shape, generator=g, dtype=torch.float64) * 2
    return PolicyLossInputs(log_prob=lp, old_log_prob=old, advantages=adv, mask=mask, entropy=ent, old_entropy=old_ent)


def test_registry_lists_the_losses_and_rejects_unknown_names():
    assert {"grpo", "steer", "entropy_reg", "kl_cov", "clip_cov", "entropy_adv"} <= set(policy_loss_names())
    with pytest.raises(KeyError, match="unknown policy loss 'nope'"):
        get_policy_loss("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("grpo")(lambda i, c: None)


@pytest.mark.parametrize("dual", [None, 1.5])
def test_grpo_matches_dual_clip_reference(dual):
    inp = _inputs(1, spread=0.8)
    cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip_c=dual)
    loss, m = get_policy_loss("grpo")(inp, cfg)
    ratio = (inp.log_prob - inp.old_log_prob).exp().detach()
    ref = ppo_dual_clip_reference(inp.advantages, ratio, 0.2, 0.28, dual)
    want = (ref * inp.mask).sum() / inp.mask.sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    hi = ((inp.advantages > 0) & (ratio > 1.28) & inp.mask).sum() / inp.mask.sum()
    lo = ((inp.advantages < 0) & (ratio < 0.8) & inp.mask).sum() / inp.mask.sum()
    assert m["clipfrac_high"].item() == pytest.approx(hi.item())
    assert m["clipfrac_low"].item() == pytest.approx(lo.item())
    assert hi > 0 and lo > 0  # the case exercises both clips
    if dual:
        dual_on = ((inp.advantages < 0) & (ratio > dual) & inp.mask).sum() / inp.mask.sum()
        assert m["clipfrac_dual"].item() == pytest.approx(dual_on.item()) and dual_on > 0


def test_grpo_gradient_is_zero_exactly_where_clipped():
    inp = _inputs(2, spread=0.8)
    cfg = PolicyLossConfig(dual_clip_c=None)
    loss, _ = get_policy_loss("grpo")(inp, cfg)
    loss.backward()
    ratio = (inp.log_prob - inp.old_log_prob).exp().detach()
    clipped = ((inp.advantages > 0) & (ratio > 1.28)) | ((inp.advantages < 0) & (ratio < 0.8))
    g = inp.log_prob.grad
    assert torch.all(g[clipped | ~inp.mask] == 0)
    want = -inp.advantages * ratio / inp.mask.sum()
    torch.testing.assert_close(g[~clipped & inp.mask], want[~clipped & inp.mask])


@pytest.mark.parametrize("form", ["release", "paper", "exact"])
def test_steer_is_grpo_times_weights(form):
    inp = _inputs(3)
    inp.sum_p2 = torch.rand_like(inp.old_entropy) * 0.5
    inp.sum_p2_logp = -torch.rand_like(inp.old_entropy)
    cfg = PolicyLossConfig(steer=SteerConfig(form=form, w_min=0.7))
    loss, m = get_policy_loss("steer")(inp, cfg)
    ratio = (inp.log_prob - inp.old_log_prob).exp().detach()
    ref = ppo_dual_clip_reference(inp.advantages, ratio, 0.2, 0.28, 10.0)
    clip = ((inp.advantages > 0) & (ratio > 1.28)) | ((inp.advantages < 0) & (ratio < 0.8))
    ent = inp.entropy if form == "exact" else inp.old_entropy
    w = steer_weights(inp.advantages, inp.log_prob, inp.old_log_prob, ent, inp.mask, form=form, w_min=0.7,
                      sum_p2=inp.sum_p2, sum_p2_logp=inp.sum_p2_logp, clip_mask=clip)
    want = (ref * w * inp.mask).sum() / inp.mask.sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    assert m["weight_min"].item() == pytest.approx(0.7)
    assert m["weight_max"].item() <= 1.0 and 0.7 <= m["weight_mean"].item() <= 1.0
    assert 0 < m["weight_frac_floor"].item() < 1
    assert m["omega_absmax"].item() > 0


def test_steer_needs_old_entropy():
    inp = _inputs(4)
    inp.old_entropy = None
    with pytest.raises(ValueError, match="old_entropy"):
        get_policy_loss("steer")(inp)


@pytest.mark.parametrize("name", ["grpo", "steer", "entropy_reg", "kl_cov", "clip_cov", "entropy_adv"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_entropy_coeff_adds_minus_coef_times_entropy_to_every_loss(name, mode):
    """As the release: loss - coef * agg(H), H with gradient, aggregated like the policy loss."""
    inp = _inputs(5)
    inp.draw_key = (1,)  # clip_cov: the same draw in both calls
    coef = 0.01
    loss, m = get_policy_loss(name)(inp, PolicyLossConfig(entropy_coeff=coef, loss_agg_mode=mode))
    base, _ = get_policy_loss("grpo" if name == "entropy_reg" else name)(inp, PolicyLossConfig(loss_agg_mode=mode))
    ent = inp.entropy.detach()
    if mode == "token-mean":
        agg_h = (ent * inp.mask).sum() / inp.mask.sum()
        d_h = inp.mask.double() / inp.mask.sum()
    else:
        per_seq = inp.mask.sum(-1).clamp(min=1)
        agg_h = ((ent * inp.mask).sum(-1) / per_seq).mean()
        d_h = inp.mask.double() / per_seq[:, None] / inp.mask.shape[0]
    assert loss.item() == pytest.approx(base.item() - coef * agg_h.item(), rel=1e-12)
    assert m["entropy_loss"].item() == pytest.approx(agg_h.item(), rel=1e-12)
    loss.backward()
    torch.testing.assert_close(inp.entropy.grad, -coef * d_h)


def test_entropy_reg_refuses_a_zero_coefficient_and_entropy_coeff_needs_entropy():
    with pytest.raises(ValueError, match="algorithm.entropy_coeff > 0"):
        get_policy_loss("entropy_reg")(_inputs(5), PolicyLossConfig())
    inp = _inputs(5)
    inp.entropy = None
    with pytest.raises(ValueError, match="needs the current policy's entropy"):
        get_policy_loss("grpo")(inp, PolicyLossConfig(entropy_coeff=0.01))


def test_kl_cov_penalises_top_covariance_tokens():
    inp = _inputs(6, shape=(8, 64))
    cfg = PolicyLossConfig(kl_cov=KlCovConfig(ratio=0.02, coef=1.0))
    loss, m = get_policy_loss("kl_cov")(inp, cfg)
    mask = inp.mask
    lp = inp.log_prob.detach()
    mean = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
    cov = (inp.advantages - mean(inp.advantages)) * (lp - mean(lp))
    n = int(mask.sum())
    k = max(1, int(n * 0.02))
    order = sorted([(cov.flatten()[i].item(), i) for i in range(cov.numel()) if mask.flatten()[i]], reverse=True)
    chosen = {i for _, i in order[:k]}
    ratio = (lp - inp.old_log_prob).exp()
    total = 0.0
    for i in range(cov.numel()):
        if not mask.flatten()[i]:
            continue
        li = -inp.advantages.flatten()[i].item() * ratio.flatten()[i].item()
        if i in chosen:
            li += abs(lp.flatten()[i].item() - inp.old_log_prob.flatten()[i].item())
        total += li
    assert loss.item() == pytest.approx(total / n, rel=1e-10)
    assert m["kl_cov_frac"].item() == pytest.approx(k / n)


def _clip_cov_reference_candidates(inp, lb, ub, clip_low, clip_high):
    """Cui et al.'s Clip-Cov candidates in float64: valid tokens the PPO clip left alone whose
    centred covariance (A - mean A)(log p - mean log p) lies strictly inside (lb, ub)."""
    m = inp.mask
    lp = inp.log_prob.detach().double()
    a = inp.advantages.double()
    mean = lambda x: (x * m).sum() / m.sum()  # noqa: E731
    cov = (a - mean(a)) * (lp - mean(lp))
    r = (lp - inp.old_log_prob).exp()
    clipped = -a * r.clamp(1 - clip_low, 1 + clip_high) > -a * r
    return m & ~clipped & (cov > lb) & (cov < ub)


def test_clip_cov_matches_the_reference_rule_and_draws_afresh_per_call():
    inp = _inputs(7, shape=(8, 64), spread=0.3)
    inp.advantages = inp.advantages * 20  # push covariances into the (lb, ub) band
    cfg = PolicyLossConfig(clip_cov=ClipCovConfig(ratio=0.05, lb=0.5, ub=50.0), seed=3, dual_clip_c=10.0)
    cand = _clip_cov_reference_candidates(inp, 0.5, 50.0, 0.2, 0.28)
    n = int(inp.mask.sum())
    k = max(int(0.05 * n), 1)
    assert int(cand.sum()) > k  # a real draw among more candidates than it keeps

    def dropped(key):
        inp.log_prob.grad = None
        inp.draw_key = key
        loss, m = get_policy_loss("clip_cov")(inp, cfg)
        loss.backward()
        ratio = (inp.log_prob - inp.old_log_prob).exp().detach()
        # reference loss: max(-A r, -A clip(r)) (no dual clip), 0 on the dropped tokens, token-mean
        ref = ppo_dual_clip_reference(inp.advantages, ratio, 0.2, 0.28, None)
        pg_zero = (inp.log_prob.grad == 0) & inp.mask
        d = pg_zero & cand
        assert loss.item() == pytest.approx(float((ref * inp.mask * ~d).sum() / n), rel=1e-10)
        assert m["clip_cov_frac"].item() == pytest.approx(int(d.sum()) / n)
        return d

    d1 = dropped((0, 0))
    assert int(d1.sum()) == k and torch.all(cand[d1])  # exactly k, all among the candidates
    assert torch.equal(d1, dropped((0, 0)))  # same (seed, key): the same tokens on every TP rank
    d2 = dropped((0, 1))
    assert int(d2.sum()) == k and not torch.equal(d1, d2)  # another micro-batch: a fresh choice


def test_clip_cov_drops_one_token_of_a_small_micro_batch_and_ignores_dual_clip():
    """max(int(ratio * n), 1): a micro-batch of a few hundred tokens at ratio 2e-4 still drops one
    token (int() alone gives 0 below 5,000 tokens, and Clip-Cov silently equals GRPO)."""
    inp = _inputs(12, shape=(4, 64), spread=0.3)
    inp.advantages = inp.advantages * 20
    cfg = PolicyLossConfig(clip_cov=ClipCovConfig(lb=0.5, ub=50.0), dual_clip_c=1.5)
    assert cfg.clip_cov.ratio == 0.0002 and int(0.0002 * int(inp.mask.sum())) == 0
    loss, m = get_policy_loss("clip_cov")(inp, cfg)
    assert m["clip_cov_frac"].item() * int(inp.mask.sum()) == pytest.approx(1.0)
    assert m["clipfrac_dual"].item() == 0.0  # the reference has no dual clip


def test_kl_cov_and_clip_cov_defaults_are_the_original_7b_scripts():
    cfg = PolicyLossConfig()
    assert (cfg.kl_cov.ratio, cfg.kl_cov.coef) == (0.002, 1.0)
    assert (cfg.clip_cov.ratio, cfg.clip_cov.lb, cfg.clip_cov.ub) == (0.0002, 1.0, 5.0)


def test_entropy_adv_shapes_advantage():
    inp = _inputs(8)
    cfg = PolicyLossConfig(entropy_adv=EntropyAdvConfig(alpha=0.4, kappa=2.0), dual_clip_c=None)
    loss, _ = get_policy_loss("entropy_adv")(inp, cfg)
    bonus = torch.minimum(0.4 * inp.entropy.detach(), inp.advantages.abs() / 2)
    ratio = (inp.log_prob - inp.old_log_prob).exp().detach()
    ref = ppo_dual_clip_reference(inp.advantages + bonus, ratio, 0.2, 0.28, None)
    assert loss.item() == pytest.approx(((ref * inp.mask).sum() / inp.mask.sum()).item(), rel=1e-10)


def test_aggregation_modes_against_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    rows = [[x[i, j].item() for j in range(5) if mask[i, j]] for i in range(3)]
    flat = [v for r in rows for v in r]
    assert aggregate(x, mask, "token-mean").item() == pytest.approx(sum(flat) / len(flat))
    assert aggregate(x, mask, "token-mean", token_normalizer=20).item() == pytest.approx(sum(flat) / 20)
    assert aggregate(x, mask, "seq-mean-token-sum").item() == pytest.approx(sum(sum(r) for r in rows) / 3)
    assert aggregate(x, mask, "seq-mean-token-mean").item() == pytest.approx(
        (sum(rows[0]) / 2 + sum(rows[1]) / 5) / 2)  # the empty sequence does not count
    assert aggregate(x, mask, "seq-mean-token-sum-norm").item() == pytest.approx(sum(flat) / (3 * 5))
    assert aggregate(x, mask, "seq-mean-token-sum-norm", horizon=10).item() == pytest.approx(sum(flat) / 30)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate(x, mask, "mean")


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", ["grpo", "steer", "entropy_reg", "kl_cov", "clip_cov", "entropy_adv"])
def test_empty_mask_gives_zero_loss_not_nan(name, mode):
    inp = _inputs(9)
    inp.mask = torch.zeros_like(inp.mask)
    loss, m = get_policy_loss(name)(inp, PolicyLossConfig(loss_agg_mode=mode, entropy_coeff=0.01))
    assert loss.item() == 0.0
    assert all(torch.isfinite(v).all() for v in m.values())
    loss.backward()
    assert torch.all(inp.log_prob.grad == 0)


def test_kl_to_reference_k1_k3_and_tis():
    inp = _inputs(10)
    ref = inp.old_log_prob - 0.1
    inp.ref_log_prob = ref
    lp = inp.log_prob.detach()
    assert torch.allclose(kl_penalty(lp, ref, "k1"), lp - ref)
    assert torch.allclose(kl_penalty(lp, ref, "k3"), (ref - lp).exp() - (ref - lp) - 1)
    base, _ = get_policy_loss("grpo")(inp)
    loss, m = get_policy_loss("grpo")(inp, PolicyLossConfig(kl_coef=0.5, kl_type="k3"))
    k3 = (((ref - lp).exp() - (ref - lp) - 1) * inp.mask).sum() / inp.mask.sum()
    assert loss.item() == pytest.approx(base.item() + 0.5 * k3.item(), rel=1e-12)
    inp.rollout_log_prob = inp.old_log_prob + 0.3 * torch.randn_like(lp)
    loss_t, m = get_policy_loss("grpo")(inp, PolicyLossConfig(tis_cap=1.1))
    tis = (inp.old_log_prob - inp.rollout_log_prob).exp().clamp(max=1.1)
    ratio = lp.sub(inp.old_log_prob).exp()
    want = (ppo_dual_clip_reference(inp.advantages, ratio, 0.2, 0.28, 10.0) * tis * inp.mask).sum() / inp.mask.sum()
    assert loss_t.item() == pytest.approx(want.item(), rel=1e-10)
    with pytest.raises(ValueError, match="rollout_log_prob"):
        get_policy_loss("grpo")(_inputs(10), PolicyLossConfig(tis_cap=2.0))
    with pytest.raises(ValueError, match="ref_log_prob"):
        get_policy_loss("grpo")(_inputs(10), PolicyLossConfig(kl_coef=0.1))


def test_metrics_quadrants_and_shapes():
    inp = _inputs(11)
    _, m = get_policy_loss("steer")(inp)
    p = inp.log_prob.detach().exp()
    total = sum(m[f"quadrant_{q}"].item() for q in ("pos_high", "pos_low", "neg_high", "neg_low"))
    assert total == ((inp.advantages != 0) & inp.mask).sum().item()
    want = ((inp.advantages > 0) & (p >= 0.5) & inp.mask).sum().item()
    assert m["quadrant_pos_high"].item() == want
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    with pytest.raises(ValueError, match="old_log_prob has shape"):
        bad = _inputs(11)
        bad.old_log_prob = bad.old_log_prob[:, :3]
        get_policy_loss("grpo")(bad)


def test_config_validation():
    with pytest.raises(ValueError, match="dual_clip_c"):
        PolicyLossConfig(dual_clip_c=0.5)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        PolicyLossConfig(loss_agg_mode="sum")
    assert PolicyLossConfig(steer={"form": "exact"}).steer.form == "exact"
    assert math.isclose(PolicyLossConfig().clip_high, 0.28)
