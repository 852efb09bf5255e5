"""Shared by the Slurm tests: a real single-host 2-node cluster (slurm/cluster_ci.sh), job
submission and polling. Plain functions; the test modules wrap them in fixtures."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "slurm" / "cluster_ci.sh"
STANDIN = "tests/slurm_standin_trainer.py"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def cluster_env() -> dict[str, str]:
    out = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True, check=True).stdout
    return {"SLURM_CONF": out.strip().split("=", 1)[1]}


def start_cluster() -> bool:
    """Bring the cluster up unless one already answers. True when this call started it (and
    the caller must stop it); skips the test session when Slurm cannot run here."""
    env = {**os.environ, **cluster_env()}
    if subprocess.run(["bash", str(CLUSTER), "status"], env=env, capture_output=True).returncode == 0:
        os.environ.update(cluster_env())
        return False
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root (they install slurm-wlm and run slurmd); run as root or start "
                    "slurm/cluster_ci.sh up yourself and export SLURM_CONF")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("no sbatch and no apt-get to install slurm-wlm: the Slurm tests need Debian/Ubuntu or Slurm")
    up = subprocess.run(["bash", str(CLUSTER), "up"], env=env, capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(f"slurm/cluster_ci.sh up failed:\n{up.stdout}\n{up.stderr}")
    os.environ.update(cluster_env())
    return True


def stop_cluster() -> None:
    subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True)


def write_config(path: Path, model: Path, out_dir: Path, run_name: str, total_steps: int, save_every: int) -> Path:
    """A CPU config small enough for seconds-long jobs (the stand-in trainer ignores the model
    but the CPU rollout server really serves it)."""
    path.write_text(f"""\
model: {{hf_path: {model}, dtype: float32}}
rollout: {{engine: cpu, n: 2, num_servers: 1, max_new_tokens: 8}}
data: {{max_prompt_len: 16, max_response_len: 8}}
trainer:
  total_steps: {total_steps}
  rollout_batch_size: 2
  mini_batch_size: 2
  micro_batch_size: 1
  save_every: {save_every}
  output_dir: {out_dir}
  run_name: {run_name}
""")
    return path


def job_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "STEER_PYTHON": sys.executable, "STEER_TRAINER_ENTRY": STANDIN,
            "STEER_CPUS_PER_NODE": "1", "STANDIN_STEP_SECONDS": "0.3", **extra}


def sbatch(script: str, args: list[str], out: Path, env: dict[str, str], sbatch_args: tuple[str, ...] = ()) -> int:
    res = subprocess.run(["sbatch", "--parsable", f"--output={out}", *sbatch_args, script, *args],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"sbatch failed: {res.stderr}"
    return int(res.stdout.strip().split(";")[0])


def job_info(job: int) -> dict[str, str]:
    """scontrol's view of the job (first component of a hetjob)."""
    out = subprocess.run(["scontrol", "show", "job", str(job), "-o"], capture_output=True, text=True).stdout
    line = out.splitlines()[0] if out else ""
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def wait_job(job: int, timeout: float, until=lambda info: info.get("JobState") in FINAL) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if until(info):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", str(job)])
    raise AssertionError(f"job {job} did not reach the expected state within {timeout:.0f} s: {job_info(job)}")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
