"""Metrics logger (JSONL, TensorBoard, resume) and tools/plot_run.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from steer_megatron.tracking import JSONL_NAME, MetricsLogger, read_metrics, step_summary
from steer_megatron.tracking import names

ROOT = Path(__file__).resolve().parent.parent


def test_jsonl_one_line_per_step_and_resume_drops_later_steps(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for s in range(1, 6):
            log.log(s, {"loss": 1.0 / s, "nan": float("nan")})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[1]["loss"] == 0.5 and rows[1]["nan"] is None  # NaN is stored as null
    # a crash mid-write leaves a torn line; resume from the step-3 checkpoint
    with (tmp_path / JSONL_NAME).open("a") as f:
        f.write('{"step": 6, "lo')
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=3) as log:
        log.log(4, {"loss": 9.0})
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 9.0)]
    # a fresh run replaces the record
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss": 2.0})
    assert [r["loss"] for r in read_metrics(tmp_path)] == [2.0]


def test_tensorboard_scalars_are_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, jsonl=False) as log:
        log.log(1, {"train/accuracy": 0.25, "note": "text is skipped"})
        log.log(2, {"train/accuracy": 0.5})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/accuracy")] == [(1, 0.25), (2, 0.5)]
    assert not (tmp_path / JSONL_NAME).exists()


def test_wandb_requested_but_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(RuntimeError, match="logging.wandb_project is set but wandb is not installed"):
        MetricsLogger(tmp_path, tensorboard=False, wandb_project="p")


def test_step_summary_lists_headline_and_eval_metrics():
    metrics = {names.ACCURACY: 0.5, names.ENTROPY: 0.123456, "eval/aime/mean@32": 0.1, "other": 3}
    console = Console(record=True, width=100)
    console.print(step_summary(7, metrics))
    text = console.export_text()
    assert "step 7" in text and "0.1235" in text and "eval/aime/mean@32" in text and "other" not in text


def _write_run(d: Path, entropy0: float) -> None:
    d.mkdir(parents=True)
    with (d / JSONL_NAME).open("w") as f:
        for s in range(1, 21):
            f.write(json.dumps({"step": s, names.ENTROPY: entropy0 / s, names.ACCURACY: s / 20,
                                names.RESPONSE_LENGTH: 10 + s}) + "\n")


def test_plot_run_draws_two_runs(tmp_path):
    _write_run(tmp_path / "grpo", 1.0)
    _write_run(tmp_path / "steer", 2.0)
    out = tmp_path / "curves.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plot_run.py"), str(tmp_path / "grpo"), str(tmp_path / "steer"),
         "--out", str(out)], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # reward was not logged, so three panels are drawn
    assert "actor/entropy, train/accuracy, rollout/response_length_mean for 2 run(s)" in proc.stdout
    import matplotlib.image as mpimg

    img = mpimg.imread(out)
    assert img.shape[1] > 3 * img.shape[0]  # three panels side by side
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_plot_run_without_metrics_fails_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_run.py"), str(tmp_path / "empty"),
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "metrics.jsonl does not exist" in proc.stderr
