"""Scored rollout groups -> the trainer's batch: advantages, the ActorBatch and the rollout metrics.

The step from "samples with rewards" to "what every rank trains on", out of the Driver so it
runs without a fleet (tests/test_rollout_batch.py). One group = one prompt and its n samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from steer_megatron.algorithms.advantages import grpo_advantages, psr_nsr_advantages, w_reinforce_advantages
from steer_megatron.rollout.types import Sample
from steer_megatron.tracking import names
from steer_megatron.train.actor import ActorBatch
from steer_megatron.train.batch import samples_to_batch


@dataclass(frozen=True)
class Group:
    prompt_ids: Sequence[int]
    samples: Sequence[Sample]
    rewards: torch.Tensor  # [n], one per sample


@dataclass
class RolloutBatch:
    """A step's batch with what rank 0 logs about it."""

    batch: ActorBatch
    metrics: dict[str, float] = field(default_factory=dict)
    # per sample: the trainer's weight version when it trains on the batch minus the version that
    # generated the sample (0 on the synchronous path, 1 with trainer.async_rollout)
    staleness: torch.Tensor | None = None
    generate_span: tuple[float, float] | None = None  # perf_counter start / end of its generation


def sequence_advantages(rewards: torch.Tensor, adv) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[G, n] rewards -> ([G, n] per-sequence advantages of algorithm.adv.estimator, [G, n] samples kept
    in the loss or None for all). GTPO's advantages are per token and need the old policy's entropy:
    the trainer fills them after the old-log-prob pass (zeros here)."""
    if adv.estimator == "w_reinforce":
        return w_reinforce_advantages(rewards, adv.w_reinforce_lambda), None
    if adv.estimator in ("psr", "nsr"):
        return psr_nsr_advantages(rewards, adv.estimator)
    if adv.estimator == "gtpo":
        return torch.zeros_like(rewards, dtype=torch.float32), None
    return grpo_advantages(rewards, norm_by_std=adv.norm_by_std, eps=adv.eps), None


def weight_version(sample: Sample) -> int:
    """The trainer step whose weights generated the sample (the fleet serves versions str(step))."""
    v = sample.weight_version or 0
    try:
        return int(float(v))
    except ValueError:
        raise ValueError(f"sample {sample.rid}/{sample.sample_index}: weight_version {v!r} is not a trainer step; "
                         f"start the rollout servers with --weight-version <int> (the fleet does)") from None


def groups_to_batch(groups: Sequence[Group], adv, *, pad_id: int, policy_version: int) -> RolloutBatch:
    """Advantages per group, one right-padded row per sample, and the rollout metrics.

    adv: the algorithm.adv config; policy_version: the trainer's weight version when it trains on
    this batch (the step index), from which each sample's staleness is counted.
    """
    if not groups:
        raise ValueError("groups_to_batch: no groups")
    rewards = torch.stack([g.rewards for g in groups])
    adv_t, kept = sequence_advantages(rewards, adv)
    prompts = [g.prompt_ids for g in groups for _ in g.samples]
    samples = [s for g in groups for s in g.samples]
    batch = samples_to_batch(prompts, samples, adv_t.flatten().tolist(), pad_id=pad_id, rewards=rewards.flatten().tolist())
    if kept is not None:  # PSR / NSR: the other samples leave the loss and its token count
        batch.loss_mask &= kept.flatten()[:, None]
    lengths = torch.tensor([s.length for s in samples], dtype=torch.float32)
    staleness = torch.tensor([policy_version - weight_version(s) for s in samples], dtype=torch.float32)
    if (staleness < 0).any():
        raise ValueError(f"samples from weight version {max(weight_version(s) for s in samples)} are newer than the "
                         f"policy that trains on them ({policy_version}): the fleet and the trainer disagree on the step")
    metrics = {
        names.REWARD: float(rewards.mean()), names.ACCURACY: float((rewards > 0.5).float().mean()),
        names.RESPONSE_LENGTH: float(lengths.mean()), "rollout/response_length_max": float(lengths.max()),
        # prompt + response tokens the trainer's passes run over (their tokens/s in Driver.finish_step)
        "rollout/batch_tokens": float(sum(len(p) for p in prompts) + lengths.sum()),
        "rollout/truncated_frac": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "rollout/groups_all_equal_frac": float((rewards == rewards[:, :1]).all(1).float().mean()),
        "rollout/weight_version": float(samples[0].weight_version or 0),
        "rollout/staleness_mean": float(staleness.mean()), "rollout/staleness_max": float(staleness.max()),
    }
    return RolloutBatch(batch=batch, metrics=metrics, staleness=staleness)


__all__ = ["Group", "RolloutBatch", "groups_to_batch", "sequence_advantages", "weight_version"]
