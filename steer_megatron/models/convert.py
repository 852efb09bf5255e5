"""Streaming HF <-> dist-checkpoint conversion in one process, tensor by tensor.

A dist checkpoint stores global tensors (layer-stacked, padded vocab), so its contents do not
depend on the TP/PP layout it is later loaded at; only the vocabulary padding does (recorded
in meta.json). That lets both directions run in a single process that never holds more than
one tensor (or one layer) of the model:

- HF -> Megatron: the model is built on the meta device (no memory) only to obtain megatron's
  exact sharded_state_dict (keys, shapes, swiglu split, extra-state objects); the torch_dist
  writer then asks a planner for each chunk's data, and the planner reads just that tensor
  from the HF safetensors at that moment (torch.distributed.checkpoint's serial loader).
- Megatron -> HF: one layer at a time is loaded from the checkpoint with dist_checkpointing
  (a sharded state dict holding only that layer), converted, and handed to the HF writer.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterator

import torch

from steer_megatron.models.hf_config import HFArch, VocabInfo, parse_hf_config
from steer_megatron.models.hf_import import HFReader, check_hf_tensors, local_shard
from steer_megatron.models.layout import Entry, Kind, merge_tp, plan

Progress = Callable[[str, int], None]


def _require_single_process_state() -> None:
    """Converters run with TP=1, PP=1 parallel state (a 1-rank gloo group is enough)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from steer_megatron.parallel import ParallelLayout, init_parallel

    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        init_parallel(ParallelLayout())
    if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("streaming conversion needs TP=1, PP=1 parallel state (it runs in one process)")


def meta_model(arch: HFArch, padded_vocab: int, params_dtype: torch.dtype):
    """A TP=1/PP=1 GPTModel whose parameters live on the meta device (no memory)."""
    from steer_megatron.models.hf_config import build_gpt_model

    _require_single_process_state()
    with torch.device("meta"):
        model, _ = build_gpt_model(arch, params_dtype=params_dtype, padded_vocab=padded_vocab, use_te=False,
                                   perform_initialization=False, use_cpu_initialization=True)
    return model


def _layer_templates(model, arch: HFArch, vocab: VocabInfo) -> tuple[dict[str, Entry], dict[str, str]]:
    """checkpoint key -> Entry (layer 0 for layer-stacked keys) and checkpoint key -> param name."""
    entries = {e.mcore_name: e for e in plan(arch, 1, te_spec=False)}
    key_to_entry: dict[str, Entry] = {}
    key_to_param: dict[str, str] = {}
    for name, sh in model.sharded_state_dict().items():
        if name.endswith("._extra_state") or name not in entries:
            continue
        if name.startswith("decoder.layers.") and not name.startswith("decoder.layers.0."):
            continue
        key_to_entry[sh.key] = entries[name]
        key_to_param[sh.key] = name
    return key_to_entry, key_to_param


def _entry_for_layer(entry: Entry, layer: int) -> Entry:
    if not entry.mcore_name.startswith("decoder.layers."):
        return entry
    names = tuple(n.replace("model.layers.0.", f"model.layers.{layer}.", 1) for n in entry.hf_names)
    return Entry(0, entry.mcore_name.replace("decoder.layers.0.", f"decoder.layers.{layer}.", 1), entry.kind, names)


