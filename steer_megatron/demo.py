"""`make demo`: the embedded CPU default, end to end.

Builds (or reuses) the tiny Qwen2 model with its own tokenizer and the synthetic digit-sorting
task, warmed up so that accuracy starts between zero and the ceiling; then trains GRPO and
STEER from the same seed through the real path (megatron-core trainer, CPU SGLang-protocol
servers behind sglang-router, math rewards, weight sync with parity checks, checkpoints);
exports HF checkpoints and draws the comparison plot.

    python -m steer_megatron.demo [key=value ...]   # overrides apply to both runs
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from steer_megatron.config import load_config
from steer_megatron.tracking import read_metrics
from steer_megatron.tracking.names import ACCURACY, ENTROPY, RESPONSE_LENGTH

RUNS = (("grpo", "grpo"), ("steer", "steer"))


def _eval_keys(row: dict) -> list[str]:
    return sorted(k for k in row if k.startswith("eval/") and "/mean@" in k)


def _eval_accuracy(rows: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r[keys[0]]) for r in rows if (keys := _eval_keys(r))]


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    console = Console(width=max(Console().width, 150))  # the summary table must not be truncated
    cfg = load_config(None, overrides)
    root = Path(cfg.trainer.output_dir)
    console.rule("[bold]steer-megatron CPU demo[/]: GRPO vs STEER on synthetic digit sorting")
    run_dirs = []
    for name, loss in RUNS:
        run_name = f"demo_{name}"
        console.print(f"\n[bold]{run_name}[/]: policy loss {loss!r}, {cfg.trainer.total_steps} steps")
        cmd = [sys.executable, "-m", "steer_megatron.train", *overrides,
               f"algorithm.policy_loss={loss}", f"trainer.run_name={run_name}"]
        if subprocess.call(cmd) != 0:
            console.print(f"[red]{run_name} failed; its logs are in {root / run_name / 'logs'}[/]")
            return 1
        run_dirs.append(root / run_name)
    png = root / "demo_comparison.png"
    # held-out accuracy next to the training curves (train reward = train accuracy here: 0/1 rewards)
    eval_key = next((keys[0] for r in read_metrics(run_dirs[0]) if (keys := _eval_keys(r))), None)
    metrics = [ENTROPY, ACCURACY, *([eval_key] if eval_key else []), RESPONSE_LENGTH]
    subprocess.check_call([sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "plot_run.py"),
                           *map(str, run_dirs), "--out", str(png), *(a for m in metrics for a in ("--metric", m))])
    table = Table("run", "eval accuracy first -> last", "train accuracy first -> last", "entropy first -> last",
                  "response length last", "HF export")
    for d in run_dirs:
        rows = read_metrics(d)
        ev = _eval_accuracy(rows)
        train = [r for r in rows if ACCURACY in r]
        fmt = lambda a, b: f"{a:.3f} -> {b:.3f}"  # noqa: E731
        table.add_row(d.name, fmt(ev[0][1], ev[-1][1]) if ev else "-",
                      fmt(train[0][ACCURACY], train[-1][ACCURACY]) if train else "-",
                      fmt(train[0][ENTROPY], train[-1][ENTROPY]) if train else "-",
                      f"{train[-1][RESPONSE_LENGTH]:.1f}" if train else "-", str(d / "hf"))
    console.print(table)
    console.print(f"comparison plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
