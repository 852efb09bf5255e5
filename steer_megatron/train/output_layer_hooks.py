"""Forward hooks on megatron's output layer (torch's public hook API on our model instance;
megatron's code is unchanged): the sampling temperature, and the fused LM head's tap of the hidden
states."""
from __future__ import annotations

import torch


class HiddenStatesTap:
    """Forward pre-hook on megatron's output layer (algorithm.fused_lm_head): keeps the final-norm
    hidden states [s, b, H] and the weight the layer would multiply them by (GPTModel passes the
    shared embedding when embeddings are tied, else the layer uses its own), and hands the layer a
    zero-length sequence, so the [s, b, V_local] logits are never computed. Uses torch's public
    hook API on our model instance; megatron's code is unchanged."""

    def __init__(self):
        self.kept: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, module, args, kwargs):
        weight = kwargs.get("weight")
        self.kept = (args[0], module.weight if weight is None else weight)
        return (args[0][:0],) + tuple(args[1:]), kwargs

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, output weight) of the micro-batch that just ran forward."""
        kept, self.kept = self.kept, None
        if kept is None:
            raise RuntimeError("fused_lm_head: the output layer did not run before the loss")
        return kept


def _scale_output_input(module, args, kwargs):
    """Forward pre-hook: the output layer's input times 1 / T, so every path that turns it into
    statistics (logits with the torch or Triton kernels, or the fused LM head) sees logits / T,
    with no extra copy of the logits; the gradient flows through the scaling."""
    return (args[0] * module.steer_inv_temperature,) + tuple(args[1:]), kwargs


def apply_temperature(gpt, temperature: float) -> None:
    """Make gpt's output layer produce logits / temperature (once per model: actors may share it)."""
    layer = gpt.output_layer
    current = getattr(layer, "steer_inv_temperature", None)
    if current is None:
        layer.steer_inv_temperature = 1.0 / temperature
        if temperature != 1.0:  # T = 1 needs no hook
            layer.register_forward_pre_hook(_scale_output_input, with_kwargs=True, prepend=True)
    elif current != 1.0 / temperature:
        raise ValueError(f"the model's output layer already divides by temperature {1 / current}, this actor asks "
                         f"for {temperature}: actors sharing a model must share the temperature")
