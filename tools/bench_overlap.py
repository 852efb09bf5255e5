"""Step time of the CPU demo with trainer.async_rollout off vs on, trainer and rollout server on separate cores.

    python tools/bench_overlap.py                                  # cores 0 (trainer) and 1 (rollout server)
    python tools/bench_overlap.py --steps 6 --train-cores 0-3 --rollout-cores 4-7 --plot docs/img/overlap_timeline.png

The trainer runs under `taskset`; the rollout server (and router) it starts are moved onto
--rollout-cores as soon as they appear, so the two stand for separate nodes as in the hetjob
layout. Per step (the first, synchronous in both modes, is left out): rollout = the generation of
the step's batch, train = old-log-prob pass + update, sync = weight sync with its parity probe,
step = the trainer's wall time per step. Target for async: step <= max(rollout, train) + sync + 10%.
--plot draws the async run's timeline (rollout of step k+1 under the training of step k).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a small CPU demo (tests/test_trainer.py's shape, larger batches so both phases take seconds)
DEMO = ["demo.num_digits=3", "demo.n_train=400", "demo.n_test=19", "demo.warmup_steps=60",
        "trainer.rollout_batch_size=16", "trainer.mini_batch_size=8", "trainer.micro_batch_size=16",
        "rollout.n=4", "trainer.save_every=0", "eval.every=0", "eval.at_start=false", "logging.tensorboard=false",
        "logging.console=false", "algorithm.tis_cap=2.0"]


def _cpus(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def _pin_children(root: int, cores: set[int], stop: threading.Event, done: set[int]) -> None:
    """Move the rollout server and router processes under `root` onto `cores` as they appear (pids into done)."""
    while not stop.is_set():
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) in done:
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == root and ("rollout.cpu_server" in cmd or "sglang_router" in cmd or "sglang-router" in cmd):
                try:
                    for task in (d / "task").iterdir():  # every thread, including those started already
                        os.sched_setaffinity(int(task.name), cores)
                    done.add(int(d.name))
                except OSError:
                    pass
        time.sleep(0.2)


def run(mode: str, steps: int, out: Path, train_cores: str, rollout_cores: set[int], cache: Path) -> list[dict]:
    over = DEMO + [f"trainer.total_steps={steps}", f"trainer.async_rollout={mode == 'async'}",
                   f"trainer.output_dir={out}", f"trainer.run_name={mode}", f"demo.cache_dir={cache}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(len(_cpus(train_cores)))}
    proc = subprocess.Popen(["taskset", "-c", train_cores, sys.executable, "-m", "steer_megatron.train", *over],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop, pinned = threading.Event(), set()
    pinner = threading.Thread(target=_pin_children, args=(proc.pid, rollout_cores, stop, pinned), daemon=True)
    pinner.start()
    log, _ = proc.communicate()
    stop.set()
    if proc.returncode:
        raise SystemExit(f"{mode} run failed:\n{log[-3000:]}")
    if not pinned:
        raise SystemExit(f"{mode} run: no rollout server process was found to pin onto {sorted(rollout_cores)}")
    print(f"{mode}: moved {len(pinned)} rollout processes onto cores {sorted(rollout_cores)}", file=sys.stderr)
    rows = [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "timing/step_s" in r]


def summary(rows: list[dict]) -> dict:
    later = rows[1:]  # step 1 generates its batch synchronously in both modes
    med = lambda key: statistics.median(key(r) for r in later)  # noqa: E731
    return {"steps": len(later),
            "step_s": med(lambda r: r["timing/step_s"]),
            "rollout_s": med(lambda r: r["timing/rollout_generate_s"]),
            "train_s": med(lambda r: r["timing/old_logprob_s"] + r["timing/update_s"]),
            "sync_s": med(lambda r: r["timing/weight_sync_s"]),
            "wait_s": med(lambda r: r["timing/rollout_wait_s"] + r["timing/rollout_s"])}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 2.6))
    lanes = {"rollout server": ("rollout", "tab:orange"), "trainer: train": ("train", "tab:blue"),
             "trainer: weight sync": ("sync", "tab:green")}
    for y, (label, (key, color)) in enumerate(lanes.items()):
        for r in rows:
            a, b = r[f"timeline/{key}_start"], r[f"timeline/{key}_end"]
            ax.broken_barh([(a, b - a)], (y - 0.35, 0.7), color=color)
            ax.text(a + (b - a) / 2, y, str(r["step"]), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(lanes)), list(lanes))
    ax.set_xlabel("seconds (numbers: the step a batch trains in)")
    ax.set_title("trainer.async_rollout=true: step k+1's rollouts generated while step k trains")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--train-cores", default="0")
    p.add_argument("--rollout-cores", default="1")
    p.add_argument("--out", type=Path, help="run directories (default: a temporary one)")
    p.add_argument("--plot", type=Path, help="write the async run's timeline here (PNG)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_overlap_"))
    cache = out / "demo_assets"
    load = os.getloadavg()
    results = {}
    for mode in ("sync", "async"):
        rows = run(mode, args.steps, out, args.train_cores, _cpus(args.rollout_cores), cache)
        results[mode] = summary(rows)
        if mode == "async" and args.plot:
            plot(rows, args.plot)
    a = results["async"]
    bound = (max(a["rollout_s"], a["train_s"]) + a["sync_s"]) * 1.10
    results["target"] = {"async_step_s": a["step_s"], "bound_s": bound, "met": a["step_s"] <= bound,
                         "speedup": results["sync"]["step_s"] / a["step_s"]}
    results["loadavg_before"] = load
    results["loadavg_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
