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

from steer_megatron.loss.vocab_parallel import (
    check_vocab_size,
    default_chunk_tokens,
    gather_stats as _gather_stats,
    grad_logits_torch as _grad_torch,
    local_stats as _local_stats,
    merge_stats as _merge,
    raise_on_bad_values as _raise_on_bad_values,
    tp_rank_world as _tp_rank_world,
    valid_columns as _valid_columns,
)


@dataclass(frozen=True)
class TokenStats:
    """Per-token outputs, each shaped like `target` (fp32, or fp64 for fp64 logits)."""

    logprob: torch.Tensor
    entropy: torch.Tensor
    sum_p2: torch.Tensor
    sum_p2_logp: torch.Tensor


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
        as many tokens as fit vocab_parallel.CHUNK_BYTES per temporary.
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
