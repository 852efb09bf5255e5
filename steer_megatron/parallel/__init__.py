"""Process groups and rank launching (megatron-core's parallel_state underneath)."""

from steer_megatron.parallel.launch import free_port, spawn_ranks
from steer_megatron.parallel.state import ParallelLayout, destroy_parallel, init_parallel

__all__ = ["ParallelLayout", "destroy_parallel", "free_port", "init_parallel", "spawn_ranks"]
