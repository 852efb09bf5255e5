"""Megatron parameters -> HF names and layouts, streamed tensor by tensor or in buckets.

The same iterator serves the HF converter (tools/convert_megatron_to_hf.py) and the rollout
weight sync. It is collective: every rank of the model must iterate it to the end. Only one
TP-gathered HF tensor is materialised at a time.

Modes:
- dst="rank0": global rank 0 yields every HF tensor (other stages send theirs to it); all
  other ranks yield nothing.
- dst="stage": the TP-rank-0 / DP-rank-0 rank of each pipeline stage yields its own stage's
  tensors (no cross-stage traffic; each stage pushes its own part to the rollout engine).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable, Iterable, Iterator, Literal, TypeVar

import torch
import torch.distributed as dist

from steer_megatron.models.hf_config import HFArch
from steer_megatron.models.hf_import import unwrap
from steer_megatron.models.layout import hf_shapes, is_te_model, merge_tp, plan

Dst = Literal["rank0", "stage"]
T = TypeVar("T")


def _gather_tp(t: torch.Tensor) -> list[torch.Tensor]:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(out, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return out


@torch.no_grad()
def iter_hf_weights(model, arch: HFArch | None = None, *, dst: Dst = "rank0",
                    dtype: torch.dtype | None = None,
                    tensor_fn: Callable[[str, torch.nn.Parameter], torch.Tensor] | None = None,
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, tensor) in HF layout; see the module docstring for who yields what.

    dtype: cast each tensor (e.g. to the HF checkpoint's dtype); None keeps the param dtype.
    tensor_fn(mcore_name, param): export another per-parameter tensor of the same shape
    instead of the weight, e.g. an optimizer moment or fp32 main param.
    """
    from megatron.core import parallel_state as ps

    model = unwrap(model)
    arch = arch or model.hf_arch
    vocab = model.vocab_info
    if ps.get_data_parallel_rank(with_context_parallel=True) != 0:
        return  # DP replicas hold the same weights; replica 0 does the work
    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    tp_rank = ps.get_tensor_model_parallel_rank()
    params = dict(model.named_parameters())
    shapes = hf_shapes(arch)
    pipe_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()) if pp > 1 else None
    me = dist.get_rank() if dist.is_initialized() else 0
    for entry in plan(arch, pp, is_te_model(model)):
        if entry.mcore_name == "output_layer.weight" and arch.tie_word_embeddings:
            continue  # the tied copy on the last stage is the embedding, already exported
        tensors: list[torch.Tensor] | None = None
        if entry.stage == stage:
            param = params[entry.mcore_name]
            local = param.detach() if tensor_fn is None else tensor_fn(entry.mcore_name, param).detach()
            tensors = merge_tp(entry.kind, _gather_tp(local), arch, vocab)
            if dtype is not None:
                tensors = [t.to(dtype) for t in tensors]
        if dst == "stage":
            if tensors is not None and tp_rank == 0:
                yield from zip(entry.hf_names, tensors)
            continue
        if tp_rank != 0:
            continue
        # dst == "rank0": the owning stage's TP-rank-0 sends to the pipeline's first rank.
        if pp > 1 and entry.stage != 0:
            src, dst_rank = pipe_ranks[entry.stage], pipe_ranks[0]
            if me == src:
                for t in tensors:
                    dist.send(t.contiguous(), dst_rank)
            elif me == dst_rank:
                out_dtype = dtype or (params_dtype(model) if tensor_fn is None else _probe_dtype(model, tensor_fn))
                device = next(model.parameters()).device  # NCCL needs device buffers
                tensors = [torch.empty(shapes[n], dtype=out_dtype, device=device) for n in entry.hf_names]
                for t in tensors:
                    dist.recv(t, src)
        if me == 0 and tensors is not None:
            yield from zip(entry.hf_names, tensors)


def params_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _probe_dtype(model: torch.nn.Module, tensor_fn) -> torch.dtype:
    # The receiving stage owns other parameters; assume tensor_fn's dtype is uniform.
    name, p = next(iter(model.named_parameters()))
    return tensor_fn(name, p).dtype


