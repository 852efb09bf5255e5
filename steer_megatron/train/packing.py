"""Packed sequences and token-budget micro-batches (trainer.pack_sequences, trainer.max_tokens_per_micro_batch).

Packing puts several sequences of a micro-batch into one row, trimmed to their real length
(prompt + response), so the forward computes no padding. Two forms of the same layout:
- Transformer Engine: one row of all tokens, megatron's PackedSeqParams (qkv_format="thd",
  cu_seqlens); TE's attention and megatron's THD RoPE restart at each sequence.
- Local spec (CPU, no TE): rows of at most the longest sequence, a block-diagonal causal mask
  (a token sees only earlier tokens of its own sequence), and RoPE fed each sequence's own
  positions (0 at its first token) through a hook on the rotary embedding, so every query/key
  pair is rotated exactly as in the padded row.
The statistics come back in the packed layout and are gathered into the micro-batch's padded
layout (`PackedMicroBatch.unpack`, per-token tensors only), so every loss, aggregation mode and
STEER group sees the same tensors as on the padded path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from steer_megatron.train.balance import row_lengths


@dataclass
class PackedMicroBatch:
    """rows: ActorBatch of the packed rows (input_ids [R, S], loss_mask [R, S - 1], False across a
    sequence boundary); source: the micro-batch's own rows (ActorBatch [n, L]); index [n, L - 1]:
    where each predicted position of `source` sits in the flattened [R * (S - 1)] packed
    statistics (R * (S - 1), a zero slot, past a sequence's end).

    Any other attribute (loss_mask, advantages, old_log_prob, ...) is the source's, so a loss
    function written for a padded micro-batch reads the same tensors from a packed one."""

    rows: object  # ActorBatch (not imported: actor.py imports this module)
    position_ids: torch.Tensor  # [R, S] each sequence's own positions
    segment_ids: torch.Tensor  # [R, S] sequence number within the micro-batch, -1 on row padding
    source: object  # ActorBatch
    index: torch.Tensor
    cu_seqlens: torch.Tensor  # int32 [k + 1] token offsets of the sequences in the flattened rows (THD)
    max_seqlen: int
    real_tokens: int

    def __len__(self) -> int:  # sequences, as for an ActorBatch
        return len(self.source)

    def __getattr__(self, name):
        if name.startswith("__") or name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    @property
    def computed_tokens(self) -> int:
        return self.rows.input_ids.numel()

    def attention_mask(self) -> torch.Tensor:
        """[R, 1, S, S] bool, True where attention is masked (megatron's convention): block-diagonal causal."""
        seg = self.segment_ids
        s = seg.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).triu(1)
        return ((seg[:, :, None] != seg[:, None, :]) | causal)[:, None]

    def unpack(self, stats):
        """TokenStats on the packed rows' [R, S - 1] positions -> the same on source's [n, L - 1]
        (a gather: gradients flow back to the packed positions; positions past a sequence are 0)."""
        def one(t):
            if t is None:
                return None
            flat = torch.cat([t.reshape(-1), t.new_zeros(1)])
            return flat[self.index]

        return type(stats)(**{k: one(v) for k, v in vars(stats).items()})


def sequence_lengths(batch) -> torch.Tensor:
    """Tokens each row needs: through its last response token (later tokens predict nothing)."""
    return row_lengths(batch.loss_mask)


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack(mb, *, row_len: int | None = None, rows: int | None = None, multiple: int = 1) -> PackedMicroBatch:
    """Pack the sequences of micro-batch `mb` (an ActorBatch) into rows of `row_len` tokens
    (default: its longest sequence), first fit by decreasing length, rounded up to `multiple`
    (sequence parallelism splits a row over TP ranks). rows: fill up to this many rows (pipeline
    stages exchange one fixed shape); row_len then must fit them."""
    lengths = [int(n) for n in sequence_lengths(mb)]
    longest = max(lengths)
    row_len = longest if row_len is None else row_len
    if longest > row_len:
        raise ValueError(f"packing: a sequence of {longest} tokens does not fit a row of {row_len}")
    s = -(-row_len // multiple) * multiple
    bins = _first_fit_decreasing(lengths, s)
    r = len(bins) if rows is None else rows
    if len(bins) > r:
        raise ValueError(f"packing: {len(bins)} rows of {s} tokens needed, {r} allowed")
    n, width = mb.input_ids.shape
    ids = mb.input_ids.new_zeros(r, s)
    pos = torch.zeros(r, s, dtype=torch.long)
    seg = torch.full((r, s), -1, dtype=torch.long)
    mask = torch.zeros(r, s - 1, dtype=torch.bool)
    index = torch.full((n, width - 1), r * (s - 1), dtype=torch.long)
    starts = []
    for row, members in enumerate(bins):
        offset = 0
        for i in members:
            k = lengths[i]
            ids[row, offset: offset + k] = mb.input_ids[i, :k]
            pos[row, offset: offset + k] = torch.arange(k)
            seg[row, offset: offset + k] = i
            index[i, : k - 1] = row * (s - 1) + offset + torch.arange(k - 1)
            mask[row, offset: offset + k - 1] = mb.loss_mask[i, : k - 1]
            starts.append((row * s + offset, k))
            offset += k
    # THD: sequences in flattened order, row padding as trailing pseudo-sequences so cu_seqlens covers every token
    cu, at = [0], 0
    for start, k in sorted(starts):
        if start > at:
            cu.append(start)
        cu.append(start + k)
        at = start + k
    if at < r * s:
        cu.append(r * s)
    device = mb.input_ids.device
    rows_batch = type(mb)(input_ids=ids, loss_mask=mask.to(device))
    return PackedMicroBatch(rows=rows_batch, position_ids=pos.to(device), segment_ids=seg.to(device), source=mb,
                            index=index.to(device), cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
                            max_seqlen=max(b - a for a, b in zip(cu, cu[1:])), real_tokens=sum(lengths))


def plan_micro_batches(lengths: list[int], max_tokens: int, *, padded: bool, min_count: int = 1) -> list[list[int]]:
    """Split rows into micro-batches of at most `max_tokens` tokens each, as few as possible but at
    least `min_count`: longest first, each to the micro-batch it raises least (token-balanced).
    A micro-batch costs its real tokens when packed, rows x its longest row when padded. Each
    micro-batch lists its rows in increasing order."""
    if not lengths:
        return [[] for _ in range(min_count)]
    longest = max(lengths)
    if longest > max_tokens:
        raise ValueError(f"trainer.max_tokens_per_micro_batch={max_tokens} is below a sequence of {longest} tokens: "
                         f"raise it to at least data.max_prompt_len + data.max_response_len")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    m = max(min_count, -(-sum(lengths) // max_tokens))
    while True:
        bins: list[list[int]] = [[] for _ in range(m)]
        cost = [0] * m
        ok = True
        for i in order:
            # padded: the first (longest) row of a micro-batch sets its width, each row adds that width
            add = [lengths[bins[b][0]] if padded and bins[b] else lengths[i] for b in range(m)]
            b = min(range(m), key=lambda b: (cost[b] + add[b], b))
            if cost[b] + add[b] > max_tokens:
                ok = False
                break
            bins[b].append(i)
            cost[b] += add[b]
        if ok:
            return [sorted(b) for b in bins]
        m += 1
