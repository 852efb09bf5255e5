"""trainer.async_rollout end to end on CPU: one-step off-policy rollouts overlapped with training,
their staleness and correction, the checkpointed data position, and resume (in-flight rollouts
regenerated). The synchronous path's equality with the code before the pipeline is recorded in
docs/benchmarks.md (a one-off comparison against the previous commit)."""
import json
from pathlib import Path

import pytest

from steer_megatron.parallel import spawn_ranks
from tests.test_trainer import _metrics, _overrides, demo_cache, train_worker  # noqa: F401 - the fixture

# The CPU server's log-probs differ from the trainer's by float noise only (<1e-5: tests/test_trainer.py);
# a sample generated one update earlier differs by the update itself, orders of magnitude above it.
NOISE = 1e-5


def _sampler_position(run: Path, step: int) -> int:
    meta = json.loads((run / "checkpoints" / f"iter_{step:07d}" / "meta.json").read_text())
    return meta["extra"]["sampler"]["position"]


def test_async_rollout_overlaps_training_is_corrected_and_resumes_by_regenerating(tmp_path, demo_cache):  # noqa: F811
    common = ("trainer.async_rollout=true", "algorithm.tis_cap=2.0", "trainer.total_steps=3")
    # two ranks (TP=2): rank 0's rollout thread runs while both ranks train and exchange collectives
    full = Path(spawn_ranks(train_worker, 2, _overrides(tmp_path, demo_cache, *common, "parallel.tp=2",
                                                        "trainer.run_name=full", "trainer.save_every=1",
                                                        "trainer.keep_last=3", "eval.every=2"))[0])
    rows = [r for r in _metrics(full) if "actor/pg_loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # step 1 trains on rollouts of version 0 (generated when asked); steps 2 and 3 on rollouts of the
    # weights one update older than the trainer's
    assert [r["rollout/weight_version"] for r in rows] == [0, 0, 1]
    assert [(r["rollout/staleness_mean"], r["rollout/staleness_max"]) for r in rows] == [(0, 0), (1, 1), (1, 1)]
    assert all(r["sync/parity_max_abs_diff"] <= 1e-4 for r in rows)  # the weight sync still lands exactly
    # the loss sees the generating policy's log-probs: a stale batch's gap to the trainer's old policy
    # is the update, and TIS weights it
    gaps = [r["actor/rollout_train_logprob_gap"] for r in rows]
    assert gaps[0] < NOISE and min(gaps[1:]) > 100 * NOISE, gaps
    assert abs(rows[0]["actor/tis_weight_mean"] - 1) < NOISE
    assert all(abs(r["actor/tis_weight_mean"] - 1) > 10 * NOISE for r in rows[1:]), [r["actor/tis_weight_mean"] for r in rows]
    # the next batch was generated while this step trained: step k+1's rollout span overlaps step k's training
    for now, nxt in zip(rows, rows[1:]):
        assert nxt["timeline/rollout_start"] < now["timeline/train_end"]
        assert nxt["timeline/rollout_end"] > now["timeline/train_start"]
        assert nxt["timeline/rollout_end"] <= now["timeline/sync_start"]  # and finished before the weights changed
    assert any("eval/" in k for r in _metrics(full) if r["step"] == 2 for k in r)
    # checkpoints store the data position before the batch in flight (8 prompts a step), not after it
    assert [_sampler_position(full, s) for s in (1, 2, 3)] == [8, 16, 24]

    # resume from step 2's checkpoint (one rank now): step 3's prompts are drawn again and generated
    # from the resumed weights, so that one step is on-policy; the data order goes on unchanged
    resumed = Path(spawn_ranks(train_worker, 1, _overrides(tmp_path, demo_cache, *common, "trainer.run_name=resumed",
                                                           f"trainer.resume={full / 'checkpoints' / 'iter_0000002'}"))[0])
    (again,) = [r for r in _metrics(resumed) if "actor/pg_loss" in r]
    assert again["step"] == 3 and again["rollout/weight_version"] == 2 and again["rollout/staleness_max"] == 0
    assert again["actor/rollout_train_logprob_gap"] < NOISE
    assert _sampler_position(resumed, 3) == _sampler_position(full, 3)
    assert (resumed / "DONE").is_file()