def _make_streaming_strategy(resolve: Callable[[str, tuple[int, ...], tuple[int, ...]], torch.Tensor]):
    """A torch_dist save strategy whose tensor data comes from `resolve(key, offsets, sizes)`."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            chunk = write_item.tensor_data.chunk
            return resolve(write_item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes))

    class StreamingStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            pyt = mcore_to_pyt_state_dict(sd, False)
            # thread_count=1 on CPU selects the serial loader: one chunk is resolved, written
            # and dropped before the next.
            writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1)
            dcp_save(pyt, storage_writer=writer,
                     planner=LazyPlanner(dedup_replicated_tensors=False, flatten_state_dict=False))

    return StreamingStrategy("torch_dist", 1)


def hf_to_dist_checkpoint(
    hf_dir: str | os.PathLike,
    out_root: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype | None = None,
    step: int = 0,
    progress: Progress | None = None,
) -> str:
    """Write the HF model at hf_dir as a dist checkpoint out_root/iter_<step> (atomically).

    tp/pp are checked against the model and set the vocabulary padding (Megatron pads to
    128 * tp); the checkpoint itself loads at any layout with the same padding.
    dtype: parameter dtype in the checkpoint (default: the HF config's dtype).
    Returns the checkpoint directory. Single process; memory ~ one tensor.
    """
    from megatron.core import dist_checkpointing

    from steer_megatron.models.checkpoint import (
        CheckpointMeta, begin_checkpoint_dir, commit_checkpoint_dir, iter_dir_name,
    )
    from steer_megatron.models.hf_export import hf_dtype

    arch = parse_hf_config(hf_dir)
    arch.check_layout(tp, pp)
    vocab = arch.vocab(tp)
    dtype = dtype or hf_dtype(arch)
    model = meta_model(arch, vocab.padded_size, dtype)
    key_to_entry, _ = _layer_templates(model, arch, vocab)
    reader = HFReader(hf_dir)
    check_hf_tensors(reader, arch)
    cache: dict[tuple[str, int], torch.Tensor] = {}

    def resolve(key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        if key not in key_to_entry:
            raise KeyError(f"no HF source for checkpoint tensor {key!r}")
        stacked = key.startswith("decoder.layers.")
        layer = offsets[0] if stacked else -1
        entry = _entry_for_layer(key_to_entry[key], max(layer, 0))
        ck = (key, layer)
        if ck not in cache:
            cache.clear()  # keep one full parameter: fc1's gate and up chunks come in turn
            like = torch.empty(0)
            if entry.kind is Kind.VOCAB:
                like = torch.zeros(vocab.padded_size, arch.hidden_size, dtype=dtype)
            full = local_shard(entry, reader, arch, vocab, 1, 0, like).to(dtype)
            cache[ck] = full.unsqueeze(0) if stacked else full
            if progress is not None:  # counted in HF bytes read, so a bar over the HF size ends at 100%
                progress(entry.mcore_name, sum(reader.info(n).nbytes for n in entry.hf_names))
        full = cache[ck]
        out = full
        for dim, (o, s) in enumerate(zip(offsets, sizes)):
            if dim == 0 and stacked:
                continue
            if out.shape[dim] != s:
                out = out.narrow(dim, o, s)
        return out.contiguous()

    root = os.path.abspath(os.fspath(out_root))
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, iter_dir_name(step))
    tmp = final + ".tmp"
    begin_checkpoint_dir(tmp)
    with reader:
        dist_checkpointing.save(model.sharded_state_dict(), os.path.join(tmp, "dist"),
                                sharded_strategy=_make_streaming_strategy(resolve))
    cache.clear()
    meta = CheckpointMeta(step=step, hf_config=dict(arch.raw), padded_vocab_size=vocab.padded_size,
                          layout=dict(tp=tp, pp=pp, dp=1), has_optimizer=False,
                          extra={"converted_from": os.path.abspath(os.fspath(hf_dir)), "dtype": str(dtype)})
    commit_checkpoint_dir(root, tmp, final, meta)
    return final


def _slice_load_planner():
    """A DCP load planner that reads given chunks (offsets into global tensors) into buffers.

    megatron's own load maps a partial request onto a full regular grid of shards, which a
    one-layer read is not; plain torch.distributed.checkpoint can read any box."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SliceLoadPlanner(DefaultLoadPlanner):
        def __init__(self, offsets: dict[str, tuple[int, ...]]):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.offsets = offsets

        def create_local_plan(self) -> LoadPlan:
            items = []
            for fqn, buf in self.state_dict.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets[fqn]), sizes=buf.size())
                items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return self.state_dict[index.fqn]

    return SliceLoadPlanner


