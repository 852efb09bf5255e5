"""Per-token statistics on vocab-sharded logits: log p(target), entropy, sum p^2, sum p^2 log p.

Each tensor-parallel rank holds logits [tokens, V_local] for a contiguous slice of the padded
vocabulary. Ranks reduce their shard to six numbers per token (max, four shifted moments, target
logit), exchange them in ONE all-gather of [tokens, 6] fp32 and merge (DESIGN.md section 2).
The full vocabulary is never gathered, and no fp32 copy of the logits is kept for backward:
forward and backward walk the shard in token chunks, so extra memory is chunk x V_local.

Backward needs no collective: d logp / dz = 1[a=y] - p and d H / dz = -p (log p + H).
On CUDA the per-shard passes run as Triton kernels (loss/kernels/triton_stats.py) with no chunk
temporaries; the all-gather and merge below are shared by every path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

CHUNK_BYTES = 64 << 20  # per [chunk, V_local] fp32 temporary
_N_STATS = 6  # m, S0, S1, S2, S3, z_target


@dataclass(frozen=True)
class TokenStats:
    """Per-token outputs, each shaped like `target` (fp32, or fp64 for fp64 logits)."""

    logprob: torch.Tensor
    entropy: torch.Tensor
    sum_p2: torch.Tensor
    sum_p2_logp: torch.Tensor


def _tp_rank_world(tp_group) -> tuple[int, int]:
    if tp_group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _valid_columns(vocab_size: int, v_local: int, rank: int) -> int:
    """Columns of this rank's shard that are real vocabulary (padding sits at the global end)."""
    return max(0, min(v_local, vocab_size - rank * v_local))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product without materialising a * b."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def default_chunk_tokens(v_local: int) -> int:
    """Tokens per chunk so that one [chunk, v_local] fp32 temporary stays within CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * v_local))


def padding_only_stats(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[n, 6] partial stats of a shard made only of padding: zero sums and a finite "max", which
    keeps the merge free of inf * 0."""
    out = torch.zeros(n, _N_STATS, dtype=dtype, device=device)
    out[:, 0] = torch.finfo(dtype).min
    return out


def check_vocab_size(vocab_size: int | None, v_local: int, world: int, who: str) -> int:
    """The real vocabulary size (default: every column of every shard), checked against the shards."""
    if vocab_size is None:
        return v_local * world
    if not 0 < vocab_size <= v_local * world:
        raise ValueError(f"{who}: vocab_size={vocab_size} must be in (0, V_local * tp = {v_local} * {world}]")
    return vocab_size


def _local_stats(logits, target, n_valid, vocab_start, chunk, acc_dtype, p2_stats):
    """Shard-local [N, 6]: max, S0..S3 relative to the local max, and the target logit (0 off-shard)."""
    n = logits.shape[0]
    if n_valid == 0:
        return padding_only_stats(n, acc_dtype, logits.device)
    out = torch.zeros(n, _N_STATS, dtype=acc_dtype, device=logits.device)
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
        o[:, 2] = _rowdot(e, d)
        if p2_stats:
            o[:, 3] = _rowdot(e, e)
            o[:, 4] = _rowdot(e, d.mul_(e))  # sum e^2 d, reusing d's storage
        t = local_t[s : s + chunk].clamp(0, n_valid - 1)
        zt = z.gather(1, t[:, None]).squeeze(-1).to(acc_dtype)
        o[:, 5] = torch.where(on_shard[s : s + chunk], zt, torch.zeros_like(zt))
    return out


def _gather_stats(local: torch.Tensor, tp_group, world: int) -> torch.Tensor:
    """[world, N, 6] from every rank, in one collective."""
    if world == 1:
        return local[None]
    out = torch.empty((world,) + tuple(local.shape), dtype=local.dtype, device=local.device)
    try:
        dist.all_gather_into_tensor(out, local.contiguous(), group=tp_group)
    except (RuntimeError, NotImplementedError):  # gloo lacks the fused form on some builds
        dist.all_gather(list(out.unbind(0)), local.contiguous(), group=tp_group)
    return out


