"""Rank-0-driven control plane: object broadcast/gather over a gloo group, and stop signals.

Rank 0 talks to the rollout fleet and the reward workers; every rank trains. Python objects
(batches, metrics, decisions) travel over a gloo group so this works the same with NCCL
training groups on GPUs.
"""
from __future__ import annotations

import signal
from typing import Any

import torch.distributed as dist


class ControlPlane:
    def __init__(self):
        self.active = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.group = dist.new_group(backend="gloo") if self.active else None

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's obj on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        out = [None] * dist.get_world_size() if self.is_driver else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank."""
        if not self.active:
            return flag
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, bool(flag), group=self.group)
        return any(flags)


class StopRequest:
    """SIGTERM / SIGUSR1 (Slurm's pre-emption warning) ask the loop to save and exit at the
    end of the current step, instead of dying mid-update."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):  # noqa: ARG002
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
