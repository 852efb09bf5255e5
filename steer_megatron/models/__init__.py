"""HF <-> Megatron-Core models: builder, sliced HF import, streaming HF export, dist checkpoints.

Submodules: hf_config (config.json -> TransformerConfig/GPTModel), layout (name and tensor
layout map), hf_import (sliced loading), hf_export (HF-layout iterator, HF writer),
checkpoint (dist_checkpointing save/load), convert (single-process streaming conversion),
st_io (bounded-memory safetensors I/O).
"""

from steer_megatron.models.checkpoint import (
    CheckpointMeta, find_latest, list_checkpoints, load_checkpoint, prune, read_meta, save_checkpoint,
)
from steer_megatron.models.hf_config import (
    HFArch, UnsupportedModelError, VocabInfo, build_gpt_model, padded_vocab_size, parse_hf_config,
    transformer_config,
)
from steer_megatron.models.hf_export import (
    export_hf_checkpoint, iter_hf_buckets, iter_hf_weights, save_hf_checkpoint,
)
from steer_megatron.models.hf_import import CheckpointMismatchError, load_hf_weights

__all__ = [
    "CheckpointMeta", "CheckpointMismatchError", "HFArch", "UnsupportedModelError", "VocabInfo",
    "build_gpt_model", "export_hf_checkpoint", "find_latest", "iter_hf_buckets", "iter_hf_weights",
    "list_checkpoints", "load_checkpoint", "load_hf_weights", "padded_vocab_size", "parse_hf_config",
    "prune", "read_meta", "save_checkpoint", "save_hf_checkpoint", "transformer_config",
]
