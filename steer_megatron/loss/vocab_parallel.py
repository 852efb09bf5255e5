"""The vocab-parallel pieces every token-statistics path shares (PyTorch, Triton, fused LM head).

Each tensor-parallel rank reduces its contiguous shard of the padded vocabulary to six numbers per
token (max, four moments shifted by that max, target logit; DESIGN.md section 2); `gather_stats`
exchanges them in one all-gather and `merge_stats` turns them into log Z, H, sum p^2, sum p^2 log p
and the target logit. `combine_stats` also merges vocab blocks within a rank (the fused head).
The PyTorch shard passes (`local_stats`, `grad_logits_torch`) and the input checks live here too,
so token_stats, loss/kernels/* and the fused head import one public module.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK_BYTES = 64 << 20  # per [chunk, V_local] fp32 temporary
N_STATS = 6  # m, S0, S1, S2, S3, z_target


def tp_rank_world(tp_group) -> tuple[int, int]:
    if tp_group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def valid_columns(vocab_size: int, v_local: int, rank: int) -> int:
    """Columns of this rank's shard that are real vocabulary (padding sits at the global end)."""
    return max(0, min(v_local, vocab_size - rank * v_local))


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product without materialising a * b."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def default_chunk_tokens(v_local: int) -> int:
    """Tokens per chunk so that one [chunk, v_local] fp32 temporary stays within CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * v_local))


def padding_only_stats(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[n, 6] partial stats of a shard made only of padding: zero sums and a finite "max", which
    keeps the merge free of inf * 0."""
    out = torch.zeros(n, N_STATS, dtype=dtype, device=device)
    out[:, 0] = torch.finfo(dtype).min
    return out


def check_vocab_size(vocab_size: int | None, v_local: int, world: int, who: str) -> int:
    """The real vocabulary size (default: every column of every shard), checked against the shards."""
    if vocab_size is None:
        return v_local * world
    if not 0 < vocab_size <= v_local * world:
        raise ValueError(f"{who}: vocab_size={vocab_size} must be in (0, V_local * tp = {v_local} * {world}]")
    return vocab_size


def local_stats(logits, target, n_valid, vocab_start, chunk, acc_dtype, p2_stats):
    """Shard-local [N, 6]: max, S0..S3 relative to the local max, and the target logit (0 off-shard)."""
    n = logits.shape[0]
    if n_valid == 0:
        return padding_only_stats(n, acc_dtype, logits.device)
    out = torch.zeros(n, N_STATS, dtype=acc_dtype, device=logits.device)
    local_t = target - vocab_start
    on_shard = (local_t >= 0) & (local_t < n_valid)
    for s in range(0, n, chunk):
        z = logits[s : s + chunk, :n_valid]
        m = z.amax(dim=-1, keepdim=True).to(acc_dtype)
        d = z.to(acc_dtype) - m  # two [chunk, V_local] temporaries in all: d and e
        e = d.exp()
        o = out[s : s + chunk]
        o[:, 0] = m.squeeze(-1)
        o[:, 1] = e.sum(-1)
        o[:, 2] = rowdot(e, d)
        if p2_stats:
            o[:, 3] = rowdot(e, e)
            o[:, 4] = rowdot(e, d.mul_(e))  # sum e^2 d, reusing d's storage
        t = local_t[s : s + chunk].clamp(0, n_valid - 1)
        zt = z.gather(1, t[:, None]).squeeze(-1).to(acc_dtype)
        o[:, 5] = torch.where(on_shard[s : s + chunk], zt, torch.zeros_like(zt))
    return out


def gather_stats(local: torch.Tensor, tp_group, world: int) -> torch.Tensor:
    """[world, N, 6] from every rank, in one collective."""
    if world == 1:
        return local[None]
    out = torch.empty((world,) + tuple(local.shape), dtype=local.dtype, device=local.device)
    try:
        dist.all_gather_into_tensor(out, local.contiguous(), group=tp_group)
    except (RuntimeError, NotImplementedError):  # gloo lacks the fused form on some builds
        dist.all_gather(list(out.unbind(0)), local.contiguous(), group=tp_group)
    return out


