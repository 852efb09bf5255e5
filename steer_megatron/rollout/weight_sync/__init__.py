"""Weight sync from the trainer to the rollout fleet: one class per transport."""

from steer_megatron.rollout.weight_sync.base import (
    ParityError, ParityProbe, ParityReport, SyncReport, WeightSync, WeightSyncError,
)
from steer_megatron.rollout.weight_sync.disk import DiskWeightSync, write_hf_checkpoint
from steer_megatron.rollout.weight_sync.nccl import NcclWeightSync, ParamMeta, plan_buckets

__all__ = [
    "DiskWeightSync", "NcclWeightSync", "ParamMeta", "ParityError", "ParityProbe", "ParityReport",
    "SyncReport", "WeightSync", "WeightSyncError", "plan_buckets", "write_hf_checkpoint",
]
