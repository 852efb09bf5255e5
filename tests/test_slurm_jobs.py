"""The sbatch scripts on a real Slurm cluster (slurmctld + 2 slurmd on this host, see
slurm/cluster_ci.sh): heterogeneous and homogeneous jobs run the trainer on one node and the
CPU rollout server + router on the other; preemption requeues and resumes; bad launches fail
in preflight with a clear message. The mechanics tests use tests/slurm_standin_trainer.py
(the trainer's launch contract, seconds per job, so many requeue cases stay cheap) and the real
rollout fleet; the last tests
run the real trainer on the CPU demo config with both scripts."""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from steer_megatron.models.checkpoint import find_latest
from tests import slurm_helpers as sh
from tests.rollout_helpers import tiny_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def cluster():
    started = sh.start_cluster()
    yield
    if started:
        sh.stop_cluster()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory)


def _assert_finished(run_dir: Path, out: Path, total: int) -> list[dict]:
    log = out.read_text()
    assert (run_dir / "DONE").is_file(), log
    rows = sh.metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, total + 1)), rows
    assert all(r["tokens"] > 0 for r in rows), "every step got tokens through the router"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{total}"
    assert (run_dir / "checkpoints" / f"step_{total}").is_dir()
    trainer_nodes = {r["node"] for r in rows}
    rollout_log = (run_dir / "logs" / "rollout-node0.log").read_text()
    assert "router ready" in rollout_log and "rollout node 0: stopping" in rollout_log, rollout_log
    rollout_node = rollout_log.split(" on ", 1)[1].split()[0]
    assert len(trainer_nodes) == 1 and rollout_node not in trainer_nodes, (trainer_nodes, rollout_node)
    return rows


# the hetjob script's plain run is also the real-trainer preemption test's (below: trainer on n1, rollout
# on n2, finished), so its stand-in run is left to make test-extended
@pytest.mark.parametrize("script", [pytest.param("slurm/steer_hetjob.sbatch", marks=pytest.mark.extended),
                                    "slurm/steer_homogeneous.sbatch"])
def test_job_finishes_with_trainer_and_rollout_on_separate_nodes(cluster, model, tmp_path, script):
    cfg = sh.write_config(tmp_path / "cfg.yaml", model, tmp_path / "runs", "r", total_steps=4, save_every=2)
    out = tmp_path / "job.out"
    job = sh.sbatch(script, [str(cfg)], out, sh.job_env())
    info = sh.wait_job(job, 180)
    assert info["JobState"] == "COMPLETED", out.read_text()
    _assert_finished(tmp_path / "runs" / "r", out, 4)
    assert "rollout fleet stopped" in out.read_text()


def _preempt_and_finish(job: int, run_dir: Path, out: Path, after_steps: int, timeout: float) -> None:
    """Wait for `after_steps` metrics lines, send what --signal=B:USR1@<secs> sends before the
    time limit, and let the requeued job run to its end."""
    def stepped(_info) -> bool:
        return (run_dir / "metrics.jsonl").is_file() and len(sh.metrics(run_dir)) >= after_steps

    sh.wait_job(job, timeout, until=stepped)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], check=True)
    sh.wait_job(job, 120, until=lambda i: i.get("JobState") == "PENDING" and int(i.get("Restarts", 0)) >= 1)
    # slurmctld holds a requeued job ~2 min (BeginTime) while the nodes clean up the old
    # incarnation; they need a few seconds here (KillWait=5), so release it after 10.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+10"], check=True)
    info = sh.wait_job(job, timeout)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED", log
    assert "requeueing job" in log and "(restart 1)" in log, log


# each script's preemption path runs once in make test: the stand-in trainer here on the homogeneous
# script, the real trainer (below) on the hetjob script; the other two pairings run in make test-extended
@pytest.mark.parametrize("script", [pytest.param("slurm/steer_hetjob.sbatch", marks=pytest.mark.extended),
                                    "slurm/steer_homogeneous.sbatch"])
