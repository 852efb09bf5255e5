"""Load HF safetensors (single file or sharded with an index) straight into a Megatron model.

Each rank reads only the rows/columns it owns via safetensors' `get_slice` (memory-mapped),
so a rank's peak host memory is about its own share of the model plus one tensor slice.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Iterator

import torch

from steer_megatron.models.hf_config import HFArch, VocabInfo, parse_hf_config
from steer_megatron.models.layout import (
    Entry, Kind, hf_shapes, interleave_qkv, is_te_model, plan, qkv_local_ranges, vocab_range,
)
from steer_megatron.models.st_io import TensorInfo, read_cols, read_header, read_rows

log = logging.getLogger(__name__)

# Non-parameter tensors that some HF checkpoints carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointMismatchError(ValueError):
    """The HF checkpoint does not match its config.json (missing/extra tensor, wrong shape)."""


def hf_weight_map(hf_dir: str | os.PathLike) -> dict[str, str]:
    """HF tensor name -> safetensors file path, from the index json or the single file."""
    hf_dir = os.fspath(hf_dir)
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(hf_dir, fname) for name, fname in weight_map.items()}
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(single):
        return {name: single for name in read_header(single)[0]}
    raise FileNotFoundError(
        f"{hf_dir} has neither model.safetensors.index.json nor model.safetensors; "
        "save the HF model with save_pretrained(..., safe_serialization=True)"
    )


class HFReader:
    """Reads whole tensors or row/column ranges of an HF checkpoint without memory-mapping it
    (see st_io: only the requested bytes are read, into the returned tensor)."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.weight_map = hf_weight_map(hf_dir)
        self._infos: dict[str, dict[str, TensorInfo]] = {}

    def __enter__(self) -> "HFReader":
        return self

    def __exit__(self, *exc) -> None:
        self._infos.clear()

    def info(self, name: str) -> TensorInfo:
        path = self.weight_map[name]
        if path not in self._infos:
            self._infos[path] = read_header(path)[0]
        try:
            return self._infos[path][name]
        except KeyError:
            raise CheckpointMismatchError(
                f"the index maps {name} to {os.path.basename(path)}, but that file has no such tensor"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def read(self, name: str, dim: int | None = None, start: int = 0, end: int | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, or rows (dim=0) / columns (dim=1) [start, end) of it."""
        info, path = self.info(name), self.weight_map[name]
        if dim is None:
            return read_rows(path, info, 0, info.shape[0] if info.shape else 0, out)
        end = info.shape[dim] if end is None else end
        if dim == 0:
            return read_rows(path, info, start, end, out)
        if dim == 1 and len(info.shape) == 2:
            return read_cols(path, info, start, end)
        raise ValueError(f"cannot slice {name} {list(info.shape)} along dim {dim}")


def check_hf_tensors(reader: HFReader, arch: HFArch) -> None:
    """Raise CheckpointMismatchError unless the names and shapes match what config.json implies."""
    want = hf_shapes(arch)
    have = {n for n in reader.weight_map if not n.endswith(_IGNORED_SUFFIXES)}
    if arch.tie_word_embeddings and "lm_head.weight" in have:
        # Some exporters store the tied head anyway; it is the embedding, so it is skipped.
        log.warning("tie_word_embeddings=true but the checkpoint has lm_head.weight; ignoring it")
        have.discard("lm_head.weight")
    missing = sorted(set(want) - have)
    extra = sorted(have - set(want))
    if missing or extra:
        raise CheckpointMismatchError(
            f"HF checkpoint does not match config.json ({arch.model_type}, {arch.num_layers} layers, "
            f"tie_word_embeddings={arch.tie_word_embeddings}): missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {extra[:8]}{'...' if len(extra) > 8 else ''}"
        )
    for name, shape in want.items():
        got = reader.shape(name)
        if got != shape:
            raise CheckpointMismatchError(
                f"{name} in {os.path.basename(reader.weight_map[name])} has shape {list(got)} but config.json "
                f"implies {list(shape)}; the config does not belong to these weights"
            )


def _vocab_rows(reader: HFReader, name: str, vocab: VocabInfo, tp: int, rank: int, like: torch.Tensor) -> torch.Tensor:
    start, end = vocab_range(vocab, tp, rank)
    out = torch.empty(like.shape, dtype=reader.info(name).dtype)
    real_end = min(end, vocab.size)
    if real_end > start:
        reader.read(name, 0, start, real_end, out=out[: real_end - start])  # no temporary copy
    out[max(real_end - start, 0):].zero_()  # padding rows are zero
    return out


def local_shard(entry: Entry, reader: HFReader, arch: HFArch, vocab: VocabInfo, tp: int, rank: int,
                like: torch.Tensor) -> torch.Tensor:
    """This TP rank's slice of one Megatron parameter, read from HF (only the owned rows/cols)."""
    names = entry.hf_names
    if entry.kind is Kind.REPLICATED:
        return reader.read(names[0])
    if entry.kind is Kind.VOCAB:
        return _vocab_rows(reader, names[0], vocab, tp, rank, like)
    if entry.kind is Kind.ROW:
        cols = reader.shape(names[0])[1] // tp
        return reader.read(names[0], 1, rank * cols, (rank + 1) * cols)
    if entry.kind is Kind.FC1:
        rows = arch.ffn_hidden_size // tp
        gate = reader.read(names[0], 0, rank * rows, (rank + 1) * rows)
        up = reader.read(names[1], 0, rank * rows, (rank + 1) * rows)
        return torch.cat([gate, up], dim=0)
    if entry.kind is Kind.QKV:
        (q0, q1), (k0, k1) = qkv_local_ranges(arch, tp, rank)
        q = reader.read(names[0], 0, q0, q1)
        k = reader.read(names[1], 0, k0, k1)
        v = reader.read(names[2], 0, k0, k1)
        return interleave_qkv(q, k, v, arch)
    raise AssertionError(entry.kind)


def unwrap(model) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (a list must hold exactly one chunk)."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise NotImplementedError("virtual pipeline (several model chunks per rank) is not supported")
        model = model[0]
    while hasattr(model, "module"):
        model = model.module
    return model


def stage_entries(model: torch.nn.Module, arch: HFArch) -> Iterator[tuple[Entry, torch.nn.Parameter]]:
    """(Entry, parameter) for every parameter of this rank's stage; raises if any is unmapped."""
    from megatron.core import parallel_state as ps

    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    params = dict(model.named_parameters())
    mine = {e.mcore_name: e for e in plan(arch, pp, is_te_model(model)) if e.stage == stage}
    unmapped = sorted(set(params) - set(mine))
    absent = sorted(set(mine) - set(params))
    if unmapped or absent:
        raise CheckpointMismatchError(
            f"model parameters do not match the HF layout map: unmapped {unmapped[:6]}, absent {absent[:6]}"
        )
    for name, entry in mine.items():
        yield entry, params[name]


@torch.no_grad()
def load_hf_weights(model, hf_dir: str | os.PathLike, arch: HFArch | None = None, *, check: bool = True) -> None:
    """Copy HF weights into this rank's model chunk; every rank of the model calls this.

    Reads only this rank's TP/PP slices. Raises CheckpointMismatchError on a missing or extra
    tensor, or a shape that disagrees with config.json.
    """
    from megatron.core import parallel_state as ps

    model = unwrap(model)
    arch = arch or getattr(model, "hf_arch", None) or parse_hf_config(hf_dir)
    vocab = getattr(model, "vocab_info", None) or arch.vocab(ps.get_tensor_model_parallel_world_size())
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with HFReader(hf_dir) as reader:
        if check:
            check_hf_tensors(reader, arch)
        for entry, param in stage_entries(model, arch):
            shard = local_shard(entry, reader, arch, vocab, tp, rank, param)
            if shard.shape != param.shape:
                raise CheckpointMismatchError(
                    f"{entry.mcore_name}: HF slice shape {list(shard.shape)} != Megatron shard {list(param.shape)}"
                )
            param.copy_(shard)
            del shard
