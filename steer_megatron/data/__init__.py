"""RL prompt data: verl-layout parquets -> tokenised, filtered prompts in a resumable order."""
from steer_megatron.data.rl_dataset import (
    LoadReport,
    MalformedRowError,
    PromptExample,
    load_rl_parquets,
)
from steer_megatron.data.sampler import ResumableSampler

__all__ = ["LoadReport", "MalformedRowError", "PromptExample", "ResumableSampler", "load_rl_parquets"]
