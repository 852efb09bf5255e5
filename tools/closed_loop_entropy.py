#!/usr/bin/env python
"""A short on-policy RL run with STEER's w_min closed loop: does the per-step entropy change stay
inside the band?

Each step (one process, TP = 1): sync the Megatron weights into the HF rollout model, sample
--n-prompts x n completions, score, GRPO advantages (groups with mixed rewards), old log-prob
pass, ONE optimizer step over the whole batch with the configured STEER loss, then measure the
step's entropy change on that batch (mean over response tokens of H_after - H_before, one extra
forward pass) and, with the loop on, let WMinController set w_min for the next step.
Run it twice, --mode on and --mode off, for the comparison; writes OUT/closed_loop_<mode>.json.

Example:
  python tools/closed_loop_entropy.py --demo --band=-0.004,-0.001 --steps 30 --out docs/img/entropy_demo
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import _common  # noqa: F401  (puts the repo on sys.path)
import verify_entropy_change as vec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="HF_DIR", help="HF model directory to train from")
    src.add_argument("--demo", action="store_true", help="the CPU demo's warmed-up tiny model and digit-sorting data")
    p.add_argument("--config", metavar="YAML", help="run config for loss and optimizer (default configs/cpu_demo.yaml)")
    p.add_argument("--data", metavar="PARQUET",
                   help=f"RL parquet of prompts, or '{vec.SYNTHETIC}' (default: the demo's train parquet with --demo)")
    p.add_argument("--out", required=True, metavar="DIR", help="where closed_loop_<mode>.json goes")
    p.add_argument("--mode", choices=("on", "off"), default="on", help="closed loop on, or fixed w_min (default on)")
    p.add_argument("--band", required=True, metavar="LOW,HIGH",
                   help="target band of the per-step mean entropy change in nats (write --band=-0.004,-0.001)")
    p.add_argument("--gain", type=float, default=0.5, help="controller gain (log w_min per band width; default 0.5)")
    p.add_argument("--w-min-bounds", default="0.05,1.0", metavar="LO,HI", help="w_min range (default 0.05,1.0)")
    p.add_argument("--steps", type=int, default=30, help="RL steps (default 30)")
    p.add_argument("--n-prompts", type=int, default=16, help="prompts per step (default 16)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the config's optim.lr)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompt draws and sampling (default 0)")
    return p


def _pair(text: str, flag: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"{flag} wants two comma-separated numbers, got {text!r}") from None
    return lo, hi


def run_rank(cfg, hf_dir: str, data: str, args) -> list[dict]:
    import dataclasses

    from steer_megatron.algorithms.controller import WMinController, step_entropy_change
    from steer_megatron.models import build_gpt_model, iter_hf_weights, load_hf_weights, parse_hf_config
    from steer_megatron.parallel import ParallelLayout, init_parallel
    from steer_megatron.rollout.cpu_engine import CpuEngine
    from steer_megatron.train.actor import ActorConfig, MegatronActor
    from steer_megatron.train.settings import DTYPES, optim_settings, policy_loss_config
    from steer_megatron.train.optim import wrap_for_training

    init_parallel(ParallelLayout(), seed=cfg.trainer.seed)
    arch = parse_hf_config(hf_dir)
    model, vocab = build_gpt_model(arch, params_dtype=DTYPES[cfg.model.dtype])
    load_hf_weights(model, hf_dir, arch)
    ddp, optimizer, scheduler = wrap_for_training(model, optim_settings(cfg))
    base = ActorConfig(vocab_size=vocab.size, micro_batch_size=1, mini_batch_size=1, ppo_epochs=1,
                       policy_loss="steer", loss=policy_loss_config(cfg), temperature=cfg.rollout.temperature)
    actor = MegatronActor(ddp, optimizer, base, scheduler)
    ctrl = WMinController(*_pair(args.band, "--band"), w_min_init=cfg.algorithm.steer.w_min,
                          w_min_bounds=_pair(args.w_min_bounds, "--w-min-bounds"), gain=args.gain)
    tok = vec.load_tokenizer(hf_dir)
    engine = CpuEngine(hf_dir)
    rng = random.Random(args.seed)
    pool = vec.prompt_pool(data, tok, engine.vocab_size, cfg, 4 * args.n_prompts, rng)
    history = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        engine.load_state(dict(iter_hf_weights(ddp, arch)))  # on-policy: sample from the weights being trained
        prompts = rng.sample(pool, min(args.n_prompts, len(pool)))
        batch, stats = vec.rollout_batch(engine, tok, prompts, cfg, n=cfg.rollout.n, max_new=cfg.rollout.max_new_tokens,
                                         temperature=cfg.rollout.temperature, seed=args.seed * 100_003 + step)
        rec = {"step": step, "w_min": ctrl.w_min if args.mode == "on" else cfg.algorithm.steer.w_min,
               "mean_reward": stats["mean_reward"]}
        if batch is None:  # every group solved or failed alike: no gradient this step
            history.append(rec | {"dH": None, "in_band": None})
            continue
        n_seq = len(batch)
        actor.cfg = dataclasses.replace(actor.cfg, micro_batch_size=vec._micro_batch_size(n_seq, cfg.trainer.micro_batch_size),
                                        mini_batch_size=n_seq)
        batch.old_log_prob, batch.old_entropy = actor.compute_log_probs(batch)
        metrics = actor.update(batch)
        dh = step_entropy_change(actor, batch)
        rec |= {"dH": dh, "in_band": ctrl.in_band(dh), "entropy_before": float(batch.old_entropy[batch.loss_mask].mean()),
                "weight_mean": metrics.get("weight_mean"), "seconds": time.perf_counter() - t0}
        if args.mode == "on":
            ctrl.update(dh)
            actor.cfg = ctrl.actuate(actor.cfg)
        history.append(rec)
        print(f"step {step}: w_min {rec['w_min']:.3f} dH {dh:+.5f} in band {rec['in_band']} reward {rec['mean_reward']:.2f}",
              flush=True)
    return history


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from steer_megatron.config import load_config
    from steer_megatron.parallel import spawn_ranks

    cfg = load_config(args.config or vec.DEFAULT_CONFIG)
    if args.demo:
        from steer_megatron.demo_assets import apply_demo_assets

        cfg.demo.enabled = True
        apply_demo_assets(cfg)
        hf_dir, data = cfg.model.hf_path, args.data or cfg.data.train_files[0]
    else:
        hf_dir, data = args.hf, args.data or vec.SYNTHETIC
    if args.lr:
        cfg.optim.lr = args.lr
    cfg.algorithm.policy_loss = "steer"
    t0 = time.perf_counter()
    history = spawn_ranks(run_rank, 1, cfg, hf_dir, data, args)[0]
    measured = [h for h in history if h["dH"] is not None]
    in_band = sum(h["in_band"] for h in measured)
    summary = {"mode": args.mode, "band": _pair(args.band, "--band"), "gain": args.gain, "steps": args.steps,
               "measured_steps": len(measured), "in_band_steps": in_band,
               "in_band_fraction": in_band / len(measured) if measured else None,
               "in_band_fraction_after_5": (sum(h["in_band"] for h in measured[5:]) / len(measured[5:])) if measured[5:] else None,
               "lr": cfg.optim.lr, "seconds": time.perf_counter() - t0, "history": history}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"closed_loop_{args.mode}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{args.mode}: {in_band}/{len(measured)} steps in band {summary['band']}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
