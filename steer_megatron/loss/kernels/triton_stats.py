"""Triton kernels for the vocab-parallel token statistics (DESIGN.md section 2).

Forward: one program per token row (or ROWS rows) streams its shard once, in BLOCK-column tiles, with fp32
online accumulators (running max m and S0..S3 relative to it, rescaled when m grows; the same
rescaling rule as the cross-rank merge) and writes the row's 6 partial stats. Backward: one
program per row streams the shard once more and writes d loss / d z in the logits' dtype,
in place when grad aliases logits (each element is read before the same program writes it).
Columns at or past n_valid (Megatron's vocab padding) are masked in forward, zero in backward.

Both kernels work in base 2 (exp2 of z * log2 e, one FMA and one MUFU op per element) and run
full tiles unmasked, with one masked tail tile: on an H200 the forward pass is close to
ALU-bound at ~10 fp32 ops per bf16 element, so every per-element op counts.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from steer_megatron.loss.vocab_parallel import padding_only_stats

# Tile sizes (columns per loop step, warps per program), forward and backward separately:
# tools/tune_kernels.py's winners on an H200 (2026-11-27, N = 16,384, V = 152,064 and 38,016;
# docs/benchmarks.md). Overridable for tuning on other GPUs without code changes.
FWD_BLOCK = int(os.environ.get("STEER_TRITON_FWD_BLOCK", "4096"))
FWD_WARPS = int(os.environ.get("STEER_TRITON_FWD_WARPS", "4"))
FWD_ROWS = int(os.environ.get("STEER_TRITON_FWD_ROWS", "1"))  # token rows per program
BWD_BLOCK = int(os.environ.get("STEER_TRITON_BWD_BLOCK", "4096"))
BWD_WARPS = int(os.environ.get("STEER_TRITON_BWD_WARPS", "16"))
_M_INIT = -3.0e38  # finite start for the running max: (m_old - m_new) * 0 stays 0, never NaN
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _accumulate(z2, mask, m, s0, s1, s2, s3, P2: tl.constexpr, MASKED: tl.constexpr):
    """Fold one [ROWS, BLOCK] tile of base-2 logits z2 into the rows' running (m, S0..S3), all
    in base-2 units. The tile's sums go through ONE multi-operand reduction (one round of
    shuffles and barriers instead of one per sum)."""
    m_new = tl.maximum(m, tl.max(z2, 1))
    delta = m - m_new  # <= 0: rescale what was accumulated against the old max
    a = tl.exp2(delta)
    d = z2 - m_new[:, None]
    if MASKED:
        d = tl.where(mask, d, 0.0)  # masked lanes: keep -inf out of e * d (0 * -inf = NaN)
        e = tl.where(mask, tl.exp2(d), 0.0)
    else:
        e = tl.exp2(d)
    ed = e * d
    if P2:
        t0, t1, t2, t3 = tl.reduce((e, ed, e * e, ed * e), 1, _add4)
        aa = a * a
        s3 = aa * (s3 + delta * s2) + t3
        s2 = aa * s2 + t2
    else:
        t0, t1 = tl.reduce((e, ed), 1, _add2)
    s1 = a * (s1 + delta * s0) + t1
    s0 = a * s0 + t0
    return m_new, s0, s1, s2, s3


@triton.jit
def _stats_fwd_kernel(z_ptr, stride_z, target_ptr, out_ptr, n_rows, n_valid, vocab_start,
                      P2: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr, M_INIT: tl.constexpr,
                      LOG2E: tl.constexpr, LN2: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # int64: row * stride passes 2^31
    keep = rows < n_rows
    rows = tl.minimum(rows, n_rows - 1)  # past the end: redo the last row, store nothing; no load masks
    base = z_ptr + rows[:, None] * stride_z
    cols = tl.arange(0, BLOCK_V)[None, :]
    m = tl.full((ROWS,), M_INIT, tl.float32)
    s0 = tl.zeros((ROWS,), tl.float32)
    s1 = tl.zeros((ROWS,), tl.float32)
    s2 = tl.zeros((ROWS,), tl.float32)
    s3 = tl.zeros((ROWS,), tl.float32)
    n_full = (n_valid // BLOCK_V) * BLOCK_V
    for start in range(0, n_full, BLOCK_V):
        z2 = tl.load(base + start + cols).to(tl.float32) * LOG2E
        m, s0, s1, s2, s3 = _accumulate(z2, cols < BLOCK_V, m, s0, s1, s2, s3, P2, False)
    if n_full < n_valid:
        offs = n_full + cols
        mask = offs < n_valid
        z2 = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32) * LOG2E
        m, s0, s1, s2, s3 = _accumulate(z2, mask, m, s0, s1, s2, s3, P2, True)
    t = tl.load(target_ptr + rows) - vocab_start
    on = (t >= 0) & (t < n_valid)
    zt = tl.load(z_ptr + rows * stride_z + tl.where(on, t, 0), mask=on, other=0.0).to(tl.float32)
    o = out_ptr + rows * 6
    tl.store(o + 0, m * LN2, mask=keep)  # back to natural units: S1, S3 carry one factor of the exponent
    tl.store(o + 1, s0, mask=keep)
    tl.store(o + 2, s1 * LN2, mask=keep)
    tl.store(o + 3, s2, mask=keep)
    tl.store(o + 4, s3 * LN2, mask=keep)
    tl.store(o + 5, zt, mask=keep)


@triton.jit
def _grad_tile(z, offs, t, log_z2, ent, glp, gh, LOG2E: tl.constexpr, LN2: tl.constexpr):
    lp2 = z * LOG2E - log_z2  # log2 p
    p = tl.exp2(lp2)
    # glp (1[a=y] - p) - gh p (log p + H)
    g = -p * (glp + gh * (lp2 * LN2 + ent))
    return tl.where(offs == t, g + glp, g)


@triton.jit
def _stats_bwd_kernel(z_ptr, stride_z, g_ptr, stride_g, target_ptr, logz_ptr, ent_ptr, glp_ptr, gh_ptr,
                      n_valid, v_local, vocab_start,
                      HAS_LP: tl.constexpr, HAS_H: tl.constexpr, BLOCK_V: tl.constexpr,
                      LOG2E: tl.constexpr, LN2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zbase = z_ptr + row * stride_z
    gbase = g_ptr + row * stride_g
    cols = tl.arange(0, BLOCK_V)
    log_z2 = tl.load(logz_ptr + row) * LOG2E
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
    n_full = (n_valid // BLOCK_V) * BLOCK_V
    for start in range(0, n_full, BLOCK_V):
        offs = start + cols
        z = tl.load(zbase + offs).to(tl.float32)
        g = _grad_tile(z, offs, t, log_z2, ent, glp, gh, LOG2E, LN2)
        tl.store(gbase + offs, g.to(g_ptr.dtype.element_ty))
    for start in range(n_full, v_local, BLOCK_V):  # the valid tail, then padding: zero gradient
        offs = start + cols
        valid = offs < n_valid
        z = tl.load(zbase + offs, mask=valid, other=0.0).to(tl.float32)
        g = _grad_tile(z, offs, t, log_z2, ent, glp, gh, LOG2E, LN2)
        g = tl.where(valid, g, 0.0)
        tl.store(gbase + offs, g.to(g_ptr.dtype.element_ty), mask=offs < v_local)


INTERPRETED = type(_stats_fwd_kernel).__name__ == "InterpretedFunction"


def _block(v: int, block: int) -> int:
    return max(16, min(triton.next_power_of_2(max(v, 1)), block))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def local_stats(logits: torch.Tensor, target: torch.Tensor, n_valid: int, vocab_start: int, p2_stats: bool,
                block: int | None = None, out: torch.Tensor | None = None, warps: int | None = None,
                rows: int | None = None) -> torch.Tensor:
    """[N, 6] fp32 partial stats of this shard (same layout as token_stats._local_stats).
    `out` (contiguous [N, 6] fp32) lets tests pass a NaN-poisoned buffer."""
    logits = _rows(logits)
    n = logits.shape[0]
    if out is None:
        out = torch.empty(n, 6, dtype=torch.float32, device=logits.device)
    if n_valid == 0:
        return out.copy_(padding_only_stats(n, torch.float32, logits.device))
    if n:
        r = rows or FWD_ROWS
        _stats_fwd_kernel[(triton.cdiv(n, r),)](
            logits, logits.stride(0), target.contiguous(), out, n, n_valid, vocab_start,
            P2=bool(p2_stats), ROWS=r, BLOCK_V=_block(n_valid, block or FWD_BLOCK), M_INIT=_M_INIT,
            LOG2E=_LOG2E, LN2=_LN2, num_warps=warps or FWD_WARPS)
    return out


def grad_logits(logits, target, log_z, entropy, g_logp, g_entropy, n_valid: int, vocab_start: int,
                grad: torch.Tensor, block: int | None = None, warps: int | None = None) -> torch.Tensor:
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
        HAS_LP=g_logp is not None, HAS_H=g_entropy is not None, BLOCK_V=_block(v_local, block or BWD_BLOCK),
        LOG2E=_LOG2E, LN2=_LN2, num_warps=warps or BWD_WARPS,
    )
    return grad
