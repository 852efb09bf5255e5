"""Disk transport: write an HF safetensors checkpoint to a shared path, then every worker
loads it with /update_weights_from_disk. Slowest, but needs nothing but a shared
filesystem, and a restarted worker can start straight from the newest checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from safetensors.torch import save_file

from steer_megatron.rollout.weight_sync.base import (
    NamedTensors, ParityProbe, WeightSource, WeightSync, WeightSyncError, named_tensors,
)

if TYPE_CHECKING:
    from steer_megatron.rollout.fleet import Fleet

# Files copied from the source model dir next to the weights (config, tokenizer, chat template).
_SIDECARS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")


def write_hf_checkpoint(tensors: NamedTensors, out_dir: Path, source_dir: Path, shard_bytes: int = 2 << 30) -> tuple[Path, int]:
    """Sharded safetensors + model.safetensors.index.json + config/tokenizer from source_dir,
    written to a temp dir and renamed into place, so a reader sees all of it or nothing.
    Returns (out_dir, total bytes of tensors)."""
    out_dir, source_dir = Path(out_dir), Path(source_dir)
    if not (source_dir / "config.json").exists():
        raise FileNotFoundError(f"{source_dir}/config.json is missing: pass the HF model dir the weights belong to")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        total = _write_shards(tensors, tmp, source_dir, shard_bytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir, total


def _write_shards(tensors: NamedTensors, tmp: Path, source_dir: Path, shard_bytes: int) -> int:
    shards: list[list[str]] = []
    seen: set[str] = set()
    total, current, current_bytes = 0, {}, 0

    def flush() -> None:
        nonlocal current, current_bytes
        if current:
            save_file(current, str(tmp / f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append(list(current))
            current, current_bytes = {}, 0

    for name, tensor in tensors:
        if name in seen:
            raise WeightSyncError(f"tensor {name!r} appears twice in the exported weights")
        seen.add(name)
        # clone: safetensors refuses tensors sharing storage (tied embeddings, views)
        t = tensor.detach().to("cpu").contiguous().clone()
        size = t.numel() * t.element_size()
        if current and current_bytes + size > shard_bytes:
            flush()
        current[name] = t
        current_bytes += size
        total += size
    flush()
    if not shards:
        raise WeightSyncError("no tensors to export: the weight source was empty")
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (tmp / f"shard-{i:05d}.safetensors").rename(tmp / final)
        weight_map.update({n: final for n in names})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    for pattern in _SIDECARS:
        for f in source_dir.glob(pattern):
            if f.name != "model.safetensors.index.json":
                shutil.copy2(f, tmp / f.name)
    return total


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

