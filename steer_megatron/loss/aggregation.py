"""Reduce a [batch, tokens] loss matrix to a scalar (the usual RLVR aggregation modes)."""
from __future__ import annotations

import torch

from steer_megatron.loss.schema import AGG_MODES


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    token_normalizer: float | torch.Tensor | None = None,
    horizon: int | None = None,
) -> torch.Tensor:
    """Aggregate per-token losses; an all-False mask gives 0, never NaN.

    token-mean: sum / number of valid tokens (or `token_normalizer`, e.g. the valid tokens of the
        whole mini-batch across micro-batches and DP ranks, so that gradients do not depend on how
        the batch is split).
    seq-mean-token-sum: mean over sequences of each sequence's token sum.
    seq-mean-token-mean: mean over sequences of each sequence's token mean.
    seq-mean-token-sum-norm: sum / (sequences x horizon) with a constant horizon (Dr. GRPO);
        horizon defaults to the padded response length.
    """
    if loss_mat.shape != mask.shape:
        raise ValueError(f"aggregate: loss {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} must match")
    m = mask.to(loss_mat.dtype)
    masked = loss_mat * m
    if mode == "token-mean":
        denom = m.sum() if token_normalizer is None else torch.as_tensor(token_normalizer, dtype=loss_mat.dtype)
        return masked.sum() / denom.clamp(min=1)
    if loss_mat.dim() != 2:
        raise ValueError(f"aggregate mode {mode!r} needs a [batch, tokens] loss, got {tuple(loss_mat.shape)}")
    n_seq = loss_mat.shape[0]
    if mode == "seq-mean-token-sum":
        return masked.sum(-1).sum() / max(n_seq, 1)
    if mode == "seq-mean-token-mean":
        seq = masked.sum(-1) / m.sum(-1).clamp(min=1)
        has_tokens = (m.sum(-1) > 0).to(loss_mat.dtype)
        return (seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)
    if mode == "seq-mean-token-sum-norm":
        h = horizon or loss_mat.shape[-1]
        return masked.sum() / max(n_seq * h, 1)
    raise ValueError(f"loss_agg_mode={mode!r}: choose one of {AGG_MODES}")
