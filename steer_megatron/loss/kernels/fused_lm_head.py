"""Token statistics straight from hidden states and the vocab-parallel output weight.

For runs where even the bf16 logits [N, V_local] do not fit. The shard's vocabulary is walked in
column blocks: logits of one block = hidden @ W_block^T (one cuBLAS matmul), reduced to [N, 6]
partial stats by the same kernel as token_stats, and combined block after block with the same
rule as the cross-rank merge (token_stats._combine); then one all-gather across TP ranks.
Backward recomputes each block's logits, turns them into their gradient in place (the same
backward kernel) and writes grad_W[block] = G^T hidden once (no cross-block accumulation of the
weight gradient) and adds G @ W_block into an fp32 grad_hidden accumulator, token chunk by token
chunk. Extra memory: grad_W (V_local x H) + fp32 [N, H] + one [N, block] logits block.

Matmul work: 2 N H V forward + 6 N H V backward (recompute + two gradient products) = 8 N H V,
1.33x the 6 N H V of a pass that stores the logits: the recompute is the price of not storing them,
since the STEER loss only knows d loss / d logp after all tokens' statistics exist.
"""
from __future__ import annotations

import torch

from steer_megatron.loss.token_stats import (
    TokenStats,
    _combine,
    _grad_torch,
    _local_stats,
    _raise_on_bad_values,
    _tp_rank_world,
    _valid_columns,
    check_vocab_size,
    default_chunk_tokens,
    merge_across_ranks,
    padding_only_stats,
)

BLOCK_BYTES = 64 << 20  # one [N, block] logits block
TOKEN_CHUNK_BYTES = 32 << 20  # one [chunk, H] temporary of the grad_hidden product


def _block_cols(n: int, elem: int, block_v: int | None) -> int:
    if block_v is not None:
        return block_v
    cols = BLOCK_BYTES // max(1, n * elem)
    return int(min(8192, max(256, cols // 128 * 128)))


def _block_stats(z, target, n_valid, start, kernel, p2, acc):
    if kernel == "triton":
        from steer_megatron.loss.kernels import triton_stats

        return triton_stats.local_stats(z, target, n_valid, start, p2)
    return _local_stats(z, target, n_valid, start, default_chunk_tokens(z.shape[1]), acc, p2)


def _block_grad(z, target, log_z, entropy, g_logp, g_entropy, n_valid, start, kernel):
    """z becomes its own gradient (in place)."""
    if kernel == "triton":
        from steer_megatron.loss.kernels import triton_stats

        return triton_stats.grad_logits(z, target, log_z, entropy, g_logp, g_entropy, n_valid, start, z)
    return _grad_torch(z, target, log_z, entropy, g_logp, g_entropy, n_valid, start, default_chunk_tokens(z.shape[1]), z)


class _FusedLinearTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, vocab_size, tp_group, block_v, kernel, p2_stats, check_inputs):
        rank, _ = _tp_rank_world(tp_group)
        v_local = weight.shape[0]
        n_valid = _valid_columns(vocab_size, v_local, rank)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        n = hidden.shape[0]
        running = None
        for c0 in range(0, n_valid, block_v):  # blocks of padding only are skipped, not computed
            c1 = min(c0 + block_v, n_valid)
            z = hidden @ weight[c0:c1].t()
            part = _block_stats(z, target, c1 - c0, rank * v_local + c0, kernel, p2_stats, acc)
            running = part if running is None else _combine(torch.stack([running, part]))
            del z
        if running is None:
            running = padding_only_stats(n, acc, hidden.device)
        log_z, entropy, sum_p2, sum_p2_logp, z_target = merge_across_ranks(running, tp_group)
        if check_inputs:
            _raise_on_bad_values(log_z, target, vocab_size)
        ctx.save_for_backward(hidden, weight, target, log_z, entropy)
        ctx.meta = (n_valid, rank * v_local, block_v, kernel)
        ctx.mark_non_differentiable(sum_p2, sum_p2_logp)
        ctx.set_materialize_grads(False)
        return z_target - log_z, entropy, sum_p2, sum_p2_logp

    @staticmethod
    def backward(ctx, g_logp, g_entropy, _g2, _g3):
        hidden, weight, target, log_z, entropy = ctx.saved_tensors
        n_valid, vocab_start, block_v, kernel = ctx.meta
        none = (None,) * 7
        if g_logp is None and g_entropy is None:
            return (None, None) + none
        n, h = hidden.shape
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_w = torch.zeros_like(weight) if need_w else None  # padded rows stay zero
        acc_h = torch.zeros(n, h, dtype=log_z.dtype, device=hidden.device) if need_h else None
        tok = max(1, TOKEN_CHUNK_BYTES // max(1, h * hidden.element_size()))
        for c0 in range(0, n_valid, block_v):
            c1 = min(c0 + block_v, n_valid)
            w_b = weight[c0:c1]
            z = hidden @ w_b.t()  # recompute: the logits were never kept
            g = _block_grad(z, target, log_z, entropy, g_logp, g_entropy, c1 - c0, vocab_start + c0, kernel)
            if need_w:
                torch.mm(g.t(), hidden, out=grad_w[c0:c1])  # each weight row written exactly once
            if need_h:
                for s in range(0, n, tok):
                    part = g[s : s + tok] @ w_b
                    acc_h[s : s + tok].add_(part)
            del z, g
        grad_h = None if acc_h is None else acc_h.to(hidden.dtype)
        return (grad_h, grad_w) + none


def fused_linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    vocab_size: int | None = None,
    tp_group=None,
    block_v: int | None = None,
    kernel: str = "auto",
    check_inputs: bool = True,
    p2_stats: bool = True,
) -> TokenStats:
    """token_stats(hidden @ weight.T, target) without ever holding the logits whole.

    hidden: [tokens, H] or [s, b, H], the final-norm output for the WHOLE sequence (sequence-
        parallel models gather it first, as Megatron's output layer does).
    weight: [V_local, H], this rank's rows of the (padded) output weight (Megatron layout).
    block_v: vocabulary columns per block (default: about 64 MiB of logits per block).
    kernel: auto | torch | triton, for the per-block statistics and gradient (see loss.kernels).
    Gradients flow to hidden and weight through logprob and entropy.
    """
    from steer_megatron.loss.kernels import select_kernel

    _, world = _tp_rank_world(tp_group)
    if hidden.dim() not in (2, 3) or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"fused_linear_token_stats: need hidden [..., H] and weight [V_local, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"fused_linear_token_stats: hidden {hidden.dtype} and weight {weight.dtype} must match")
    lead = tuple(hidden.shape[:-1])
    if tuple(target.shape) != lead:
        raise ValueError(f"fused_linear_token_stats: target shape {tuple(target.shape)} must equal hidden's "
                         f"leading dims {lead}")
    vocab_size = check_vocab_size(vocab_size, weight.shape[0], world, "fused_linear_token_stats")
    flat = hidden.reshape(-1, hidden.shape[-1])
    bv = _block_cols(flat.shape[0], flat.element_size(), block_v)
    if bv < 1:
        raise ValueError(f"fused_linear_token_stats: block_v must be >= 1, got {block_v}")
    out = _FusedLinearTokenStats.apply(
        flat, weight, target.reshape(-1).long(), int(vocab_size), tp_group, int(bv),
        select_kernel(kernel, flat), bool(p2_stats), bool(check_inputs),
    )
    return TokenStats(*(o.reshape(lead) for o in out))
