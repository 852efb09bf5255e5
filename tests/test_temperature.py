"""Rollout temperature T != 1: the trainer optimises softmax(logits / T), the distribution the
rollout sampled from, and the fleet's servers return log-probs of that same distribution, so the
trainer's log-probs, TIS and the parity probe all compare like with like (CPU fleet over HTTP,
Megatron actor on a gloo rank)."""
import pytest
import torch

from steer_megatron.parallel import free_port_block, spawn_ranks
from steer_megatron.rollout import Fleet, FleetConfig, RolloutClient, RolloutConfig, RouterConfig, SamplingConfig
from tests.rollout_helpers import tiny_model_dir

T = 0.7
PROMPTS = [[5 + i, 30 + 2 * i, 7] for i in range(4)]
# fp32 on both sides (HF on the server, Megatron here): the weight-sync parity bound of the CPU
# fleet (rollout.parity_atol); dividing the logits by T < 1 scales their rounding by 1/T only.
ATOL = 1e-5


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    model_dir = tiny_model_dir(tmp_path_factory)
    base = free_port_block(2)
    cfg = FleetConfig(model_path=str(model_dir), num_workers=1, engine="cpu", base_port=base, port_stride=1,
                      use_router=False, router=RouterConfig(port=base + 1), cpu_threads=1, cpu_max_batch_size=8,
                      log_dir=str(tmp_path_factory.mktemp("fleet_logs")), startup_timeout_s=120, health_timeout_s=2)
    assert cfg.return_original_logprob is False  # the default: log-probs at the sampling temperature
    fleet = Fleet(cfg)
    try:
        fleet.start()
        client = RolloutClient(fleet.endpoints, RolloutConfig(run_id="temperature"))
        result = client.generate_sync(PROMPTS, SamplingConfig(temperature=T, max_new_tokens=8, n=2, ignore_eos=True))
        samples = result.flat()
        prompts = [PROMPTS[s.prompt_index] for s in samples]
        (out,) = spawn_ranks(_trainer_side, 1, str(model_dir), prompts, samples, fleet.live_urls[0],
                             fleet.weight_version)
        yield out
    finally:
        fleet.stop()


def _actor(model_dir: str, temperature: float):
    from steer_megatron.models import build_gpt_model, load_hf_weights, parse_hf_config
    from steer_megatron.train.actor import ActorConfig, MegatronActor
    from steer_megatron.train.optim import OptimSettings, wrap_for_training

    model, vocab = build_gpt_model(parse_hf_config(model_dir))
    load_hf_weights(model, model_dir)
    ddp, opt, sched = wrap_for_training(model, OptimSettings(lr=1e-3))
    return MegatronActor(ddp, opt, ActorConfig(vocab_size=vocab.size, micro_batch_size=4, mini_batch_size=8,
                                               policy_loss="grpo", temperature=temperature), sched)


def _trainer_side(model_dir, prompts, samples, url, version):
    from steer_megatron.loss import PolicyLossConfig, PolicyLossInputs, get_policy_loss
    from steer_megatron.parallel import ParallelLayout, init_parallel
    from steer_megatron.rollout.weight_sync import ParityError, ParityProbe
    from steer_megatron.train.batch import samples_to_batch
    from steer_megatron.train.control import ControlPlane
    from steer_megatron.train.weights import WeightPublisher, actor_logprobs

    init_parallel(ParallelLayout(), seed=0)
    control = ControlPlane()
    out = {}
    for temperature in (T, 1.0):  # the trainer at T, and a trainer that ignores T (the old behaviour)
        actor = _actor(model_dir, temperature)
        batch = samples_to_batch(prompts, samples, [1.0] * len(samples), pad_id=0)
        actor.old_pass(batch)
        mask = batch.loss_mask
        gap = (batch.old_log_prob - batch.rollout_log_prob).abs()[mask]
        _, m = get_policy_loss("grpo")(PolicyLossInputs(
            log_prob=batch.old_log_prob, old_log_prob=batch.old_log_prob, advantages=batch.advantages, mask=mask,
            rollout_log_prob=batch.rollout_log_prob), PolicyLossConfig(tis_cap=10.0))
        probe_errors = {}
        for probe_t in (T, 0.0):  # sampling at T (what the publisher asks for), greedy (raw logits)
            probe = ParityProbe(prompts=tuple(tuple(p) for p in prompts[:2]), atol=ATOL, temperature=probe_t,
                                trainer_logprobs=lambda p, c: actor_logprobs(actor, control, p, c, 0))
            try:
                probe_errors[probe_t] = probe.run([url], version).max_abs_diff
            except ParityError as e:
                probe_errors[probe_t] = str(e)

        class _Sync:
            probe = None

        sync = _Sync()
        WeightPublisher(actor, control, sync, prompts[:2], pad_id=0, atol=ATOL, dtype=torch.float32,
                        temperature=temperature)
        out[temperature] = dict(gap=float(gap.max()), tokens=int(mask.sum()), tis=float(m["tis_weight_mean"]),
                                probe=probe_errors, publisher_probe_t=sync.probe.temperature)
    return out


