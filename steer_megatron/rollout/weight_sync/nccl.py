"""NCCL transport: trainer rank 0 broadcasts the weights straight into the servers.

The group: trainer rank 0 is rank 0, worker k's TP ranks are 1 + k*tp ... (k+1)*tp
(/init_weights_update_group with rank_offset). Per bucket: every worker gets
/update_weights_from_distributed {names, dtypes, shapes} and, while those calls are
open, rank 0 broadcasts each tensor of the bucket in the listed order (SGLang receives
one broadcast per tensor). Only the last bucket carries weight_version, so a server
reports the new version once all of it has landed. Backend "gloo" runs the same path on
CPU against steer_megatron's CPU server.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import torch

from steer_megatron.rollout.weight_sync.base import ParityProbe, WeightSource, WeightSync, WeightSyncError, named_tensors
from steer_megatron.rollout.weight_sync.group import broadcast, new_weight_update_group

if TYPE_CHECKING:
    from steer_megatron.rollout.fleet import Fleet

T = TypeVar("T")


@dataclass(frozen=True)
class ParamMeta:
    name: str
    dtype: str  # torch dtype name as SGLang expects it: "bfloat16", "float32", ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "ParamMeta":
        return cls(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))


def plan_buckets(metas: Sequence[ParamMeta], bucket_bytes: int) -> list[list[ParamMeta]]:
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    from steer_megatron.models.hf_export import bucketize  # the one bucketer, shared with the HF export

    return list(bucketize(metas, bucket_bytes, lambda m: m.nbytes))


def init_group_request(master_address: str, master_port: int, rank_offset: int, world_size: int,
                       group_name: str, backend: str) -> dict[str, Any]:
    return {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend}


def update_request(bucket: Sequence[ParamMeta], group_name: str, weight_version: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "names": [m.name for m in bucket], "dtypes": [m.dtype for m in bucket],
        "shapes": [list(m.shape) for m in bucket], "group_name": group_name, "flush_cache": weight_version is not None,
    }
    if weight_version is not None:
        body["weight_version"] = weight_version
    return body


class NcclWeightSync(WeightSync):
    """Run on trainer rank 0 only (other trainer ranks gather their shards to it first)."""

    def __init__(self, targets: "Fleet | Sequence[str]", *, master_address: str, master_port: int,
                 probe: ParityProbe | None = None, bucket_bytes: int = 512 << 20, backend: str = "nccl",
                 ranks_per_worker: int = 1, group_name: str = "steer_weight_update", **kwargs):
        super().__init__(targets, probe=probe, **kwargs)
        if bucket_bytes <= 0 or ranks_per_worker < 1:
            raise ValueError("bucket_bytes must be > 0 and ranks_per_worker (the servers' TP size) >= 1")
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
        self.master_address, self.master_port = master_address, master_port
        self.bucket_bytes, self.backend = bucket_bytes, backend
        self.ranks_per_worker, self.group_name = ranks_per_worker, group_name
        self._pg = None
        self._store = None
        self._group_urls: list[str] = []
        self._active_name = ""
        self._generation = 0
        self._rebuild = False
        if not isinstance(targets, (list, tuple)):
            # A replacement worker is not in the old group: rebuild it at the next sync.
            targets.on_replaced.append(lambda url: setattr(self, "_rebuild", True))

    def connect(self, urls: list[str]) -> None:
        """(Re)build the group over trainer rank 0 + these workers; each rebuild uses the next
        port (master_port + n) and group name, since a replaced worker cannot join an old one.
        Workers of the previous group leave it first (/destroy_weights_update_group)."""
        for url in [u for u in self._group_urls if u in urls]:  # survivors leave the old group
            try:
                self._post_all([url], "/destroy_weights_update_group", {"group_name": self._active_name})
            except WeightSyncError:
                pass  # a replaced worker never joined it
        if self._pg is not None and hasattr(self._pg, "shutdown"):
            self._pg.shutdown()  # frees NCCL communicators; the peers left above
        port, name = self.master_port + self._generation, f"{self.group_name}_{self._generation}"
        self._generation += 1
        world = 1 + len(urls) * self.ranks_per_worker
        bodies = [init_group_request(self.master_address, port, 1 + k * self.ranks_per_worker, world, name, self.backend)
                  for k in range(len(urls))]
        # The HTTP calls block until every rank joins, rank 0 (us) included: run them alongside.
        self._pg, self._store = self._alongside(
            [(u, "/init_weights_update_group", b) for u, b in zip(urls, bodies)],
            lambda: new_weight_update_group(self.master_address, port, 0, world, name, self.backend, self.timeout_s),
        )
        self._group_urls, self._active_name, self._rebuild = list(urls), name, False

    def push(self, urls: list[str], source: WeightSource, version: str) -> tuple[int, str | None]:
        if self._pg is None or self._rebuild or self._group_urls != urls:
            self.connect(urls)
        sent = 0
        from steer_megatron.models.hf_export import bucketize

        buckets = bucketize(named_tensors(source), self.bucket_bytes)
        pending = next(buckets, None)
        if pending is None:
            raise WeightSyncError("no tensors to send: the weight source was empty")
        while pending is not None:
            nxt = next(buckets, None)  # look ahead: only the last bucket sets weight_version
            metas = [ParamMeta.of(n, t) for n, t in pending]
            body = update_request(metas, self._active_name, version if nxt is None else None)

            def send(bucket=pending) -> None:
                works = [broadcast(self._pg, t.detach().contiguous()) for _, t in bucket]
                for w in works:
                    w.wait()

            self._alongside([(u, "/update_weights_from_distributed", body) for u in urls], send)
            sent += sum(m.nbytes for m in metas)
            pending = nxt
        return sent, None

    def _alongside(self, calls: list[tuple[str, str, dict]], local: Callable[[], T]) -> T:
        """POST every call from its own thread while running local() here; raise any failure."""
        errors: list[str] = []

        def post(url: str, path: str, body: dict) -> None:
            try:
                self._post_all([url], path, body)
            except WeightSyncError as e:
                errors.append(str(e))

        threads = [threading.Thread(target=post, args=c, daemon=True) for c in calls]
        for t in threads:
            t.start()
        try:
            result = local()
        finally:
            for t in threads:
                t.join(self.timeout_s)
        if errors:
            raise WeightSyncError("; ".join(errors))
        return result
