"""The run directory: <trainer.output_dir>/<trainer.run_name>/ and what guards it.

A run name is an identity: a second config with the same name must not write into (or resume
from) the first one's checkpoints. The identity is what the run learns, so the hash leaves out
what legitimately changes between launches of one run: the step budget, the resume mode, where
the rollout servers are, evaluation and logging, and how the model is laid out and fitted into
memory (TP, PP, CP, sequence parallelism, the distributed optimizer and
communication overlap, activation recompute; the number of nodes is not in the
config at all). Extending, requeueing onto other nodes, or scaling a run up resumes it: the
checkpoints reload at any layout and the data order continues from the sampler state they hold.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from steer_megatron.config import RunConfig, config_hash, save_config
from steer_megatron.train.control import ControlPlane

IDENTITY_FILE = "run_identity.sha256"
DONE_FILE = "DONE"


def identity_hash(cfg: RunConfig) -> str:
    neutral = dataclasses.replace(
        cfg,
        trainer=dataclasses.replace(cfg.trainer, total_steps=1, resume="auto", save_every=0, keep_last=1),
        rollout=dataclasses.replace(cfg.rollout, server_urls=[], router_url=None),
        parallel=type(cfg.parallel)(),
        model=dataclasses.replace(cfg.model, recompute="none"),
        eval=type(cfg.eval)(), logging=type(cfg.logging)(),
    )
    return config_hash(neutral)


class RunDir:
    def __init__(self, cfg: RunConfig, control: ControlPlane):
        self.path = Path(cfg.trainer.output_dir).resolve() / cfg.trainer.run_name
        self.checkpoints = self.path / "checkpoints"
        self.hf_export = self.path / "hf"
        self.logs = self.path / "logs"
        error = self._claim(cfg) if control.is_driver else None
        error = control.broadcast(error)
        if error:
            raise RuntimeError(error)

    def _claim(self, cfg: RunConfig) -> str | None:
        ident = identity_hash(cfg)
        marker = self.path / IDENTITY_FILE
        has_ckpts = self.checkpoints.is_dir() and any(self.checkpoints.iterdir())
        if marker.is_file() and has_ckpts:
            theirs = marker.read_text().strip()
            if theirs != ident:
                return (f"{self.path} holds checkpoints of a different run (identity {theirs[:12]} vs this config's "
                        f"{ident[:12]}): choose another trainer.run_name or trainer.output_dir, or delete that directory")
            if cfg.trainer.resume == "none":
                return (f"{self.path} already has checkpoints and trainer.resume=none would overwrite them: "
                        f"use trainer.resume=auto to continue, or another trainer.run_name")
        self.path.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        marker.write_text(ident + "\n")
        (self.path / DONE_FILE).unlink(missing_ok=True)
        save_config(cfg, self.path)
        return None

    def mark_done(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            (self.path / DONE_FILE).write_text("done\n")