def _combine(stats: torch.Tensor) -> torch.Tensor:
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


def _finish(raw: torch.Tensor):
    """One [N, 6] (max, S0..S3, target logit) -> log Z, H, sum p^2, sum p^2 log p, target logit."""
    big_m, S0, S1, S2, S3, zt = raw.unbind(-1)
    log_s0 = S0.log()
    log_z = big_m + log_s0
    entropy = log_s0 - S1 / S0
    sum_p2 = S2 / (S0 * S0)
    sum_p2_logp = S3 / (S0 * S0) - sum_p2 * log_s0
    return log_z, entropy, sum_p2, sum_p2_logp, zt


def _merge(stats: torch.Tensor):
    """Combine per-rank shifted moments into log Z, H, sum p^2, sum p^2 log p and the target logit."""
    return _finish(_combine(stats))


def merge_across_ranks(local: torch.Tensor, tp_group):
    """The shared cross-rank step of every path (PyTorch, Triton, fused LM head): one all-gather of
    the local [N, 6] partial stats, then the merge of DESIGN.md section 2."""
    _, world = _tp_rank_world(tp_group)
    return _merge(_gather_stats(local, tp_group, world))


def _grad_torch(logits, target, log_z, entropy, g_logp, g_entropy, n_valid, vocab_start, chunk, grad):
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


class _VocabParallelTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, tp_group, chunk, inplace_backward, check_inputs, p2_stats, kernel):
        rank, world = _tp_rank_world(tp_group)
        v_local = logits.shape[-1]
        n_valid = _valid_columns(vocab_size, v_local, rank)
        acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        if kernel == "triton":
            from steer_megatron.loss.kernels import triton_stats

            local = triton_stats.local_stats(logits, target, n_valid, rank * v_local, p2_stats)
        else:
            local = _local_stats(logits, target, n_valid, rank * v_local, chunk, acc_dtype, p2_stats)
        log_z, entropy, sum_p2, sum_p2_logp, z_target = _merge(_gather_stats(local, tp_group, world))
        logprob = z_target - log_z
        if check_inputs:
            _raise_on_bad_values(log_z, target, vocab_size)
        ctx.save_for_backward(logits, target, log_z, entropy)
        ctx.meta = (n_valid, rank * v_local, chunk, inplace_backward, kernel)
        ctx.mark_non_differentiable(sum_p2, sum_p2_logp)
        ctx.set_materialize_grads(False)
        return logprob, entropy, sum_p2, sum_p2_logp

    @staticmethod
    def backward(ctx, g_logp, g_entropy, _g_p2, _g_p2logp):
        logits, target, log_z, entropy = ctx.saved_tensors
        n_valid, vocab_start, chunk, inplace, kernel = ctx.meta
        none = (None,) * 8
        if g_logp is None and g_entropy is None:
            return (None,) + none
        grad = logits.detach() if inplace else torch.empty_like(logits)  # detach: the same storage, no graph
        if kernel == "triton":
            from steer_megatron.loss.kernels import triton_stats

            triton_stats.grad_logits(logits, target, log_z, entropy, g_logp, g_entropy, n_valid, vocab_start, grad)
        else:
            _grad_torch(logits, target, log_z, entropy, g_logp, g_entropy, n_valid, vocab_start, chunk, grad)
        return (grad,) + none


def _raise_on_bad_values(log_z: torch.Tensor, target: torch.Tensor, vocab_size: int) -> None:
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


