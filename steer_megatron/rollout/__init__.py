"""Rollouts from a fleet of SGLang servers (or the CPU engine) behind sglang-router."""

from steer_megatron.rollout.client import MalformedResponse, RolloutClient, RolloutError
from steer_megatron.rollout.fleet import Fleet, FleetConfig, server_command
from steer_megatron.rollout.router import RouterConfig, router_command
from steer_megatron.rollout.types import RolloutConfig, RolloutResult, Sample, SamplingConfig

__all__ = [
    "Fleet", "FleetConfig", "MalformedResponse", "RolloutClient", "RolloutConfig", "RolloutError",
    "RolloutResult", "RouterConfig", "Sample", "SamplingConfig", "router_command", "server_command",
]
