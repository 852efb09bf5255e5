"""Fused Triton kernels for the token statistics, and which path runs.

- triton_stats: the forward (one pass over the logits shard -> [N, 6] partial stats) and the
  backward (one pass writing the logit gradient, in place when allowed). The cross-rank merge is
  token_stats' own (one all-gather of [N, 6]), so both paths share it.
- fused_lm_head: hidden states x the vocab-parallel output weight -> the same statistics, logits
  computed block by block and never stored whole: fused_linear_token_stats (any loss; logits
  recomputed in backward, 8 N H V) and fused_linear_token_loss (a per-token loss evaluated chunk by
  chunk, gradients made in forward, 6 N H V).

Selection ("auto"): the Triton path for bf16/fp16/fp32 CUDA tensors when triton imports, PyTorch
everywhere else. CPU tensors never import triton under "auto", so CPU runs are unchanged. When
"auto" meets CUDA tensors but the kernels cannot load, it runs PyTorch and warns once
(auto_fallback() says why; the trainer reports it as a metric). Asking
for "triton" on CPU tensors works only under Triton's interpreter (TRITON_INTERPRET=1 set before
the kernels are first imported): slow, meant for tests.
"""
from __future__ import annotations

import logging

import torch

KERNELS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_import_error: str | None = None
_checked = False
_fallback: str | None = None  # why "auto" ran PyTorch on CUDA logits (set once, warned once)
_log = logging.getLogger(__name__)


def triton_import_error() -> str | None:
    """None when the Triton kernels import; else why not (imported once, on first need)."""
    global _checked, _import_error
    if not _checked:
        _checked = True
        try:
            from steer_megatron.loss.kernels import triton_stats  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means "use PyTorch"
            _import_error = f"{type(exc).__name__}: {exc}"
    return _import_error


def interpreted() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    if triton_import_error() is not None:
        return False
    from steer_megatron.loss.kernels import triton_stats

    return triton_stats.INTERPRETED


def select_kernel(kernel: str, x: torch.Tensor) -> str:
    """'torch' or 'triton' for tensor x under the requested kernel (auto | torch | triton)."""
    if kernel not in KERNELS:
        raise ValueError(f"loss kernel {kernel!r}: must be one of {list(KERNELS)}")
    if kernel == "torch":
        return "torch"
    if kernel == "auto":
        if not (x.is_cuda and x.dtype in _TRITON_DTYPES):
            return "torch"
        if triton_import_error() is None and not interpreted():
            return "triton"
        _note_fallback(triton_import_error() or "Triton runs under its CPU interpreter (TRITON_INTERPRET=1)")
        return "torch"
    err = triton_import_error()
    if err is not None:
        raise RuntimeError(
            f"loss kernel 'triton' requested but the Triton kernels do not import ({err}); "
            "install the extra (pip install 'steer-megatron[kernels]') or use kernel 'auto'/'torch'"
        )
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"loss kernel 'triton' takes bf16/fp16/fp32 tensors, got {x.dtype}; use kernel 'torch'")
    if not x.is_cuda and not interpreted():
        raise RuntimeError(
            "loss kernel 'triton' on CPU tensors runs only under Triton's interpreter (set TRITON_INTERPRET=1 "
            "before the kernels are imported; slow, for tests); use kernel 'auto' or 'torch' on a CPU"
        )
    return "triton"


def _note_fallback(reason: str) -> None:
    global _fallback
    if _fallback is None:
        _fallback = reason
        # the PyTorch path is ~55x slower at V = 152,064 (docs/benchmarks.md): never silent
        _log.warning("loss kernel 'auto' runs the PyTorch token statistics on CUDA logits because the Triton "
                     "kernels cannot run (%s); install the extra (pip install 'steer-megatron[kernels]') or set "
                     "algorithm.loss_kernel: torch to silence this", reason)


def auto_fallback() -> str | None:
    """Why 'auto' ran PyTorch on CUDA tensors in this process (None: it never did). The trainer
    reports it as the metric actor/loss_kernel_fallback."""
    return _fallback


def __getattr__(name):  # lazy: importing this package must not import triton
    if name in ("fused_linear_token_stats", "fused_linear_token_loss"):
        from steer_megatron.loss.kernels import fused_lm_head

        return getattr(fused_lm_head, name)
    raise AttributeError(name)
