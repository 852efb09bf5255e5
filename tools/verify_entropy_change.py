#!/usr/bin/env python
"""Check STEER's first-order entropy-change estimate (Omega) on real updates of your model.

Samples a rollout batch from the model itself (HF generate on this machine), scores it, computes
GRPO advantages, then on Megatron-Core (TP ranks via spawn): records every response token's
entropy, performs ONE real training step with the configured loss, optimizer and LR, recomputes
the entropies at the same positions and compares the measured change with Omega in each form
(release, paper, exact: the exact first order of the PPO surrogate's own step). Several
--lr values are measured from the same starting weights (the step is undone in between).

Writes OUT/report.json, OUT/scatter_lr<LR>.png (binned predicted vs measured per form) and
OUT/entropy_lr<LR>.png (change vs current entropy), and prints the headline numbers.

Examples:
  python tools/verify_entropy_change.py --demo --out docs/img/entropy_demo
  python tools/verify_entropy_change.py --hf /models/Qwen2.5-Math-1.5B --data dapo.parquet --out diag --tp 2 --lr 1e-6
  python tools/verify_entropy_change.py --ckpt runs/my_run/checkpoints --data train.parquet --out diag
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import tempfile
import time

import _common  # noqa: F401  (puts the repo on sys.path)

SYNTHETIC = "synthetic"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "cpu_demo.yaml")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="HF_DIR", help="HF model directory (weights + tokenizer) to measure")
    src.add_argument("--ckpt", metavar="CKPT_DIR",
                     help="training checkpoint (a checkpoint dir, or a root: its latest); model AND optimizer state "
                          "are loaded, so the step uses the run's Adam moments; its saved run config is the default "
                          "--config")
    src.add_argument("--demo", action="store_true",
                     help="the CPU demo's warmed-up tiny model and digit-sorting data (built and cached on first use)")
    p.add_argument("--config", metavar="YAML",
                   help="run config whose algorithm (loss, clip, STEER form, w_min) and optim (lr, Adam, clip, "
                        "weight decay) settings define the step; default: the checkpoint's saved config with "
                        "--ckpt, else configs/cpu_demo.yaml")
    p.add_argument("--data", metavar="PARQUET",
                   help=f"verl-layout RL parquet to draw prompts from (rewards from its ground truths); "
                        f"'{SYNTHETIC}' = random token prompts with a synthetic reward (fraction of even token ids "
                        f"in the response); default: the demo's train parquet with --demo, else {SYNTHETIC}")
    p.add_argument("--out", required=True, metavar="DIR", help="where report.json and the PNGs go (created)")
    p.add_argument("--loss", choices=("steer", "grpo"), help="policy loss of the step (default: the config's)")
    p.add_argument("--form", choices=("release", "paper", "exact"),
                   help="STEER form used for the weights in the step (default: the config's); all forms are "
                        "evaluated as predictors either way")
    p.add_argument("--w-min", type=float, default=None, help="STEER weight floor of the step (default: the config's)")
    p.add_argument("--lr", default=None, metavar="LR[,LR...]",
                   help="learning rate(s) of the step; several comma-separated values are each measured from the "
                        "same starting point (default: the config's optim.lr)")
    p.add_argument("--adam-eps", type=float, default=None,
                   help="override optim.eps; a large value (e.g. 1) turns Adam's step into ~lr * gradient (plain SGD), "
                        "which separates Adam's per-parameter rescaling from the network's coupling of tokens")
    p.add_argument("--weight-decay", type=float, default=None, help="override optim.weight_decay")
    p.add_argument("--n-prompts", type=int, default=16, help="prompts in the rollout batch (default 16)")
    p.add_argument("--samples-per-prompt", type=int, default=None,
                   help="completions per prompt, the GRPO group size (default: the config's rollout.n)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="response length limit (default: the config's rollout.max_new_tokens)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollout (default 1.0)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size: ranks launched on this machine (default 1)")
    p.add_argument("--prob-threshold", type=float, default=0.5,
                   help="token probability splitting 'high' from 'low' in the quadrant and clipping tables (default 0.5)")
    p.add_argument("--bins", type=int, default=20, help="equal-count bins of the binned scatter (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompt choice and sampling (default 0)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds the measuring ranks may take (default 3600; a 135M model on a busy 2-core "
                        "machine needs more than 600 for two learning rates)")
    return p


# -- configuration ------------------------------------------------------------------------------

def _run_config(args):
    """(RunConfig, hf_dir for tokenizer/rollout, checkpoint or None, default data)."""
    from steer_megatron.config import RunConfig, load_config

    if args.ckpt:
        from omegaconf import OmegaConf

        from steer_megatron.models.checkpoint import find_latest, read_meta

        ckpt = find_latest(args.ckpt)
        if ckpt is None:
            raise SystemExit(f"no complete checkpoint under {args.ckpt} (a dir with meta.json and dist/)")
        meta = read_meta(ckpt)
        if args.config:
            cfg = load_config(args.config)
        elif meta.config:
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), meta.config))
        else:
            raise SystemExit(f"{ckpt} has no saved run config: pass --config with the run's YAML")
        return cfg, None, ckpt, (cfg.data.train_files[0] if cfg.data.train_files else SYNTHETIC)
    cfg = load_config(args.config or DEFAULT_CONFIG)
    if args.demo:
        from steer_megatron.demo_assets import apply_demo_assets

        cfg.demo.enabled = True
        apply_demo_assets(cfg)
        return cfg, cfg.model.hf_path, None, cfg.data.train_files[0]
    cfg.demo.enabled = False
    cfg.model.hf_path = args.hf
    return cfg, args.hf, None, SYNTHETIC


def _apply_flags(cfg, args) -> list[float]:
    if args.loss:
        cfg.algorithm.policy_loss = args.loss
    if args.form:  # the loss's components are frozen dataclasses: replaced, not edited
        cfg.algorithm.steer = dataclasses.replace(cfg.algorithm.steer, form=args.form)
    if args.w_min is not None:
        cfg.algorithm.steer = dataclasses.replace(cfg.algorithm.steer, w_min=args.w_min)
    if args.adam_eps is not None:
        cfg.optim.eps = args.adam_eps
    if args.weight_decay is not None:
        cfg.optim.weight_decay = args.weight_decay
    cfg.rollout.temperature = args.temperature  # the actor's statistics are those of softmax(logits / T)
    lrs = [float(x) for x in args.lr.split(",")] if args.lr else [cfg.optim.lr]
    if cfg.model.dtype != "float32":
        # A bf16 weight keeps ~3 significant digits: at lr 1e-6 it does not move, and the
        # "measured" entropy change is rounding noise (every Omega form then correlates within
        # +-0.03 of zero on SmolLM2-135M; docs/entropy_diagnostics.md).
        if args.ckpt:
            raise SystemExit(f"the checkpoint's run trains in {cfg.model.dtype}: a one-step entropy change measured in "
                             f"{cfg.model.dtype} is rounding noise. Convert it to HF (tools/convert_megatron_to_hf.py "
                             "--dtype float32) and measure with --hf")
        print(f"measuring in float32, not the config's {cfg.model.dtype}: in {cfg.model.dtype} a one-step weight "
              "change this small is lost to rounding, and the measured entropy change would be noise")
        cfg.model.dtype = "float32"
    if any(lr <= 0 for lr in lrs):
        raise SystemExit(f"--lr values must be > 0, got {lrs}")
    return lrs


def _export_ckpt_to_hf(ckpt: str, cfg, out_dir: str) -> str:
    """HF weights of the checkpoint, for the HF rollout (tokenizer from the run's model dir)."""
    from steer_megatron.models.convert import dist_checkpoint_to_hf

    source = cfg.model.tokenizer_path or cfg.model.hf_path
    if not source or not os.path.isdir(source):
        raise SystemExit(f"the checkpoint's run config points at model dir {source!r}, which is missing here; pass "
                         "--config with model.hf_path set to the base model (its tokenizer and config are used)")
    dist_checkpoint_to_hf(ckpt, out_dir, hf_config_dir=source, overwrite=True)
    return out_dir


# -- the rollout batch --------------------------------------------------------------------------

def load_tokenizer(hf_dir: str):
    """The model dir's tokenizer. (The demo's tokenizer is byte-level since demo recipe 2, so
    AutoTokenizer gives the same ids as the serialised tokenizer.json.)"""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def prompt_pool(data: str, tokenizer, vocab_size: int, cfg, n_synthetic: int, rng: random.Random):
    """Prompts as (ids, data_source, ground_truth, style): every usable row of the parquet, or
    n_synthetic random 8-token prompts (no ground truth) for data == 'synthetic'."""
    if data == SYNTHETIC:
        specials = set(tokenizer.all_special_ids)
        pool = [i for i in range(vocab_size) if i not in specials]
        return [([rng.choice(pool) for _ in range(8)], SYNTHETIC, "", None) for _ in range(n_synthetic)]
    from steer_megatron.data.rl_dataset import load_rl_parquets

    rows, _ = load_rl_parquets([data], tokenizer, max_prompt_len=cfg.data.max_prompt_len, prompt_key=cfg.data.prompt_key,
                               apply_chat_template=cfg.data.apply_chat_template)  # as the trainer builds its prompts
    return [(r.prompt_ids, r.data_source, r.ground_truth, r.reward_style) for r in rows]


def _rewards(prompts, texts, outputs, n, num_workers, routes=None) -> list[float]:
    if prompts[0][1] == SYNTHETIC:
        # Deterministic, varied within a group, unrelated to correctness: exercises both advantage signs.
        return [sum(t % 2 == 0 for t in o) / max(len(o), 1) for o in outputs]
    from steer_megatron.rewards.scorer import RewardScorer

    expand = lambda k: [prompts[i // n][k] for i in range(len(texts))]  # noqa: E731
    with RewardScorer(num_workers=num_workers, routes=routes) as scorer:  # the config's reward.routes, as in training
        return scorer.score(expand(1), texts, expand(2), expand(3)).scores


def rollout_batch(engine, tok, prompts, cfg, *, n: int, max_new: int, temperature: float, seed: int):
    """Sample n completions per prompt, score them, GRPO advantages; keep the groups with mixed
    rewards (the others carry no gradient). Returns (ActorBatch, stats) or (None, stats)."""
    import torch

    from steer_megatron.algorithms.advantages import grpo_advantages, informative_groups
    from steer_megatron.rollout.cpu_engine import SeqRequest, derive_seed
    from steer_megatron.rollout.types import Sample
    from steer_megatron.train.batch import samples_to_batch

    # stop where the trainer's rollouts stop: EOS or pad (an instruct model's end-of-turn token)
    stop = tuple(sorted({i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}))
    seqs = [SeqRequest(rid=f"p{i}", prompt=list(p[0]), max_new_tokens=max_new, temperature=temperature,
                       stop_token_ids=stop, seed=derive_seed(f"p{i}", j, seed))
            for i, p in enumerate(prompts) for j in range(n)]
    engine.generate(seqs)
    texts = [tok.decode(s.output_ids, skip_special_tokens=True) for s in seqs]
    rewards = torch.tensor(_rewards(prompts, texts, [s.output_ids for s in seqs], n, cfg.reward.num_workers,
                                    cfg.reward.routes)).view(-1, n)
    keep = informative_groups(rewards)
    stats = {"prompts": len(prompts), "groups_kept": int(keep.sum()), "mean_reward": float(rewards.mean()),
             "samples_per_prompt": n, "max_new_tokens": max_new, "temperature": temperature}
    if not keep.any():
        return None, stats
    adv = grpo_advantages(rewards[keep], norm_by_std=cfg.algorithm.adv.norm_by_std, eps=cfg.algorithm.adv.eps)
    kept = [i for i in range(len(prompts)) if keep[i]]
    samples = [Sample(prompt_index=i, sample_index=j, rid=f"p{i}", output_ids=seqs[i * n + j].output_ids,
                      logprobs=seqs[i * n + j].logprobs, finish_reason=seqs[i * n + j].finish["type"],
                      matched_stop=seqs[i * n + j].finish.get("matched"), prompt_tokens=len(prompts[i][0]),
                      weight_version=None) for i in kept for j in range(n)]
    batch = samples_to_batch([prompts[s.prompt_index][0] for s in samples], samples, adv.flatten().tolist(),
                             pad_id=engine.pad_id)
    stats |= {"sequences": len(samples), "response_tokens": int(batch.loss_mask.sum())}
    return batch, stats


def build_batch(hf_dir: str, data: str, cfg, args):
    """The measured rollout batch, sampled by HF generate from the model itself."""
    from steer_megatron.rollout.cpu_engine import CpuEngine

    rng = random.Random(args.seed)
    tok = load_tokenizer(hf_dir)
    engine = CpuEngine(hf_dir)
    pool = prompt_pool(data, tok, engine.vocab_size, cfg, args.n_prompts, rng)
    if len(pool) < args.n_prompts:
        raise SystemExit(f"{data} has {len(pool)} usable prompts, fewer than --n-prompts {args.n_prompts}")
    prompts = rng.sample(pool, args.n_prompts)
    batch, stats = rollout_batch(engine, tok, prompts, cfg, n=args.samples_per_prompt or cfg.rollout.n,
                                 max_new=args.max_new_tokens or cfg.rollout.max_new_tokens,
                                 temperature=args.temperature, seed=args.seed)
    if batch is None:
        raise SystemExit(f"all {len(prompts)} groups have equal rewards (mean reward {stats['mean_reward']:.2f}): no "
                         "advantage signal; raise --n-prompts, --samples-per-prompt or --temperature")
    return batch, stats | {"data": data}


# -- the measurement on Megatron (one function per rank) --------------------------------------

def _micro_batch_size(n_seq: int, wanted: int) -> int:
    """The largest divisor of the batch not above the configured micro-batch size (one step = whole batch)."""
    return max(d for d in range(1, min(n_seq, wanted) + 1) if n_seq % d == 0)


def measure_rank(cfg, hf_dir: str | None, ckpt: str | None, batch, lrs: list[float]):
    from steer_megatron.diagnostics import measure_entropy_change
    from steer_megatron.models import build_gpt_model, load_hf_weights, parse_hf_config
    from steer_megatron.parallel import ParallelLayout, init_parallel
    from steer_megatron.train.actor import ActorConfig, MegatronActor
    from steer_megatron.train.settings import DTYPES, optim_settings, policy_loss_config
    from steer_megatron.train.optim import wrap_for_training

    init_parallel(ParallelLayout(tp=cfg.parallel.tp), seed=cfg.trainer.seed)
    if ckpt:
        from steer_megatron.models.checkpoint import load_checkpoint, read_meta

        meta = read_meta(ckpt)
        arch = parse_hf_config(meta.hf_config)
        model, vocab = build_gpt_model(arch, params_dtype=DTYPES[cfg.model.dtype], padded_vocab=meta.padded_vocab_size)
    else:
        arch = parse_hf_config(hf_dir)
        model, vocab = build_gpt_model(arch, params_dtype=DTYPES[cfg.model.dtype])
        load_hf_weights(model, hf_dir, arch)
    ddp, optimizer, scheduler = wrap_for_training(model, optim_settings(cfg))
    if ckpt:
        meta = load_checkpoint(ckpt, ddp, optimizer if meta.has_optimizer else None)
        if "scheduler" in meta.extra:
            scheduler.load_state_dict(meta.extra["scheduler"])
    n_seq = len(batch)
    actor = MegatronActor(ddp, optimizer, ActorConfig(
        vocab_size=vocab.size, micro_batch_size=_micro_batch_size(n_seq, cfg.trainer.micro_batch_size),
        mini_batch_size=n_seq, ppo_epochs=1, policy_loss=cfg.algorithm.policy_loss, loss=policy_loss_config(cfg),
        temperature=cfg.rollout.temperature),
        scheduler)
    return [measure_entropy_change(actor, batch, undo=True, lr=lr)[0] for lr in lrs]


# -- report -------------------------------------------------------------------------------------

def _print(reports: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for rep in reports:
        lr = rep["meta"]["lr"]
        t = Table(title=f"Omega vs measured entropy change, lr={lr:g}, {rep['tokens']} tokens, "
                        f"mean dH {rep['measured']['mean']:.3g}")
        for col in ("form", "pearson", "spearman", "sign agree", "spearman top-H 20%", "fit scale", "holdout total ratio"):
            t.add_column(col)
        for f, s in rep["forms"].items():
            t.add_row(f, fmt(s["pearson"]), fmt(s["spearman"]), fmt(s["sign_agreement"]),
                      fmt(s["top_entropy_quintile"]["spearman"]),
                      f"{s['total']['fitted_scale']:.3g}" if s["total"]["fitted_scale"] is not None else "n/a",
                      fmt(s["total"]["holdout_ratio"]))
        fo = rep.get("first_order")
        if fo is not None:  # the parameter-space first order along the actual update, next to the forms
            ratio = fo["first_order_sum"] / fo["measured_sum"] if fo["measured_sum"] else None
            t.add_row("first order (grad H . delta)", fmt(fo["pearson"]), fmt(fo["spearman"]),
                      fmt(fo["sign_agreement"]), "", fmt(fo["slope"]), fmt(ratio))
        con.print(t)
        if fo is not None:
            con.print(f"measurement check: {fo['verdict']}")
        q = Table(title="quadrants (A sign x p_old high/low)")
        for col in ("quadrant", "tokens", "mean dH", "frac dH<0"):
            q.add_column(col)
        for name in ("pos_high", "pos_low", "neg_high", "neg_low"):
            s = rep["quadrants"][name]
            q.add_row(name, str(s["count"]), "n/a" if s["mean_measured"] is None else f"{s['mean_measured']:.3g}",
                      fmt(s["frac_entropy_down"]))
        con.print(q)
        c = rep["clipping"]
        con.print(f"clip fires after the step: low-p {fmt(c['low_prob']['clip_fraction'])}, "
                  f"high-p {fmt(c['high_prob']['clip_fraction'])}; entropy vs change: spearman "
                  f"{fmt(rep['entropy_relation']['spearman'])}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from steer_megatron.diagnostics import analyze, plot_binned_scatter, plot_entropy_relation
    from steer_megatron.parallel import spawn_ranks

    t0 = time.perf_counter()
    cfg, hf_dir, ckpt, default_data = _run_config(args)
    lrs = _apply_flags(cfg, args)
    cfg.parallel.tp = args.tp
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rollout_dir = hf_dir or _export_ckpt_to_hf(ckpt, cfg, os.path.join(tmp, "hf"))
        batch, batch_stats = build_batch(rollout_dir, args.data or default_data, cfg, args)
    t_rollout = time.perf_counter() - t0
    print(f"rollout batch ({t_rollout:.0f} s): {batch_stats}", flush=True)
    results = spawn_ranks(measure_rank, args.tp, cfg, hf_dir, ckpt, batch, lrs, timeout=args.timeout)[0]
    reports = []
    for data in results:
        lr = data.meta["lr"]
        rep = analyze(data, prob_threshold=args.prob_threshold, clip_low=cfg.algorithm.clip_low,
                      clip_high=cfg.algorithm.clip_high, n_bins=args.bins)
        title = f"{cfg.algorithm.policy_loss} step, lr={lr:g}, {rep['tokens']} tokens"
        rep["plots"] = [os.path.basename(plot_binned_scatter(rep, data, os.path.join(args.out, f"scatter_lr{lr:g}.png"), title)),
                        os.path.basename(plot_entropy_relation(rep, data, os.path.join(args.out, f"entropy_lr{lr:g}.png"), title))]
        reports.append(rep)
    out = {
        "source": {"hf": args.hf, "ckpt": ckpt, "demo": args.demo},
        "batch": batch_stats,
        "step": {"policy_loss": cfg.algorithm.policy_loss, "steer_form": cfg.algorithm.steer.form,
                 "w_min": cfg.algorithm.steer.w_min, "optimizer": "adam", "weight_decay": cfg.optim.weight_decay,
                 "grad_clip": cfg.optim.grad_clip, "adam_eps": cfg.optim.eps, "tp": args.tp,
                 "optimizer_state": "from checkpoint" if ckpt else "fresh (first Adam step)"},
        "seconds": {"rollout": t_rollout, "total": time.perf_counter() - t0},
        "runs": reports,
    }
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(out, f, indent=1, allow_nan=False)
    _print(reports)
    print(f"wrote {args.out}/report.json and {2 * len(reports)} PNGs in {out['seconds']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
