"""Algorithm pieces that are not the loss: advantage estimation and dynamic sampling."""
from steer_megatron.algorithms.advantages import (
    DynamicSamplingResult,
    broadcast_to_tokens,
    fill_with_informative_groups,
    grpo_advantages,
    informative_groups,
)

__all__ = [
    "DynamicSamplingResult", "broadcast_to_tokens", "fill_with_informative_groups", "grpo_advantages",
    "informative_groups",
]
