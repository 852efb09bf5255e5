"""Rollout correction: the trainer's old policy vs the rollout engine's log-probs.

The rollout engine samples from pi_rollout (another kernel, precision or weight version), the
loss is built on pi_old from the trainer's old-log-prob pass. rho = pi_old / pi_rollout per
token; over a sequence either the product (`sequence`) or the geometric mean (`geometric`,
exp of the mean log-ratio, which does not explode with length). Modes:

  truncate  weight the loss by min(rho, upper)                       (TIS; `algorithm.tis_cap`)
  icepop    weight by rho inside [lower, upper], 0 outside; the
            token-mean denominator still counts every token           (IcePop, as in verl)
  mask      weight by rho inside [lower, upper]; tokens (or whole
            sequences) outside are dropped, from the denominator too  (masked IS)

Weights carry no gradient. References: verl's rollout_corr_helper (truncate/icepop weights,
token and sequence rejection) and G-Core's off-policy correction (the mask / icepop split).
"""
from __future__ import annotations

import torch

from steer_megatron.loss.schema import CORRECTION_LEVELS as LEVELS, CORRECTION_MODES as MODES, RolloutCorrection

_SAFETY = 20.0  # exp(+-20): weights far past any band, no inf


def log_ratio(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log rho per token: the token's own, or its sequence's (sum / mean over valid tokens), broadcast."""
    m = mask.to(old_log_prob.dtype)
    lr = (old_log_prob - rollout_log_prob).detach() * m
    if level == "token":
        return lr
    if lr.dim() != 2:
        raise ValueError(f"rollout correction level {level!r} needs [batch, tokens] log-probs, got {tuple(lr.shape)}")
    seq = lr.sum(-1, keepdim=True)
    if level == "geometric":
        seq = seq / m.sum(-1, keepdim=True).clamp(min=1)
    return seq.expand_as(lr)


def correction(old_log_prob, rollout_log_prob, mask, rc: RolloutCorrection):
    """(weights, keep): per-token IS weights (detached, 0 off the mask) and the mask of tokens that
    stay in the loss (None unless mode='mask')."""
    mask = mask.bool()
    rho = torch.exp(log_ratio(old_log_prob, rollout_log_prob, mask, rc.level).clamp(-_SAFETY, _SAFETY))
    rho = torch.where(mask, rho, torch.zeros_like(rho))
    if rc.mode == "truncate":
        return rho.clamp(max=rc.upper), None
    lo, hi = rc.band
    inside = (rho >= lo) & (rho <= hi)
    weights = torch.where(inside, rho, torch.zeros_like(rho))
    return weights, (mask & inside if rc.mode == "mask" else None)


def keep_mask(old_log_prob, rollout_log_prob, mask, rc: RolloutCorrection) -> torch.Tensor:
    """The loss mask after mode='mask' drops out-of-band tokens / sequences (the mask itself otherwise)."""
    if not rc.drops_tokens:
        return mask.bool()
    return correction(old_log_prob, rollout_log_prob, mask, rc)[1]


@torch.no_grad()
def mismatch_metrics(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Trainer-vs-rollout mismatch on one batch (the definitions of verl's rollout_corr metrics):
    mismatch_kl = mean(log p_rollout - log p_old) (k1 estimate of KL(rollout || trainer)),
    mismatch_k3 = mean(rho - log rho - 1), ppl_* = mean over sequences of exp(-mean token log-prob)."""
    m = mask.bool()
    if not m.any():
        return {}
    old, roll = old_log_prob.double(), rollout_log_prob.double()
    mf = m.double()
    n = mf.sum()
    lr = (old - roll) * mf
    seqs = mf.sum(-1) > 0
    ntok = mf.sum(-1).clamp(min=1)
    mean_old = ((old * mf).sum(-1) / ntok)[seqs]
    mean_roll = ((roll * mf).sum(-1) / ntok)[seqs]
    return {
        "mismatch_kl": float(-(lr.sum()) / n),
        "mismatch_k3": float(((torch.exp(lr.clamp(-_SAFETY, _SAFETY)) - lr - 1) * mf).sum() / n),
        "ppl_trainer": float(torch.exp(-mean_old).mean()),
        "ppl_rollout": float(torch.exp(-mean_roll).mean()),
        "log_ppl_diff": float((mean_roll - mean_old).mean()),
    }


__all__ = ["LEVELS", "MODES", "RolloutCorrection", "correction", "keep_mask", "log_ratio", "mismatch_metrics"]
