"""Rollout samples -> the trainer's next-token batch (right-padded, response-masked)."""
from __future__ import annotations

from typing import Sequence

import torch

from steer_megatron.rollout.types import Sample
from steer_megatron.train.actor import ActorBatch


def samples_to_batch(
    prompts: Sequence[Sequence[int]],
    samples: Sequence[Sample],
    advantages: Sequence[float],
    *,
    pad_id: int,
    pad_to_multiple: int = 1,
    rewards: Sequence[float] | None = None,
) -> ActorBatch:
    """One row per sample: prompt + response, right-padded (megatron's RoPE ignores position
    ids, so left padding would shift every position). Position t predicts token t + 1, so the
    response mask covers [len(prompt) - 1, len(prompt) + len(response) - 1).

    prompts[i] is the prompt of samples[i]; advantages one per sample (broadcast over tokens).
    """
    if not (len(prompts) == len(samples) == len(advantages)):
        raise ValueError(f"samples_to_batch: {len(prompts)} prompts, {len(samples)} samples, {len(advantages)} advantages")
    if not samples:
        raise ValueError("samples_to_batch: empty rollout batch")
    seqs = [list(p) + list(s.output_ids) for p, s in zip(prompts, samples)]
    length = max(len(s) for s in seqs)
    length = -(-length // pad_to_multiple) * pad_to_multiple
    b = len(seqs)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros(b, length - 1, dtype=torch.bool)
    rollout_lp = torch.zeros(b, length - 1)
    for i, (p, s, seq) in enumerate(zip(prompts, samples, seqs)):
        if len(s.logprobs) != len(s.output_ids):
            raise ValueError(f"sample {s.rid}/{s.sample_index}: {len(s.logprobs)} log-probs for {len(s.output_ids)} tokens")
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        start, stop = len(p) - 1, len(p) - 1 + len(s.output_ids)
        mask[i, start:stop] = True
        if s.output_ids:
            rollout_lp[i, start:stop] = torch.tensor(s.logprobs, dtype=torch.float32)
    adv = torch.tensor(list(advantages), dtype=torch.float32)[:, None] * mask.float()
    rew = None if rewards is None else torch.tensor(list(rewards), dtype=torch.float32)[:, None] * mask.float()
    return ActorBatch(input_ids=ids, loss_mask=mask, advantages=adv, rollout_log_prob=rollout_lp, rewards=rew)
