"""HuggingFace config.json -> megatron-core TransformerConfig + GPTModel.

Supported: Qwen2/Qwen2.5 (`model_type: qwen2`) and Llama 2/3/3.x (`model_type: llama`).
Every field that changes the math is checked; one megatron-core cannot express raises
`UnsupportedModelError` naming the field, so we never build a silently different model.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch

from steer_megatron.loss.token_stats import padded_vocab_size

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
# Megatron pads the vocabulary to a multiple of this times TP so each TP shard is aligned.
DEFAULT_VOCAB_DIVISIBLE_BY = 128


class UnsupportedModelError(ValueError):
    """The HF config describes something megatron-core (as we build it) cannot reproduce."""


@dataclass(frozen=True)
class VocabInfo:
    """True vs padded vocabulary. Rows [size, padded_size) of the embedding/output layer are
    padding: they are zero on import, dropped on export, and the loss must mask their logits."""

    size: int
    padded_size: int

    @property
    def num_padding(self) -> int:
        return self.padded_size - self.size


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling megatron-core can express: `linear` (position interpolation) or `llama3`."""

    kind: str  # "none" | "linear" | "llama3"
    factor: float = 1.0


@dataclass(frozen=True)
class HFArch:
    """The architecture fields we read from an HF config.json, validated."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling = field(default_factory=lambda: RopeScaling("none"))
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

    def vocab(self, tp: int, divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY) -> VocabInfo:
        return VocabInfo(self.vocab_size, padded_vocab_size(self.vocab_size, tp, divisible_by))

    def check_layout(self, tp: int, pp: int) -> None:
        """Raise if this model cannot be split tp x pp (naming what must divide what)."""
        if self.num_attention_heads % tp:
            raise ValueError(
                f"tp={tp} does not divide num_attention_heads={self.num_attention_heads}; choose a tp that divides it"
            )
        if self.num_kv_heads % tp:
            raise ValueError(
                f"tp={tp} does not divide num_key_value_heads={self.num_kv_heads}; choose a tp that divides it"
            )
        if self.ffn_hidden_size % tp:
            raise ValueError(f"tp={tp} does not divide intermediate_size={self.ffn_hidden_size}")
        if self.num_layers % pp:
            raise ValueError(f"pp={pp} does not divide num_hidden_layers={self.num_layers}; choose a pp that divides it")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("raw")
        return d


def _rope(cfg: Mapping[str, Any], model_type: str) -> tuple[float, RopeScaling]:
    # transformers 5 nests theta and scaling in `rope_parameters`; 4.x has rope_theta + rope_scaling.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind == "default":
        return float(theta), RopeScaling("none")
    factor = float(merged.get("factor", 1.0))
    if kind == "linear":
        return float(theta), RopeScaling("linear", factor)
    if kind == "llama3":
        # megatron-core's llama3 scaling hard-codes these three; any other value would be wrong.
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for name, want in fixed.items():
            got = merged.get(name, want)
            if float(got) != float(want):
                raise UnsupportedModelError(
                    f"rope_scaling.{name}={got} is not supported: megatron-core's llama3 RoPE scaling fixes it to {want}"
                )
        return float(theta), RopeScaling("llama3", factor)
    raise UnsupportedModelError(
        f"rope_scaling type {kind!r} ({model_type}) is not supported; supported: default, linear, llama3. "
        "Remove rope_scaling from config.json to train at the original context length."
    )


def parse_hf_config(cfg: Mapping[str, Any] | str | os.PathLike) -> HFArch:
    """Validate an HF config (a dict, a config.json path, or a model directory) into HFArch."""
    if not isinstance(cfg, Mapping):
        path = os.fspath(cfg)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            cfg = json.load(f)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = cfg.get("architectures")
        raise UnsupportedModelError(
            f"model_type={model_type!r} (architectures={archs}) is not supported; supported: {SUPPORTED_MODEL_TYPES}"
        )

    def need(name: str) -> Any:
        if name not in cfg or cfg[name] is None:
            raise UnsupportedModelError(f"config.json has no {name!r}, which a {model_type} model requires")
        return cfg[name]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise UnsupportedModelError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act={act!r} is not supported; only 'silu' (SwiGLU) is")
    if model_type == "qwen2":
        qkv_bias = True  # Qwen2 always has q/k/v bias and no o_proj bias.
        if cfg.get("use_sliding_window"):
            raise UnsupportedModelError("use_sliding_window=true is not supported; set it to false in config.json")
        if cfg.get("layer_types") and any(t != "full_attention" for t in cfg["layer_types"]):
            raise UnsupportedModelError(f"layer_types={cfg['layer_types']} is not supported; only full_attention")
    else:
        if cfg.get("attention_bias"):
            # Llama's attention_bias also adds an o_proj bias; megatron has no q/k/v-and-o-only switch.
            raise UnsupportedModelError("attention_bias=true (Llama) is not supported: megatron-core cannot add o_proj bias alone")
        if cfg.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=true is not supported; megatron would add bias to every linear layer")
        qkv_bias = False
        if cfg.get("pretraining_tp", 1) not in (1, None):
            raise UnsupportedModelError(f"pretraining_tp={cfg['pretraining_tp']} is not supported; set it to 1")
    theta, scaling = _rope(cfg, model_type)
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return HFArch(
        model_type=model_type,
        hidden_size=hidden,
        num_layers=int(need("num_hidden_layers")),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=int(need("intermediate_size")),
        vocab_size=int(need("vocab_size")),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype=str(dtype).replace("torch.", ""),
        raw=dict(cfg),
    )


def te_available() -> bool:
    """Transformer Engine importable AND a GPU present (TE layers do not run on a CPU)."""
    try:
        import transformer_engine  # noqa: F401

        return torch.cuda.is_available()
    except Exception:  # ImportError, or a broken TE build
        return False


def transformer_config(
    arch: HFArch,
    *,
    tp: int = 1,
    pp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    **overrides: Any,
):
    """Megatron TransformerConfig equivalent to `arch` (dropout off, unfused CPU-safe paths)."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    arch.check_layout(tp, pp)
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,  # dtype of activations sent between stages
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(use_te: bool | None = None):
    """Transformer Engine layer spec when TE is usable (GPU + importable), the local spec otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te is None:
        use_te = te_available()
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec()
    return specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def build_gpt_model(
    arch: HFArch,
    *,
    tp: int | None = None,
    pp: int | None = None,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY,
    padded_vocab: int | None = None,
    seed: int | None = None,
    **config_overrides: Any,
):
    """Build this rank's GPTModel chunk for `arch`; parallel state must be initialised.

    Returns (model, vocab). tp/pp default to the initialised parallel state; passing them
    checks they agree. The model's vocabulary is padded as Megatron does (vocab.padded_size);
    padded_vocab forces a size instead (to load a checkpoint saved at another TP size).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is not initialised; call steer_megatron.parallel.init_parallel first")
    real_tp = ps.get_tensor_model_parallel_world_size()
    real_pp = ps.get_pipeline_model_parallel_world_size()
    if (tp is not None and tp != real_tp) or (pp is not None and pp != real_pp):
        raise ValueError(f"requested tp={tp}, pp={pp} but parallel state has tp={real_tp}, pp={real_pp}")
    # context parallelism: megatron-core's attention and RoPE split the sequence over the CP group
    # (TE's attention only; the local spec refuses it)
    config_overrides.setdefault("context_parallel_size", ps.get_context_parallel_world_size())
    config = transformer_config(arch, tp=real_tp, pp=real_pp, params_dtype=params_dtype, **config_overrides)
    vocab = arch.vocab(real_tp, vocab_divisible_by)
    if padded_vocab:
        if padded_vocab < arch.vocab_size or padded_vocab % real_tp:
            raise ValueError(
                f"padded_vocab={padded_vocab} must be >= vocab_size={arch.vocab_size} and divisible by tp={real_tp}: "
                f"choose a tp that divides it (a checkpoint keeps the padding it was saved with), or pad to "
                f"{padded_vocab_size(arch.vocab_size, real_tp, vocab_divisible_by)} (padded_vocab_size(vocab, tp))"
            )
        vocab = VocabInfo(arch.vocab_size, padded_vocab)
    if seed is not None:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    rope_kwargs: dict[str, Any] = {}
    if arch.rope_scaling.kind == "llama3":
        rope_kwargs = dict(rope_scaling=True, rope_scaling_factor=arch.rope_scaling.factor)
    elif arch.rope_scaling.kind == "linear":
        rope_kwargs = dict(seq_len_interpolation_factor=arch.rope_scaling.factor)
    spec = layer_spec(use_te)
    if config.sequence_parallel:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm
        from megatron.core.transformer.transformer_block import get_num_layers_to_build

        if spec.submodules.input_layernorm is WrappedTorchNorm:  # local spec without apex: see models/norms.py
            from steer_megatron.models.norms import with_sequence_parallel_norms

            spec = with_sequence_parallel_norms(spec, get_num_layers_to_build(config))
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab.padded_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        **rope_kwargs,
    )
    model.hf_arch = arch  # exporters and checkpoints read it back from the model
    model.vocab_info = vocab
    return model, vocab
