"""The attribution form against brute force: per-token update steps, and the whole step (SGD, Adam).

  python tools/attribution_check.py --hf .cache/demo_assets/<hash>/model --lr 1e-4
  python tools/attribution_check.py --hf .cache/models/smollm2-135m-instruct \\
      --config configs/smollm2_135m_steer.yaml --data .cache/data/arith/train.parquet \\
      --per-token 120 --out attribution_smollm2.json

The batch is random tokens, or with --data real rollouts sampled by the model itself (chat
prompts, the config's reward, GRPO advantages; groups with equal rewards dropped).

For each optimizer (SGD, then Adam): one warm-up update on another batch (Adam then has
statistics), then the batch's summed attribution `lr sum_j dH_total_j` against the change of the
batch's summed entropy over one real update, measured two-sided, (dH(+A) - dH(-A)) / 2, so that
the second-order term drops out. fp32, TP = DP = 1.

--per-token K adds, for SGD (P = identity), K tokens drawn at random: each token's own step,
theta +- s A_j / N grad log p_j (plain torch on the bare model, entropies from float64
log-softmax of the raw logits), s set so that the largest weight moves by --token-step x
max|theta|; the central difference per unit step is that token's measured contribution,
compared with its attribution (Pearson, Spearman, sign agreement, sums).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import _common  # noqa: F401  (puts the repo on sys.path)


def _actor(hf: str, optimizer: str, lr: float, seqs: int):
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from steer_megatron.loss import PolicyLossConfig
    from steer_megatron.models import build_gpt_model, load_hf_weights, parse_hf_config
    from steer_megatron.train.actor import ActorConfig, MegatronActor

    arch = parse_hf_config(hf)
    model, vocab = build_gpt_model(arch, params_dtype=torch.float32)
    load_hf_weights(model, hf, arch)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    # no weight decay, no clipping, no momentum: the step is exactly -lr * P * grad(loss)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer=optimizer, lr=lr, weight_decay=0.0, clip_grad=0.0,
                                                 sgd_momentum=0.0), [ddp])
    micro = max(d for d in range(1, min(seqs, 4) + 1) if seqs % d == 0)
    return MegatronActor(ddp, opt, ActorConfig(vocab_size=vocab.size, micro_batch_size=micro, mini_batch_size=seqs,
                                               policy_loss="grpo", loss=PolicyLossConfig())), vocab.size


def random_batches(vocab: int, seqs: int, length: int, seed: int = 0):
    """(measured batch, warm-up batch) of random tokens, the second half of each row the response."""
    import torch

    from steer_megatron.train.actor import ActorBatch

    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(seqs, length - 1, dtype=torch.bool)
    mask[:, length // 2:] = True

    def one():
        return ActorBatch(input_ids=torch.randint(0, vocab, (seqs, length), generator=g), loss_mask=mask,
                          advantages=torch.randn(seqs, 1, generator=g) * mask)

    return one(), one()


def plain_entropy_sum(gpt, batch, vocab: int, chunk: int = 4) -> float:
    """Summed response-token entropy from float64 log-softmax of the bare model's raw logits."""
    import torch

    ids, mask = batch.input_ids, batch.loss_mask
    total = 0.0
    with torch.no_grad():
        for i in range(0, ids.shape[0], chunk):
            rows = ids[i:i + chunk]
            pos = torch.arange(rows.shape[1])[None].expand_as(rows)
            lp = torch.log_softmax(gpt(rows, pos, None)[:, :-1, :vocab].double(), -1)
            total += float((-(lp.exp() * lp).sum(-1))[mask[i:i + chunk]].sum())
    return total