def combine_stats(stats: torch.Tensor) -> torch.Tensor:
    """[k, N, 6] partial stats (ranks, or vocab blocks) -> one [N, 6] relative to the common max."""
    if stats.shape[0] == 1:
        return stats[0]
    m, s0, s1, s2, s3, zt = stats.unbind(-1)  # each [k, N]
    big_m = m.amax(dim=0)
    delta = m - big_m
    a = delta.exp()
    return torch.stack([
        big_m,
        (a * s0).sum(0),
        (a * (s1 + delta * s0)).sum(0),
        (a * a * s2).sum(0),
        (a * a * (s3 + delta * s2)).sum(0),
        zt.sum(0),
    ], dim=-1)


def finish_stats(raw: torch.Tensor):
    """One [N, 6] (max, S0..S3, target logit) -> log Z, H, sum p^2, sum p^2 log p, target logit."""
    big_m, S0, S1, S2, S3, zt = raw.unbind(-1)
    log_s0 = S0.log()
    log_z = big_m + log_s0
    entropy = log_s0 - S1 / S0
    sum_p2 = S2 / (S0 * S0)
    sum_p2_logp = S3 / (S0 * S0) - sum_p2 * log_s0
    return log_z, entropy, sum_p2, sum_p2_logp, zt


def merge_stats(stats: torch.Tensor):
    """Combine per-rank shifted moments into log Z, H, sum p^2, sum p^2 log p and the target logit."""
    return finish_stats(combine_stats(stats))


def merge_across_ranks(local: torch.Tensor, tp_group):
    """The shared cross-rank step of every path (PyTorch, Triton, fused LM head): one all-gather of
    the local [N, 6] partial stats, then the merge of DESIGN.md section 2."""
    _, world = tp_rank_world(tp_group)
    return merge_stats(gather_stats(local, tp_group, world))


def grad_logits_torch(logits, target, log_z, entropy, g_logp, g_entropy, n_valid, vocab_start, chunk, grad):
    """Write d(loss)/d(logits) into `grad` (may alias `logits`): chunked PyTorch, fp32 temporaries."""
    grad[:, n_valid:] = 0
    if n_valid == 0:
        return grad
    acc = log_z.dtype
    local_t = target - vocab_start
    on_shard = (local_t >= 0) & (local_t < n_valid)
    for s in range(0, logits.shape[0], chunk):
        sl = slice(s, s + chunk)
        g = logits[sl, :n_valid].to(acc) - log_z[sl, None]  # log p; becomes the gradient in place
        p = g.exp()
        if g_entropy is not None:  # dH/dz = -p (log p + H)
            g.add_(entropy[sl, None]).mul_(p).mul_(-g_entropy[sl, None].to(acc))
        else:
            g.zero_()
        if g_logp is not None:  # dlogp/dz = 1[a=y] - p
            gl = g_logp[sl].to(acc)
            g.addcmul_(p, gl[:, None], value=-1)
            # the target column gets + g_logp; a masked scatter, not nonzero(), which syncs with the host
            t = local_t[sl].clamp(0, n_valid - 1)
            g.scatter_add_(1, t[:, None], torch.where(on_shard[sl], gl, torch.zeros_like(gl))[:, None])
        grad[sl, :n_valid] = g
    return grad


def raise_on_bad_values(log_z: torch.Tensor, target: torch.Tensor, vocab_size: int) -> None:
    # One host sync for both checks; NaN/Inf anywhere in a token's logits makes its log Z non-finite.
    bad = torch.stack([(~torch.isfinite(log_z)).any(), ((target < 0) | (target >= vocab_size)).any()])
    nonfinite, out_of_range = bad.tolist()
    if out_of_range:
        lo, hi = int(target.min()), int(target.max())
        raise ValueError(
            f"token_stats: target ids must lie in [0, vocab_size={vocab_size}); got min {lo}, max {hi}. "
            "Replace padding/ignored positions by a real token id (e.g. the pad id) and mask them in the loss."
        )
    if nonfinite:
        rows = (~torch.isfinite(log_z)).nonzero().squeeze(-1)
        raise FloatingPointError(
            f"token_stats: logits contain NaN or Inf in {rows.numel()} token row(s) (first: {rows[:5].tolist()}); "
            "they are not zeroed silently. Check the model for overflow (lower the LR, use bf16/fp32) "
            "or the input for masked logits set to -inf."
        )


__all__ = [
    "CHUNK_BYTES", "N_STATS", "check_vocab_size", "combine_stats", "default_chunk_tokens", "finish_stats", "gather_stats",
    "grad_logits_torch", "local_stats", "merge_across_ranks", "merge_stats", "padding_only_stats", "raise_on_bad_values",
    "rowdot", "tp_rank_world", "valid_columns",
]
