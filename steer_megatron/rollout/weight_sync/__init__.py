"""Weight sync from the trainer to the rollout fleet: one class per transport, chosen by name.

`make_weight_sync(name, fleet, settings)` builds the transport `rollout.weight_sync` names:
  disk  writes an HF checkpoint to a shared path; every worker reloads it (needs only a shared
        filesystem; a restarted worker starts from the newest checkpoint)
  nccl  trainer rank 0 broadcasts each tensor into the workers' process group (gloo against
        the CPU server; the same code path)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from steer_megatron.rollout.weight_sync.base import (
    ParityError, ParityProbe, ParityReport, SyncReport, WeightSync, WeightSyncError,
)
from steer_megatron.rollout.weight_sync.disk import DiskWeightSync, write_hf_checkpoint
from steer_megatron.rollout.weight_sync.nccl import NcclWeightSync, ParamMeta, plan_buckets

if TYPE_CHECKING:
    from steer_megatron.rollout.fleet import Fleet

# A replaced worker makes the NCCL transport rebuild its group on the next port: reserve a block.
_NCCL_PORTS = 32


@dataclass(frozen=True)
class TransportSettings:
    """What the transports need from the run; each reads its own fields."""

    export_root: Path  # disk: where checkpoints for the workers are written
    source_dir: Path  # disk: the HF model dir whose config and tokenizer go with the weights
    master_address: str = "127.0.0.1"  # nccl: trainer rank 0's address as the workers reach it
    master_port: int = 0  # nccl: first port of the group's block; 0 = a free block on this host
    bucket_bytes: int = 512 << 20  # nccl: tensors per /update_weights_from_distributed call
    backend: str = "nccl"  # nccl: "nccl" for SGLang on GPUs, "gloo" for the CPU server
    ranks_per_worker: int = 1  # nccl: each worker's TP size


def _disk(fleet: "Fleet", s: TransportSettings) -> WeightSync:
    return DiskWeightSync(fleet, export_root=s.export_root, source_dir=s.source_dir)


def _nccl(fleet: "Fleet", s: TransportSettings) -> WeightSync:
    from steer_megatron.parallel.launch import free_port_block

    return NcclWeightSync(fleet, master_address=s.master_address, master_port=s.master_port or free_port_block(_NCCL_PORTS),
                          bucket_bytes=s.bucket_bytes, backend=s.backend, ranks_per_worker=s.ranks_per_worker)


TRANSPORTS: dict[str, Callable[["Fleet", TransportSettings], WeightSync]] = {"disk": _disk, "nccl": _nccl}


def make_weight_sync(name: str, fleet: "Fleet", settings: TransportSettings) -> WeightSync:
    try:
        build = TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"weight sync transport {name!r}: choose one of {sorted(TRANSPORTS)}") from None
    return build(fleet, settings)


__all__ = [
    "DiskWeightSync", "NcclWeightSync", "ParamMeta", "ParityError", "ParityProbe", "ParityReport",
    "SyncReport", "TRANSPORTS", "TransportSettings", "WeightSync", "WeightSyncError", "make_weight_sync",
    "plan_buckets", "write_hf_checkpoint",
]
