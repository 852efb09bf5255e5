"""Context parallelism: each CP rank's share of a micro-batch's sequence positions.

megatron-core's load-balanced layout (megatron.core.utils.get_batch_on_this_cp_rank): the sequence
is cut into 2*cp chunks and rank r keeps chunks r and 2*cp-1-r, so every rank gets an equal share
of causal attention work. Labels must be built on the full sequence before the split (the roll
crosses chunk borders), and a token-mean normaliser must count the full sequence's tokens.
"""

from __future__ import annotations

import torch


def cp_index(seq_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Positions [2 * seq_len / (2 * cp)] this CP rank keeps, in order."""
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} must be divisible by 2 * cp = {2 * cp_size}")
    n = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * n, (cp_rank + 1) * n, device=device)
    last = torch.arange((2 * cp_size - 1 - cp_rank) * n, (2 * cp_size - cp_rank) * n, device=device)
    return torch.cat([first, last])


def split_for_cp(tensors: dict[str, torch.Tensor | None], cp_rank: int, cp_size: int) -> dict[str, torch.Tensor | None]:
    """This CP rank's share of each [b, s, ...] tensor along dim 1 (None passes through)."""
    if cp_size == 1:
        return dict(tensors)
    out = {}
    for k, t in tensors.items():
        out[k] = None if t is None else t.index_select(1, cp_index(t.shape[1], cp_rank, cp_size, t.device))
    return out
