"""Preflight: every check that can fail a launch, run before any component starts.

    python -m steer_megatron.launch.preflight plan CONFIG [key=value ...] --nodes n1,n2 --trainer-count 1 ...
    python -m steer_megatron.launch.preflight node trainer|rollout SPEC.json

`plan` runs on the batch host: it loads the config, splits the allocation into trainer and
rollout nodes, checks the parallel layout against the node/GPU counts, the rollout layout,
the model path and the run directory (a different run of the same name is never
overwritten), writes the per-node check spec into the run directory and prints the job
layout as shell `export` lines. `node` runs on every node (one srun task per node): it reads
that spec (so it also proves the run directory is shared), then checks paths, ports, free
disk and visible GPUs there. Each failure is one line naming the fix; exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from steer_megatron.config import ConfigError, RunConfig, config_to_dict, load_config, validate_config
from steer_megatron.launch.layout import JobLayout, node_addr, port_base, run_dir_of

# What may change between launches of one run (the trainer's run identity leaves the same
# out, steer_megatron.train.run_dir): per-job fleet addresses, step budget, resume mode,
# checkpoint cadence, evaluation and logging.
SAME_RUN_KEYS = frozenset({"rollout.server_urls", "rollout.router_url", "rollout.num_servers", "trainer.resume",
                           "trainer.total_steps", "trainer.save_every", "trainer.keep_last"})
SAME_RUN_PREFIXES = ("eval.", "logging.")


class PreflightError(RuntimeError):
    pass


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse a run directory whose checkpoints belong to a run with another config, or that
    trainer.resume=none would overwrite. The trainer refuses the same, but only after the
    whole job has started; here it costs seconds."""
    ckpts = run_dir / "checkpoints"
    if not (ckpts.is_dir() and any(ckpts.iterdir())):
        return
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = _flatten(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
        new = _flatten(config_to_dict(cfg))
        differ = sorted(k for k, v in new.items() if k not in SAME_RUN_KEYS and not k.startswith(SAME_RUN_PREFIXES)
                        and old.get(k) != v)
        if differ:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in differ[:5])
            raise PreflightError(
                f"{run_dir} holds checkpoints of a run with a different config ({shown}{', ...' if len(differ) > 5 else ''}). "
                f"Set a new trainer.run_name (or trainer.output_dir), or move that directory away; continuing a run "
                f"may only change {sorted(SAME_RUN_KEYS)}, eval.* and logging.*")
    if cfg.trainer.resume == "none":
        raise PreflightError(f"trainer.resume=none would start over in {run_dir}, which holds checkpoints: set a new "
                             f"trainer.run_name, or trainer.resume=auto to continue that run")


def _model_heads(model_path: str | None) -> tuple[int | None, int | None]:
    cfg_file = Path(model_path) / "config.json" if model_path else None
    if cfg_file is None or not cfg_file.is_file():
        return None, None
    hf = json.loads(cfg_file.read_text())
    return hf.get("num_attention_heads"), hf.get("num_key_value_heads")


