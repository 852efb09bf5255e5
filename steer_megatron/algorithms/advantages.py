"""GRPO advantages and dynamic sampling (DAPO): pure functions on rewards grouped by prompt.

Rewards arrive as one row per prompt group ([num_groups, n], the rollout's prompt-major
order). A group whose rewards are all equal has zero advantage for every token, so it costs
compute and adds no gradient; dynamic sampling drops such groups and draws more prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

import torch


def grpo_advantages(rewards: torch.Tensor, *, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """[G, n] rewards -> [G, n] advantages: r - mean(group), divided by (std(group) + eps) if
    norm_by_std. std is the unbiased (n - 1) one, as in GRPO implementations (verl, TRL)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [num_groups, n >= 2], got shape {tuple(rewards.shape)}")
    r = rewards.float()
    adv = r - r.mean(dim=1, keepdim=True)
    if norm_by_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv


def broadcast_to_tokens(seq_values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B] per-sequence values -> [B, T] per-token values, zero where response_mask is 0."""
    if seq_values.shape != response_mask.shape[:1]:
        raise ValueError(
            f"values of shape {tuple(seq_values.shape)}: need one value per sequence, "
            f"{seq_values.numel()} values for {response_mask.shape[0]} sequences"
        )
    return seq_values.float()[:, None] * response_mask.to(torch.float32)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[G, n] -> [G] bool: True where the group's rewards are not all equal."""
    return (rewards != rewards[:, :1]).any(dim=1)


G = TypeVar("G")


@dataclass
class DynamicSamplingResult(Generic[G]):
    groups: list[G]  # exactly `target` informative groups, or fewer when gave_up
    rounds: int
    kept: int  # informative groups seen (before trimming to target)
    dropped: int  # all-equal groups discarded
    gave_up: bool
    message: str


def fill_with_informative_groups(
    generate: Callable[[int], tuple[list[G], torch.Tensor]],
    target: int,
    *,
    max_rounds: int,
    oversample: float = 1.0,
) -> DynamicSamplingResult[G]:
    """Call `generate(num_prompts) -> (groups, rewards [num_prompts, n])` until `target`
    informative groups are collected. Each round asks for what is still missing, scaled by
    the observed keep rate (times `oversample`) so a mostly-solved dataset converges in few
    rounds. After `max_rounds`, returns what it has with gave_up=True and a message saying
    what to change; the trainer decides whether to train on a short batch or stop."""
    if target < 1 or max_rounds < 1:
        raise ValueError(f"target={target} and max_rounds={max_rounds} must be >= 1")
    kept: list[G] = []
    seen = dropped = 0
    rounds = 0
    while len(kept) < target and rounds < max_rounds:
        missing = target - len(kept)
        rate = len(kept) / seen if seen and kept else 1.0
        ask = max(missing, int(round(missing / rate * oversample)))
        groups, rewards = generate(ask)
        if len(groups) != rewards.shape[0]:
            raise ValueError(f"generate returned {len(groups)} groups but rewards for {rewards.shape[0]}")
        mask = informative_groups(rewards).tolist()
        kept.extend(g for g, m in zip(groups, mask) if m)
        dropped += mask.count(False)
        seen += len(mask)
        rounds += 1
    informative = len(kept)
    gave_up = informative < target
    if gave_up:
        msg = (f"dynamic sampling gave up after {rounds} rounds (algorithm.dynamic_sampling.max_rounds): "
               f"{informative}/{target} groups with mixed rewards, {dropped} all-equal groups dropped; "
               f"the prompts are too easy or too hard for the policy, raise max_rounds or rollout.n")
    else:
        msg = f"dynamic sampling: {target} groups in {rounds} round(s), {dropped} all-equal groups dropped"
    return DynamicSamplingResult(kept[:target], rounds, informative, dropped, gave_up, msg)
