"""Disk transport: write an HF safetensors checkpoint to a shared path, then every worker
loads it with /update_weights_from_disk. Slowest, but needs nothing but a shared
filesystem, and a restarted worker can start straight from the newest checkpoint.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from steer_megatron.rollout.weight_sync.base import (
    NamedTensors, ParityProbe, WeightSource, WeightSync, WeightSyncError, named_tensors,
)

if TYPE_CHECKING:
    from steer_megatron.rollout.fleet import Fleet


def write_hf_checkpoint(tensors: NamedTensors, out_dir: Path, source_dir: Path, shard_bytes: int = 2 << 30) -> tuple[Path, int]:
    """Sharded safetensors + model.safetensors.index.json + config/tokenizer from source_dir, written
    by the project's one HF checkpoint writer (models.hf_export.save_hf_checkpoint: streamed tensor
    by tensor, renamed into place, so a reader sees all of it or nothing). The names are not
    checked here: the worker's load is strict. Returns (out_dir, total bytes of tensors)."""
    from steer_megatron.models.hf_config import parse_hf_config
    from steer_megatron.models.hf_export import save_hf_checkpoint

    out_dir, source_dir = Path(out_dir), Path(source_dir)
    if not (source_dir / "config.json").exists():
        raise FileNotFoundError(f"{source_dir}/config.json is missing: pass the HF model dir the weights belong to")
    sizes: list[int] = []
    save_hf_checkpoint(tensors, out_dir, parse_hf_config(source_dir), source_dir=source_dir, max_shard_bytes=shard_bytes,
                       overwrite=True, progress=lambda _name, n: sizes.append(n), check_names=False)
    if not sizes:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise WeightSyncError("no tensors to export: the weight source was empty")
    return out_dir, sum(sizes)


class DiskWeightSync(WeightSync):
    """Exports to export_root/v{version} and loads it on every worker; keeps the newest keep_last."""

    def __init__(self, targets: "Fleet | Sequence[str]", *, export_root: str | Path, source_dir: str | Path,
                 probe: ParityProbe | None = None, shard_bytes: int = 2 << 30, keep_last: int = 2, **kwargs):
        super().__init__(targets, probe=probe, **kwargs)
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (a restarted worker loads the newest), got {keep_last}")
        self.export_root, self.source_dir = Path(export_root), Path(source_dir)
        self.shard_bytes, self.keep_last = shard_bytes, keep_last
        self._exported: list[Path] = []

    def push(self, urls: list[str], source: WeightSource, version: str) -> tuple[int, str | None]:
        path, total = write_hf_checkpoint(named_tensors(source), self.export_root / f"v{version}", self.source_dir, self.shard_bytes)
        body = {"model_path": str(path.resolve()), "weight_version": version, "flush_cache": True, "abort_all_requests": False}
        self._post_all(urls, "/update_weights_from_disk", body)
        self._exported.append(path)
        for old in self._exported[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        self._exported = self._exported[-self.keep_last:]
        return total, str(path.resolve())

