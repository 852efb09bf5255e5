"""Megatron-core's memory and speed knobs, as the trainer sets them (train/settings.py), change how
a step is computed, not what it computes: one actor update (STEER loss, two mini-batches, an
SGD-like Adam) with each knob on equals the plain run at the same layout, loss and every weight.

TP=2: sequence parallelism (logits path and fused LM head), full and selective recompute.
DP=2: the distributed optimizer (ZeRO-1), with overlapped gradient reduce and parameter gather.
"""
import pytest
import torch

from steer_megatron.config import ConfigError, load_config, validate_config
from steer_megatron.loss import PolicyLossConfig
from steer_megatron.parallel import ParallelLayout, init_parallel, spawn_ranks
from steer_megatron.train.actor import ActorConfig, MegatronActor
from steer_megatron.train.optim import OptimSettings, wrap_for_training
from steer_megatron.train.settings import model_settings
from tests.models_helpers import TINY, make_hf_model
from tests.tiny_gpt import rl_batch

VOCAB = TINY["vocab_size"]


def _settings(*overrides):
    cfg = load_config(None, list(overrides))
    return model_settings(cfg), cfg.parallel


def _update(hf_dir, overrides, fused=False):
    """This rank's weights and the loss after one update, the model built as the trainer builds it."""
    from megatron.core import parallel_state as ps

    from steer_megatron.models.hf_config import build_gpt_model, parse_hf_config
    from steer_megatron.models.hf_import import load_hf_weights

    model_kw, par = _settings(*overrides)
    arch = parse_hf_config(hf_dir)
    model, vocab = build_gpt_model(arch, seed=3, **model_kw)
    load_hf_weights(model, hf_dir, arch)
    ddp, opt, sched = wrap_for_training(model, OptimSettings(
        lr=1.0, weight_decay=0.0, clip_grad=0.0, adam_eps=1.0,  # ~SGD: rounding noise stays rounding noise
        use_distributed_optimizer=par.distributed_optimizer, overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather))
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    cfg = ActorConfig(vocab_size=vocab.size, micro_batch_size=2, mini_batch_size=4 // dp, loss=PolicyLossConfig(),
                      fused_lm_head=fused, loss_kernel="torch")
    actor = MegatronActor(ddp, opt, cfg, sched)
    # 15 tokens: under sequence parallelism the actor pads the sequence to a multiple of TP
    batch = rl_batch(VOCAB, [(3, 14), (5, 12), (2, 9), (6, 14), (4, 13), (1, 7), (7, 14), (3, 10)], seq=15).dp_slice(rank, dp)
    batch.old_log_prob, batch.old_entropy = actor.compute_log_probs(batch)
    metrics = actor.update(batch)  # two mini-batches: the second runs on weights the first updated
    return {n: p.detach().clone() for n, p in model.named_parameters()}, torch.tensor(metrics["loss"])


TP_CASES = {
    "sequence_parallel": (["parallel.tp=2", "parallel.sequence_parallel=true"], False),
    "sequence_parallel_fused_head": (["parallel.tp=2", "parallel.sequence_parallel=true"], True),
    "recompute_full": (["parallel.tp=2", "model.recompute=full"], False),
    "recompute_selective": (["parallel.tp=2", "model.recompute=selective"], False),
    "sp_recompute_full": (["parallel.tp=2", "parallel.sequence_parallel=true", "model.recompute=full"], False),
}
DP_CASES = {
    "distributed_optimizer": ["parallel.distributed_optimizer=true"],
    "overlap_grad_reduce": ["parallel.overlap_grad_reduce=true"],
    "distributed_optimizer_overlap": ["parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
                                      "parallel.overlap_param_gather=true"],
}


def _tp_worker(hf_dir):
    init_parallel(ParallelLayout(tp=2), seed=3)
    plain = {"plain": _update(hf_dir, ["parallel.tp=2"]), "plain_fused": _update(hf_dir, ["parallel.tp=2"], fused=True)}
    return plain, {name: _update(hf_dir, over, fused) for name, (over, fused) in TP_CASES.items()}


def _dp_worker(hf_dir):
    from steer_megatron.models.hf_config import build_gpt_model, parse_hf_config
    from steer_megatron.models.hf_import import load_hf_weights

    init_parallel(ParallelLayout(tp=1), seed=3)
    arch = parse_hf_config(hf_dir)
    model, _ = build_gpt_model(arch, seed=3)
    load_hf_weights(model, hf_dir, arch)
    plain = {"plain": _update(hf_dir, []), "start": {n: p.detach().clone() for n, p in model.named_parameters()}}
    return plain, {name: _update(hf_dir, over) for name, over in DP_CASES.items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_model(str(tmp_path_factory.mktemp("hf")))


def _assert_same(got, want, name):
    (w_got, loss_got), (w_want, loss_want) = got, want
    # fp32, other reduction orders (reduce-scatter vs all-reduce, recomputed activations): a few
    # ulps on O(1) losses and weights, as in the TP=2 vs TP=1 tests
    torch.testing.assert_close(loss_got, loss_want, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name} loss: {m}")
    for n, w in w_want.items():
        torch.testing.assert_close(w_got[n], w, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name} {n}: {m}")


def test_tensor_parallel_knobs_equal_the_plain_run(hf_dir):
    for plain, cases in spawn_ranks(_tp_worker, 2, hf_dir):
        for name, (over, fused) in TP_CASES.items():
            _assert_same(cases[name], plain["plain_fused" if fused else "plain"], name)
        # the fused head and the logits path are the same computation too
        _assert_same(plain["plain_fused"], plain["plain"], "fused vs logits")


def test_data_parallel_knobs_equal_the_plain_run(hf_dir):
    ranks = spawn_ranks(_dp_worker, 2, hf_dir)
    for plain, cases in ranks:
        for name in DP_CASES:
            _assert_same(cases[name], plain["plain"], name)
    # both DP ranks hold the same (gathered) weights after the step, and the step moved them
    for n, w in ranks[0][1]["distributed_optimizer_overlap"][0].items():
        torch.testing.assert_close(ranks[1][1]["distributed_optimizer_overlap"][0][n], w, atol=0, rtol=0)
    start = ranks[0][0]["start"]
    assert any(not torch.equal(ranks[0][0]["plain"][0][n], w) for n, w in start.items())


def test_knob_settings_reach_megatron_and_bad_ones_are_refused():
    model_kw, _ = _settings("parallel.tp=2", "parallel.sequence_parallel=true", "model.recompute=full")
    assert model_kw == dict(sequence_parallel=True, recompute_granularity="full", recompute_method="uniform",
                            recompute_num_layers=1)
    with pytest.raises(ConfigError, match="overlap_param_gather=true .* set parallel.distributed_optimizer=true"):
        load_config(None, ["parallel.overlap_param_gather=true"])
    with pytest.raises(ConfigError, match="model.recompute='some'"):
        load_config(None, ["model.recompute=some"])
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"parallel.cp=2: .*TEDotProductAttention.* set parallel.cp=1"):
            validate_config(load_config(None, ["parallel.cp=2"]), check_paths=False)
