"""Policy losses against slow element-wise references."""
import math

import pytest
import torch

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


def test_entropy_reg_adds_entropy_gradient():
    inp = _inputs(5)
    cfg = PolicyLossConfig(entropy_reg_coeff=0.01)
    loss, m = get_policy_loss("entropy_reg")(inp, cfg)
    base, _ = get_policy_loss("grpo")(inp, cfg)
    want = base - 0.01 * (inp.entropy * inp.mask).sum() / inp.mask.sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    loss.backward()
    torch.testing.assert_close(inp.entropy.grad, -0.01 * inp.mask.double() / inp.mask.sum())


def test_kl_cov_penalises_top_covariance_tokens():
    inp = _inputs(6, shape=(8, 64))
    cfg = PolicyLossConfig(kl_cov_ratio=0.02, kl_cov_coef=1.0)
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


def test_clip_cov_detaches_a_seeded_random_subset_in_band():
    inp = _inputs(7, shape=(8, 64), spread=0.05)
    inp.advantages = inp.advantages * 20  # push covariances into the [lb, ub] band
    cfg = PolicyLossConfig(clip_cov_ratio=0.05, clip_cov_lb=0.5, clip_cov_ub=50.0, seed=3)
    loss, m = get_policy_loss("clip_cov")(inp, cfg)
    loss.backward()
    dropped = (inp.log_prob.grad == 0) & inp.mask
    assert m["clip_cov_frac"].item() > 0
    g2 = inp.log_prob.grad.clone()
    inp.log_prob.grad = None
    loss2, _ = get_policy_loss("clip_cov")(inp, cfg)
    loss2.backward()
    assert torch.equal(g2, inp.log_prob.grad)  # same seed, same tokens on every rank
    assert int(dropped.sum()) >= int(m["clip_cov_frac"].item() * inp.mask.sum().item())


def test_entropy_adv_shapes_advantage():
    inp = _inputs(8)
    cfg = PolicyLossConfig(entropy_adv_alpha=0.4, entropy_adv_kappa=2.0, dual_clip_c=None)
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
    loss, m = get_policy_loss(name)(inp, PolicyLossConfig(loss_agg_mode=mode))
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
