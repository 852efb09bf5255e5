"""Minimal safetensors reading and writing with bounded memory.

Why not the `safetensors` package here: its reader memory-maps the file, and every page a
slice touches stays in the process's RSS while the file is open; its writer serialises a
whole shard into one bytes object first (twice the shard in memory). Conversion of a model
larger than RAM needs neither, so this module reads byte ranges straight into the target
tensor and writes one tensor at a time. The format is the public safetensors spec: an 8-byte
little-endian header length, a JSON header (dtype, shape, data_offsets per tensor), the data.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# Column slices are read in row blocks of about this many bytes (bounds the temporary).
_BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensor infos, __metadata__) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    infos = {}
    for name, h in header.items():
        if h["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {h['dtype']}")
        b, e = h["data_offsets"]
        infos[name] = TensorInfo(_DTYPES[h["dtype"]], tuple(h["shape"]), 8 + n + b, e - b)
    return infos, meta


def _readinto(f, t: torch.Tensor, offset: int) -> None:
    view = memoryview(t.view(-1).view(torch.uint8).numpy())
    f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise EOFError(f"{f.name}: file ends inside a tensor (truncated download?)")
        got += n


def read_rows(path: str, info: TensorInfo, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, end) along dim 0, read straight into `out` (allocated if None)."""
    row = info.nbytes // max(info.shape[0], 1) if info.shape else info.nbytes
    shape = (end - start, *info.shape[1:]) if info.shape else ()
    if out is None:
        out = torch.empty(shape, dtype=info.dtype)
    elif tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"out has shape {tuple(out.shape)}, need contiguous {shape}")
    if out.numel():
        with open(path, "rb", buffering=0) as f:
            _readinto(f, out, info.offset + start * row)
    return out


def read_cols(path: str, info: TensorInfo, start: int, end: int) -> torch.Tensor:
    """Columns [start, end) along dim 1 of a 2-D tensor, reading blocks of whole rows."""
    rows, cols = info.shape
    out = torch.empty(rows, end - start, dtype=info.dtype)
    row_bytes = info.nbytes // max(rows, 1)
    step = max(1, _BLOCK_BYTES // max(row_bytes, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        out[r0:r1] = read_rows(path, info, r0, r1)[:, start:end]
    return out


class ShardWriter:
    """Write one safetensors file tensor by tensor: data goes to a body file as it arrives,
    and close() writes header + body. Memory: one tensor (none is kept)."""

    def __init__(self, path: str, metadata: dict[str, str] | None = None):
        self.path = path
        self._body_path = path + ".body"
        self._body = open(self._body_path, "wb")
        self._header: dict[str, dict] = {}
        self._offset = 0
        self._metadata = metadata or {"format": "pt"}

    @property
    def nbytes(self) -> int:
        return self._offset

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        if t.dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        t = t.detach().cpu().contiguous()
        n = t.numel() * t.element_size()
        if n:
            self._body.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + n]}
        self._offset += n

    def close(self) -> None:
        self._body.close()
        header = {"__metadata__": self._metadata, **self._header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
        with open(self.path, "wb") as out, open(self._body_path, "rb") as body:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            while chunk := body.read(_BLOCK_BYTES):
                out.write(chunk)
        os.remove(self._body_path)

    def names(self) -> list[str]:
        return list(self._header)
