"""The closed loop's in-step trim (steer_megatron.algorithms.step_trim): the line search on
synthetic plants whose answer is known, and the weight rescaling on real megatron-core actors
(data-parallel, the distributed optimizer, bf16 with fp32 main copies), checked against the
weights recorded before and after a real step and against an entropy computed from raw logits."""
import math

import pytest
import torch

from steer_megatron.algorithms.step_trim import next_trim_scale, search_step_scale

VOCAB = 150


def _search(plant, band, trims=2, min_scale=0.25):
    """search_step_scale on a plant dH(s): (scale kept, dH reported, the scales measured)."""
    at, tried = [1.0], []

    def scale(s):
        at[0] = s

    def measure():
        tried.append(at[0])
        return plant(at[0])

    s, dh, passes = search_step_scale(measure, scale, plant(1.0), *band, trims, min_scale)
    assert passes == len(tried) and s == at[0]  # the weights are left at the scale reported
    return s, dh, tried


@pytest.mark.parametrize("curve", [0.0, 0.3, -0.3, 0.6])
@pytest.mark.parametrize("raw", [-0.013, -0.02, -0.03])
def test_trim_lands_in_the_band_on_curved_plants(raw, curve):
    # dH(s) = a s + b s^2 with dH(1) = raw: linear, convex and concave along the step
    b = curve * raw
    plant = lambda s: (raw - b) * s + b * s * s  # noqa: E731
    band = (-0.011, -0.005)
    s, dh, points = _search(plant, band)
    assert band[0] <= dh <= band[1] and 0.25 <= s < 1
    assert dh == plant(s)  # what is reported is the value at the weights kept
    if curve == 0:  # a straight line: one interpolation lands on the centre exactly
        assert len(points) == 1 and dh == pytest.approx(sum(band) / 2, abs=1e-15)
    assert len(points) <= 2


def test_trim_does_nothing_where_shrinking_cannot_reach_the_band():
    band = (-0.011, -0.005)
    assert next_trim_scale([(1.0, -0.003)], *band, 0.25) is None  # lost too little: shrinking loses even less
    assert next_trim_scale([(1.0, 0.004)], *band, 0.25) is None  # entropy rose: wrong side of zero
    assert next_trim_scale([(1.0, 0.01)], -0.002, 0.002, 0.25) is None  # a band centred on 0 would undo the step
    assert next_trim_scale([(1.0, 0.01)], 0.001, 0.003, 0.25) == 0.25  # 0.2 would hit the centre; clamped
    # a band of rises works the same way, and the scale never goes below min_scale
    s, dh, points = _search(lambda s: 0.1 * s, (0.001, 0.003))
    assert s == 0.25 and dh == pytest.approx(0.025) and points == [0.25]  # pinned at the floor: no second try there
    assert _search(lambda s: -0.003 * s, band) == (1.0, -0.003, [])  # nothing tried: the step is kept whole
    with pytest.raises(ValueError, match="untrimmed"):
        next_trim_scale([(0.5, -0.02)], *band, 0.25)


def test_trim_keeps_the_closest_scale_when_the_change_is_not_monotone():
    # like a measured demo step: a rise that turns into a loss part way along the step
    plant = lambda s: 0.0015 if s == 1.0 else (-0.001 if s < 0.5 else -0.0021)  # noqa: E731
    s, dh, tried = _search(plant, (0.0002, 0.001))
    assert tried == [pytest.approx(0.4), pytest.approx(0.4 + 0.6 * 0.0016 / 0.0025), 1.0]  # two tries, then back
    assert (s, dh) == (1.0, 0.0015)  # the whole step missed the band by least


def _actor(weights, distributed, bf16):
    from steer_megatron.loss import PolicyLossConfig
    from steer_megatron.train.actor import ActorConfig, MegatronActor
    from steer_megatron.train.optim import OptimSettings, wrap_for_training
    from tests.tiny_gpt import build_tiny_gpt

    model = build_tiny_gpt(1, VOCAB)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    if bf16:
        from megatron.core.transformer.module import Float16Module

        model.config.bf16 = True
        model = Float16Module(model.config, model.to(torch.bfloat16))
    ddp, opt, sched = wrap_for_training(model, OptimSettings(lr=3e-3, use_distributed_optimizer=distributed, bf16=bf16))
    return MegatronActor(ddp, opt, ActorConfig(vocab_size=VOCAB, micro_batch_size=4, mini_batch_size=4,
                                               loss=PolicyLossConfig()), sched)


def _snapshot(tensors):
    return [t.detach().double().clone() for t in tensors]


