"""The rollout-to-batch step and the rollout pipeline, without a fleet: hand-made samples, a fake producer."""
import statistics
import threading

import pytest
import torch

from steer_megatron.config import AdvantageConfig
from steer_megatron.rollout.types import Sample
from steer_megatron.tracking import names
from steer_megatron.train.rollout_batch import Group, RolloutBatch, groups_to_batch
from steer_megatron.train.rollout_pipeline import RolloutPipeline


def _sample(i, j, ids, version, finish="stop"):
    return Sample(prompt_index=i, sample_index=j, rid=f"r-{i}", output_ids=list(ids),
                  logprobs=[-0.1 * (k + 1) - j for k in range(len(ids))], finish_reason=finish, matched_stop=None,
                  prompt_tokens=0, weight_version=str(version))


def _groups(version=3):
    # two prompts of different lengths, three samples each, one truncated
    return [
        Group([5, 6, 7], [_sample(0, 0, [1, 2], version), _sample(0, 1, [3], version),
                          _sample(0, 2, [4, 4, 4, 4], version, "length")], torch.tensor([1.0, 0.0, 0.0])),
        Group([8], [_sample(1, j, [9] * (j + 1), version) for j in range(3)], torch.tensor([1.0, 1.0, 0.0])),
    ]


def test_groups_to_batch_layout_advantages_and_metrics():
    out = groups_to_batch(_groups(), AdvantageConfig(), pad_id=0, policy_version=4)
    b = out.batch
    assert b.input_ids.shape == (6, 7)  # longest row: prompt 3 + response 4
    # row 2: prompt [5, 6, 7] + [4, 4, 4, 4]; position t predicts t + 1, so the response is predicted from 2..5
    assert b.input_ids[2].tolist() == [5, 6, 7, 4, 4, 4, 4]
    assert b.loss_mask[2].tolist() == [False, False, True, True, True, True]
    assert b.rollout_log_prob[2, 2:].tolist() == pytest.approx([-2.1, -2.2, -2.3, -2.4])
    assert b.loss_mask[3].tolist() == [True, False, False, False, False, False]  # prompt [8], one token
    # GRPO advantages against a float64 reference: (r - mean) / (unbiased std + eps), per group
    for g, rows in ((0, range(0, 3)), (1, range(3, 6))):
        r = [float(x) for x in _groups()[g].rewards]
        mu, sd = statistics.fmean(r), statistics.stdev(r)
        for k, row in enumerate(rows):
            want = (r[k] - mu) / (sd + 1e-6)
            got = b.advantages[row][b.loss_mask[row]]
            assert got.tolist() == pytest.approx([want] * int(b.loss_mask[row].sum()), rel=1e-6)
    m = out.metrics
    assert m["rollout/staleness_mean"] == 1.0 and m["rollout/staleness_max"] == 1.0
    assert out.staleness.tolist() == [1.0] * 6
    assert m["rollout/weight_version"] == 3.0
    assert m[names.REWARD] == pytest.approx(0.5) and m["rollout/truncated_frac"] == pytest.approx(1 / 6)
    assert m["rollout/response_length_max"] == 4.0 and m["rollout/groups_all_equal_frac"] == 0.0


def test_psr_drops_wrong_samples_from_the_loss_and_newer_samples_are_refused():
    out = groups_to_batch(_groups(), AdvantageConfig(estimator="psr"), pad_id=0, policy_version=3)
    assert out.batch.loss_mask.any(1).tolist() == [True, False, False, True, True, False]
    assert out.metrics["rollout/staleness_max"] == 0.0
    with pytest.raises(ValueError, match="newer than the policy"):
        groups_to_batch(_groups(version=5), AdvantageConfig(), pad_id=0, policy_version=4)
    bad = [Group([1], [Sample(0, j, "r", [2], [-1.0], "stop", None, 0, "default") for j in range(2)], torch.tensor([0.0, 1.0]))]
    with pytest.raises(ValueError, match="weight_version 'default'"):
        groups_to_batch(bad, AdvantageConfig(), pad_id=0, policy_version=0)


class _Sampler:
    def __init__(self):
        self.position = 0

    def state_dict(self):
        return {"position": self.position}


def test_pipeline_generates_ahead_concurrently_and_checkpoints_the_position_before_it():
    sampler = _Sampler()
    training = threading.Event()  # set by the "trainer" only after the producer has started
    started = threading.Event()

    def produce(step):
        started.set()
        if step > 0:  # a producer that runs only while the trainer trains: it must be in another thread
            assert training.wait(10), "the next batch was not generated while the step trained"
        sampler.position += 8
        return RolloutBatch(batch=None, metrics={"step": step})

    pipe = RolloutPipeline(produce, sampler, ahead=True)
    try:
        assert pipe.take(0).metrics == {"step": 0}  # the first batch: generated when asked
        assert sampler.position == 8
        pipe.prefetch(1)
        assert started.wait(10)
        # a checkpoint now stores the data position before the batch in flight: it is regenerated on resume
        assert pipe.sampler_state() == {"position": 8}
        training.set()
        assert pipe.wait() >= 0.0 and sampler.position == 16
        assert pipe.sampler_state() == {"position": 8}
        with pytest.raises(RuntimeError, match="generated for step 1, asked for step 2"):
            pipe.take(2)
        pipe.prefetch(2)
        assert pipe.take(2).metrics == {"step": 2}
        assert pipe.sampler_state() == {"position": 24}  # nothing pending: the live position
    finally:
        pipe.close()


def test_pipeline_raises_what_generation_raised_and_sync_generates_on_take():
    def boom(step):
        raise ConnectionError(f"fleet down at {step}")

    pipe = RolloutPipeline(boom, _Sampler(), ahead=True)
    pipe.prefetch(1)
    with pytest.raises(ConnectionError, match="fleet down at 1"):
        pipe.wait()
    pipe.close()
    calls = []
    sync = RolloutPipeline(lambda s: calls.append(s) or RolloutBatch(batch=None), _Sampler(), ahead=False)
    sync.prefetch(1)  # no-op
    assert calls == []
    sync.take(1)
    assert calls == [1] and sync.wait() == 0.0