def per_token_brute_force(actor, batch, attr, vocab: int, k: int, token_step: float, seed: int) -> dict:
    """Each of k random response tokens' own SGD step, two-sided, against its attribution."""
    import torch

    from steer_megatron.diagnostics.entropy_change import pearson, sign_agreement, spearman

    ids, mask, adv = batch.input_ids, batch.loss_mask, batch.advantages
    n = int(mask.sum())
    gpt = actor.model.module
    was_training = gpt.training
    gpt.eval()
    params = list(gpt.parameters())
    saved = [p.detach().clone() for p in params]
    theta_max = max(float(p.detach().abs().max()) for p in params)
    positions = mask.nonzero().tolist()
    picked = sorted(random.Random(seed).sample(positions, min(k, len(positions))))
    h0 = plain_entropy_sum(gpt, batch, vocab)
    rows = []
    pos = torch.arange(ids.shape[1])[None]
    t0 = time.perf_counter()
    for done, (i, t) in enumerate(picked, 1):
        logits = gpt(ids[i:i + 1], pos, None)[0, t, :vocab].double()
        grads = torch.autograd.grad(torch.log_softmax(logits, -1)[ids[i, t + 1]], params)
        c = float(adv[i, t]) / n  # token j's term of the token-mean surrogate, ratio 1
        g_max = max(float(g.abs().max()) for g in grads)
        if c == 0 or g_max == 0:
            rows.append((i, t, float(attr[i, t]), 0.0))
            continue
        s = token_step * theta_max / (abs(c) * g_max)

        def change(sign):
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.add_(g.to(p.dtype), alpha=sign * s * c)
                h = plain_entropy_sum(gpt, batch, vocab)
                for p, w in zip(params, saved):
                    p.copy_(w)
            return h - h0

        measured = (change(1.0) - change(-1.0)) / (2 * s)  # per unit LR, as the attribution
        rows.append((i, t, float(attr[i, t]), measured))
        if done % 10 == 0:
            print(f"  per-token brute force: {done}/{len(picked)} tokens, {time.perf_counter() - t0:.0f} s", flush=True)
    restored = all(torch.equal(p, w) for p, w in zip(params, saved))
    gpt.train(was_training)
    a = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    m = torch.tensor([r[3] for r in rows], dtype=torch.float64)
    return {"tokens": len(rows), "of_response_tokens": n, "token_step": token_step,
            "pearson": pearson(a, m), "spearman": spearman(a, m), "sign_agreement": sign_agreement(a, m)[0],
            "sum_attribution": float(a.sum()), "sum_measured": float(m.sum()),
            "weights_restored": restored, "seconds": time.perf_counter() - t0,
            "rows": [{"seq": i, "pos": t, "attribution": x, "measured": y} for i, t, x, y in rows]}


def _worker(hf: str, optimizer: str, lr: float, batch, warm, per_token: int, token_step: float, seed: int) -> dict:
    from dataclasses import replace

    from steer_megatron.diagnostics.measure import TrainingSnapshot, _set_lr
    from steer_megatron.parallel import ParallelLayout, init_parallel
    from steer_megatron.train.attribution import entropy_attribution

    init_parallel(ParallelLayout(), seed=0)
    actor, vocab = _actor(hf, optimizer, lr, batch.input_ids.shape[0])
    mask = batch.loss_mask
    out = {"optimizer": optimizer, "lr": lr}
    if per_token:  # P = identity: before any update, and SGD's P anyway
        actor.old_pass(batch)
        attr, _ = entropy_attribution(actor, batch, int(mask.sum()))
        out["per_token"] = per_token_brute_force(actor, batch, attr, vocab, per_token, token_step, seed)
    actor.old_pass(warm)
    actor.update(warm)
    actor.old_pass(batch)
    n = int(mask.sum())
    attr, stats = entropy_attribution(actor, batch, n)

    def h_total():
        _, h = actor.compute_log_probs(batch)
        return float(h[mask].double().sum())

    h0 = h_total()

    def change(sign):
        snap = TrainingSnapshot(actor)
        _set_lr(actor, lr)
        actor.update(replace(batch, advantages=sign * batch.advantages))
        dh = h_total() - h0
        snap.restore()
        return dh

    up, down = change(1.0), change(-1.0)
    predicted = lr * float(attr[mask].double().sum())
    return out | {"tokens": n, "predicted_sum": predicted, "measured_up": up, "measured_down": down,
                  "measured_first_order": (up - down) / 2,
                  "ratio": predicted / ((up - down) / 2) if up != down else None, "fd_eps": stats["attr_eps"]}


