"""The weight-update process group shared by the trainer's rank 0 and the rollout servers.

SGLang's receiver builds it with `init_custom_process_group(backend, init_method=
"tcp://{master_address}:{master_port}", world_size, rank, group_name)`: a TCPStore hosted
by rank 0 (the trainer), prefixed with "{group_name}/", outside the default group. We
build the same thing from public torch APIs, so our trainer can talk to real SGLang
(backend "nccl") and to the CPU server (backend "gloo") with one code path.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def new_weight_update_group(master_address: str, master_port: int, rank: int, world_size: int,
                            group_name: str, backend: str = "nccl", timeout_s: float = 300.0):
    """A standalone process group (not registered as the default one); rank 0 hosts the store."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, master_port, world_size, is_master=(rank == 0), timeout=timeout)
    prefixed = dist.PrefixStore(f"{group_name}/", store)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    elif backend == "nccl":
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size)
    else:
        raise ValueError(f"weight update backend must be 'nccl' or 'gloo', got {backend!r}")
    return pg, store  # keep the store alive as long as the group


def broadcast(pg, tensor: torch.Tensor, src: int = 0):
    """Async broadcast on a standalone group; returns the work handle."""
    opts = dist.BroadcastOptions()
    opts.rootRank = src
    opts.rootTensor = 0
    return pg.broadcast([tensor], opts)