def token_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    vocab_size: int | None = None,
    tp_group=None,
    chunk_tokens: int | None = None,
    inplace_backward: bool = False,
    check_inputs: bool = True,
    p2_stats: bool = True,
    kernel: str = "auto",
) -> TokenStats:
    """Per-token log p(target), entropy, sum p^2 and sum p^2 log p of softmax(logits).

    logits: [tokens, V_local] or Megatron's [s, b, V_local], this rank's vocab shard (any float
        dtype; accumulation is fp32, or fp64 for fp64 input). Sequence-parallel models gather the
        sequence before the output layer, so their logits arrive whole here; context-parallel
        ranks pass their own tokens (the statistics are per token).
    target: global token ids shaped like logits without the vocab dim.
    vocab_size: the true vocabulary size; columns at or past it (Megatron's padding) are excluded.
        Defaults to V_local * tp (no padding).
    tp_group: the tensor-parallel process group (None: a single unsharded vocab).
    chunk_tokens: tokens per chunk; extra memory is about 2 x chunk x V_local x 4 bytes. Default:
        as many tokens as fit CHUNK_BYTES per temporary.
    inplace_backward: write the logit gradient into the logits' storage (they must not be reused).
    check_inputs: raise on out-of-range targets or NaN/Inf logits (one host sync per call).
    p2_stats: compute sum p^2 and sum p^2 log p (STEER's exact form needs them; two fewer vocab
        reductions without). When False those two outputs are zeros.
    kernel: "auto" (the Triton kernels for bf16/fp16/fp32 CUDA logits when triton imports, else
        PyTorch), "torch", or "triton" (fails clearly where it cannot run). See loss/kernels/.
        The Triton path ignores chunk_tokens: it streams the shard with no temporaries.

    Gradients flow through logprob and entropy; sum_p2 and sum_p2_logp carry none.
    """
    _, world = _tp_rank_world(tp_group)
    if logits.dim() not in (2, 3):
        raise ValueError(f"token_stats: logits must be [tokens, V_local] or [s, b, V_local], got {tuple(logits.shape)}")
    lead = tuple(logits.shape[:-1])
    if tuple(target.shape) != lead:
        hint = ""
        if len(target.shape) == len(lead) and target.shape[0] * world == lead[0]:
            hint = " (the target looks sequence-parallel-scattered: pass labels for the whole sequence)"
        raise ValueError(
            f"token_stats: target shape {tuple(target.shape)} must equal logits shape without the vocab dim {lead}{hint}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"token_stats: logits must be floating point, got {logits.dtype}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token_stats: target must hold integer token ids, got {target.dtype}")
    v_local = logits.shape[-1]
    vocab_size = check_vocab_size(vocab_size, v_local, world, "token_stats")
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(v_local)
    if chunk_tokens < 1:
        raise ValueError(f"token_stats: chunk_tokens must be >= 1, got {chunk_tokens}")
    from steer_megatron.loss.kernels import select_kernel

    flat = logits.reshape(-1, v_local)
    tgt = target.reshape(-1).long()
    out = _VocabParallelTokenStats.apply(
        flat, tgt, int(vocab_size), tp_group, int(chunk_tokens), bool(inplace_backward), bool(check_inputs),
        bool(p2_stats), select_kernel(kernel, flat),
    )
    return TokenStats(*(o.reshape(lead) for o in out))


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padding: round V up to a multiple of divisible_by * tp."""
    if vocab_size < 1 or tp < 1 or divisible_by < 1:
        raise ValueError(f"padded_vocab_size: need positive sizes, got vocab {vocab_size}, tp {tp}, divisible_by {divisible_by}")
    mult = divisible_by * tp
    return -(-vocab_size // mult) * mult


def check_vocab_shard(padded_vocab: int, tp: int) -> int:
    """V_local for a padded vocabulary, or a clear error when tp does not divide it."""
    if padded_vocab % tp:
        raise ValueError(
            f"tensor-parallel size {tp} does not divide the padded vocabulary {padded_vocab}; "
            f"pad the vocabulary to a multiple of 128 * tp (padded_vocab_size) or change parallel.tp"
        )
    return padded_vocab // tp
