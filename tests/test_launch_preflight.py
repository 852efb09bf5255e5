"""Launch layout and preflight pieces that need no Slurm: run-dir protection, ports, the
trainer overrides the launcher hands over, per-node checks."""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from steer_megatron.config import load_config, save_config
from steer_megatron.launch.layout import JobLayout, port_base
from steer_megatron.launch.preflight import PreflightError, check_run_dir, node_checks

CFG = """\
model: {{hf_path: {model}, dtype: float32}}
rollout: {{engine: cpu, n: 2, num_servers: 2}}
trainer: {{total_steps: 4, rollout_batch_size: 2, mini_batch_size: 2, output_dir: {out}, run_name: r}}
"""


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    (tmp_path / "model").mkdir()
    p = tmp_path / "cfg.yaml"
    p.write_text(CFG.format(model=tmp_path / "model", out=tmp_path / "runs"))
    return p


def test_same_run_name_with_another_config_is_refused(cfg_file, tmp_path):
    first = load_config(cfg_file)
    run_dir = tmp_path / "runs" / "r"
    save_config(first, run_dir)
    check_run_dir(load_config(cfg_file, ["optim.lr=1e-3"]), run_dir)  # no checkpoints yet: nothing to overwrite
    (run_dir / "checkpoints" / "step_2").mkdir(parents=True)
    # Continuing the same run is fine, also with a new step budget and per-job fleet addresses.
    check_run_dir(load_config(cfg_file, ["trainer.total_steps=8", 'rollout.server_urls=["http://127.0.0.1:1"]']), run_dir)
    with pytest.raises(PreflightError, match=r"checkpoints of a run with a different config \(optim.lr: 1e-06 -> 0.001\).*new trainer.run_name"):
        check_run_dir(load_config(cfg_file, ["optim.lr=1e-3"]), run_dir)


def test_resume_none_never_overwrites_checkpoints(cfg_file, tmp_path):
    run_dir = tmp_path / "runs" / "r"
    cfg = load_config(cfg_file, ["trainer.resume=none"])
    check_run_dir(cfg, run_dir)  # nothing there yet
    (run_dir / "checkpoints" / "step_2").mkdir(parents=True)
    with pytest.raises(PreflightError, match="trainer.resume=none would start over"):
        check_run_dir(cfg, run_dir)


def test_ports_per_job_are_disjoint_and_stable():
    bases = [port_base(j) for j in range(1, 401)]
    assert len(set(bases)) == 400 and min(bases) >= 20000 and max(bases) + 100 <= 60000
    assert port_base(7) == port_base(7)  # a requeued job (same id) gets its ports back


def test_trainer_overrides_load_into_the_config(cfg_file, tmp_path):
    layout = JobLayout(job_id=5, trainer_nodes=["n1"], rollout_nodes=["n2", "n3"], trainer_addrs=["10.0.0.1"],
                       rollout_addrs=["10.0.0.2", "10.0.0.3"], nproc_per_node=8, gpus_per_node=8, servers_per_node=1,
                       rollout_tp=1, engine="sglang", model_path="/m", run_dir=tmp_path, base_port=20500, restart_count=1)
    ovs = layout.trainer_overrides()
    assert 'rollout.router_url="http://10.0.0.2:20501"' in ovs and "trainer.resume=auto" in ovs
    cfg = load_config(cfg_file, [o for o in ovs if not o.startswith("rollout.router_url")])
    assert cfg.rollout.server_urls == ["http://10.0.0.2:20510", "http://10.0.0.3:20510"]
    assert cfg.rollout.num_servers == 2 and cfg.trainer.resume == "auto"


def test_node_checks_name_each_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible, whatever this machine has
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"run_dir": str(tmp_path), "min_free_gb": 1e9, "gpus_per_node": 2,
                                "trainer": {"paths": [str(tmp_path / "missing")], "ports": [port]},
                                "rollout": {"paths": [], "ports": []}}))
    try:
        fails = node_checks("trainer", spec)
    finally:
        busy.close()
    assert len(fails) == 4, fails
    assert "missing does not exist here" in fails[0] and f"port {port} is in use" in fails[1]
    assert "GiB free" in fails[2] and "GPU(s) visible, the layout needs 2" in fails[3]
    assert "shared by all nodes" in node_checks("rollout", tmp_path / "nope.json")[0]


def _plan(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    from steer_megatron.launch.preflight import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["plan", *args])
    return rc, out.getvalue() + err.getvalue()


def test_7b_recipe_layout_two_trainer_nodes_one_rollout_node(tmp_path):
    """slurm/qwen2.5-math-7b_steer.sbatch's layout, checked without GPUs: 2 x 8 trainer ranks
    (TP=4 x DP=4) and 8 SGLang servers on the third node; too few nodes or a TP that does
    not divide the model's heads fail with the fix."""
    model = tmp_path / "qwen7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 28, "num_key_value_heads": 4}))
    config = ["configs/qwen2.5-math-7b_steer.yaml", f"model.hf_path={model}", f"trainer.output_dir={tmp_path}/runs",
              "rollout.num_servers=8"]
    common = [*config, "--trainer-count", "2", "--gpus-per-node", "8", "--job-id", "42"]
    rc, out = _plan(*common, "--nodes", "gpu1,gpu2,gpu3")
    assert rc == 0, out
    assert "export STEER_NPROC_PER_NODE=8" in out and "export STEER_SERVERS_PER_NODE=8" in out
    assert "export STEER_TRAINER_NODELIST=gpu1,gpu2" in out and "export STEER_ROLLOUT_ENGINE=sglang" in out
    rc, out = _plan(*common, "--nodes", "gpu1,gpu2")
    assert rc == 2 and "needs 2 trainer node(s) + at least 1 rollout node: submit with sbatch --nodes=3" in out
    rc, out = _plan(*config, "parallel.tp=8", *common[len(config):], "--nodes", "gpu1,gpu2,gpu3")
    assert rc == 2 and "parallel.tp=8 does not divide the model's 28 attention heads" in out
    rc, out = _plan(*config, "rollout.tp_size=2", *common[len(config):], "--nodes", "gpu1,gpu2,gpu3")
    assert rc == 2 and "8 rollout server(s) per node x rollout.tp_size=2 need 16 GPUs" in out


def test_preflight_refuses_a_layout_whose_memory_plan_does_not_fit(tmp_path):
    model = tmp_path / "qwen7b"
    model.mkdir()
    shutil.copy("configs/model_shapes/qwen2.5-math-7b.json", model / "config.json")
    config = ["configs/qwen2.5-math-7b_steer.yaml", f"model.hf_path={model}", f"trainer.output_dir={tmp_path}/runs",
              "rollout.num_servers=8"]
    common = ["--trainer-count", "2", "--gpus-per-node", "8", "--job-id", "42", "--nodes", "gpu1,gpu2,gpu3",
              "--gpu-mem-gib", "80"]
    rc, out = _plan(*config, *common)
    assert rc == 0, out
    rc, out = _plan(*config, "model.recompute=none", "trainer.micro_batch_size=8", *common)
    assert rc == 2 and "the memory plan does not fit a 80 GiB GPU" in out and "turn on model.recompute" in out
