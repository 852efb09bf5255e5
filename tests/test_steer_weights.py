"""Omega forms and STEER weights against direct float64 formulas and a measured entropy change."""
import math

import pytest
import torch

from steer_megatron.loss import SteerConfig, omega, steer_weights, token_stats, weights_from_omega


def _batch(seed, shape=(3, 17)):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    lp = -torch.rand(shape, generator=g, dtype=torch.float64) * 4
    old = lp + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    old = old.clamp(max=0)
    ent = torch.rand(shape, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(shape, generator=g) > 0.3
    return adv, lp, old, ent, mask


def test_release_and_paper_forms_follow_their_formulas():
    adv, lp, old, ent, mask = _batch(0)
    for form, power in (("release", 1), ("paper", 2)):
        got = omega(adv, lp, old, ent, form=form)
        for i in range(adv.numel()):
            a, l, o, h = (t.flatten()[i].item() for t in (adv, lp, old, ent))
            p = min(max(math.exp(l), 1e-8), 1 - 1e-8)
            want = -a / max(math.exp(o), 1e-8) * p * (1 - p) ** power * (math.log(p) + h)
            assert got.flatten()[i].item() == pytest.approx(want, rel=1e-5, abs=1e-9)


def test_paper_form_zeroes_clipped_tokens_and_release_ignores_clip():
    adv, lp, old, ent, _ = _batch(1)
    clip = torch.zeros_like(adv, dtype=torch.bool)
    clip[0, :5] = True
    paper = omega(adv, lp, old, ent, form="paper", clip_mask=clip)
    assert torch.all(paper[0, :5] == 0) and torch.all(paper[1:] != 0)


def test_exact_form_uses_sum_p2_terms():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 40, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, 40, (6,), generator=g)
    st = token_stats(logits, target)
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    old = st.logprob - 0.05
    clip = torch.tensor([False, True, False, False, False, False])
    got = omega(adv, st.logprob, old, st.entropy, form="exact", sum_p2=st.sum_p2, sum_p2_logp=st.sum_p2_logp,
                clip_mask=clip)
    lp = torch.log_softmax(logits, -1)
    p, H = lp.exp(), -(lp.exp() * lp).sum(-1)
    for i in range(6):
        y = target[i]
        bracket = p[i, y] * (lp[i, y] + H[i]) - (p[i] ** 2 * (lp[i] + H[i])).sum()
        want = 0.0 if clip[i] else -adv[i] * p[i, y] / old[i].exp() * bracket
        assert got[i].item() == pytest.approx(float(want), rel=1e-5, abs=1e-10)
    with pytest.raises(ValueError, match="sum_p2"):
        omega(adv, st.logprob, old, st.entropy, form="exact")


def _pearson(x, y):
    return float(torch.corrcoef(torch.stack([x.double(), y.double()]))[0, 1])


@pytest.mark.parametrize("dual_clip_c", [10.0, 1.1])
def test_exact_form_predicts_the_entropy_change_of_the_losss_own_step(dual_clip_c):
    """Tabular softmax states (float64), one token each, off-policy (p_old = p * u, some ratios
    outside the clip), stepped by the gradient of the project's own `grpo` loss (dual-clip PPO
    surrogate). Exact Omega, with the clip mask from the same rule, predicts every state's measured
    entropy change (Pearson >= 0.99; clipped tokens get no gradient and Omega 0); the release and
    paper forms only correlate."""
    from steer_megatron.loss import PolicyLossConfig, PolicyLossInputs, get_policy_loss

    g = torch.Generator().manual_seed(1)
    T, V, eta = 200, 300, 1e-4
    z = torch.randn(T, V, generator=g, dtype=torch.float64) * (0.5 + 5.5 * torch.rand(T, 1, generator=g, dtype=torch.float64))
    o = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(-1)
    adv = torch.randn(T, generator=g, dtype=torch.float64)
    zz = z.clone().requires_grad_()
    lp = torch.log_softmax(zz, -1).gather(-1, o[:, None]).squeeze(-1)
    u = 0.7 + 0.6 * torch.rand(T, generator=g, dtype=torch.float64)  # ratio r = 1 / u in [0.77, 1.43]
    old = (lp.detach() + u.log()).clamp(max=0)
    cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip_c=dual_clip_c)
    inp = PolicyLossInputs(log_prob=lp, old_log_prob=old, advantages=adv, mask=torch.ones(T, dtype=torch.bool))
    loss, _ = get_policy_loss("grpo")(inp, cfg)
    (loss * T).backward()  # token-mean over T tokens: each state steps by its own token's gradient
    H = lambda x: -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)  # noqa: E731
    measured = (H(z - eta * zz.grad) - H(z)) / eta

    r = (lp.detach() - old).exp()
    clip = ((adv > 0) & (r > 1.28)) | ((adv < 0) & (r < 0.8)) | ((adv < 0) & (r > dual_clip_c))
    assert 0 < int(clip.sum()) < T // 2  # the case exercises the clip
    st = token_stats(z, o)
    om = {f: omega(adv, st.logprob, old, st.entropy, form=f, sum_p2=st.sum_p2,
                   sum_p2_logp=st.sum_p2_logp, clip_mask=clip) for f in ("exact", "release", "paper")}
    free = ~clip
    assert torch.all(measured[clip] == 0) and torch.all(om["exact"][clip] == 0)
    # omega() computes in float32: compare to its rounding, the step's second order is far smaller
    assert _pearson(om["exact"][free], measured[free]) >= 0.99
    torch.testing.assert_close(om["exact"].double(), measured, rtol=1e-3, atol=1e-5 * float(measured.abs().max()))
    for f in ("release", "paper"):
        assert _pearson(om[f][free], measured[free]) < 0.95  # they drop the factor p and the other tokens' terms


