"""A stand-in for `python -m steer_megatron.train` that follows the trainer's launch contract,
so the Slurm tests exercise the sbatch mechanics (rendezvous, fleet hand-over, signals,
requeue, resume) in seconds instead of minutes of real training.

    torchrun ... tests/slurm_standin_trainer.py CONFIG [key=value ...]

Contract (what the sbatch scripts rely on): the run dir is <trainer.output_dir>/<trainer.run_name>;
one metrics.jsonl line per step with key "step"; complete checkpoints checkpoints/step_<N>/
plus a checkpoints/latest marker written after them; config.yaml; DONE once
trainer.total_steps is reached. SIGTERM/SIGUSR1: finish the step, checkpoint, exit 0 without
DONE. trainer.resume=auto continues after the latest complete checkpoint. With
rollout.router_url set it waits for the router's /readiness and sends one /generate per step
through it (so a step proves the rollout fleet handed over by the launcher serves).
Metrics lines also carry the Slurm restart count and node name, for the tests' assertions.
Step length: env STANDIN_STEP_SECONDS (default 0.5).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

from steer_megatron.config import load_config, save_config
from steer_megatron.rollout import http
from steer_megatron.rollout.router import RouterAdmin


def _split_router_url(overrides: list[str]) -> tuple[list[str], str | None]:
    """rollout.router_url is consumed here (RunConfig may not have the key yet)."""
    rest, url = [], None
    for ov in overrides:
        if ov.startswith("rollout.router_url="):
            url = ov.split("=", 1)[1].strip('"')
        else:
            rest.append(ov)
    return rest, url


def _save(run_dir: Path, step: int) -> None:
    ckpts = run_dir / "checkpoints"
    tmp, final = ckpts / f"step_{step}.tmp", ckpts / f"step_{step}"
    if not final.is_dir():  # already saved by save_every when the run stops on that step
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        tmp.rename(final)  # complete or absent: never a half-written step_<N>
    (ckpts / "latest.tmp").write_text(final.name)
    os.replace(ckpts / "latest.tmp", ckpts / "latest")


def _resume_step(run_dir: Path, resume: str) -> int:
    latest = run_dir / "checkpoints" / "latest"
    if resume == "none" or not latest.is_file():
        return 0
    return json.loads((run_dir / "checkpoints" / latest.read_text().strip() / "state.json").read_text())["step"]


def main(argv: list[str]) -> int:
    overrides, router_url = _split_router_url(argv[1:])
    cfg = load_config(argv[0], overrides)
    stop = {"sig": None}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda s, _f: stop.update(sig=signal.Signals(s).name))
    dist.init_process_group("gloo")  # the torchrun rendezvous the launcher set up
    rank = dist.get_rank()
    run_dir = Path(cfg.trainer.output_dir) / cfg.trainer.run_name
    start = _resume_step(run_dir, cfg.trainer.resume)
    if rank == 0:
        save_config(cfg, run_dir)
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():  # steps after the checkpoint are redone: drop their old lines
            kept = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["step"] <= start]
            metrics.write_text("".join(ln + "\n" for ln in kept))
    if router_url:
        RouterAdmin(router_url).wait_ready(timeout_s=120)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    node = os.environ.get("SLURMD_NODENAME")  # which Slurm node ran the trainer
    print(f"stand-in trainer rank {rank}/{dist.get_world_size()}: steps {start + 1}..{cfg.trainer.total_steps}, "
          f"router {router_url}", flush=True)
    step = start
    while step < cfg.trainer.total_steps and stop["sig"] is None:
        step += 1
        tokens = 0
        if router_url:
            out = http.call("POST", f"{router_url}/generate", {
                "input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2, "temperature": 1.0}}, timeout=60)
            tokens = len(out["output_ids"])
        time.sleep(float(os.environ.get("STANDIN_STEP_SECONDS", "0.5")))
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "restart": restart, "node": node, "tokens": tokens}) + "\n")
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
                _save(run_dir, step)
    if rank == 0:
        _save(run_dir, step)
        if step >= cfg.trainer.total_steps:
            (run_dir / "DONE").write_text(f"{step}\n")
    print(f"stand-in trainer rank {rank}: stopped after step {step} ({stop['sig'] or 'done'})", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
