"""Process groups and rank launching (megatron-core's parallel_state underneath)."""

from steer_megatron.parallel.launch import free_port, free_port_block, spawn_ranks
from steer_megatron.parallel.state import ParallelLayout, destroy_parallel, init_parallel

__all__ = ["ParallelLayout", "destroy_parallel", "free_port", "free_port_block", "init_parallel", "spawn_ranks"]
