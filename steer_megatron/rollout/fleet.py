"""The rollout fleet: SGLang (or CPU) workers behind one sglang-router, and their health.

`Fleet.start()` launches every worker, waits until each answers /health_generate, starts
the router, registers the workers at run time (POST /workers) and waits for /readiness.
`Fleet.check_health()` (or the monitor thread) finds dead workers by process exit or
failed /health probes and takes them out of the router; if allowed it restarts them on
the same port from the newest checkpoint on disk. A replacement goes back behind the
router only when it serves the current weights: at once if that checkpoint is current
(disk sync), else it waits as "stale" until the next weight sync reaches it (NCCL sync:
only the trainer can re-send those weights, and does so at its next sync).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from steer_megatron.rollout import http
from steer_megatron.rollout.router import RouterAdmin, RouterConfig, router_command


@dataclass(frozen=True)
class FleetConfig:
    model_path: str
    num_workers: int = 1
    engine: Literal["sglang", "cpu"] = "sglang"
    host: str = "127.0.0.1"
    base_port: int = 30000
    port_stride: int = 10  # SGLang takes a few ports above --port for its own processes
    tp_size: int = 1
    gpus_per_node: int = 8  # worker i uses GPUs from (i * tp_size) % gpus_per_node
    mem_fraction_static: float = 0.8
    skip_tokenizer_init: bool = True
    # False (default): log-probs of the distribution the tokens were sampled from, softmax(logits / T),
    # which is the policy the trainer optimises (it divides its logits by rollout.temperature, as the
    # STEER release does), so TIS and the parity probe compare like with like. True: log-probs of the
    # raw logits, before temperature (SGLang: env SGLANG_RETURN_ORIGINAL_LOGPROB=1). The variable is
    # always set explicitly, so a value inherited from the launching shell cannot flip it.
    return_original_logprob: bool = False
    weight_version: str = "0"
    use_router: bool = True
    router: RouterConfig = field(default_factory=RouterConfig)
    extra_server_args: tuple[str, ...] = ()
    cpu_max_batch_size: int = 64
    cpu_threads: int = 0
    log_dir: str | None = None  # worker and router logs; None: inherit stdout/stderr
    startup_timeout_s: float = 900.0
    health_timeout_s: float = 5.0
    health_failures_to_dead: int = 2  # consecutive failed /health probes that mean "dead"
    restart_dead: bool = True
    max_restarts: int = 3  # per worker slot
    # Workers started elsewhere (e.g. by srun on the rollout nodes): waited for, put behind
    # the router and monitored, but never launched or restarted here (a dead one is dropped).
    worker_urls: tuple[str, ...] = ()
    # A router started elsewhere (e.g. on a Slurm rollout node): workers are registered with it
    # and it is waited for, but never launched or stopped here.
    external_router: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.engine in ("sglang", "cpu"), f"fleet.engine must be 'sglang' or 'cpu', got {self.engine!r}"),
            (self.num_workers >= 1, f"fleet.num_workers must be >= 1, got {self.num_workers}"),
            (self.tp_size >= 1, f"fleet.tp_size must be >= 1, got {self.tp_size}"),
            (self.gpus_per_node % self.tp_size == 0, f"fleet.gpus_per_node ({self.gpus_per_node}) must be a multiple of tp_size ({self.tp_size})"),
            (0 < self.mem_fraction_static < 1, f"fleet.mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}"),
            (0 < self.base_port and self.base_port + self.num_workers * self.port_stride < 65536, "fleet.base_port + workers * port_stride must stay below 65536"),
            (self.port_stride >= 1, f"fleet.port_stride must be >= 1, got {self.port_stride}"),
            (self.health_failures_to_dead >= 1, "fleet.health_failures_to_dead must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def port(self, index: int) -> int:
        return self.base_port + index * self.port_stride

    def url(self, index: int) -> str:
        return f"http://{self.host}:{self.port(index)}"


def server_command(cfg: FleetConfig, index: int, model_path: str | None = None, weight_version: str | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment for worker `index` (SGLang or the CPU engine)."""
    model = model_path or cfg.model_path
    version = weight_version or cfg.weight_version
    env = {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1" if cfg.return_original_logprob else "0"}
    if cfg.engine == "sglang":
        argv = [
            sys.executable, "-m", "sglang.launch_server", "--model-path", model,
            "--host", cfg.host, "--port", str(cfg.port(index)), "--tp-size", str(cfg.tp_size),
            "--base-gpu-id", str((index * cfg.tp_size) % cfg.gpus_per_node),
            "--mem-fraction-static", str(cfg.mem_fraction_static), "--weight-version", version,
        ]
    else:
        argv = [
            sys.executable, "-m", "steer_megatron.rollout.cpu_server", "--model", model,
            "--host", cfg.host, "--port", str(cfg.port(index)), "--weight-version", version,
            "--max-batch-size", str(cfg.cpu_max_batch_size), "--threads", str(cfg.cpu_threads),
        ]
        if cfg.return_original_logprob:
            argv.append("--return-original-logprob")
    if cfg.skip_tokenizer_init:
        argv.append("--skip-tokenizer-init")
    return argv + list(cfg.extra_server_args), env


@dataclass
class Worker:
    index: int
    url: str
    proc: subprocess.Popen | None = None
    state: Literal["starting", "healthy", "stale", "dead", "stopped"] = "starting"
    failed_probes: int = 0
    restarts: int = 0


@dataclass(frozen=True)
class WorkerEvent:
    url: str
    kind: Literal["dead", "restarted", "dropped", "current"]
    detail: str
    time: float


class Fleet:
    def __init__(self, cfg: FleetConfig):
        self.cfg = cfg
        urls = [u.rstrip("/") for u in cfg.worker_urls] or [cfg.url(i) for i in range(cfg.num_workers)]
        self.workers = [Worker(i, url) for i, url in enumerate(urls)]
        self.router_proc: subprocess.Popen | None = None
        self.router = RouterAdmin(cfg.router.url) if cfg.use_router else None
        self.events: list[WorkerEvent] = []
        # The newest weights on disk (a replacement starts from them) and the version the
        # fleet serves; they differ after an NCCL sync.
        self.model_path, self.model_version = cfg.model_path, cfg.weight_version
        self.weight_version = cfg.weight_version
        self.on_replaced: list[Callable[[str], None]] = []  # e.g. NCCL sync rebuilding its group
        self._lock = threading.RLock()
        self._monitor: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- views ----
    @property
    def live_urls(self) -> list[str]:
        return [w.url for w in self.workers if w.state == "healthy"]

    @property
    def sync_urls(self) -> list[str]:
        """Workers a weight sync must reach: the live ones and stale replacements."""
        return [w.url for w in self.workers if w.state in ("healthy", "stale")]

    @property
    def dead_urls(self) -> list[str]:
        return [w.url for w in self.workers if w.state == "dead"]

    @property
    def endpoints(self) -> list[str]:
        """Where /generate goes: the router, or the live workers when there is none."""
        return [self.cfg.router.url] if self.cfg.use_router else self.live_urls

    def exclusive(self) -> contextlib.AbstractContextManager:
        """Held by a weight sync: no restart happens halfway through it."""
        return self._lock

    def record_weights(self, model_path: str | None, weight_version: str) -> None:
        """Called after a weight sync reached every sync_url (model_path None: nothing on disk)."""
        with self._lock:
            if model_path is not None:
                self.model_path, self.model_version = model_path, weight_version
            self.weight_version = weight_version
            for w in self.workers:
                if w.state == "stale":
                    self._serve(w)
                    self.events.append(WorkerEvent(w.url, "current", f"weights version {weight_version}", time.time()))

    # ---- lifecycle ----
    def _log(self, name: str):
        if self.cfg.log_dir is None:
            return None
        Path(self.cfg.log_dir).mkdir(parents=True, exist_ok=True)
        return open(Path(self.cfg.log_dir) / f"{name}.log", "ab")

    def _launch(self, w: Worker) -> None:
        argv, extra_env = server_command(self.cfg, w.index, self.model_path, self.model_version)
        log = self._log(f"worker{w.index}")
        w.proc = subprocess.Popen(argv, env={**os.environ, **extra_env}, stdout=log, stderr=subprocess.STDOUT if log else None,
                                  start_new_session=True)  # a Ctrl-C to the trainer does not race our shutdown
        w.state, w.failed_probes = "starting", 0

    def _wait_ready(self, w: Worker) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while not http.is_up(w.url, "/health_generate", timeout=30):
            if w.proc is not None and w.proc.poll() is not None:
                raise RuntimeError(f"worker {w.url} exited with code {w.proc.returncode} during startup"
                                   + (f"; see {self.cfg.log_dir}/worker{w.index}.log" if self.cfg.log_dir else ""))
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {w.url} not healthy after {self.cfg.startup_timeout_s:.0f} s (fleet.startup_timeout_s)")
            time.sleep(0.25)
        w.state = "healthy"

    def start(self) -> "Fleet":
        try:
            if not self.cfg.worker_urls:
                for w in self.workers:
                    self._launch(w)
            for w in self.workers:
                self._wait_ready(w)
            if self.cfg.use_router:
                self._start_router()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_router(self) -> None:
        if not self.cfg.external_router:
            log = self._log("router")
            self.router_proc = subprocess.Popen(router_command(self.cfg.router), stdout=log or subprocess.DEVNULL,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:  # the router answers /workers as soon as it listens
            try:
                self.router.workers()
                break
            except http.HttpError:
                exited = self.router_proc is not None and self.router_proc.poll() is not None
                if exited or time.monotonic() > deadline:
                    code = f" (exit code {self.router_proc.poll()})" if self.router_proc is not None else ""
                    raise RuntimeError(f"sglang-router did not come up on {self.cfg.router.url}{code}")
                time.sleep(0.2)
        for url in self.live_urls:
            self.router.add_worker(url)
        self.router.wait_workers(self.live_urls)
        self.router.wait_ready()

    def _serve(self, w: Worker) -> None:
        w.state = "healthy"
        if self.router is not None:
            self.router.add_worker(w.url)
            self.router.wait_workers([w.url])

    def stop(self) -> None:
        self.stop_monitor()
        procs = [w.proc for w in self.workers] + [self.router_proc]
        for p in procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            if p is None:
                continue
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for w in self.workers:
            w.state = "stopped"

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- health ----
    def check_health(self) -> list[WorkerEvent]:
        """Probe every healthy worker once; handle the dead ones. Returns the new events."""
        new: list[WorkerEvent] = []
        with self._lock:
            for w in self.workers:
                if w.state != "healthy":
                    continue
                exited = w.proc is not None and w.proc.poll() is not None
                if not exited and http.is_up(w.url, "/health", timeout=self.cfg.health_timeout_s):
                    w.failed_probes = 0
                    continue
                w.failed_probes += 1
                if exited or w.failed_probes >= self.cfg.health_failures_to_dead:
                    why = f"process exited with code {w.proc.returncode}" if exited else f"{w.failed_probes} failed /health probes"
                    new += self._handle_dead(w, why)
            self.events += new
        return new

    def _handle_dead(self, w: Worker, why: str) -> list[WorkerEvent]:
        events = [WorkerEvent(w.url, "dead", why, time.time())]
        w.state = "dead"
        if self.router is not None:
            try:
                self.router.remove_worker(w.url)
            except http.HttpError:
                pass  # a router that is down itself has no worker to remove
        if w.proc is not None and w.proc.poll() is None:
            w.proc.kill()  # a hung worker must not come back half-alive
            w.proc.wait(10)
        if self.cfg.worker_urls:
            events.append(WorkerEvent(w.url, "dropped", "attached worker (fleet.worker_urls): its launcher must restart it", time.time()))
            return events
        if not self.cfg.restart_dead or w.restarts >= self.cfg.max_restarts:
            events.append(WorkerEvent(w.url, "dropped", f"restarts used: {w.restarts}/{self.cfg.max_restarts}", time.time()))
            return events
        w.restarts += 1
        try:
            self._launch(w)
            self._wait_ready(w)
        except (RuntimeError, TimeoutError) as e:
            w.state = "dead"
            events.append(WorkerEvent(w.url, "dropped", f"restart failed: {e}", time.time()))
            return events
        for hook in self.on_replaced:
            hook(w.url)
        if self.model_version == self.weight_version:
            self._serve(w)
            events.append(WorkerEvent(w.url, "restarted", f"serving {self.model_path} (version {self.model_version})", time.time()))
        else:
            w.state = "stale"
            events.append(WorkerEvent(w.url, "restarted", f"stale: loaded version {self.model_version}, fleet serves "
                                      f"{self.weight_version}; out of the router until the next weight sync", time.time()))
        return events

    def start_monitor(self, interval_s: float = 2.0) -> None:
        """Run check_health every interval_s in a daemon thread until stop_monitor()."""
        if self._monitor is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.check_health()

        self._monitor = threading.Thread(target=loop, name="fleet-monitor", daemon=True)
        self._monitor.start()

    def stop_monitor(self) -> None:
        if self._monitor is not None:
            self._stop.set()
            self._monitor.join(30)
            self._monitor = None
