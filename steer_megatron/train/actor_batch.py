"""ActorBatch: one rollout batch in the actor's next-token layout, and the ways the actor cuts it
(data-parallel shares, mini- and micro-batches, padding)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from steer_megatron.train.balance import balanced_order, row_lengths


@dataclass
class ActorBatch:
    """One rollout batch in next-token layout: position t predicts input_ids[:, t + 1].

    input_ids [B, L] right-padded (megatron's RoPE ignores position ids, so no left padding);
    every other tensor is [B, L - 1]. loss_mask is True on response tokens.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor | None = None
    old_log_prob: torch.Tensor | None = None
    old_entropy: torch.Tensor | None = None
    rollout_log_prob: torch.Tensor | None = None
    ref_log_prob: torch.Tensor | None = None
    # the old-log-prob pass's sum p^2 / sum p^2 log p: STEER exact with steer.group=mini_batch only
    old_sum_p2: torch.Tensor | None = None
    old_sum_p2_logp: torch.Tensor | None = None
    rewards: torch.Tensor | None = None  # each sequence's reward on its response tokens (GTPO's estimator)
    # STEER attribution: dH_total_j per unit LR, filled per mini-batch by update() (train/attribution.py)
    steer_attribution: torch.Tensor | None = None

    def __post_init__(self):
        b, length = self.input_ids.shape
        for f in fields(self)[1:]:
            t = getattr(self, f.name)
            if t is not None and tuple(t.shape) != (b, length - 1):
                raise ValueError(f"ActorBatch.{f.name} has shape {tuple(t.shape)}, expected {(b, length - 1)}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def dp_slice(self, rank: int, dp: int, *, balance_rows: int | None = None) -> "ActorBatch":
        """This data-parallel rank's equal share (rows past dp * (len // dp) are left out).

        balance_rows (trainer.max_tokens_per_micro_batch): each rank's mini-batch of this many rows
        keeps the same sequences across ranks as without it, but they are dealt to the ranks so their
        token counts balance (balance.balanced_order over the mini-batch's dp * balance_rows rows)."""
        per = len(self) // dp
        if not balance_rows or dp == 1:
            return self.slice(rank * per, (rank + 1) * per)
        shares = torch.arange(dp * per).view(dp, per)  # the plain split: rank r holds row r * per + j
        mine = []
        for start in range(0, per, balance_rows):
            rows = shares[:, start: start + balance_rows].reshape(-1)  # one mini-batch, all ranks
            order = balanced_order(row_lengths(self.loss_mask[rows]), len(rows) // dp)
            mine.append(rows[order].view(dp, -1)[rank])
        return self.take(torch.cat(mine))

    def slice(self, start: int, stop: int) -> "ActorBatch":
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[start:stop])
                                for f in fields(self)})

    def lengthened(self, length: int) -> "ActorBatch":
        """Right-padded to `length` tokens (masked out): sequence parallelism splits the sequence
        evenly over the TP ranks, so its length must be a multiple of TP."""
        extra = length - self.input_ids.shape[1]
        if extra <= 0:
            return self

        def grow(t):
            return None if t is None else torch.cat([t, t.new_zeros(t.shape[0], extra)], 1)

        return replace(self, **{f.name: grow(getattr(self, f.name)) for f in fields(self)})

    def take(self, order: torch.Tensor) -> "ActorBatch":
        """The rows in `order` (a permutation or selection of row indices)."""
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[order])
                                for f in fields(self)})

    def trimmed(self, length: int) -> "ActorBatch":
        """The first `length` tokens of every row (a micro-batch cut to its longest sequence)."""
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else
                                         getattr(self, f.name)[:, : length - (f.name != "input_ids")])
                                for f in fields(self)})

    def padded(self, rows: int) -> "ActorBatch":
        """`rows` more rows, copies of the first with loss_mask False: they add nothing to any loss or statistic."""
        def grow(t):
            return None if t is None else torch.cat([t, t[:1].expand(rows, *t.shape[1:])])

        out = replace(self, **{f.name: grow(getattr(self, f.name)) for f in fields(self)})
        out.loss_mask[len(self):] = False
        return out
