"""Start N local ranks (gloo on CPU, NCCL on GPU) and collect each rank's return value.

Used by the tests and by tools that launch their own ranks (converters). Functions passed in
must be importable (module level): ranks are new processes (forked from a fork server, or
spawned), never forks of the caller.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(n: int, tries: int = 50) -> int:
    """A base port with n consecutive free ports on 127.0.0.1 (workers, router, metrics)."""
    for _ in range(tries):
        base = free_port()
        if base + n >= 65000:
            continue
        socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} consecutive free ports found in {tries} tries")


def _rank_main(rank: int, world: int, port: int, env: dict, fn: Callable, args: tuple, kwargs: dict, queue) -> None:
    # the caller's environment now, not the fork server's from when it started
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    # Two ranks per core here: more threads per rank only thrash.
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        result = fn(*args, **kwargs)
        # Serialised to bytes: torch's queue pickler would share tensors through file descriptors
        # that vanish when this process exits before the parent reads them.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - forwarded to the parent with the traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                from megatron.core import parallel_state as ps

                ps.destroy_model_parallel()
            except Exception:
                pass
            dist.destroy_process_group()


# Imported once by the fork server; each rank forked from it starts without re-importing them
# (torch + megatron-core take several seconds of CPU per process: the bulk of a small test's time).
_PRELOAD = ["torch", "torch.distributed", "megatron.core", "transformers"]


def _context():
    """A CPU build of torch: ranks fork from a server that imported _PRELOAD (a clean process
    started for the purpose, not the caller). A CUDA / ROCm build: fresh spawned processes, as
    a driver initialised before a fork is not usable after it."""
    import torch

    if torch.version.cuda or getattr(torch.version, "hip", None):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def spawn_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 600.0, **kwargs: Any) -> list[Any]:
    """Run fn(*args, **kwargs) on world_size fresh processes; return results ordered by rank.

    Raises RuntimeError with the failing rank's traceback if any rank fails or times out.
    """
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, dict(os.environ), fn, args, kwargs, queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        import queue as queue_mod

        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except queue_mod.Empty:
                errors.append(f"timed out after {timeout:.0f} s waiting for ranks")
                break
            if status == "ok":
                import torch

                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.terminate()
                p.join(5)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