def iter_dist_checkpoint_hf(ckpt: str | os.PathLike, *, arch: HFArch | None = None,
                            dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, tensor) from a dist checkpoint, reading one layer at a time.

    arch: override the architecture stored in meta.json (e.g. from --hf-config)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    from steer_megatron.models.checkpoint import find_latest, read_meta

    path = find_latest(ckpt)
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint under {os.fspath(ckpt)}")
    meta = read_meta(path)
    if arch is None:
        if not meta.hf_config:
            raise ValueError(f"{path}/meta.json has no hf_config; pass the source model's config (--hf-config)")
        arch = parse_hf_config(meta.hf_config)
    if not meta.padded_vocab_size:
        raise ValueError(f"{path}/meta.json has no padded_vocab_size")
    vocab = VocabInfo(arch.vocab_size, meta.padded_vocab_size)
    dist_dir = os.path.join(path, "dist")
    saved = FileSystemReader(dist_dir).read_metadata().state_dict_metadata
    key_to_entry, _ = _layer_templates(meta_model(arch, vocab.padded_size, torch.float32), arch, vocab)
    planner_cls = _slice_load_planner()

    def read(entries: list[tuple[str, Entry, int]]) -> dict[str, torch.Tensor]:
        bufs, offsets = {}, {}
        for key, _, layer in entries:
            if key not in saved:
                raise KeyError(f"{path}: checkpoint has no tensor {key!r}; it does not match config.json")
            md = saved[key]
            size = list(md.size)
            if layer >= 0:
                if size[0] != arch.num_layers:
                    raise ValueError(f"{key} stacks {size[0]} layers but config.json has {arch.num_layers}")
                size[0] = 1
            # Buffers take the saved dtype, so nothing is upcast on the way.
            bufs[key] = torch.empty(size, dtype=md.properties.dtype)
            offsets[key] = tuple([max(layer, 0)] + [0] * (len(size) - 1))
        dcp_load(bufs, storage_reader=FileSystemReader(dist_dir), planner=planner_cls(offsets), no_dist=True)
        return {k: (v[0] if layer >= 0 else v) for (k, _, layer), v in zip(entries, bufs.values())}

    stacked = [(k, e) for k, e in key_to_entry.items() if k.startswith("decoder.layers.")]
    groups: list[list[tuple[str, Entry, int]]] = [
        [(k, e, -1)] for k, e in key_to_entry.items() if k == "embedding.word_embeddings.weight"
    ]
    for layer in range(arch.num_layers):
        groups.append([(k, _entry_for_layer(e, layer), layer) for k, e in stacked])
    groups += [[(k, e, -1)] for k, e in key_to_entry.items()
               if k in ("decoder.final_layernorm.weight", "output_layer.weight")]
    for group in groups:
        loaded = read(group)
        for key, entry, _ in group:
            tensors = merge_tp(entry.kind, [loaded[key]], arch, vocab)
            for hf_name, t in zip(entry.hf_names, tensors):
                yield hf_name, (t.to(dtype) if dtype is not None else t).contiguous()
        del loaded


def dist_checkpoint_to_hf(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    hf_config_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, str]:
    """Convert a dist checkpoint to an HF directory (sharded safetensors + index + configs).

    hf_config_dir: take config.json, generation_config.json and tokenizer files from there
    (default: config from meta.json, tokenizer from the model the checkpoint was converted from
    when that path still exists)."""
    from steer_megatron.models.checkpoint import find_latest, read_meta
    from steer_megatron.models.hf_export import hf_dtype, save_hf_checkpoint

    path = find_latest(ckpt)
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint under {os.fspath(ckpt)}")
    meta = read_meta(path)
    arch = parse_hf_config(hf_config_dir) if hf_config_dir else parse_hf_config(meta.hf_config)
    source = hf_config_dir or meta.extra.get("converted_from")
    if source and not os.path.isdir(source):
        source = None
    tensors = iter_dist_checkpoint_hf(path, arch=arch, dtype=dtype or hf_dtype(arch))
    return save_hf_checkpoint(tensors, out_dir, arch, source_dir=source, max_shard_bytes=max_shard_bytes,
                              overwrite=overwrite, progress=progress)


