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


# --------------------------------------------------------------------------------------------
# Other estimators. A sample is correct when its reward exceeds CORRECT_ABOVE (1/0 and +1/-1
# rewards alike), the same split as the rollout accuracy metric.

CORRECT_ABOVE = 0.5
ESTIMATORS = ("grpo", "w_reinforce", "psr", "nsr", "gtpo")


def w_reinforce_advantages(rewards: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    """W-REINFORCE (Zhu et al. 2025, arXiv 2506.01347; TianHongZXY/RLVR-Decomposed): lambda * PSR + NSR,
    i.e. advantage +lambda for a correct sample and -1 for a wrong one; no group baseline, no std."""
    if not lam > 0:
        raise ValueError(f"W-REINFORCE lambda={lam} must be > 0 (the paper recommends 0.1)")
    correct = rewards.float() > CORRECT_ABOVE
    return torch.where(correct, torch.full_like(rewards, lam, dtype=torch.float32), torch.full_like(rewards, -1.0, dtype=torch.float32))


def psr_nsr_advantages(rewards: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PSR / NSR (Zhu et al. 2025, the ablations W-REINFORCE blends): (advantages, kept). PSR trains on
    correct samples only (advantage +1), NSR on wrong ones only (-1); the other samples leave the
    batch (the reference subsets it), so they must leave the loss and its token count: `kept`."""
    correct = rewards.float() > CORRECT_ABOVE
    if mode == "psr":
        return correct.float(), correct
    if mode == "nsr":
        return -(~correct).float(), ~correct
    raise ValueError(f"psr_nsr_advantages mode={mode!r}: choose psr or nsr")


def _whiten(x: torch.Tensor, sel: torch.Tensor, group) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the selected entries (unbiased var, as verl's masked_whiten),
    over the whole data-parallel group when one is given; 0 off the selection."""
    import torch.distributed as dist

    s = sel.to(torch.float64)
    xd = x.to(torch.float64) * s
    stats = torch.stack([s.sum(), xd.sum(), (xd * xd).sum()])
    if group is not None:
        dist.all_reduce(stats, group=group)
    n, total, sq = stats
    mean = total / n.clamp(min=1)
    var = (sq - n * mean * mean) / (n - 1).clamp(min=1)
    return torch.where(sel, (x.to(torch.float64) - mean) * torch.rsqrt(var.clamp(min=0) + 1e-8), torch.zeros_like(xd)).to(x.dtype)


def gtpo_token_advantages(
    rewards: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, group_size: int, *,
    alpha1: float = 1.0, alpha2: float = 0.1, eps: float = 1e-6, dp_group=None,
) -> torch.Tensor:
    """GTPO (Tan et al. 2025, arXiv 2508.04349, eqs. 3, 5, 6): entropy-shaped token rewards, whitened.

    rewards [B] per sequence, entropy / mask [B, T] (the old policy's entropy), rows in groups of
    `group_size` consecutive sequences of one prompt. At each position t of a group:
      correct  i: alpha1 + alpha2 * H_it / (sum over correct k active at t of H_kt + eps) * d_t
      wrong    j: -alpha1 - alpha2 * (1 / (H_jt + eps)) / (sum over wrong k of 1 / (H_kt + eps) + eps) * h_t
    (d_t, h_t: correct / wrong sequences still generating at t). Then correct and wrong tokens are
    whitened separately over the batch (all data-parallel ranks when dp_group is given)."""
    b, t = entropy.shape
    if b % group_size:
        raise ValueError(f"GTPO needs whole prompt groups: {b} sequences on this rank is not a multiple of "
                         f"rollout.n={group_size}; make trainer.rollout_batch_size a multiple of the data-parallel size")
    m = mask.bool().view(-1, group_size, t)
    h = entropy.detach().double().view(-1, group_size, t)
    ok = (rewards.double() > CORRECT_ABOVE).view(-1, group_size, 1)
    pos, neg = m & ok, m & ~ok
    d_t, h_t = pos.sum(1, keepdim=True), neg.sum(1, keepdim=True)
    hp = torch.where(pos, h, torch.zeros_like(h))
    shaped_pos = alpha1 + alpha2 * h / (hp.sum(1, keepdim=True) + eps) * d_t
    inv = torch.where(neg, 1.0 / (h + eps), torch.zeros_like(h))
    shaped_neg = -alpha1 - alpha2 * inv / (inv.sum(1, keepdim=True) + eps) * h_t
    shaped = torch.where(pos, shaped_pos, torch.where(neg, shaped_neg, torch.zeros_like(h))).view(b, t)
    pos, neg = pos.view(b, t), neg.view(b, t)
    return (_whiten(shaped, pos, dp_group) + _whiten(shaped, neg, dp_group)).to(torch.float32)
