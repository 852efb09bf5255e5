"""One place a step's metrics go: metrics.jsonl, TensorBoard, and wandb when configured.

The JSONL file is the source of truth (plots and resume read it): one line per step,
flushed as written. On resume from step S, lines with step > S (written after the
checkpoint the run restarts from) are dropped so every step appears once.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

JSONL_NAME = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of run_dir/metrics.jsonl; a torn last line (crash mid-write) is ignored."""
    path = Path(run_dir) / JSONL_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):  # torch / numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf; null keeps the line parseable everywhere
    return v


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        *,
        jsonl: bool = True,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        wandb_entity: str | None = None,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
    ):
        """resume_step=None starts a new record (an existing metrics.jsonl is replaced);
        resume_step=S keeps the lines with step <= S and appends after them."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = None
        if jsonl:
            path = self.run_dir / JSONL_NAME
            kept = []
            if resume_step is not None and path.is_file():
                kept = [r for r in read_metrics(self.run_dir) if r.get("step", math.inf) <= resume_step]
            with path.open("w") as f:
                for r in kept:
                    f.write(json.dumps(r) + "\n")
            self._jsonl = path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a crashed run wrote after the checkpoint we resume from
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError(
                    "logging.wandb_project is set but wandb is not installed: pip install wandb "
                    "(or set logging.wandb_project=null)"
                ) from exc
            self._wandb = wandb.init(
                project=wandb_project, entity=wandb_entity, name=run_name, config=dict(config or {}),
                dir=str(self.run_dir), resume="allow" if resume_step is not None else None,
            )

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
            self._jsonl.flush()
        numeric = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
