"""Where every component of one Slurm job runs and listens.

A job is one trainer group (torchrun per node, rank 0's node hosts the c10d rendezvous) and
one rollout group (`servers_per_node` inference servers per node, one router on the first
rollout node). Ports come from the job id, so two jobs sharing a node never collide and a
requeued job (same id) gets the same ports back. Addresses are Slurm's NodeAddr: what
Slurm itself uses to reach a node (on the single-host CI cluster, 127.0.0.1).
"""
from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from steer_megatron.config import RunConfig

PORT_BLOCK = 100  # ports reserved per job: rendezvous, router, router metrics, then the servers
PORT_FIRST, PORT_LAST = 20000, 60000  # below Linux's ephemeral range (32768+ is shared, but
# every port is checked free by preflight before use)
SERVER_OFFSET = 10  # first server port = base + 10
SERVER_STRIDE = 10  # SGLang takes a few ports above --port for its own processes


def port_base(job_id: int) -> int:
    return PORT_FIRST + (job_id % ((PORT_LAST - PORT_FIRST) // PORT_BLOCK)) * PORT_BLOCK


def node_addr(node: str) -> str:
    """Slurm's NodeAddr for a node name (the name itself where Slurm knows no other)."""
    try:
        out = subprocess.run(["scontrol", "show", "node", node, "-o"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return node
    for item in out.split():
        if item.startswith("NodeAddr="):
            return item.split("=", 1)[1]
    return node


@dataclass
class JobLayout:
    job_id: int
    trainer_nodes: list[str]
    rollout_nodes: list[str]
    trainer_addrs: list[str]
    rollout_addrs: list[str]
    nproc_per_node: int  # trainer processes per node (one per GPU; on CPU nodes, configured)
    gpus_per_node: int  # 0 on CPU clusters
    servers_per_node: int
    rollout_tp: int
    engine: str  # sglang | cpu: what the rollout nodes launch
    model_path: str
    run_dir: Path
    base_port: int
    restart_count: int = 0

    @property
    def master_port(self) -> int:
        return self.base_port

    @property
    def router_port(self) -> int:
        return self.base_port + 1

    @property
    def metrics_port(self) -> int:
        """The router's Prometheus exporter (its default port would collide between routers on one host)."""
        return self.base_port + 2

    @property
    def server_port(self) -> int:
        """Port of the first server on each rollout node; server i uses server_port + i * stride."""
        return self.base_port + SERVER_OFFSET

    @property
    def preflight_spec(self) -> Path:
        """The per-node check spec; in the run dir, so reading it proves that dir is shared."""
        return self.run_dir / "logs" / f"preflight-{self.job_id}.json"

    @property
    def server_urls(self) -> list[str]:
        return [f"http://{a}:{self.server_port + i * SERVER_STRIDE}"
                for a in self.rollout_addrs for i in range(self.servers_per_node)]

    @property
    def router_url(self) -> str:
        return f"http://{self.rollout_addrs[0]}:{self.router_port}"

    def trainer_overrides(self) -> list[str]:
        """Dotlist appended to the user's overrides: the fleet the trainer must use."""
        urls = ",".join(f'"{u}"' for u in self.server_urls)
        ovs = [f"rollout.server_urls=[{urls}]", f'rollout.router_url="{self.router_url}"',
               f"rollout.num_servers={len(self.server_urls)}"]
        if self.restart_count > 0:  # a requeued job must continue, whatever resume says
            ovs.append("trainer.resume=auto")
        return ovs

    def node_ports(self, role: str) -> list[int]:
        if role == "trainer":
            return [self.master_port]
        return [self.router_port, self.metrics_port] + [self.server_port + i * SERVER_STRIDE for i in range(self.servers_per_node)]

    def shell(self) -> str:
        """`export` lines the sbatch scripts eval."""
        env = {
            "STEER_RUN_DIR": str(self.run_dir),
            "STEER_LOG_DIR": str(self.run_dir / "logs"),
            "STEER_PREFLIGHT_SPEC": str(self.preflight_spec),
            "STEER_NNODES": str(len(self.trainer_nodes)),
            "STEER_NPROC_PER_NODE": str(self.nproc_per_node),
            "STEER_MASTER_ADDR": self.trainer_addrs[0],
            "STEER_MASTER_PORT": str(self.master_port),
            "STEER_ROLLOUT_NNODES": str(len(self.rollout_nodes)),
            "STEER_ROLLOUT_ADDRS": " ".join(self.rollout_addrs),
            "STEER_ROLLOUT_ENGINE": self.engine,
            "STEER_ROLLOUT_TP": str(self.rollout_tp),
            "STEER_SERVERS_PER_NODE": str(self.servers_per_node),
            "STEER_SERVER_PORT": str(self.server_port),
            "STEER_SERVER_STRIDE": str(SERVER_STRIDE),
            "STEER_ROUTER_PORT": str(self.router_port),
            "STEER_ROUTER_METRICS_PORT": str(self.metrics_port),
            "STEER_ROUTER_URL": self.router_url,
            "STEER_MODEL_PATH": self.model_path,
            "STEER_TRAINER_NODELIST": ",".join(self.trainer_nodes),
            "STEER_ROLLOUT_NODELIST": ",".join(self.rollout_nodes),
        }
        lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        # a bash array, so that quoting inside the overrides survives
        lines.append("STEER_TRAINER_OVERRIDES=(" + " ".join(shlex.quote(o) for o in self.trainer_overrides()) + ")")
        return "\n".join(lines) + "\n"


def run_dir_of(cfg: RunConfig) -> Path:
    return (Path(cfg.trainer.output_dir) / cfg.trainer.run_name).resolve()
