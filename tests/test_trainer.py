"""The GRPO/STEER loop end to end on CPU: real megatron-core ranks over gloo, the real CPU
SGLang-protocol servers behind the real sglang-router, real rewards, real checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steer_megatron.config import load_config
from steer_megatron.parallel import spawn_ranks

ROOT = Path(__file__).resolve().parents[1]
SMALL = [  # a tiny, quick version of the CPU demo
    "demo.num_digits=3", "demo.n_train=81", "demo.n_test=19", "demo.warmup_steps=60",
    "trainer.rollout_batch_size=8", "trainer.mini_batch_size=4", "trainer.micro_batch_size=4",
    "rollout.n=4", "trainer.save_every=0", "eval.every=0", "logging.tensorboard=false",
]
NONDETERMINISTIC = ("time", "timing/", "rollout/tokens_per_s", "sync/seconds")
GAP = "actor/rollout_train_logprob_gap"
# computed from the rollout engine's log-probs, which carry the CPU server's float noise
ROLLOUT_LOGPROB_METRICS = ("actor/mismatch_kl", "actor/mismatch_k3", "actor/ppl_rollout", "actor/log_ppl_diff")


@pytest.fixture(scope="module")
def demo_cache(demo_cache_root):
    """Build this module's demo assets once, before any run spawns ranks that would each build them."""
    from steer_megatron.demo_assets.assets import build_demo_assets

    cache = demo_cache_root
    cfg = load_config(None, SMALL + [f"demo.cache_dir={cache}"])
    build_demo_assets(cfg.demo)
    return cache


def _overrides(tmp_path, demo_cache, *extra):
    return SMALL + [f"demo.cache_dir={demo_cache}", f"trainer.output_dir={tmp_path}", *extra]


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_worker(overrides):
    from steer_megatron.train.loop import train

    return str(train(load_config(None, overrides)))


# TP=2 and PP=2 train and sync in make test through test_resume_at_another_layout_continues_the_run;
# their standalone runs here are in make test-extended
@pytest.mark.parametrize("layout", [pytest.param(["parallel.tp=2"], id="tp2", marks=pytest.mark.extended),
                                    pytest.param(["parallel.tp=1"], id="dp2"),
                                    pytest.param(["parallel.pp=2"], id="pp2", marks=pytest.mark.extended)])
def test_two_rank_training_steps_and_rollouts_see_new_weights(tmp_path, demo_cache, layout):
    over = _overrides(tmp_path, demo_cache, "trainer.total_steps=2", "trainer.run_name=r", *layout)
    run_dir = Path(spawn_ranks(train_worker, 2, over)[0])
    rows = _metrics(run_dir)
    steps = [r for r in rows if "actor/pg_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # step 2's rollouts came from the weights the trainer pushed after step 1, and the servers'
    # log-probs matched the trainer's on the parity probe after every push
    assert [r["rollout/weight_version"] for r in steps] == [0, 1]
    assert all(r["sync/parity_max_abs_diff"] <= 1e-4 for r in steps)
    assert all(r["actor/grad_norm"] > 0 for r in steps)
    assert (run_dir / "DONE").is_file() and (run_dir / "hf" / "config.json").is_file()
    assert any((run_dir / "checkpoints").iterdir())


def _launch(tmp_path, demo_cache, name, steps):
    over = _overrides(tmp_path, demo_cache, f"trainer.total_steps={steps}", f"trainer.run_name={name}")
    return subprocess.Popen([sys.executable, "-m", "steer_megatron.train", *over], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(NONDETERMINISTIC)} for r in rows]


def assert_same_metrics(got_rows, want_rows):
    """Step for step: identical samples, rewards, losses and weights. Only the rollout-vs-trainer
    log-prob gap, and the mismatch metrics made from the same rollout log-probs, carry the CPU
    server's float noise (its batches form differently run to run, ~1e-8 on a gap of ~2e-7): both
    runs must keep them at fp32 noise, not equal to the bit."""
    got_rows, want_rows = _comparable(got_rows), _comparable(want_rows)
    assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows]
    for got, want in zip(got_rows, want_rows):
        assert got.pop(GAP, 0.0) < 1e-5 and want.pop(GAP, 0.0) < 1e-5
        for key in ROLLOUT_LOGPROB_METRICS:  # each within the same fp32-noise bound as the gap
            assert got.pop(key, 0.0) == pytest.approx(want.pop(key, 0.0), abs=1e-5), key
        assert got == pytest.approx(want, rel=0, abs=1e-8)


