"""Context parallelism: each CP rank's share of a micro-batch's sequence positions.

megatron-core's load-balanced layout (megatron.core.utils.get_batch_on_this_cp_rank): the sequence
is cut into 2*cp chunks and rank r keeps chunks r and 2*cp-1-r, so every rank gets an equal share
of causal attention work. TE's attention and megatron's RoPE (get_pos_emb_on_this_cp_rank) expect
exactly this layout. Labels are built on the full sequence before the split (the roll crosses
chunk borders), and a token-mean normaliser counts the full sequence's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist


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


@dataclass
class CPShare:
    """This CP rank's share of a padded micro-batch (an ActorBatch of length s, a multiple of 2*cp).

    input_ids, position_ids and labels are [b, s / cp] at the positions `index`; every per-token
    field of the source ([b, s - 1], position t predicting token t + 1) is taken at the same
    positions after a masked last column is appended (the last position predicts nothing), so a
    loss written for a micro-batch reads a share's tensors under the same names (loss_mask, ...)."""

    source: object  # ActorBatch (not imported: actor.py imports this module)
    index: torch.Tensor
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    per_token: dict

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name):
        if name.startswith("__") or name == "per_token":
            raise AttributeError(name)
        if name in self.per_token:
            return self.per_token[name]
        raise AttributeError(name)


def cp_share(mb, cp_rank: int, cp_size: int) -> CPShare:
    """`mb`'s share on CP rank cp_rank (see CPShare)."""
    b, s = mb.input_ids.shape
    idx = cp_index(s, cp_rank, cp_size, mb.input_ids.device)

    def take(t):
        if t is None:
            return None
        return torch.cat([t, t.new_zeros(b, 1)], 1).index_select(1, idx)

    per_token = {f.name: take(getattr(mb, f.name)) for f in fields(mb) if f.name != "input_ids"}
    return CPShare(source=mb, index=idx, input_ids=mb.input_ids.index_select(1, idx),
                   position_ids=idx[None].expand(b, -1), labels=mb.input_ids.roll(-1, dims=1).index_select(1, idx),
                   per_token=per_token)


def gather_share(t: torch.Tensor, share: CPShare, group) -> torch.Tensor:
    """A per-token [b, s / cp] tensor of every CP rank's share -> [b, s - 1] in the source's layout
    (forward-only: the old-log-prob and statistics passes)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    b, s = share.source.input_ids.shape
    out = t.new_zeros(b, s)
    for r, part in enumerate(parts):
        out[:, cp_index(s, r, len(parts), t.device)] = part
    return out[:, :-1]


# how a metric of one CP rank's share combines into the micro-batch's: losses normalised by the
# global token count and counts add up; maxima and minima take the extreme; any other metric is a
# mean over the share's tokens, averaged over the shares (equal-length shares; not token-weighted)
_CP_SUM = ("loss", "pg_loss", "entropy_loss", "kl_ref")


def reduce_metrics_over_cp(metrics: dict[str, float], group) -> dict[str, float]:
    """Combine each CP rank's update metrics into the values of the whole sequences."""
    if not metrics or dist.get_world_size(group) == 1:
        return metrics
    keys = sorted(metrics)
    kinds = {"sum": [], "max": [], "min": [], "mean": []}
    for k in keys:
        name = k.rsplit("/", 1)[-1]
        kind = ("sum" if name in _CP_SUM or name.startswith("quadrant_") else "max" if name.endswith(("_max", "absmax"))
                else "min" if name.endswith("_min") else "mean")
        kinds[kind].append(k)
    out = dict(metrics)
    for kind, names in kinds.items():
        if not names:
            continue
        v = torch.tensor([metrics[k] for k in names], dtype=torch.float64)
        op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[kind]
        dist.all_reduce(v, op=op, group=group)
        if kind == "mean":
            v /= dist.get_world_size(group)
        out.update(zip(names, v.tolist()))
    return out
