#!/usr/bin/env python
"""Plot training curves of one or more runs from their metrics.jsonl into one PNG.

    python tools/plot_run.py runs/demo_grpo runs/demo_steer --out curves.png
    python tools/plot_run.py runs/a --metric actor/entropy --metric eval/test/mean@4

One subplot per metric (default: entropy, accuracy, response length, reward), one line per
run, labelled by the run directory's name. Metrics that no run logged are left out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from steer_megatron.tracking import read_metrics  # noqa: E402
from steer_megatron.tracking.names import DEFAULT_PANELS  # noqa: E402


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(run_dirs: list[str | Path], out: str | Path, panels=DEFAULT_PANELS) -> list[str]:
    """Draw the panels that have data; returns the metric keys drawn. Raises if none has any."""
    runs = {Path(d).name or str(d): read_metrics(d) for d in run_dirs}
    drawn = [(title, key) for title, key in panels if any(series(rows, key)[0] for rows in runs.values())]
    if not drawn:
        raise ValueError(f"none of the metrics {[k for _, k in panels]} appear in {list(map(str, run_dirs))}")
    fig, axes = plt.subplots(1, len(drawn), figsize=(4.5 * len(drawn), 3.6), squeeze=False)
    for ax, (title, key) in zip(axes[0], drawn):
        for name, rows in runs.items():
            x, y = series(rows, key)
            if x:
                ax.plot(x, y, label=name, marker="." if len(x) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [k for _, k in drawn]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    ap.add_argument("--out", required=True, help="PNG path to write")
    ap.add_argument("--metric", action="append", default=None,
                    help="metric key to draw (repeatable); default: entropy, accuracy, response length, reward")
    args = ap.parse_args(argv)
    panels = [(k.split("/")[-1], k) for k in args.metric] if args.metric else DEFAULT_PANELS
    try:
        drawn = plot_runs(args.runs, args.out, panels)
    except (FileNotFoundError, ValueError) as exc:
        print(f"plot_run: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {', '.join(drawn)} for {len(args.runs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