def rollout_batches(args):
    """(measured, warm-up) batches of real rollouts from the model itself, two disjoint prompt draws."""
    import verify_entropy_change as vec

    from steer_megatron.config import load_config

    cfg = load_config(args.config)
    cfg.model.hf_path = args.hf
    ns = argparse.Namespace(seed=args.seed, n_prompts=args.n_prompts, samples_per_prompt=args.samples_per_prompt,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    batch, stats = vec.build_batch(args.hf, args.data, cfg, ns)
    warm, _ = vec.build_batch(args.hf, args.data, cfg, argparse.Namespace(**(vars(ns) | {"seed": args.seed + 1})))
    if args.max_seqs:  # the per-token check costs two forwards of the whole batch per token
        batch, warm = _first_rows(batch, args.max_seqs), _first_rows(warm, args.max_seqs)
        stats |= {"sequences": len(batch), "response_tokens": int(batch.loss_mask.sum())}
    return batch, warm, stats


def _first_rows(batch, rows: int):
    """The first `rows` sequences (whole GRPO groups when rows is a multiple of the group size),
    without the padding columns no kept row needs."""
    from dataclasses import fields, replace

    batch = batch.slice(0, rows)
    length = int(batch.loss_mask.any(0).nonzero().max()) + 2
    return replace(batch, **{f.name: (None if getattr(batch, f.name) is None else
                                      getattr(batch, f.name)[:, :length if f.name == "input_ids" else length - 1])
                             for f in fields(batch)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="HF model directory")
    ap.add_argument("--lr", type=float, default=1e-4, help="Adam's learning rate for the whole-step check")
    ap.add_argument("--sgd-lr", type=float, default=1e-2, help="SGD's learning rate for the whole-step check")
    ap.add_argument("--seqs", type=int, default=8, help="random-token batch: sequences")
    ap.add_argument("--len", type=int, default=48, help="random-token batch: tokens per sequence")
    ap.add_argument("--data", help="parquet of prompts: measure on the model's own rollouts instead of random tokens")
    ap.add_argument("--config", help="run config for --data (chat template, reward, advantage settings)")
    ap.add_argument("--n-prompts", type=int, default=4, help="with --data: prompts sampled (groups with equal "
                    "rewards are dropped)")
    ap.add_argument("--samples-per-prompt", type=int, default=8, help="with --data: the GRPO group size")
    ap.add_argument("--max-new-tokens", type=int, default=40, help="with --data: the longest response")
    ap.add_argument("--temperature", type=float, default=1.0, help="with --data: the sampling temperature")
    ap.add_argument("--max-seqs", type=int, default=0, help="with --data: keep the first this many sequences (0: all)")
    ap.add_argument("--per-token", type=int, default=0, metavar="K",
                    help="also brute-force K random tokens one by one (SGD); 0: off")
    ap.add_argument("--token-step", type=float, default=1e-3,
                    help="per-token step: the largest weight change as a fraction of max|theta| (default 1e-3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the report as JSON here")
    args = ap.parse_args(argv)
    if args.data and not args.config:
        ap.error("--data needs --config (the chat template, reward and advantage settings of the rollouts)")
    from steer_megatron.parallel import spawn_ranks

    t0 = time.perf_counter()
    if args.data:
        batch, warm, batch_stats = rollout_batches(args)
    else:
        from steer_megatron.models import parse_hf_config

        batch, warm = random_batches(parse_hf_config(args.hf).vocab_size, args.seqs, args.len, args.seed)
        batch_stats = {"random_tokens": int(batch.loss_mask.sum())}
    print(f"batch: {batch_stats}", flush=True)
    rows = [spawn_ranks(_worker, 1, args.hf, o, lr, batch, warm, args.per_token if o == "sgd" else 0,
                        args.token_step, args.seed, timeout=4 * 3600)[0]
            for o, lr in (("sgd", args.sgd_lr), ("adam", args.lr))]
    report = {"args": vars(args), "batch": batch_stats, "rows": rows, "seconds": time.perf_counter() - t0}
    brief = [{k: v for k, v in r.items() if k != "per_token"} | (
        {"per_token": {k: v for k, v in r["per_token"].items() if k != "rows"}} if "per_token" in r else {})
        for r in rows]
    print(json.dumps(brief, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
