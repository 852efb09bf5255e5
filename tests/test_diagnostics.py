"""Entropy-change diagnostics: Omega vs measured entropy change, the analyses, the probe's undo,
and the w_min closed loop."""
import math
import random

import pytest
import torch

from steer_megatron.algorithms.controller import WMinController
from steer_megatron.diagnostics import (
    EntropyChangeData, analyze, average_ranks, omega_forms, sign_agreement, spearman,
)
from steer_megatron.diagnostics.entropy_change import clipping, quadrants, total_agreement

# -- (a) tabular policy: the known answer ----------------------------------------------------------


def _entropy(z: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(z, -1)
    return -(lp.exp() * lp).sum(-1)


def _tabular_case(eta: float, n_states: int = 300, vocab: int = 200, seed: int = 0, objective: str = "ppo"):
    """One softmax per state; one on-policy sampled token each; one plain SGD step of size eta, in
    float64 autograd, on
      objective="ppo":     A * p(o) / p_old(o), the PPO surrogate at ratio 1 (what `exact` predicts);
      objective="logprob": (A / p_old) * log p(o), a step weight chosen independently of p (the
                           prefactor the release form is written with), which `exact` must NOT match.
    Omega's inputs (p, H, sum p^2, sum p^2 log p) are computed here directly from the softmax.
    Returns the measured change, Omega per form, A, log p, H and the logit step weight."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_states):
        z = torch.randn(vocab, generator=g, dtype=torch.float64) * (0.5 + 4.5 * torch.rand((), generator=g).item())
        p = torch.softmax(z, 0)
        o = int(torch.multinomial(p, 1, generator=g))
        adv = float(torch.randn((), generator=g, dtype=torch.float64))
        w = adv if objective == "ppo" else adv / float(p[o])  # d objective / d log p(o) at ratio 1
        zz = z.clone().requires_grad_()
        lp_o = torch.log_softmax(zz, 0)[o]
        (adv * torch.exp(lp_o - lp_o.detach()) if objective == "ppo" else w * lp_o).backward()
        measured = float(_entropy(z + eta * zz.grad) - _entropy(z))
        lp = torch.log(p)
        rows.append((measured, adv, float(lp[o]), float(_entropy(z)), float((p * p).sum()), float((p * p * lp).sum()), w))
    t = torch.tensor(rows, dtype=torch.float64).T
    measured, adv, logp, ent, sp2, sp2l, w = t
    return measured, omega_forms(adv, logp, ent, sp2, sp2l), adv, logp, ent, w


def test_exact_omega_matches_the_surrogate_step_to_second_order():
    eta = 1e-4
    measured, om, adv, logp, ent, w = _tabular_case(eta)
    pred = eta * om["exact"].double()
    err = (measured - pred).abs()
    step2 = (eta * w) ** 2  # |dz|^2 <= 2 (eta w)^2: the second-order remainder scales with it
    assert float((err / step2).max()) < 5.0
    # Halving the step quarters the error: the mismatch is second order, not a constant bias.
    m2, om2, *_ = _tabular_case(eta / 2)
    ratio = float((m2 - eta / 2 * om2["exact"].double()).abs().sum() / err.sum())
    assert 0.2 < ratio < 0.3

    data = EntropyChangeData(measured=measured, omega=om, advantages=adv, prob=logp.exp(), entropy=ent)
    rep = analyze(data)
    ex = rep["forms"]["exact"]
    # a sign can flip only where Omega is near 0 (below the second-order term, or float32 rounding in omega())
    assert ex["pearson"] > 0.9999 and ex["spearman"] > 0.999 and ex["sign_agreement"] > 0.99
    assert ex["total"]["fitted_scale"] == pytest.approx(eta, rel=1e-3)  # measured = eta * Omega
    # signed sums cancel, so the total carries the second-order terms relatively more than each token
    assert ex["total"]["holdout_ratio"] == pytest.approx(1.0, abs=0.02)
    for form in ("release", "paper"):  # they drop the other-token terms and the factor p: correlated, not exact
        assert rep["forms"][form]["pearson"] < 0.97


def test_exact_omega_is_not_the_step_of_a_weight_chosen_without_p():
    """A step weighted A / p_old on log p (independent of the surrogate) is a different, much larger
    step for rare tokens: `exact` must not predict it (so the test above can fail)."""
    eta = 1e-4
    measured, om, *_ = _tabular_case(eta, objective="logprob")
    assert float((measured - eta * om["exact"].double()).abs().max()) > 0.1 * float(measured.abs().max())


# -- (b) the analysis functions against hand-computed numbers ------------------------------------


def test_ranks_spearman_and_sign_agreement_by_hand():
    assert average_ranks(torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0])).tolist() == [3.0, 1.5, 4.0, 1.5, 5.0]
    # ranks x = 1..5, ranks y = [1, 2, 3.5, 5, 3.5]: rho = 8 / sqrt(10 * 9.5)
    rho = spearman(torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([5.0, 6, 7, 8, 7]))
    assert rho == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    frac, n = sign_agreement(torch.tensor([1.0, -1, 2, 0, -3]), torch.tensor([0.5, 0.2, 1, 1, -1]))
    assert (frac, n) == (0.75, 4)  # token 3 predicts no direction; 3 of the other 4 agree


def _hand_data():
    #            A     p     dH     ratio_after
    rows = [(1.0, 0.9, -0.02, 1.01), (1.0, 0.8, -0.04, 1.40), (1.0, 0.1, 0.03, 1.30),
            (-1.0, 0.7, 0.05, 0.90), (-1.0, 0.2, -0.01, 0.70), (-1.0, 0.3, -0.03, 0.85), (0.0, 0.5, 0.01, 1.0)]
    a, p, dh, r = (torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    om = {"exact": 2 * dh}
    return EntropyChangeData(measured=dh, omega=om, advantages=a, prob=p, entropy=torch.ones_like(dh), ratio_after=r)


def test_quadrants_clipping_and_totals_by_hand():
    d = _hand_data()
    q = quadrants(d, 0.5)
    assert q["pos_high"]["count"] == 2 and q["pos_high"]["mean_measured"] == pytest.approx(-0.03)
    assert q["pos_low"]["count"] == 1 and q["pos_low"]["mean_measured"] == pytest.approx(0.03)
    assert q["neg_high"]["count"] == 1 and q["neg_high"]["mean_measured"] == pytest.approx(0.05)
    assert q["neg_low"]["count"] == 2 and q["neg_low"]["mean_measured"] == pytest.approx(-0.02)
    assert q["neg_low"]["frac_entropy_down"] == 1.0 and q["zero_advantage_count"] == 1  # p = 0.5 counts as high
    c = clipping(d, 0.5, clip_low=0.2, clip_high=0.28)
    # low-p tokens (p < 0.5): A>0 r=1.30 fires, A<0 r=0.70 fires, A<0 r=0.85 does not
    assert c["low_prob"]["count"] == 3 and c["low_prob"]["clip_fraction"] == pytest.approx(2 / 3)
    # high-p: r=1.01 no, r=1.40 fires, A<0 r=0.90 no, A=0 never
    assert c["high_prob"]["count"] == 4 and c["high_prob"]["clip_fraction"] == pytest.approx(1 / 4)
    t = total_agreement(d.omega["exact"], d.measured)  # measured = Omega / 2 exactly
    assert t["fitted_scale"] == pytest.approx(0.5) and t["holdout_ratio"] == pytest.approx(1.0)
    assert t["fit_r2_through_origin"] == pytest.approx(1.0)


def test_report_is_json_safe_with_undefined_statistics():
    import json

    d = _hand_data()
    d.omega["flat"] = torch.zeros_like(d.measured)  # constant prediction: correlation undefined
    rep = analyze(d, n_bins=3)
    json.dumps(rep, allow_nan=False)
    assert rep["forms"]["flat"]["pearson"] is None and rep["forms"]["exact"]["pearson"] == pytest.approx(1.0)


def test_first_order_check_flags_a_measurement_that_does_not_resolve_the_step():
    from steer_megatron.diagnostics.entropy_change import first_order_check

    g = torch.Generator().manual_seed(0)
    fo = torch.randn(200, generator=g, dtype=torch.float64) * 1e-4
    good = first_order_check(fo, fo * 1.02 + 1e-7 * torch.randn(200, generator=g, dtype=torch.float64))
    assert good["ok"] and good["slope"] == pytest.approx(1.02, abs=0.01)
    noisy = first_order_check(fo, fo + 1e-4 * torch.randn(200, generator=g, dtype=torch.float64))  # noise ~ signal
    assert not noisy["ok"] and noisy["verdict"].startswith("BROKEN")
    curved = first_order_check(fo, 1.5 * fo)  # perfectly correlated but past the linear regime
    assert not curved["ok"]


def test_plots_write_png(tmp_path):
    from steer_megatron.diagnostics import plot_binned_scatter, plot_entropy_relation

    d = _hand_data()
    rep = analyze(d, n_bins=3)
    for f in (plot_binned_scatter(rep, d, str(tmp_path / "s.png")), plot_entropy_relation(rep, d, str(tmp_path / "e.png"))):
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# -- (c) the real-model measurement on a tiny megatron model ---------------------------------------

VOCAB = 150


def _actor(weights):
    from steer_megatron.loss import PolicyLossConfig
    from steer_megatron.train.actor import ActorConfig, MegatronActor
    from steer_megatron.train.optim import OptimSettings, wrap_for_training
    from tests.tiny_gpt import build_tiny_gpt

    model = build_tiny_gpt(1, VOCAB)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    ddp, opt, sched = wrap_for_training(model, OptimSettings(lr=1e-3, warmup_steps=10))  # warm-up: LR moves every step
    return MegatronActor(ddp, opt, ActorConfig(vocab_size=VOCAB, micro_batch_size=4, mini_batch_size=4,
                                               loss=PolicyLossConfig()), sched)


def _params(actor):
    return {n: p.detach().clone() for n, p in actor.model.named_parameters()}


def _train_step(actor, batch):
    from dataclasses import replace

    b = replace(batch)
    b.old_log_prob, b.old_entropy = actor.compute_log_probs(b)
    actor.update(b)  # two mini-batches of 4: two optimizer steps


def probe_worker():
    from dataclasses import replace

    from steer_megatron.algorithms.controller import step_entropy_change
    from steer_megatron.diagnostics import EntropyProbe, measure_entropy_change
    from steer_megatron.parallel import ParallelLayout, init_parallel
    from tests.tiny_gpt import build_tiny_gpt, plain_entropy, rl_batch

    init_parallel(ParallelLayout(), seed=3)
    weights = {n: p.detach().clone() for n, p in build_tiny_gpt(1, VOCAB).named_parameters()}
    batch = rl_batch(VOCAB, [(5, 7 + i) for i in range(8)])
    ids, mask = batch.input_ids, batch.loss_mask

    probed = _actor(weights)
    _train_step(probed, batch)  # Adam moments and the scheduler are non-trivial before the probe
    before = _params(probed)
    probe = EntropyProbe(2, batch)
    skipped = probe.maybe_run(1, probed)
    metrics = probe.maybe_run(2, probed)
    unchanged = all(torch.equal(before[n], p) for n, p in _params(probed).items())
    _train_step(probed, batch)

    plain = _actor(weights)
    _train_step(plain, batch)
    _train_step(plain, batch)
    same_after = all(torch.equal(p, _params(plain)[n]) for n, p in _params(probed).items())

    # The measured change against entropies computed here from the raw logits (not token_stats).
    fresh = _actor(weights)
    _train_step(fresh, batch)  # past the warm-up's LR of 0 at step 0
    h0 = plain_entropy(fresh.model, ids, VOCAB)
    data, _ = measure_entropy_change(fresh, batch, undo=False)
    independent = (plain_entropy(fresh.model, ids, VOCAB) - h0)[mask]
    stepped = replace(batch, old_entropy=h0.float())
    step_dh = step_entropy_change(fresh, stepped)

    # The closed loop's LR actuator: the only optimizer step with a non-zero LR (the warm-up's
    # first LR is 0) moves the weights exactly lr_scale times as far; the scheduler's LR is kept.
    start, moved, lrs = _params(_actor(weights)), [], []
    for scale in (1.0, 0.5):
        scaled = _actor(weights)
        scaled.cfg = replace(scaled.cfg, lr_scale=scale)
        _train_step(scaled, batch)
        moved.append({n: p - start[n] for n, p in _params(scaled).items()})
        lrs.append([g["lr"] for g in scaled.optimizer.param_groups])
    return dict(step_dh=step_dh, moved=moved, lrs=lrs, skipped=skipped, metrics=metrics, report=probe.last_report, unchanged=unchanged, same_after=same_after,
                measured=data.measured, independent=independent)


def test_probe_measures_real_update_and_leaves_training_unchanged():
    from steer_megatron.parallel import spawn_ranks

    (out,) = spawn_ranks(probe_worker, 1)
    assert out["skipped"] is None
    m, rep = out["metrics"], out["report"]
    assert rep["tokens"] == int(sum(i + 2 for i in range(8)))
    for f in ("release", "paper", "exact"):
        assert math.isfinite(m[f"diag/pearson_{f}"]) and math.isfinite(m[f"diag/spearman_{f}"])
    assert rep["measured"]["std"] > 0 and rep["meta"]["update_metrics"]["grad_norm"] > 0  # the step really ran
    # the parameter-space first order along the real step, next to the forms (fp32: must hold)
    fo = rep["first_order"]
    assert fo["ok"] and m["diag/first_order_ok"] == 1.0, fo["verdict"]
    assert fo["pearson"] >= 0.98 and fo["slope"] == pytest.approx(1.0, abs=0.1)
    assert out["unchanged"], "the probe changed the model weights"
    assert out["same_after"], "training after a probe differs from training without it (optimizer/scheduler/RNG)"
    assert out["independent"].abs().max() > 1e-4  # the step moved the entropies measurably
    torch.testing.assert_close(out["measured"].double(), out["independent"], atol=2e-5, rtol=1e-3)
    assert out["step_dh"] == pytest.approx(float(out["independent"].mean()), abs=2e-6)  # the closed loop's input
    full, half = out["moved"]
    biggest = max(float(d.abs().max()) for d in full.values())
    assert biggest > 1e-5
    for n, d in full.items():  # up to fp32 rounding of the weights themselves
        torch.testing.assert_close(half[n], 0.5 * d, rtol=1e-4, atol=1e-3 * biggest)
    assert out["lrs"][0] == out["lrs"][1] and min(out["lrs"][0]) > 0


# -- (d) the w_min closed loop on synthetic plants ---------------------------------------------------


def _run(ctrl, plant, steps):
    out = []
    for t in range(steps):
        dh = plant(ctrl.w_min, t)
        out.append((dh, ctrl.in_band(dh)))
        ctrl.update(dh)
    return out


def test_controller_converges_into_band_and_stays():
    # entropy falls as w_min^2 (w_min = 1 is plain GRPO); the band needs w_min in [0.316, 0.5]
    ctrl = WMinController(-0.01, -0.004, w_min_init=1.0, gain=0.5)
    hist = _run(ctrl, lambda w, t: -0.04 * w * w, 40)
    first_in = next(i for i, (_, ok) in enumerate(hist) if ok)
    assert first_in < 15 and all(ok for _, ok in hist[first_in:])
    assert 0.316 < ctrl.w_min < 0.5


def test_controller_tracks_noisy_drifting_plant_and_respects_bounds():
    rng = random.Random(0)
    ctrl = WMinController(-0.01, -0.004, w_min_init=0.8, gain=0.5)
    # the step's entropy drop grows 3x over the run (collapse accelerating), with noise
    hist = _run(ctrl, lambda w, t: -0.03 * w * w * (1 + 2 * t / 200) + rng.gauss(0, 0.0008), 200)
    assert sum(ok for _, ok in hist[20:]) / 180 > 0.8
    weak = WMinController(-0.01, -0.004, w_min_init=0.5)
    _run(weak, lambda w, t: -0.001 * w, 30)  # too weak even at w_min = 1: release fully, no further
    assert weak.w_min == 1.0
    strong = WMinController(-0.01, -0.004, w_min_init=0.5, w_min_bounds=(0.2, 1.0))
    _run(strong, lambda w, t: -1.0 * w, 30)  # cannot be damped enough: stop at the floor
    assert strong.w_min == 0.2


def test_controller_moves_w_min_by_the_sign_of_the_miss_and_rejects_bad_settings():
    # dH rises as w_min falls, through zero (the demo's direction): the band needs w_min in [0.2, 0.5]
    plant = lambda w, t: 0.003 - 0.01 * w  # noqa: E731
    for start in (1.0, 0.05):  # from above the band's w_min (dH too low) and below it (dH too high)
        ctrl = WMinController(-0.002, 0.001, w_min_init=start)
        hist = _run(ctrl, plant, 30)
        assert all(ok for _, ok in hist[15:]) and 0.2 <= ctrl.w_min <= 0.5
    assert ctrl.update(0.0) == ctrl.w_min  # inside the band: no change
    with pytest.raises(ValueError, match="low < high"):
        WMinController(0.1, -0.1)
    with pytest.raises(ValueError, match="w_min_bounds"):
        WMinController(-0.1, 0.1, w_min_bounds=(0.5, 1.5))


def test_controller_finds_the_known_w_min_of_a_log_plant():
    # dH = a log(w_min) + b + noise; the band's centre needs log w_min = (centre - b) / a, w_min = 0.19
    rng = random.Random(1)
    a, b, low, high = -0.003, -0.012, -0.009, -0.005
    ctrl = WMinController(low, high, w_min_init=0.8, gain=0.5)
    hist = _run(ctrl, lambda w, t: a * math.log(w) + b + rng.gauss(0, 0.0005), 60)
    assert sum(ok for _, ok in hist[15:]) / 45 > 0.9
    # anywhere inside the band is a fixed point: the w_min range that maps into it
    assert math.exp((high - b) / a) < ctrl.w_min < math.exp((low - b) / a)
    assert ctrl.lr_scale == 1.0  # default lr_scale_bounds: w_min only


def _run_split(ctrl, plant, steps):
    """Like _run, for a plant that also sees the LR scale."""
    out = []
    for t in range(steps):
        dh = plant(ctrl.w_min, ctrl.lr_scale, t)
        out.append((dh, ctrl.in_band(dh), ctrl.w_min, ctrl.lr_scale))
        ctrl.update(dh)
    return out


def _weak_w_min_plant(seed):
    """Like the CPU demo: w_min barely moves dH (a 10x lower w_min gains 0.001), the step's size
    does (dH proportional to the LR); multiplicative noise, and the loss shrinks 1.5x over the run."""
    rng = random.Random(seed)
    return lambda w, s, t: s * (-0.015 + 0.0004 * math.log(1 / w)) * (1 - t / 180) * (1 + rng.gauss(0, 0.15))


def test_lr_actuator_takes_over_once_w_min_sits_at_its_floor():
    band = (-0.009, -0.005)
    split = WMinController(*band, w_min_init=0.8, w_min_bounds=(0.3, 1.0), lr_scale_bounds=(0.25, 1.0))
    hist = _run_split(split, _weak_w_min_plant(0), 60)
    settled = hist[12:]
    assert sum(ok for _, ok, _, _ in settled) / len(settled) > 0.7  # 0.77 (the noise alone allows ~0.94)
    # w_min went first, to its floor; only then did the LR scale leave 1
    first_scaled = next(i for i, (*_, s) in enumerate(hist) if s < 1)
    assert all(w == 0.3 for _, _, w, _ in hist[first_scaled:]) and all(s == 1.0 for *_, s in hist[:first_scaled])
    assert 0.5 < split.lr_scale < 0.9
    # the same plant with w_min alone: stuck at the floor, below the band nearly every step
    alone = WMinController(*band, w_min_init=0.8, w_min_bounds=(0.3, 1.0))
    hist = _run_split(alone, _weak_w_min_plant(0), 60)
    assert alone.w_min == 0.3 and alone.lr_scale == 1.0
    assert sum(ok for _, ok, _, _ in hist[12:]) / 48 < 0.2  # 0.08


def test_lr_scale_rises_past_the_w_min_ceiling_and_stops_at_its_bound():
    # too little entropy lost even at w_min = 1 (plain GRPO weights): the loop grows the step, up to 2x
    ctrl = WMinController(-0.02, -0.015, w_min_init=0.5, lr_scale_bounds=(0.5, 2.0))
    hist = _run_split(ctrl, lambda w, s, t: -0.006 * s, 20)
    assert ctrl.w_min == 1.0 and ctrl.lr_scale == pytest.approx(2.0)
    assert all(s == 1.0 for _, _, w, s in hist if w < 1.0)
    # a plant the loop can satisfy within the bounds: dH = -0.006 s needs s in [2.5, 3.33]
    ctrl = WMinController(-0.02, -0.015, w_min_init=0.5, lr_scale_bounds=(0.5, 4.0))
    hist = _run_split(ctrl, lambda w, s, t: -0.006 * s, 30)
    assert all(ok for _, ok, _, _ in hist[15:]) and 2.5 <= ctrl.lr_scale <= 3.34


def test_controller_state_round_trips_and_reads_w_min_only_checkpoints():
    ctrl = WMinController(-0.009, -0.005, w_min_init=0.8, w_min_bounds=(0.3, 1.0), lr_scale_bounds=(0.25, 1.0))
    for _ in range(6):
        ctrl.update(-0.02)
    assert ctrl.w_min == 0.3 and ctrl.lr_scale < 1
    again = WMinController(-0.009, -0.005, w_min_init=0.8, w_min_bounds=(0.3, 1.0), lr_scale_bounds=(0.25, 1.0))
    again.load_state_dict(ctrl.state_dict())
    assert (again.w_min, again.lr_scale) == pytest.approx((ctrl.w_min, ctrl.lr_scale))
    assert again.update(-0.02) == ctrl.update(-0.02) and again.lr_scale == pytest.approx(ctrl.lr_scale)
    again.load_state_dict({"w_min": 0.5})  # written before the LR actuator existed
    assert (again.w_min, again.lr_scale) == (0.5, 1.0)


def test_lr_actuator_settings_are_checked():
    with pytest.raises(ValueError, match=r"lr_scale_bounds=\[1.5, 2.0\]: must be \[low, high\] with 0 < low <= 1 <= high"):
        WMinController(-0.01, -0.004, lr_scale_bounds=(1.5, 2.0))
    with pytest.raises(ValueError, match=r"band=\[-0.01, 0.001\].*band's high end must be <= 0"):
        WMinController(-0.01, 0.001, lr_scale_bounds=(0.5, 1.0))
    WMinController(-0.01, 0.001)  # a band that allows a rise is fine for w_min alone
