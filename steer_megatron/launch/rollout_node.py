"""One rollout node of a Slurm job: its inference servers, plus the router on the first node.

    srun (one task per rollout node) python -m steer_megatron.launch.rollout_node serve \
        --model DIR --engine sglang|cpu --addrs ADDR0 ADDR1 ... --servers-per-node K \
        --server-port P --port-stride S --router-port R --metrics-port M --log-dir DIR
    python -m steer_megatron.launch.rollout_node wait ROUTER_URL --pid PID --timeout S

`serve` starts this node's servers (rollout.fleet.server_command builds their command lines)
and waits until each answers /health_generate; node 0 then starts sglang-router, registers
every server of every rollout node (POST /workers) and waits for /readiness. It restarts
its own dead servers and blocks until SIGUSR2, SIGTERM or SIGINT, then stops everything it
started. SIGUSR2 is the batch script's stop request: srun forwards it unchanged, while a
SIGTERM sent to srun makes srun kill the step outright. SIGUSR1 (Slurm's pre-termination
warning, meant for the trainer) is ignored here.
`wait` (on the batch host) blocks until the router is ready, or fails as soon as the
rollout step (PID) has exited.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from steer_megatron.rollout import http
from steer_megatron.rollout.fleet import Fleet, FleetConfig
from steer_megatron.rollout.router import RouterConfig


def serve(args: argparse.Namespace) -> int:
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    addr = args.addrs[rank]
    # CPU nodes have no GPUs to place servers on; FleetConfig only needs gpus % tp == 0.
    gpus = args.gpus_per_node or args.tp
    # The router (node 0 only) and its metrics exporter get the job's own ports: the defaults
    # would make a second router on the same host (another job, a test) fail to start.
    rcfg = RouterConfig(host=args.addrs[0], port=args.router_port, prometheus_port=args.metrics_port)
    local = FleetConfig(model_path=args.model, num_workers=args.servers_per_node, engine=args.engine, host=addr,
                        base_port=args.server_port, port_stride=args.port_stride, tp_size=args.tp, gpus_per_node=gpus,
                        use_router=False, router=rcfg, log_dir=f"{args.log_dir}/rollout-node{rank}")
    stop = threading.Event()
    for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    fleets = [Fleet(local)]
    try:
        fleets[0].start()
        node = os.environ.get("SLURMD_NODENAME", addr)
        print(f"rollout node {rank} on {node} ({addr}): servers up: {' '.join(fleets[0].live_urls)}", flush=True)
        fleets[0].start_monitor()
        if rank == 0:
            every = [f"http://{a}:{args.server_port + i * args.port_stride}"
                     for a in args.addrs for i in range(args.servers_per_node)]
            # Attached workers: the other nodes' servers are only waited for and registered here.
            router = Fleet(FleetConfig(model_path=args.model, num_workers=len(every), worker_urls=tuple(every),
                                       use_router=True, router=rcfg, log_dir=f"{args.log_dir}/rollout-node{rank}"))
            fleets.append(router)
            router.start()
            print(f"router ready: {router.cfg.router.url} -> {len(every)} server(s)", flush=True)
        while not stop.wait(1.0):
            pass
        print(f"rollout node {rank}: stopping", flush=True)
    finally:
        for f in reversed(fleets):
            f.stop()
    return 0


def wait(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    while not http.is_up(args.url, "/readiness", timeout=5):
        try:
            os.kill(args.pid, 0)
        except ProcessLookupError:
            print(f"the rollout step exited before its router {args.url} was ready: see {args.log_dir}", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            print(f"router {args.url} not ready after {args.timeout:.0f} s (STEER_ROLLOUT_TIMEOUT): see {args.log_dir}",
                  file=sys.stderr)
            return 1
        time.sleep(0.5)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steer_megatron.launch.rollout_node", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--model", required=True)
    s.add_argument("--engine", choices=["sglang", "cpu"], required=True)
    s.add_argument("--addrs", nargs="+", required=True, help="every rollout node's address, in node order")
    s.add_argument("--servers-per-node", type=int, default=1)
    s.add_argument("--server-port", type=int, required=True)
    s.add_argument("--port-stride", type=int, default=10)
    s.add_argument("--router-port", type=int, required=True)
    s.add_argument("--metrics-port", type=int, required=True, help="the router's Prometheus exporter")
    s.add_argument("--tp", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0)
    s.add_argument("--log-dir", required=True)
    w = sub.add_parser("wait")
    w.add_argument("url")
    w.add_argument("--pid", type=int, required=True, help="the rollout srun on the batch host")
    w.add_argument("--timeout", type=float, default=900.0)
    w.add_argument("--log-dir", default="the rollout logs")
    args = parser.parse_args(argv)
    return serve(args) if args.cmd == "serve" else wait(args)


if __name__ == "__main__":
    sys.exit(main())
