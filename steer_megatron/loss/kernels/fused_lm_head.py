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
1.33x the 6 N H V of a pass that stores the logits: the recompute is the price of not storing them
when the loss needs every token's statistics before it knows d loss / d logp.

fused_linear_token_loss removes the recompute for losses that are a sum of per-token terms (the
policy losses here are: advantages, old log-probs, STEER weights and the aggregation normalisers
are all fixed before the step). It walks token chunks once: logits of the chunk, statistics, the
chunk's loss and its d loss / d(logp, H) by autograd on [chunk] tensors, the logit gradient in
place, then grad_hidden[chunk] = G W and grad_W += G^T hidden[chunk]: 6 N H V in all, and the
backward only scales the stored gradients by the incoming scalar.
"""
from __future__ import annotations

from typing import Callable

import torch

from steer_megatron.loss.token_stats import TokenStats
from steer_megatron.loss.vocab_parallel import (
    check_vocab_size,
    combine_stats as _combine,
    default_chunk_tokens,
    grad_logits_torch as _grad_torch,
    local_stats as _local_stats,
    merge_across_ranks,
    padding_only_stats,
    raise_on_bad_values as _raise_on_bad_values,
    tp_rank_world as _tp_rank_world,
    valid_columns as _valid_columns,
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


def _check_head_inputs(hidden, weight, target, vocab_size, tp_group, who: str) -> tuple[tuple, int]:
    """(hidden's leading dims, the real vocab size) after the checks both fused heads share."""
    _, world = _tp_rank_world(tp_group)
    if hidden.dim() not in (2, 3) or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{who}: need hidden [..., H] and weight [V_local, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{who}: hidden {hidden.dtype} and weight {weight.dtype} must match")
    lead = tuple(hidden.shape[:-1])
    if tuple(target.shape) != lead:
        raise ValueError(f"{who}: target shape {tuple(target.shape)} must equal hidden's leading dims {lead}")
    return lead, check_vocab_size(vocab_size, weight.shape[0], world, who)


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

    lead, vocab_size = _check_head_inputs(hidden, weight, target, vocab_size, tp_group, "fused_linear_token_stats")
    flat = hidden.reshape(-1, hidden.shape[-1])
    bv = _block_cols(flat.shape[0], flat.element_size(), block_v)
    if bv < 1:
        raise ValueError(f"fused_linear_token_stats: block_v must be >= 1, got {block_v}")
    out = _FusedLinearTokenStats.apply(
        flat, weight, target.reshape(-1).long(), int(vocab_size), tp_group, int(bv),
        select_kernel(kernel, flat), bool(p2_stats), bool(check_inputs),
    )
    return TokenStats(*(o.reshape(lead) for o in out))


# one [chunk, V_local] logits block of fused_linear_token_loss: 1,152 tokens of a 152k bf16 vocab.
# Bigger chunks run the gradient matmuls faster and read-modify-write the weight gradient fewer
# times, but each chunk's logits count against the memory budget. Measured on an H200
# (docs/benchmarks.md): 1,024 tokens 93 ms, 1,152 to 1,536 tokens 89-90 ms, at 1.42-1.56 GiB.
TOKEN_LOSS_CHUNK_BYTES = 352 << 20


class _FusedLinearTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, token_loss, vocab_size, tp_group, chunk, kernel, check_inputs):
        rank, _ = _tp_rank_world(tp_group)
        n, v_local = hidden.shape[0], weight.shape[0]
        n_valid = _valid_columns(vocab_size, v_local, rank)
        start = rank * v_local
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # accumulated chunk after chunk in the weight's dtype: an fp32 copy of a 7B model's LM-head
        # gradient would be 2 GiB, more than everything else here together
        grad_w = torch.zeros_like(weight) if need_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        outs = []
        for c0 in range(0, n, chunk):
            x = hidden[c0 : c0 + chunk]
            tgt = target[c0 : c0 + chunk]
            # all V_local columns, padding too: keeps the row stride a multiple of 16 bytes (vector
            # loads in the kernels) for +0.3% matmul work; the kernels mask the padding
            z = x @ weight.t()
            local = _block_stats(z, tgt, n_valid, start, kernel, True, acc)  # padding-only shards too
            log_z, entropy, sum_p2, sum_p2_logp, z_target = merge_across_ranks(local, tp_group)
            if check_inputs:
                _raise_on_bad_values(log_z, tgt, vocab_size)
            with torch.enable_grad():
                lp = (z_target - log_z).requires_grad_()
                ent = entropy.clone().requires_grad_()
                loss = token_loss(TokenStats(lp, ent, sum_p2, sum_p2_logp), slice(c0, c0 + x.shape[0]))
                if loss.dim() != 0:
                    raise ValueError(f"fused_linear_token_loss: token_loss must return a scalar, got {tuple(loss.shape)}")
                g_lp, g_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
            total += loss.detach().to(acc)
            outs.append(torch.stack([lp.detach(), entropy, sum_p2, sum_p2_logp]))
            if n_valid and (g_lp is not None or g_ent is not None):
                g = _block_grad(z, tgt, log_z, entropy, g_lp, g_ent, n_valid, start, kernel)  # in place
                if need_h:
                    torch.mm(g, weight, out=grad_h[c0 : c0 + chunk])
                if need_w:
                    grad_w.addmm_(g.t(), x)
                del g  # the same storage as z
            elif need_h:
                grad_h[c0 : c0 + chunk].zero_()
            del z  # before the next chunk's logits are allocated
        # held on ctx, not saved tensors: backward scales them in place and hands them over, so the
        # 1 GiB weight gradient of a 7B LM head is never copied
        ctx.grads = (grad_h, grad_w)
        stats = torch.cat(outs, dim=1) if outs else torch.zeros(4, 0, dtype=acc, device=hidden.device)
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, g_total, _g_stats):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_token_loss: backward ran twice; its gradients were made in forward "
                               "and handed over by the first backward")
        grads, ctx.grads = ctx.grads, None
        out = [None if g is None else g.mul_(g_total.to(g.dtype)) for g in grads]
        return (*out, None, None, None, None, None, None, None)