def plan(args: argparse.Namespace) -> JobLayout:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise PreflightError(str(e)) from None
    if args.nodes is not None:  # homogeneous allocation: the first trainer_count nodes train
        nodes = args.nodes.split(",")
        if len(nodes) < args.trainer_count + 1:
            raise PreflightError(
                f"the allocation has {len(nodes)} node(s) ({','.join(nodes)}) but the layout needs "
                f"{args.trainer_count} trainer node(s) + at least 1 rollout node: submit with "
                f"sbatch --nodes={args.trainer_count + 1} (or more), or lower STEER_TRAINER_NODES")
        trainer_nodes, rollout_nodes = nodes[: args.trainer_count], nodes[args.trainer_count:]
    else:
        trainer_nodes, rollout_nodes = args.trainer_nodes.split(","), args.rollout_nodes.split(",")

    gpus = args.gpus_per_node
    nproc = gpus if gpus > 0 else args.nproc_per_node
    world = len(trainer_nodes) * nproc
    heads, kv_heads = _model_heads(cfg.model.hf_path)
    try:
        validate_config(cfg, world_size=world, num_attention_heads=heads, num_query_groups=kv_heads, check_paths=False)
    except ConfigError as e:
        raise PreflightError(f"{e} (trainer world size = {len(trainer_nodes)} node(s) x {nproc} process(es) per node; "
                             f"add trainer nodes or change the parallel layout)") from None

    if args.gpu_mem_gib and cfg.model.hf_path and (Path(cfg.model.hf_path) / "config.json").is_file():
        from steer_megatron.launch.plan import load_arch, plan_memory

        memory = plan_memory(cfg, load_arch(cfg, None), dp=world // (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp),
                             gpu_mem_gib=args.gpu_mem_gib)
        if not memory.fits:
            raise PreflightError(f"the memory plan does not fit a {args.gpu_mem_gib:g} GiB GPU:\n{memory.table()}\n"
                                 f"turn on model.recompute, parallel.sequence_parallel or parallel.distributed_optimizer, "
                                 f"raise parallel.tp / pp, or lower trainer.micro_batch_size")
    if cfg.demo.enabled:
        # The CPU demo builds its tiny model and data on first use: do it once here, on the
        # batch host, so that the rollout nodes have a model to serve (the trainer then finds
        # them cached under demo.cache_dir).
        from steer_megatron.demo_assets.assets import apply_demo_assets

        apply_demo_assets(cfg)
    engine = cfg.rollout.engine
    if engine == "sglang" and gpus == 0:
        raise PreflightError("rollout.engine=sglang needs GPU nodes but STEER_GPUS_PER_NODE=0: on CPU nodes use "
                             "rollout.engine=cpu (the CPU server), or set STEER_GPUS_PER_NODE")
    n_servers, n_rollout = cfg.rollout.num_servers, len(rollout_nodes)
    if n_servers % n_rollout:
        raise PreflightError(f"rollout.num_servers={n_servers} does not split evenly over {n_rollout} rollout node(s)")
    per_node, rollout_tp = n_servers // n_rollout, cfg.rollout.tp_size
    if gpus > 0 and per_node * rollout_tp > gpus:
        raise PreflightError(f"{per_node} rollout server(s) per node x rollout.tp_size={rollout_tp} need "
                             f"{per_node * rollout_tp} GPUs but a node has {gpus}: lower rollout.num_servers or "
                             f"rollout.tp_size, or add rollout nodes")
    if cfg.model.hf_path is None:
        raise PreflightError("model.hf_path is null: set it to a HF model directory every node can read "
                             "(or demo.enabled=true for the CPU demo's own model)")
    if args.port_base is None and args.job_id is None:
        raise PreflightError("no port base: pass --job-id (inside Slurm: $SLURM_JOB_ID) or --port-base")

    run_dir = run_dir_of(cfg)
    check_run_dir(cfg, run_dir)
    layout = JobLayout(
        job_id=args.job_id or 0, trainer_nodes=trainer_nodes, rollout_nodes=rollout_nodes,
        trainer_addrs=[node_addr(n) for n in trainer_nodes], rollout_addrs=[node_addr(n) for n in rollout_nodes],
        nproc_per_node=nproc, gpus_per_node=gpus, servers_per_node=per_node, rollout_tp=rollout_tp,
        engine=engine, model_path=str(Path(cfg.model.hf_path).resolve()), run_dir=run_dir,
        base_port=args.port_base if args.port_base is not None else port_base(args.job_id),
        restart_count=args.restart_count,
    )
    trainer_paths = [cfg.model.hf_path, cfg.model.tokenizer_path, *cfg.data.train_files, *cfg.eval.files]
    spec = {
        "run_dir": str(run_dir), "min_free_gb": args.min_free_gb, "gpus_per_node": gpus,
        "trainer": {"paths": [str(Path(p).resolve()) for p in trainer_paths if p], "ports": layout.node_ports("trainer")},
        "rollout": {"paths": [layout.model_path], "ports": layout.node_ports("rollout")},
    }
    spec_file = layout.preflight_spec
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec, indent=1))
    return layout


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: a port in TIME_WAIT (e.g. left by a requeued job) is free for servers,
        # which all set it too; a listening socket still makes bind fail.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False


