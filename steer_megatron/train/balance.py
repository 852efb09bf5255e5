"""Mix a mini-batch's rows across its micro-batches (trainer.balance_batch).

The STEER release normalises its weights over each per-GPU micro-batch of 8 sequences, after
verl's `balance_batch` has reordered the rollout batch into token-balanced partitions (one per
GPU), so a micro-batch holds sequences of several prompts. Our rows arrive in prompt order (the n
samples of a prompt side by side), so without reordering a micro-batch of 8 is one prompt's group.
`balanced_order` deals the rows, longest first, to the micro-batches in a snake order (0..m-1,
m-1..0, ...): every micro-batch gets the same number of rows, token totals are balanced (the greedy
form of verl's equal-size partitioning), and samples of one prompt, which tend to have similar
lengths, land in different micro-batches. Deterministic: ties keep row order.
"""
from __future__ import annotations

import torch


def row_lengths(loss_mask: torch.Tensor) -> torch.Tensor:
    """Tokens up to each row's last response token (prompt + response; 1 for a row without one)."""
    pos = torch.arange(1, loss_mask.shape[1] + 1, device=loss_mask.device)
    return (loss_mask.bool() * pos).amax(dim=1) + 1 if loss_mask.numel() else loss_mask.new_zeros(loss_mask.shape[0])


def balanced_order(lengths: torch.Tensor, micro_batch_size: int) -> torch.Tensor:
    """A permutation of the rows such that consecutive chunks of micro_batch_size rows are the
    balanced micro-batches described above (each chunk's rows kept in their original order)."""
    n = lengths.numel()
    if micro_batch_size < 1 or n % micro_batch_size:
        raise ValueError(f"balance_batch: {n} rows do not split into micro-batches of {micro_batch_size}")
    m = n // micro_batch_size
    by_length = sorted(range(n), key=lambda i: (-int(lengths[i]), i))
    groups: list[list[int]] = [[] for _ in range(m)]
    for rank, row in enumerate(by_length):
        lap, pos = divmod(rank, m)
        groups[pos if lap % 2 == 0 else m - 1 - pos].append(row)
    return torch.tensor([row for g in groups for row in sorted(g)], dtype=torch.long)
