"""Initialise torch.distributed and megatron-core's model-parallel groups from one layout."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    """Tensor x pipeline x data parallel sizes; data parallel is derived from the world size."""

    tp: int = 1
    pp: int = 1
    cp: int = 1

    def validate(self, world_size: int) -> int:
        """Return the data-parallel size, or raise naming the field that cannot work."""
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        model = self.tp * self.pp * self.cp
        if world_size % model:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp} = {model}; "
                f"launch a multiple of {model} ranks or change parallel.tp/pp/cp"
            )
        return world_size // model


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_parallel(layout: ParallelLayout = ParallelLayout(), *, backend: str | None = None, seed: int = 1234) -> int:
    """Init the default process group from the env (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and
    megatron's groups. Returns the data-parallel size. On CPU, enables the CPU redirections."""
    from steer_megatron import cpu_compat

    cpu_compat.enable()
    backend = backend or default_backend()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world > 1:
                raise RuntimeError("MASTER_PORT is not set for a multi-rank launch; use torchrun or spawn_ranks")
            from steer_megatron.parallel.launch import free_port

            os.environ["MASTER_PORT"] = str(free_port())
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    dp = layout.validate(dist.get_world_size())
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            context_parallel_size=layout.cp,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return dp


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