# ---------------------------------------------------------------------------------------------
# The "ranks" method: build the model at TP x PP on real ranks (what training does), then save
# or export. Memory per rank ~ its share of the model. Rank entry points for spawn_ranks.

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _saved_param_dtype(ckpt_dir: str) -> torch.dtype:
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(os.path.join(ckpt_dir, "dist")).read_metadata().state_dict_metadata
    return md["embedding.word_embeddings.weight"].properties.dtype


def _tqdm_progress(total_bytes: int, desc: str) -> tuple[Progress, Callable[[], None]]:
    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)
    return (lambda name, n: bar.update(n)), bar.close


def hf_to_megatron_rank(hf_dir: str, out_root: str, tp: int, pp: int, dtype: str | None, step: int) -> str:
    """Rank worker: load HF slices into a tp x pp model and save it as a dist checkpoint."""
    from steer_megatron.models.checkpoint import save_checkpoint
    from steer_megatron.models.hf_config import build_gpt_model
    from steer_megatron.models.hf_export import hf_dtype
    from steer_megatron.models.hf_import import load_hf_weights
    from steer_megatron.parallel import ParallelLayout, init_parallel

    init_parallel(ParallelLayout(tp=tp, pp=pp))
    arch = parse_hf_config(hf_dir)
    params_dtype = DTYPE_NAMES[dtype] if dtype else hf_dtype(arch)
    model, _ = build_gpt_model(arch, params_dtype=params_dtype)
    load_hf_weights(model, hf_dir)
    extra = {"converted_from": os.path.abspath(hf_dir), "dtype": str(params_dtype)}
    return save_checkpoint(out_root, step, model, extra=extra)


def megatron_to_hf_rank(ckpt: str, out_dir: str, tp: int, pp: int, hf_config_dir: str | None, dtype: str | None,
                        max_shard_bytes: int, overwrite: bool, show_progress: bool) -> None:
    """Rank worker: load a dist checkpoint at tp x pp and export it with iter_hf_weights (the
    path rollout weight sync uses)."""
    import torch.distributed as dist

    from steer_megatron.models.checkpoint import find_latest, load_checkpoint, read_meta
    from steer_megatron.models.hf_config import build_gpt_model
    from steer_megatron.models.hf_export import export_hf_checkpoint, hf_dtype
    from steer_megatron.models.layout import hf_shapes
    from steer_megatron.parallel import ParallelLayout, init_parallel

    init_parallel(ParallelLayout(tp=tp, pp=pp))
    path = find_latest(ckpt)
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt}")
    meta = read_meta(path)
    arch = parse_hf_config(hf_config_dir) if hf_config_dir else parse_hf_config(meta.hf_config)
    model, _ = build_gpt_model(arch, params_dtype=_saved_param_dtype(path), padded_vocab=meta.padded_vocab_size)
    load_checkpoint(path, model, load_rng=False)
    out_dtype = DTYPE_NAMES[dtype] if dtype else hf_dtype(arch)
    progress, close = None, lambda: None
    if show_progress and dist.get_rank() == 0:
        total = sum(math.prod(s) for s in hf_shapes(arch).values()) * out_dtype.itemsize
        progress, close = _tqdm_progress(total, "export")
    source = hf_config_dir or meta.extra.get("converted_from")
    export_hf_checkpoint(model, out_dir, source_dir=source if source and os.path.isdir(source) else None,
                         dtype=out_dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress)
    close()
