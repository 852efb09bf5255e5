"""sglang-router (PyPI, a Rust binary): the command line and its worker-management API.

Verified against sglang-router 0.3.2: POST /workers {"url"} registers a worker (202, added
in the background); GET /workers lists {id, url, is_healthy}; DELETE /workers/{id}
removes one; GET /readiness is 200 once a worker is healthy. Only /generate is routed;
weight sync, pause and abort go to each worker directly (the router 404s them).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from steer_megatron.rollout import http

POLICIES = ("random", "round_robin", "cache_aware", "power_of_two")


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 29000
    policy: str = "cache_aware"
    request_timeout_s: int = 1800
    max_retries: int = 3  # the router's own retry of connection errors / 5xx on another worker
    log_level: str = "warn"
    # The router always serves Prometheus metrics, by default on 29000 whatever its own port:
    # two routers on one host (two runs, or tests) collide there. None: port + 1.
    prometheus_port: int | None = None
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"router.policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("port", "metrics_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ValueError(f"router.{name} must be a TCP port, got {getattr(self, name)}")
        if self.port == self.metrics_port:
            raise ValueError(f"router.port and router.prometheus_port are both {self.port}: give them different ports")

    @property
    def metrics_port(self) -> int:
        return self.prometheus_port if self.prometheus_port is not None else self.port + 1

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def router_command(cfg: RouterConfig) -> list[str]:
    """Router with no workers (they are registered at run time) and no health checks of its
    own: the fleet's monitor decides who is dead, so the two never disagree."""
    return [
        sys.executable, "-m", "sglang_router.launch_router",
        "--host", cfg.host, "--port", str(cfg.port), "--policy", cfg.policy,
        "--disable-health-check", "--request-timeout-secs", str(cfg.request_timeout_s),
        "--retry-max-retries", str(cfg.max_retries), "--log-level", cfg.log_level,
        "--prometheus-port", str(cfg.metrics_port), *cfg.extra_args,
    ]


class RouterAdmin:
    """Worker registration on a running router."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def workers(self) -> list[dict]:
        return http.call("GET", f"{self.url}/workers", timeout=10)["workers"]

    def add_worker(self, worker_url: str) -> None:
        http.call("POST", f"{self.url}/workers", {"url": worker_url}, timeout=10)

    def remove_worker(self, worker_url: str) -> bool:
        """True if the router knew the worker."""
        for w in self.workers():
            if w["url"].rstrip("/") == worker_url.rstrip("/"):
                http.call("DELETE", f"{self.url}/workers/{w['id']}", timeout=10)
                return True
        return False

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until GET /readiness answers 200 (a healthy worker is registered)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                http.call("GET", f"{self.url}/readiness", timeout=5)
                return
            except http.HttpError as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"router {self.url} not ready within {timeout_s:.0f} s: {e}") from e
            time.sleep(0.2)

    def wait_workers(self, worker_urls: list[str], timeout_s: float = 60.0) -> None:
        """Block until every url is registered and healthy in the router."""
        want = {u.rstrip("/") for u in worker_urls}
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                healthy = {w["url"].rstrip("/") for w in self.workers() if w.get("is_healthy")}
            except http.HttpError:
                healthy = set()
            if want <= healthy:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"router {self.url} did not list {sorted(want - healthy)} as healthy within {timeout_s:.0f} s")
            time.sleep(0.2)
