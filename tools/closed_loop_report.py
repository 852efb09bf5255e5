#!/usr/bin/env python
"""Summarise and plot the entropy closed loop from runs' metrics.jsonl (docs/entropy_diagnostics.md).

    python tools/closed_loop_report.py /tmp/cl/ol /tmp/cl/cl --band=-0.011,-0.005 --out docs/img/closed_loop.png

Runs need `diag/step_dH` (diagnostics.step_change=true or the closed loop on). For each run it
prints the steps whose dH lies in the band (all steps, and from step `--settle` + 1 on), mean and
sd of dH, the entropy at the last step, the mean reward over the last 5 steps, the eval scores,
the w_min / LR-scale path and, with closed_loop.trims, each step's change before the trim and
the fraction of the step kept; `--json` writes the same numbers. The band is given here, not read
from the runs, so an open-loop run is counted against the same band as a closed-loop one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)

from steer_megatron.tracking import read_metrics  # noqa: E402


def summarise(rows: list[dict], band: tuple[float, float], settle: int) -> dict:
    lo, hi = band
    steps = [r for r in rows if "diag/step_dH" in r]
    if not steps:
        raise ValueError("no diag/step_dH in this run: train with diagnostics.step_change=true")
    dh = [r["diag/step_dH"] for r in steps]
    late = [r["diag/step_dH"] for r in steps if r["step"] > settle]
    inside = lambda xs: sum(lo <= x <= hi for x in xs)  # noqa: E731
    evals = {r["step"]: r["eval/test/mean@4"] for r in rows if "eval/test/mean@4" in r}
    rewards = [r["train/reward_mean"] for r in steps if "train/reward_mean" in r]
    return {
        "steps": len(dh), "in_band": inside(dh), f"in_band_after_{settle}": inside(late), f"steps_after_{settle}": len(late),
        "mean_dH": statistics.fmean(dh), "sd_dH": statistics.stdev(dh) if len(dh) > 1 else 0.0,
        f"mean_dH_after_{settle}": statistics.fmean(late) if late else None,
        f"sd_dH_after_{settle}": statistics.stdev(late) if len(late) > 1 else None,
        "entropy_last": steps[-1].get("actor/entropy"), "reward_last5": statistics.fmean(rewards[-5:]) if rewards else None,
        "eval_mean@4": evals, "dH": dh,
        "w_min": [r.get("diag/w_min") for r in steps], "lr_scale": [r.get("diag/lr_scale") for r in steps],
        # with closed_loop.trims: each step's change before the trim, and the fraction of the step kept
        "dH_raw": [r.get("diag/step_dH_raw") for r in steps], "step_scale": [r.get("diag/step_scale") for r in steps],
        "raw_in_band": inside([r["diag/step_dH_raw"] for r in steps if "diag/step_dH_raw" in r]),
        "mean_step_scale": statistics.fmean(x) if (x := [r["diag/step_scale"] for r in steps if "diag/step_scale" in r])
        else None,
    }


def plot(runs: dict[str, list[dict]], band: tuple[float, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax.axhspan(*band, color="tab:green", alpha=0.15, label=f"band [{band[0]}, {band[1]}]")
    for name, rows in runs.items():
        pts = [(r["step"], r["diag/step_dH"]) for r in rows if "diag/step_dH" in r]
        (line,) = ax.plot(*zip(*pts), marker="o", ms=3, label=name)
        raw = [(r["step"], r["diag/step_dH_raw"]) for r in rows if r.get("diag/step_scale", 1.0) < 1.0]
        if raw:  # trimmed steps: where the whole step would have gone
            ax.plot(*zip(*raw), "x", ms=4, color=line.get_color(), alpha=0.6, label=f"{name}: before the trim")
        for key, style in (("diag/w_min", "-"), ("diag/lr_scale", "--"), ("diag/step_scale", ":")):
            ctl = [(r["step"], r[key]) for r in rows if key in r]
            if ctl and any(v != 1.0 for _, v in ctl):  # an LR scale that never left 1 is left out
                ax2.plot(*zip(*ctl), style, color=line.get_color(), label=f"{name}: {key.split('/')[1]}")
    ax.set_ylabel("step dH (nats/token)")
    ax.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("actuators")
    ax2.set_xlabel("step")
    if ax2.lines:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl); labelled by their names")
    ap.add_argument("--band", required=True, help="low,high in nats/token per step, e.g. --band=-0.011,-0.005")
    ap.add_argument("--settle", type=int, default=10, help="also count the steps after this one (default 10)")
    ap.add_argument("--out", help="PNG: dH per step against the band, and the actuators")
    ap.add_argument("--json", help="write the summaries here")
    args = ap.parse_args(argv)
    try:
        band = tuple(float(x) for x in args.band.split(","))
        assert len(band) == 2 and band[0] < band[1]
    except (ValueError, AssertionError):
        raise SystemExit(f"--band wants low,high with low < high, got {args.band!r}") from None
    runs = {Path(d).name: read_metrics(d) for d in args.runs}
    summaries = {name: summarise(rows, band, args.settle) for name, rows in runs.items()}
    for name, s in summaries.items():
        fmt = lambda xs: " ".join("-" if x is None else f"{x:.3g}" for x in xs)  # noqa: E731
        print(f"{name}: in band {s['in_band']}/{s['steps']}, after step {args.settle} "
              f"{s[f'in_band_after_{args.settle}']}/{s[f'steps_after_{args.settle}']}; mean dH {s['mean_dH']:+.5f} "
              f"sd {s['sd_dH']:.5f}; entropy at the end {s['entropy_last']}; reward last 5 {s['reward_last5']}; "
              f"eval {s['eval_mean@4']}")
        print(f"  dH:       {fmt(s['dH'])}")
        if any(w is not None for w in s["w_min"]):
            print(f"  w_min:    {fmt(s['w_min'])}\n  lr_scale: {fmt(s['lr_scale'])}")
        if s["mean_step_scale"] is not None:
            print(f"  trimmed:  {sum(x < 1 for x in s['step_scale'] if x is not None)} steps, mean step kept "
                  f"{s['mean_step_scale']:.3f}; before the trim {s['raw_in_band']}/{s['steps']} in band")
            print(f"  dH raw:   {fmt(s['dH_raw'])}\n  scale:    {fmt(s['step_scale'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=1))
    if args.out:
        plot(runs, band, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