def trim_worker(distributed, bf16):
    from dataclasses import replace

    from megatron.core import parallel_state as ps

    from steer_megatron.algorithms.controller import step_entropy_change
    from steer_megatron.train.optim import torch_optimizers as _torch_optimizers
    from steer_megatron.algorithms.step_trim import StepTrim
    from steer_megatron.parallel import ParallelLayout, init_parallel
    from tests.tiny_gpt import build_tiny_gpt, plain_entropy, rl_batch

    init_parallel(ParallelLayout(), seed=3)
    weights = {n: p.detach().clone() for n, p in build_tiny_gpt(1, VOCAB).named_parameters()}
    batch = rl_batch(VOCAB, [(4, 6 + i % 9) for i in range(16)])
    local = batch.dp_slice(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())

    actor = _actor(weights, distributed, bf16)
    model_params = list(actor.model.parameters())
    main_params = [p for o in _torch_optimizers(actor.optimizer) for gr in o.param_groups for p in gr["params"]]

    def step():
        b = replace(local)
        b.old_log_prob, b.old_entropy = actor.compute_log_probs(b)
        actor.update(b)
        return b

    step()  # Adam moments are non-trivial before the trimmed step
    before_model, before_main = _snapshot(model_params), _snapshot(main_params)
    trim = StepTrim(actor)
    stepped = step()
    after_model, after_main = _snapshot(model_params), _snapshot(main_params)
    out = {"kept": len(trim.start), "shards": len(main_params), "model": [], "main": [], "dh": [], "plain": []}
    for s in (0.5, 0.8, 0.3):
        trim.scale(s)
        # error relative to the largest move of each tensor, and to its largest value
        for key, live, b0s, b1s in (("model", model_params, before_model, after_model),
                                    ("main", main_params, before_main, after_main)):
            err = [(p.double() - (b0 + s * (b1 - b0))).abs().max() for p, b0, b1 in zip(live, b0s, b1s)]
            out[key].append((max(float(e / (b1 - b0).abs().max().clamp_min(1e-30)) for e, b0, b1 in zip(err, b0s, b1s)),
                             max(float(e / b1.abs().max()) for e, b1 in zip(err, b1s))))
        out["dh"].append(step_entropy_change(actor, stepped))  # DP mean
        h = (plain_entropy(actor.model, local.input_ids, VOCAB) - stepped.old_entropy.double())[local.loss_mask]
        total = torch.stack([h.sum(), torch.tensor(float(h.numel()), dtype=torch.float64)])
        torch.distributed.all_reduce(total)
        out["plain"].append(float(total[0] / total[1]))
    out["moved"] = max(float((b1 - b0).abs().max()) for b0, b1 in zip(before_main, after_main))
    out["moved_model"] = max(float((b1 - b0).abs().max() / b1.abs().max()) for b0, b1 in zip(before_model, after_model))
    return out


@pytest.mark.parametrize("distributed,bf16", [(True, False), (True, True)], ids=["distopt-fp32", "distopt-bf16"])
def test_trim_rescales_a_real_step_on_every_copy_of_the_weights(distributed, bf16):
    """DP = 2 with megatron's distributed optimizer. Under fp32 its shards are views into the
    model's weights (they must be scaled once, not twice); under bf16 they are separate fp32
    main copies (they must be scaled too, or the next step would start from the untrimmed step)."""
    from steer_megatron.parallel import spawn_ranks

    outs = spawn_ranks(trim_worker, 2, distributed, bf16)
    for out in outs:
        assert out["moved"] > 1e-5 and out["moved_model"] > 0.05  # the step really moved the weights, past bf16 rounding
        # the 17 weights, plus this rank's fp32 main shards under bf16 (under fp32 they are views of the weights)
        assert out["kept"] == 17 + (out["shards"] if bf16 else 0) and 0 < out["shards"] < 17
        for (model_of_step, model_of_value), (main_of_step, _) in zip(out["model"], out["main"]):
            assert main_of_step < 1e-4  # fp32 main copies (under fp32, the weights themselves)
            if bf16:  # bf16 weights: theta_0 + s * step up to their own rounding (8 bits)
                assert model_of_value <= 2 ** -6  # two units in the last place
            else:
                assert model_of_step < 1e-4
        # the trimmed weights' entropy change: the loop's input equals one from raw logits, and
        # shrinking the step changes it (a rescale that did not reach the model would not)
        for dh, plain in zip(out["dh"], out["plain"]):
            assert dh == pytest.approx(plain, abs=2e-5 if not bf16 else 2e-3)
        assert len({round(d, 9) for d in out["dh"]}) == 3
    assert outs[0]["dh"] == outs[1]["dh"]  # every DP rank sees the same number
