"""Rollout samples -> trainer batch layout, and the run-directory identity guard."""
import dataclasses

import pytest
import torch

from steer_megatron.rollout.types import Sample
from steer_megatron.train.batch import samples_to_batch


def _sample(out, lps, i=0):
    return Sample(prompt_index=i, sample_index=0, rid=f"r-{i}", output_ids=out, logprobs=lps,
                  finish_reason="stop", matched_stop=None, prompt_tokens=0, weight_version="3")


def test_samples_to_batch_aligns_targets_mask_and_logprobs():
    prompts = [[5, 6, 7], [8]]
    samples = [_sample([1, 2], [-0.1, -0.2]), _sample([3, 4, 9, 9], [-1.0, -2.0, -3.0, -4.0], 1)]
    b = samples_to_batch(prompts, samples, [0.5, -1.5], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 9]]
    # position t predicts input_ids[t + 1]: the response tokens are the targets under the mask
    targets = b.input_ids[:, 1:]
    assert targets[0][b.loss_mask[0]].tolist() == [1, 2]
    assert targets[1][b.loss_mask[1]].tolist() == [3, 4, 9, 9]
    assert b.rollout_log_prob[0][b.loss_mask[0]].tolist() == pytest.approx([-0.1, -0.2])
    assert b.advantages[1][b.loss_mask[1]].tolist() == [-1.5] * 4
    assert torch.all(b.advantages[~b.loss_mask] == 0)
    assert b.slice(1, 2).input_ids.tolist() == [[8, 3, 4, 9, 9]]


def test_samples_to_batch_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="log-probs for"):
        samples_to_batch([[1]], [_sample([1, 2], [-0.1])], [1.0], pad_id=0)
    with pytest.raises(ValueError, match="prompts"):
        samples_to_batch([[1], [2]], [_sample([1], [-0.1])], [1.0], pad_id=0)