# make test covers SIGTERM (a checkpoint at the end of the step, exit 0, no DONE, the resumed run
# without lost or repeated steps) through the real trainer preempted under Slurm
# (tests/test_slurm_jobs.py), and resumed runs equal to uninterrupted ones through
# tests/test_diagnostics_trainer.py and the relaunch at another layout below; this run-for-run
# equality after a signal is in make test-extended
@pytest.mark.extended
def test_sigterm_then_resume_reproduces_an_uninterrupted_run(tmp_path, demo_cache):
    steps = 5  # room to interrupt: the signal arrives after step 1 and is taken at the end of its step
    full = _launch(tmp_path, demo_cache, "full", steps)
    out, _ = full.communicate(timeout=900)
    assert full.returncode == 0, out[-3000:]

    cut = _launch(tmp_path, demo_cache, "cut", steps)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and cut.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 1:
            break
        time.sleep(0.5)
    assert cut.poll() is None, "the run ended before it could be interrupted"
    cut.send_signal(signal.SIGTERM)
    out, _ = cut.communicate(timeout=600)
    assert cut.returncode == 0, out[-3000:]
    assert not (tmp_path / "cut" / "DONE").exists()
    interrupted_at = len(_metrics(tmp_path / "cut"))
    assert interrupted_at < steps

    resumed = _launch(tmp_path, demo_cache, "cut", steps)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    assert (tmp_path / "cut" / "DONE").exists()
    assert_same_metrics(_metrics(tmp_path / "cut"), _metrics(tmp_path / "full"))


def _launch(tmp_path, demo_cache, nproc, *extra):
    """A relaunch: fresh processes on nproc ranks resume the run "grow" (each rank gets the RANK /
    WORLD_SIZE / MASTER_* environment torchrun gives; torchrun itself runs in the Slurm and nemo-run
    tests)."""
    over = _overrides(tmp_path, demo_cache, "trainer.run_name=grow", "trainer.keep_last=3", *extra)
    spawn_ranks(train_worker, nproc, over)


def test_resume_at_another_layout_continues_the_run(tmp_path, demo_cache):
    """A run's identity is what it learns, not how it is laid out: 1 step at TP=1 on one rank, then
    relaunched on 2 ranks at TP=2 for step 2, then at PP=2 for step 3. Each launch resumes the latest
    checkpoint (resharded) and continues the same data order. What the run learns is its identity:
    the same run name with another learning rate is refused."""
    _launch(tmp_path, demo_cache, 1, "trainer.total_steps=1")
    _launch(tmp_path, demo_cache, 2, "trainer.total_steps=2", "parallel.tp=2")
    _launch(tmp_path, demo_cache, 2, "trainer.total_steps=3", "parallel.pp=2")
    run = tmp_path / "grow"
    steps = [r for r in _metrics(run) if "actor/pg_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]  # no step trained twice, none restarted from 0
    # each launch's first rollouts come from the weights it resumed: the version it published
    assert [r["rollout/weight_version"] for r in steps] == [0, 1, 2]
    assert all(r["sync/parity_max_abs_diff"] <= 1e-4 for r in steps)
    # the data order went on: 8 prompts a step (trainer.rollout_batch_size) from one epoch's order,
    # never restarted by a relaunch
    for step, layout in ((1, {"tp": 1, "pp": 1, "dp": 1}), (2, {"tp": 2, "pp": 1, "dp": 1}), (3, {"tp": 1, "pp": 2, "dp": 1})):
        meta = json.loads((run / "checkpoints" / f"iter_{step:07d}" / "meta.json").read_text())
        assert meta["layout"] == layout
        assert (meta["extra"]["sampler"]["epoch"], meta["extra"]["sampler"]["position"]) == (0, 8 * step)
    assert (run / "DONE").is_file() and (run / "hf" / "config.json").is_file()
    over = _overrides(tmp_path, demo_cache, "trainer.run_name=grow", "trainer.total_steps=5", "optim.lr=0.5")
    with pytest.raises(RuntimeError, match="holds checkpoints of a different run"):
        spawn_ranks(train_worker, 1, over)


def test_kl_penalty_to_the_frozen_initial_policy_with_nccl_weight_sync(tmp_path, demo_cache):
    """Two settings in one run (each one trainer launch less in make test).
    algorithm.kl_coef > 0: every step adds a KL to the initial weights (train/reference.py). At step 1
    the policy starts at the reference (KL 0 on the first mini-batch, and on the others too if the
    first left the weights in place); as the policy moves away the KL grows.
    rollout.weight_sync=nccl: trainer rank 0 broadcasts the weights into the servers' group (gloo
    against the CPU server, the code path NCCL takes on GPUs); the parity probe passes after every
    sync and rollouts come from the new weights. Nothing is written for the workers to load."""
    over = _overrides(tmp_path, demo_cache, "trainer.total_steps=3", "trainer.run_name=kl_nccl",
                      "algorithm.kl_coef=0.1", "algorithm.policy_loss=grpo",
                      "rollout.weight_sync=nccl", "rollout.weight_sync_bucket_mb=1")
    run_dir = Path(spawn_ranks(train_worker, 1, over)[0])
    steps = [r for r in _metrics(run_dir) if "actor/pg_loss" in r]
    kl = [r["actor/kl_ref"] for r in steps]
    assert len(kl) == 3 and 0 <= kl[0] <= kl[1] < kl[2], kl
    assert [r["rollout/weight_version"] for r in steps] == [0, 1, 2]
    assert all(r["sync/parity_max_abs_diff"] <= 1e-4 for r in steps)
    assert not (run_dir / "rollout_weights").exists()
