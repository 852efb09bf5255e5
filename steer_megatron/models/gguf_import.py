"""A GGUF file -> a plain HuggingFace model directory (float32 safetensors, config, tokenizer,
chat template), written atomically and cached by the GGUF's content hash.

transformers reads GGUF (model and tokenizer, dequantised to float) when the `gguf` and
`accelerate` packages are installed (`pip install 'steer-megatron[gguf]'`), but refuses to
`save_pretrained` a model loaded that way; its state dict is copied into a plain model class
built from the same config, which saves normally. The GGUF's architecture and chat template
are checked before the (slow) dequantising load, so bad input fails in a second.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from steer_megatron.models.hf_config import SUPPORTED_MODEL_TYPES

GGUF_EXTRA_HINT = "install the optional extra: pip install 'steer-megatron[gguf]' (gguf + accelerate)"
MARKER = "prepared.json"  # written last: a directory without it is incomplete


class GGUFImportError(ValueError):
    """The GGUF cannot be turned into a model this project trains (the message names the fix)."""


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    chat_template: str | None
    name: str | None


def require_gguf_extra() -> None:
    """Raise ImportError naming the extra when gguf or accelerate is missing."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"reading a GGUF file needs {' and '.join(missing)}: {GGUF_EXTRA_HINT}")


def read_gguf_info(path: str | os.PathLike) -> GGUFInfo:
    """Architecture, chat template and name from the GGUF header (memory-mapped, no weights read)."""
    require_gguf_extra()
    import gguf

    reader = gguf.GGUFReader(os.fspath(path))

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    if not isinstance(arch, str):
        raise GGUFImportError(f"{path}: no general.architecture in the GGUF header; is this a GGUF model file?")
    return GGUFInfo(arch, field("tokenizer.chat_template"), field("general.name"))


def check_gguf(info: GGUFInfo, path: str | os.PathLike, chat_template: str | None, allow_no_chat_template: bool) -> None:
    if info.architecture not in SUPPORTED_MODEL_TYPES:
        raise GGUFImportError(
            f"{path}: GGUF architecture {info.architecture!r} is not supported by the HF <-> Megatron converter "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}); convert a {' or '.join(SUPPORTED_MODEL_TYPES)} model instead"
        )
    if not info.chat_template and chat_template is None and not allow_no_chat_template:
        raise GGUFImportError(
            f"{path}: the GGUF has no tokenizer.chat_template. Pass --chat-template FILE (a Jinja chat template), "
            "or --allow-no-chat-template and train with data.apply_chat_template=false (plain-text prompts)"
        )


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def cached(out_dir: str | os.PathLike, gguf_path: Path, force_hash: bool = False) -> str | None:
    """The GGUF's sha256 when out_dir was prepared from these bytes, else None. The hash is
    recomputed only when the file's size or mtime changed since (or with force_hash)."""
    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not force_hash and meta.get("gguf_stamp") == _stamp(gguf_path):
        return meta.get("gguf_sha256")
    sha = file_sha256(gguf_path)
    if meta.get("gguf_sha256") != sha:
        return None
    meta["gguf_stamp"] = _stamp(gguf_path)  # same bytes, new mtime (a reinstall): skip the hash next time
    marker.write_text(json.dumps(meta, indent=2))
    return sha


def gguf_to_hf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    chat_template: str | None = None,
    allow_no_chat_template: bool = False,
    force: bool = False,
) -> Path:
    """Write out_dir as a float32 HF model from gguf_path; reuse it when already prepared from
    the same GGUF bytes. chat_template: Jinja text that replaces (or supplies) the GGUF's."""
    gguf_path, out = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    info = read_gguf_info(gguf_path)
    check_gguf(info, gguf_path, chat_template, allow_no_chat_template)
    if not force and cached(out, gguf_path):
        return out
    sha = file_sha256(gguf_path)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from steer_megatron.models.hf_config import parse_hf_config

    t0 = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if chat_template is not None:
        tok.chat_template = chat_template
    gmodel = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg_dict = gmodel.config.to_dict()
    cfg_dict.pop("quantization_config", None)  # the saved weights are plain float32
    cfg_dict["dtype"] = "float32"
    config = AutoConfig.for_model(**cfg_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gmodel.state_dict(), strict=True)
    plain.generation_config = gmodel.generation_config
    del gmodel

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    parse_hf_config(tmp)  # the converter accepts what we wrote (fails here, naming the field, if not)
    (tmp / MARKER).write_text(json.dumps({
        "gguf": str(gguf_path.resolve()), "gguf_sha256": sha, "gguf_stamp": _stamp(gguf_path), "architecture": info.architecture,
        "gguf_name": info.name, "chat_template": "given" if chat_template is not None else
        ("gguf" if info.chat_template else "none"), "seconds": round(time.perf_counter() - t0, 1),
    }, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