def fused_linear_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    token_loss: Callable[[TokenStats, slice], torch.Tensor],
    *,
    vocab_size: int | None = None,
    tp_group=None,
    chunk_tokens: int | None = None,
    kernel: str = "auto",
    check_inputs: bool = True,
) -> tuple[torch.Tensor, TokenStats]:
    """A per-token loss straight from hidden states and the output weight, gradients computed in
    the forward pass (6 N H V matmul work, logits never held beyond one token chunk).

    token_loss(stats, rows) -> scalar: the loss of the tokens `rows` (a slice of the flattened
        tokens) from their TokenStats (logprob and entropy carry gradients). It must be a SUM of
        per-token terms: anything that couples tokens (a normaliser, a mean) must be fixed
        beforehand and captured by the closure, since it sees one chunk at a time.
    hidden: [tokens, H] or [s, b, H] for the whole sequence; weight: [V_local, H] (Megatron layout).
    chunk_tokens: tokens per chunk (default: at most 352 MiB of logits per chunk, a multiple of 128).
    Returns (loss, detached TokenStats for metrics). Under tensor parallelism the returned
    grad_hidden is this rank's part: all-reduce it over the TP group (Megatron's
    copy_to_tensor_model_parallel_region before this call does exactly that in backward).
    """
    from steer_megatron.loss.kernels import select_kernel

    lead, vocab_size = _check_head_inputs(hidden, weight, target, vocab_size, tp_group, "fused_linear_token_loss")
    flat = hidden.reshape(-1, hidden.shape[-1])
    if chunk_tokens is None:  # a multiple of 128 rows suits the matmul tiles
        rows = TOKEN_LOSS_CHUNK_BYTES // max(1, weight.shape[0] * flat.element_size())
        chunk_tokens = max(1, rows // 128 * 128 if rows >= 128 else rows)
    if chunk_tokens < 1:
        raise ValueError(f"fused_linear_token_loss: chunk_tokens must be >= 1, got {chunk_tokens}")
    loss, stats = _FusedLinearTokenLoss.apply(
        flat, weight, target.reshape(-1).long(), token_loss, int(vocab_size), tp_group, int(chunk_tokens),
        select_kernel(kernel, flat), bool(check_inputs),
    )
    return loss, TokenStats(*(s.reshape(lead) for s in stats))