def test_preemption_signal_requeues_and_resumes_without_lost_or_repeated_steps(cluster, model, tmp_path, script):
    cfg = sh.write_config(tmp_path / "cfg.yaml", model, tmp_path / "runs", "p", total_steps=16, save_every=5)
    out, run_dir = tmp_path / "job.out", tmp_path / "runs" / "p"
    job = sh.sbatch(script, [str(cfg)], out, sh.job_env())
    _preempt_and_finish(job, run_dir, out, after_steps=3, timeout=240)
    rows = _assert_finished(run_dir, out, 16)
    assert {r["restart"] for r in rows} == {0, 1}, rows


def _hold_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_bad_launches_fail_fast_with_clear_messages(cluster, model, tmp_path):
    held = _hold_port()
    base = held.getsockname()[1]  # the job's rendezvous port = the base
    cases = {  # name: (script args, extra env, sbatch args, expected message)
        "too_few_nodes": ([], {}, ("--nodes=1",), "needs 1 trainer node(s) + at least 1 rollout node"),
        "layout": (["parallel.pp=2"], {}, (), "world size 1 is not divisible by parallel.tp*pp*cp = 2"),
        "model_path": (["model.hf_path=/nonexistent/model"], {}, (), "/nonexistent/model does not exist here"),
        "port_in_use": ([], {"STEER_PORT_BASE": str(base)}, (), f"port {base} is in use"),
    }
    jobs = {}
    try:
        for name, (args, env, sargs, _) in cases.items():
            cfg = sh.write_config(tmp_path / f"{name}.yaml", model, tmp_path / "runs", name, total_steps=2, save_every=1)
            jobs[name] = sh.sbatch("slurm/steer_homogeneous.sbatch", [str(cfg), *args], tmp_path / f"{name}.out",
                                   sh.job_env(**env), sargs)
        for name, job in jobs.items():
            info = sh.wait_job(job, 120)
            log = (tmp_path / f"{name}.out").read_text()
            assert info["JobState"] == "FAILED", (name, log)
            assert cases[name][3] in log, (name, log)
            assert "rollout fleet ready" not in log and not (tmp_path / "runs" / name / "metrics.jsonl").exists(), log
    finally:
        held.close()


# A tiny version of the CPU demo: tests/test_trainer.py's demo assets (one build per session, shared
# through demo_cache_root).
REAL_SMALL = ["demo.num_digits=3", "demo.n_train=81", "demo.n_test=19", "demo.warmup_steps=60",
              "trainer.rollout_batch_size=4",
              "trainer.mini_batch_size=2", "trainer.micro_batch_size=4", "rollout.n=4", "trainer.save_every=1",
              "eval.every=0", "logging.tensorboard=false", "trainer.total_steps=3"]


@pytest.mark.parametrize("script", ["slurm/steer_hetjob.sbatch",
                                    pytest.param("slurm/steer_homogeneous.sbatch", marks=pytest.mark.extended)])
def test_real_trainer_cpu_demo_across_two_nodes_survives_preemption(cluster, tmp_path, script, demo_cache_root):
    """`python -m steer_megatron.train` on the CPU demo config: trainer on one node, rollout
    server + router on the other, preempted after its first step, requeued, resumed."""
    out, run_dir = tmp_path / "job.out", tmp_path / "runs" / "slurm_demo"
    args = ["configs/cpu_demo.yaml", *REAL_SMALL, f"demo.cache_dir={demo_cache_root}",
            f"trainer.output_dir={tmp_path / 'runs'}", "trainer.run_name=slurm_demo"]
    env = sh.job_env()
    del env["STEER_TRAINER_ENTRY"]  # the real `python -m steer_megatron.train`
    job = sh.sbatch(script, args, out, env)
    _preempt_and_finish(job, run_dir, out, after_steps=1, timeout=600)
    log = out.read_text()
    assert (run_dir / "DONE").is_file() and [r["step"] for r in sh.metrics(run_dir)] == [1, 2, 3], log
    assert find_latest(run_dir / "checkpoints") is not None
    assert "trainer: n1 " in log and " on n2 " in (run_dir / "logs" / "rollout-node0.log").read_text()