def _visible_gpus() -> int:
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip()])
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def node_checks(role: str, spec_file: Path) -> list[str]:
    """Failures on this node, each a sentence with the fix."""
    if not spec_file.is_file():
        return [f"cannot read {spec_file}: the run directory (trainer.output_dir) must be on a filesystem shared by "
                f"all nodes (checkpoints are written by one node and read after a requeue by another)"]
    spec = json.loads(spec_file.read_text())
    mine = spec[role]
    fails = [f"{p} does not exist here (every {role} node must see it: put it on a shared filesystem)"
             for p in mine["paths"] if not Path(p).exists()]
    fails += [f"port {port} is in use (needed by the {role} components; another job or a stale process holds it: "
              f"free it, or submit with STEER_PORT_BASE set to a free range)" for port in mine["ports"] if not _port_free(port)]
    free_gb = shutil.disk_usage(spec["run_dir"]).free / 2**30
    if free_gb < spec["min_free_gb"]:
        fails.append(f"only {free_gb:.1f} GiB free under {spec['run_dir']}, need {spec['min_free_gb']} GiB "
                     f"(STEER_MIN_FREE_GB) for checkpoints: free space or move trainer.output_dir")
    want = spec["gpus_per_node"]
    if want > 0 and (have := _visible_gpus()) < want:
        fails.append(f"{have} GPU(s) visible, the layout needs {want} per node: submit with --gpus-per-node={want} "
                     f"or set STEER_GPUS_PER_NODE")
    return fails


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steer_megatron.launch.preflight", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="config + allocation checks; prints the layout as shell exports")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value dotlist overrides")
    p.add_argument("--nodes", help="homogeneous allocation: all node names, comma separated")
    p.add_argument("--trainer-count", type=int, default=1, help="with --nodes: how many of them train")
    p.add_argument("--trainer-nodes", help="heterogeneous job: trainer group node names")
    p.add_argument("--rollout-nodes", help="heterogeneous job: rollout group node names")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--nproc-per-node", type=int, default=1, help="trainer processes per CPU node (GPU nodes: one per GPU)")
    p.add_argument("--job-id", type=int)
    p.add_argument("--port-base", type=int)
    p.add_argument("--restart-count", type=int, default=0)
    p.add_argument("--min-free-gb", type=float, default=1.0)
    p.add_argument("--gpu-mem-gib", type=float, help="one GPU's memory: refuse a config whose memory plan "
                   "(python -m steer_megatron.launch.plan) does not fit")
    n = sub.add_parser("node", help="checks on this node (run one task per node under srun)")
    n.add_argument("role", choices=["trainer", "rollout"])
    n.add_argument("spec", type=Path)
    args = parser.parse_args(argv)

    where = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    if args.cmd == "plan":
        if (args.nodes is None) == (args.trainer_nodes is None or args.rollout_nodes is None):
            parser.error("pass either --nodes (homogeneous) or --trainer-nodes and --rollout-nodes (heterogeneous)")
        try:
            # stdout is eval'ed by the sbatch script: anything else printed meanwhile (the demo's
            # asset build) goes to stderr
            with contextlib.redirect_stdout(sys.stderr):
                layout = plan(args)
            sys.stdout.write(layout.shell())
        except PreflightError as e:
            print(f"preflight FAILED: {e}", file=sys.stderr)
            return 2
        return 0
    fails = node_checks(args.role, args.spec)
    for f in fails:
        print(f"preflight FAILED on {where} ({args.role}): {f}", file=sys.stderr)
    if not fails:
        print(f"preflight ok on {where} ({args.role})")
    return 2 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