def test_trainer_log_probs_at_T_equal_the_servers(sampled):
    at_t = sampled[T]
    assert at_t["tokens"] == len(PROMPTS) * 2 * 8
    assert at_t["gap"] < ATOL  # trainer softmax(logits / T) == the server's returned log-probs
    assert at_t["tis"] == pytest.approx(1.0, abs=ATOL * 2)  # TIS sees one distribution: weights 1
    # a trainer that ignores T is off by far more than the bound, and its TIS weights are not 1
    assert sampled[1.0]["gap"] > 100 * ATOL and abs(sampled[1.0]["tis"] - 1) > 10 * ATOL


def test_parity_probe_samples_at_the_rollout_temperature(sampled):
    at_t = sampled[T]
    assert at_t["publisher_probe_t"] == T and sampled[1.0]["publisher_probe_t"] == 0.0
    assert isinstance(at_t["probe"][T], float) and at_t["probe"][T] < ATOL  # same distribution: passes
    assert "parity failed" in at_t["probe"][0.0]  # a greedy probe reads raw logits: a T = 0.7 trainer fails it
    assert "parity failed" in sampled[1.0]["probe"][T]  # and a trainer without T fails the probe at T
    assert isinstance(sampled[1.0]["probe"][0.0], float)  # T = 1: greedy raw logits are the trained policy


def test_trainer_at_T_with_the_new_loss_settings_runs_and_stays_on_policy(tmp_path, demo_cache_root):
    """Two demo steps at T = 0.7 through the whole loop (rollout, old pass, update, weight sync
    with the parity probe at T) with STEER exact over the mini-batch group, the release's batch
    layout and an entropy bonus: the rollout and trainer log-probs agree to fp32 noise."""
    import json
    from pathlib import Path

    from tests.test_trainer import SMALL, train_worker

    over = SMALL + [f"demo.cache_dir={demo_cache_root}", f"trainer.output_dir={tmp_path}", "trainer.total_steps=2",
                    "trainer.run_name=t07", "rollout.temperature=0.7", "algorithm.steer.form=exact",
                    "algorithm.steer.group=mini_batch", "trainer.balance_batch=true", "trainer.micro_batch_size=2",
                    "algorithm.token_mean_over=micro_batch", "algorithm.entropy_coeff=0.001"]
    (run_dir,) = spawn_ranks(train_worker, 1, over)
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "actor/pg_loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["actor/rollout_train_logprob_gap"] < ATOL and r["sync/parity_max_abs_diff"] <= ATOL
        assert r["actor/entropy_loss"] > 0 and 0.8 <= r["actor/weight_mean"] <= 1.0


def kernel_paths_worker():
    from steer_megatron.parallel import ParallelLayout, init_parallel
    from steer_megatron.train.actor import ActorConfig, MegatronActor
    from steer_megatron.train.optim import OptimSettings, wrap_for_training
    from tests.test_actor import VOCAB
    from tests.tiny_gpt import build_tiny_gpt, rl_batch

    init_parallel(ParallelLayout(), seed=3)
    weights = {n: p.detach().clone() for n, p in build_tiny_gpt(1, VOCAB).named_parameters()}

    def fresh():
        model = build_tiny_gpt(1, VOCAB)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(weights[n])
        return model

    batch = rl_batch(VOCAB, [(3, 12)] * 4)
    ids = batch.input_ids
    with torch.no_grad():  # reference: the plain model's logits / T, dense float64 softmax
        logits = fresh()(ids, torch.arange(ids.shape[1])[None].expand_as(ids), None)[:, :-1, :VOCAB].double() / T
    lp = torch.log_softmax(logits, -1)
    ref = (lp.gather(-1, ids[:, 1:, None]).squeeze(-1), -(lp.exp() * lp).sum(-1))
    out = {}
    for fused in (False, True):
        ddp, opt, sched = wrap_for_training(fresh(), OptimSettings(lr=1e-3))
        actor = MegatronActor(ddp, opt, ActorConfig(vocab_size=VOCAB, micro_batch_size=2, mini_batch_size=4,
                                                    temperature=T, fused_lm_head=fused), sched)
        out[fused] = actor.compute_log_probs(batch)
    return ref, out


def test_logits_and_fused_lm_head_paths_both_divide_by_T():
    (ref, out), = spawn_ranks(kernel_paths_worker, 1)
    for fused in (False, True):
        for got, want in zip(out[fused], ref):
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)  # fp32 model and statistics
