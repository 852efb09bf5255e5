"""The STEER loss on vocab-parallel logits: token statistics, Omega/weights, policy losses."""

from steer_megatron.loss.aggregation import AGG_MODES, aggregate
from steer_megatron.loss.policy_losses import (
    PolicyLossConfig,
    PolicyLossInputs,
    get_policy_loss,
    kl_penalty,
    policy_loss_names,
    register_policy_loss,
)
from steer_megatron.loss.steer import (
    SteerConfig, old_policy_omega_range, omega, omega_range, steer_weights, weights_from_omega,
)
from steer_megatron.loss.kernels.fused_lm_head import fused_linear_token_loss, fused_linear_token_stats
from steer_megatron.loss.token_stats import TokenStats, check_vocab_shard, padded_vocab_size, token_stats

__all__ = [
    "AGG_MODES", "PolicyLossConfig", "PolicyLossInputs", "SteerConfig", "TokenStats", "aggregate",
    "check_vocab_shard", "fused_linear_token_loss", "fused_linear_token_stats", "get_policy_loss", "kl_penalty",
    "old_policy_omega_range", "omega", "omega_range", "padded_vocab_size", "policy_loss_names",
    "register_policy_loss", "steer_weights", "token_stats", "weights_from_omega",
]