def test_exp_mapping_matches_formula_with_floor():
    abs_om = torch.tensor([[0.0, 0.5, 1.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    w = weights_from_omega(abs_om, mask, SteerConfig(w_min=0.8))
    k = -math.log(0.8) / 1.0  # max over VALID tokens is 1.0
    want = [math.exp(-k * x) for x in (0.0, 0.5, 1.0)]
    assert w[0, :3].tolist() == pytest.approx(want)
    assert w[0, 3] == 0
    # all |Omega| below the 0.02 floor: k uses the floor, weights stay near 1
    small = torch.tensor([0.0, 0.005, 0.01], dtype=torch.float64)
    ws = weights_from_omega(small, torch.ones(3, dtype=torch.bool), SteerConfig(w_min=0.8))
    assert ws.tolist() == pytest.approx([math.exp(math.log(0.8) / 0.02 * x) for x in small.tolist()])
    assert ws.min() > 0.8


def test_linear_mapping_and_midpoint():
    abs_om = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    mask = torch.ones(4, dtype=torch.bool)
    w = weights_from_omega(abs_om, mask, SteerConfig(mapping="linear", w_min=0.8, w_max=1.2))
    assert w.tolist() == pytest.approx([1.2, 1.1, 1.0, 0.8])
    same = weights_from_omega(torch.full((3,), 0.7), torch.ones(3, dtype=torch.bool),
                              SteerConfig(mapping="linear", w_min=0.8, w_max=1.2))
    assert same.tolist() == pytest.approx([1.0] * 3)


def test_steer_weights_public_entry_point_and_empty_mask():
    adv, lp, old, ent, mask = _batch(4)
    w = steer_weights(adv, lp, old, ent, mask)
    assert w.shape == adv.shape and not w.requires_grad
    assert torch.all(w[mask] >= 0.8) and torch.all(w[mask] <= 1.0) and torch.all(w[~mask] == 0)
    # the token with the largest |Omega| gets exactly w_min
    om = omega(adv, lp, old, ent).abs()
    idx = torch.where(mask, om, torch.zeros_like(om)).argmax()
    assert w.flatten()[idx].item() == pytest.approx(0.8)
    empty = steer_weights(adv, lp, old, ent, torch.zeros_like(mask))
    assert torch.all(empty == 0) and torch.isfinite(empty).all()


def test_non_finite_omega_becomes_zero():
    adv = torch.tensor([1.0, float("nan"), 1.0])
    lp = torch.tensor([-1.0, -1.0, -1.0])
    ent = torch.tensor([2.0, 2.0, float("inf")])
    om = omega(adv, lp, lp, ent)
    assert om[1] == 0 and om[2] == 0 and om[0] != 0


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="steer.form"):
        SteerConfig(form="bogus")
    with pytest.raises(ValueError, match="steer.mapping"):
        SteerConfig(mapping="cubic")
    with pytest.raises(ValueError, match="w_min"):
        SteerConfig(w_min=1.5, w_max=1.0)
    with pytest.raises(ValueError, match="steer.group"):
        SteerConfig(group="world")