def iter_hf_buckets(model, bucket_bytes: int, arch: HFArch | None = None, *, dst: Dst = "rank0",
                    dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group iter_hf_weights into lists of at most ~bucket_bytes (a tensor larger than that
    gets a bucket of its own). For weight sync: one transfer per bucket."""
    yield from bucketize(iter_hf_weights(model, arch, dst=dst, dtype=dtype), bucket_bytes)


def bucketize(items: Iterable[T], bucket_bytes: int, size: Callable[[T], int] | None = None) -> Iterator[list[T]]:
    """Greedy, order-preserving buckets of at most bucket_bytes: a bucket closes before the item
    that would overflow it, and an item larger than bucket_bytes travels alone. The one bucketer
    of the export (iter_hf_buckets) and the weight-sync transports. size(item) -> bytes; default:
    the tensor of a (name, tensor) pair."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    size = size or (lambda item: item[1].numel() * item[1].element_size())
    bucket: list[T] = []
    used = 0
    for item in items:
        nbytes = size(item)
        if bucket and used + nbytes > bucket_bytes:
            yield bucket
            bucket, used = [], 0
        bucket.append(item)
        used += nbytes
    if bucket:
        yield bucket


# ---------------------------------------------------------------------------------------------
# Writing an HF checkpoint directory.

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_dtype(arch: HFArch) -> torch.dtype:
    return DTYPES.get(arch.torch_dtype, torch.float32)


def _generation_config(arch: HFArch) -> dict:
    raw = arch.raw
    cfg = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if raw.get(key) is not None:
            cfg[key] = raw[key]
    return cfg


def save_hf_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    arch: HFArch,
    *,
    source_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    progress=None,
    check_names: bool = True,
) -> dict[str, str]:
    """Write (hf_name, tensor) pairs as sharded safetensors + index + config files, atomically.

    Each tensor goes to disk as it arrives (a shard is closed once it would exceed
    max_shard_bytes), so memory holds one tensor, not a shard. Everything is written to a
    sibling temp dir that is renamed to out_dir at the end: a crash never leaves a
    half-written out_dir. Tokenizer files and generation_config.json
    are copied from source_dir when given. Returns the weight map (name -> shard file).
    `progress`: optional callable(name, nbytes) called per tensor. check_names: every tensor of the
    architecture, and nothing else (False: any names; a loader checks them).
    """
    from steer_megatron.models.st_io import ShardWriter

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) or pick a new path")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir) + "-", dir=parent)
    try:
        expected = set(hf_shapes(arch)) if check_names else None
        writer: ShardWriter | None = None
        shard_files: list[tuple[str, list[str]]] = []
        weight_map: dict[str, str] = {}
        total = 0

        def flush() -> None:
            nonlocal writer
            if writer is not None:
                writer.close()
                shard_files.append((os.path.basename(writer.path), writer.names()))
                writer = None

        for name, t in tensors:
            if expected is not None and name not in expected:
                raise ValueError(f"exporter produced unexpected tensor {name!r}")
            if name in weight_map:
                raise ValueError(f"exporter produced {name!r} twice")
            nbytes = t.numel() * t.element_size()
            if writer is not None and writer.nbytes and writer.nbytes + nbytes > max_shard_bytes:
                flush()
            if writer is None:
                writer = ShardWriter(os.path.join(tmp, f"part-{len(shard_files):05d}.safetensors"))
            writer.add(name, t)  # written to disk now; nothing is kept in memory
            total += nbytes
            weight_map[name] = ""
            if progress is not None:
                progress(name, nbytes)
        flush()
        missing = sorted(expected - set(weight_map)) if expected is not None else []
        if missing:
            raise ValueError(f"exporter did not produce {len(missing)} tensors, e.g. {missing[:5]}")
        # Final HF names need the shard count, known only now.
        n = len(shard_files)
        for i, (fname, names) in enumerate(shard_files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(tmp, fname), os.path.join(tmp, final))
            for name in names:
                weight_map[name] = final
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        config = dict(arch.raw)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        src = os.fspath(source_dir) if source_dir else None
        if src and os.path.exists(os.path.join(src, "generation_config.json")):
            shutil.copy2(os.path.join(src, "generation_config.json"), tmp)
        else:
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(_generation_config(arch), f, indent=2)
        if src:
            for fname in TOKENIZER_FILES:
                if os.path.exists(os.path.join(src, fname)):
                    shutil.copy2(os.path.join(src, fname), tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return weight_map


def export_hf_checkpoint(model, out_dir: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
                         dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30,
                         overwrite: bool = False, progress=None) -> None:
    """Collective: stream this model to an HF directory written by global rank 0."""
    arch: HFArch = unwrap(model).hf_arch
    out = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        # Checked on every rank (shared filesystem): if only rank 0 failed, the others would
        # wait forever in the gather collectives.
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) or pick a new path")
    it = iter_hf_weights(model, arch, dst="rank0", dtype=dtype or hf_dtype(arch))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        save_hf_checkpoint(it, out_dir, arch, source_dir=source_dir, max_shard_bytes=max_shard_bytes,
                           overwrite=overwrite, progress=progress)
    else:
        for _ in it:
            pass
    if dist.is_initialized():
        dist.barrier()
