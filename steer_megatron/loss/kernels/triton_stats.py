"""Triton kernels for the vocab-parallel token statistics (DESIGN.md section 2).

Forward: one program per token row streams its shard once, in BLOCK-column tiles, with fp32
online accumulators (running max m and S0..S3 relative to it, rescaled when m grows; the same
rescaling rule as the cross-rank merge) and writes the row's 6 partial stats. Backward: one
program per row streams the shard once more and writes d loss / d z in the logits' dtype,
in place when grad aliases logits (each element is read before the same program writes it).
Columns at or past n_valid (Megatron's vocab padding) are masked in forward, zero in backward.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from steer_megatron.loss.token_stats import padding_only_stats

# Tile sizes: a bf16 row tile of 4096 is 8 KiB, 16 values per thread at 8 warps. Overridable
# for tuning on a GPU without code changes.
BLOCK = int(os.environ.get("STEER_TRITON_BLOCK", "4096"))
NUM_WARPS = int(os.environ.get("STEER_TRITON_WARPS", "8"))
_M_INIT = -3.0e38  # finite start for the running max: (m_old - m_new) * 0 stays 0, never NaN


@triton.jit
def _stats_fwd_kernel(z_ptr, stride_z, target_ptr, out_ptr, n_valid, vocab_start,
                      P2: tl.constexpr, BLOCK_V: tl.constexpr, M_INIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 at RL sizes
    base = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), M_INIT, tl.float32)
    s0 = tl.zeros((), tl.float32)
    s1 = tl.zeros((), tl.float32)
    s2 = tl.zeros((), tl.float32)
    s3 = tl.zeros((), tl.float32)
    for start in range(0, n_valid, BLOCK_V):
        offs = start + cols
        mask = offs < n_valid
        z = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        delta = m - m_new  # <= 0: rescale what was accumulated against the old max
        a = tl.exp(delta)
        d = tl.where(mask, z - m_new, 0.0)  # masked lanes: keep -inf out of e * d (0 * -inf = NaN)
        e = tl.where(mask, tl.exp(d), 0.0)
        ed = e * d
        s1 = a * (s1 + delta * s0) + tl.sum(ed, 0)
        s0 = a * s0 + tl.sum(e, 0)
        if P2:
            s3 = a * a * (s3 + delta * s2) + tl.sum(ed * e, 0)
            s2 = a * a * s2 + tl.sum(e * e, 0)
        m = m_new
    t = tl.load(target_ptr + row) - vocab_start
    on = (t >= 0) & (t < n_valid)
    zt = tl.load(base + tl.where(on, t, 0), mask=on, other=0.0).to(tl.float32)
    o = out_ptr + row * 6
    tl.store(o + 0, m)
    tl.store(o + 1, s0)
    tl.store(o + 2, s1)
    tl.store(o + 3, s2)
    tl.store(o + 4, s3)
    tl.store(o + 5, zt)


@triton.jit
def _stats_bwd_kernel(z_ptr, stride_z, g_ptr, stride_g, target_ptr, logz_ptr, ent_ptr, glp_ptr, gh_ptr,
                      n_valid, v_local, vocab_start,
                      HAS_LP: tl.constexpr, HAS_H: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zbase = z_ptr + row * stride_z
    gbase = g_ptr + row * stride_g
    cols = tl.arange(0, BLOCK_V)
    log_z = tl.load(logz_ptr + row)
    if HAS_LP:
        glp = tl.load(glp_ptr + row).to(tl.float32)
    else:
        glp = 0.0
    if HAS_H:
        gh = tl.load(gh_ptr + row).to(tl.float32)
        ent = tl.load(ent_ptr + row)
    else:
        gh = 0.0
        ent = 0.0
    t = tl.load(target_ptr + row) - vocab_start  # off-shard targets never match a column below
    for start in range(0, v_local, BLOCK_V):
        offs = start + cols
        valid = offs < n_valid
        z = tl.load(zbase + offs, mask=valid, other=0.0).to(tl.float32)
        lp = z - log_z
        p = tl.exp(lp)
        # glp (1[a=y] - p) - gh p (log p + H)
        g = -p * (glp + gh * (lp + ent))
        g = tl.where(offs == t, g + glp, g)
        g = tl.where(valid, g, 0.0)
        tl.store(gbase + offs, g.to(g_ptr.dtype.element_ty), mask=offs < v_local)


INTERPRETED = type(_stats_fwd_kernel).__name__ == "InterpretedFunction"


def _block(v: int, block: int | None) -> int:
    return max(16, min(triton.next_power_of_2(max(v, 1)), block or BLOCK))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def local_stats(logits: torch.Tensor, target: torch.Tensor, n_valid: int, vocab_start: int, p2_stats: bool,
                block: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, 6] fp32 partial stats of this shard (same layout as token_stats._local_stats).
    `out` (contiguous [N, 6] fp32) lets tests pass a NaN-poisoned buffer."""
    logits = _rows(logits)
    n = logits.shape[0]
    if out is None:
        out = torch.empty(n, 6, dtype=torch.float32, device=logits.device)
    if n_valid == 0:
        return out.copy_(padding_only_stats(n, torch.float32, logits.device))
    if n:
        _stats_fwd_kernel[(n,)](logits, logits.stride(0), target.contiguous(), out, n_valid, vocab_start,
                                P2=bool(p2_stats), BLOCK_V=_block(n_valid, block), M_INIT=_M_INIT,
                                num_warps=NUM_WARPS)
    return out


def grad_logits(logits, target, log_z, entropy, g_logp, g_entropy, n_valid: int, vocab_start: int,
                grad: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Write d loss / d logits into grad ([N, V_local], logits' dtype; may be logits itself)."""
    if grad.stride(-1) != 1:
        raise ValueError("grad_logits: grad must have unit column stride")
    logits = _rows(logits)
    n, v_local = logits.shape
    if n == 0:
        return grad
    dummy = log_z  # any tensor: flags turn its loads off
    _stats_bwd_kernel[(n,)](
        logits, logits.stride(0), grad, grad.stride(0), target.contiguous(), log_z.contiguous(),
        entropy.contiguous(),
        dummy if g_logp is None else g_logp.contiguous(), dummy if g_entropy is None else g_entropy.contiguous(),
        n_valid, v_local, vocab_start,
        HAS_LP=g_logp is not None, HAS_H=g_entropy is not None, BLOCK_V=_block(v_local, block),
        num_warps=NUM_WARPS,
    )
    return grad
