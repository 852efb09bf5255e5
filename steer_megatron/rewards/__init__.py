"""Verifiable rewards: a registry keyed by data source / style, and a time-limited scorer."""
from steer_megatron.rewards.code_reward import CodeRewardSettings, CodeScore, score_code
from steer_megatron.rewards.extract import extract_final_answer
from steer_megatron.rewards.registry import (
    RewardSpec,
    get_reward_fn,
    register_data_source,
    register_reward,
    register_style,
    reward_by_name,
)
from steer_megatron.rewards.sandbox import SandboxSettings, SandboxUnavailable
from steer_megatron.rewards.scorer import RewardScorer, ScoreResult

__all__ = [
    "CodeRewardSettings", "CodeScore", "SandboxSettings", "SandboxUnavailable", "score_code",
    "RewardScorer", "RewardSpec", "ScoreResult", "extract_final_answer", "get_reward_fn",
    "register_data_source", "register_reward", "register_style", "reward_by_name",
]
