"""Let megatron-core run on a CPU-only torch build over gloo.

This is the only module that redirects CUDA calls, and it does so only when CUDA is absent:
on a GPU `enable()` returns False and touches nothing. Call it before building a model; the
redirections stay for the process lifetime because megatron queries the CUDA device inside
forward and backward too. (Facts: ../shared/DESIGN.md section 3.)
"""
from __future__ import annotations

import threading
import time

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_lock = threading.Lock()
_enabled = False


class _CpuEvent:
    """Stand-in for torch.cuda.Event: megatron's timers record/elapse events."""

    def __init__(self, *args, **kwargs):
        self._t = None

    def record(self, *args, **kwargs):
        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, end):
        return (end._t - self._t) * 1e3


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Rewrites megatron's hard-coded device="cuda", .cuda(), .to("cuda") and pin_memory."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizer asserts param.type() == "torch.cuda.FloatTensor"
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _seed_cpu(seed) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all and would recurse here.
    torch.default_generator.manual_seed(int(seed))


def _causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()


def enable() -> bool:
    """Redirect CUDA-only calls to the CPU when no GPU is present. Idempotent.

    Returns True when the CPU redirections are active, False on a CUDA machine.
    """
    global _enabled
    if torch.cuda.is_available():
        return False
    with _lock:
        if _enabled:
            return True
        from megatron.core.tensor_parallel import random as mrandom

        cpu_rng_state = lambda *a, **k: torch.get_rng_state()  # noqa: E731
        torch.cuda.current_device = lambda: _CPU
        torch.cuda.get_rng_state = cpu_rng_state
        torch.cuda.random.get_rng_state = cpu_rng_state
        # A no-op seed would make every TP rank draw the same dropout mask.
        torch.cuda.manual_seed = _seed_cpu
        # The original defers through torch.cuda._lazy_call, which never runs on a CPU build.
        mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        # Activation recompute re-runs megatron's forward inside autograd's backward, where no
        # torch function mode is active (backward is entered from the mode's own handler), so the
        # one device="cuda" allocation on that path (the causal mask) is redirected by name.
        from megatron.core.fusions import fused_softmax

        fused_softmax.get_default_causal_mask = _causal_mask
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.Event = _CpuEvent
        _CudaToCpu().__enter__()  # pushed for the lifetime of this (main) thread
        _enabled = True
        return True


def is_enabled() -> bool:
    return _enabled
