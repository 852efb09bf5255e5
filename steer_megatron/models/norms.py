"""A PyTorch norm for megatron-core's local layer spec under sequence parallelism.

megatron-core's `WrappedTorchNorm` (the local spec's norm when neither Transformer Engine nor apex
is installed) refuses `sequence_parallel`: under it each TP rank normalises only its slice of the
sequence, so the norm weight's gradient is a partial sum that must be all-reduced over TP, and
that wrapper does not mark the weight for it. This one builds the same torch norm and sets the
`sequence_parallel` attribute that megatron's `finalize_model_grads` reads to do that all-reduce
(as its apex and TE norms do). It is handed to megatron through its layer-spec API; megatron's
own code is unchanged.
"""
from __future__ import annotations

import dataclasses

import torch


class SequenceParallelTorchNorm:
    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError("SequenceParallelTorchNorm supports neither zero-centred gamma nor memory-efficient norms")
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}.get(config.normalization)
        if norm_cls is None:
            raise ValueError(f"normalization={config.normalization!r}: LayerNorm or RMSNorm only")
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def with_sequence_parallel_norms(layer_spec, num_layers: int):
    """The local layer spec with every WrappedTorchNorm replaced, as a block spec whose final norm
    is replaced too (megatron picks the block's final norm itself when given a layer spec)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    def swap(node):
        if node is WrappedTorchNorm:
            return SequenceParallelTorchNorm
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            return dataclasses.replace(node, **{f.name: swap(getattr(node, f.name)) for f in dataclasses.fields(node)})
        return node

    return TransformerBlockSubmodules(layer_specs=[swap(layer_spec)] * num_layers, layer_norm=SequenceParallelTorchNorm)
