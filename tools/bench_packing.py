#!/usr/bin/env python
"""Training cost per real token: padded vs packed micro-batches vs a batch with no padding at all.

One MegatronActor.update (forward, STEER loss, backward, optimizer step) on the same model in one
process, for four batchings of sequences whose lengths follow the DAPO-Math spread:
- padded: micro_batch_size rows per micro-batch, each padded to its longest (the default trainer);
- packed: the same micro-batches packed (trainer.pack_sequences=true);
- packed_budget: packed, micro-batches by token count (trainer.max_tokens_per_micro_batch);
- no_padding: the same number of real tokens in rows that are all full (the floor packing aims at),
  rows as long as the packed rows, as many micro-batches as the packed case.
Reports seconds per 1k real tokens (median over interleaved repeats) and the ratios to no_padding.

Lengths: prompt lengths are the real DAPO-Math-17k prompts (../shared/datasets) at
--chars-per-token characters per token (no tokenizer needed); response lengths are not in the
dataset, so they are drawn from a log-normal (median --response-median, sigma --response-sigma)
clipped to [8, --max-response] (responses at the cap are truncated ones, as in RLVR runs whose
responses range from a few tokens to 3,072). --scale shrinks every length (0.125: a CPU run in
minutes; the padding fraction does not depend on it).

    python tools/bench_packing.py                  # CPU defaults
    python tools/bench_packing.py --scale 1 --hidden 1024 --layers 8   # nearer the real shape (GPU)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "DAPO-Math-17k.parquet"


def lengths(args) -> list[int]:
    """Prompt + response token counts of --sequences samples (n samples per prompt)."""
    import numpy as np
    import pyarrow.parquet as pq

    rng = np.random.default_rng(args.seed)
    prompts = pq.read_table(args.data, columns=["prompt"]).column("prompt").to_pylist()
    picked = rng.choice(len(prompts), args.sequences // args.n, replace=False)
    out = []
    for i in picked:
        p = max(1, round(sum(len(m["content"]) for m in prompts[i]) / args.chars_per_token * args.scale))
        for _ in range(args.n):
            r = math.exp(math.log(args.response_median) + args.response_sigma * rng.standard_normal())
            out.append(p + max(1, round(min(max(r, 8), args.max_response) * args.scale)))
    return out


def make_batch(seq_lengths: list[int], width: int, vocab: int, seed: int):
    import torch

    from steer_megatron.train.actor import ActorBatch

    g = torch.Generator().manual_seed(seed)
    b = len(seq_lengths)
    ids = torch.randint(0, vocab, (b, width), generator=g)
    mask = torch.zeros(b, width - 1, dtype=torch.bool)
    for i, n in enumerate(seq_lengths):
        mask[i, max(0, n // 4 - 1): n - 1] = True  # the last 3/4 of each sequence is its response
    adv = torch.randn(b, generator=g)[:, None] * mask
    return ActorBatch(input_ids=ids, loss_mask=mask, advantages=adv)


def worker(args, seq_lengths):
    import torch

    from steer_megatron.loss import PolicyLossConfig, SteerConfig
    from steer_megatron.models.hf_config import build_gpt_model, parse_hf_config
    from steer_megatron.parallel import ParallelLayout, init_parallel
    from steer_megatron.train.actor import ActorConfig, MegatronActor
    from steer_megatron.train.optim import OptimSettings, wrap_for_training
    from steer_megatron.train.packing import pack, sequence_lengths

    torch.set_num_threads(args.threads)
    init_parallel(ParallelLayout(), seed=1)
    heads = max(1, args.hidden // 64)
    arch = parse_hf_config(dict(model_type="qwen2", hidden_size=args.hidden, num_hidden_layers=args.layers,
                                num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=3 * args.hidden,
                                vocab_size=args.vocab, max_position_embeddings=8192, rope_theta=10000.0))
    model, _ = build_gpt_model(arch, seed=1)
    ddp, opt, sched = wrap_for_training(model, OptimSettings(lr=1e-6, weight_decay=0.0, clip_grad=1.0))
    loss = PolicyLossConfig(steer=SteerConfig(group="mini_batch"))
    rows = len(seq_lengths)
    width = max(seq_lengths)
    batch = make_batch(seq_lengths, width, args.vocab, args.seed)
    real = int(sequence_lengths(batch).sum())
    # no padding: as many real tokens in full rows as long as the packed rows
    probe = [pack(batch.slice(i, i + args.micro_batch_size), row_len=width)
             for i in range(0, rows, args.micro_batch_size)]
    n_micro = len(probe)
    per_micro = -(-real // width // n_micro)  # full rows per micro-batch, every row of every micro-batch real
    nopad = make_batch([width] * (per_micro * n_micro), width, args.vocab, args.seed + 1)
    cases = {
        "padded": (batch, dict(micro_batch_size=args.micro_batch_size)),
        "packed": (batch, dict(micro_batch_size=args.micro_batch_size, pack_sequences=True)),
        "packed_budget": (batch, dict(pack_sequences=True, max_tokens_per_micro_batch=args.budget_tokens
                                      or -(-real // (n_micro * width)) * width)),
        "no_padding": (nopad, dict(micro_batch_size=per_micro)),
    }
    actors = {}
    for name, (b, kw) in cases.items():
        mini = len(b) if "micro_batch_size" not in kw else -(-len(b) // kw["micro_batch_size"]) * kw["micro_batch_size"]
        b = b if len(b) == mini else b.padded(mini - len(b))
        actors[name] = (MegatronActor(ddp, opt, ActorConfig(vocab_size=args.vocab, mini_batch_size=mini, loss=loss,
                                                            **kw), sched), b)
    times = {k: [] for k in cases}
    metrics = {}
    for rep in range(args.repeats + 1):  # the first round warms up (allocations, caches) and is not timed
        for name, (actor, b) in actors.items():
            b = b.slice(0, len(b))
            actor.old_pass(b)
            t = time.perf_counter()
            m = actor.update(b)
            if rep:
                times[name].append(time.perf_counter() - t)
            metrics[name] = {k: m[k] for k in m if k.startswith("batching/")}
    real_of = {k: int(sequence_lengths(b).sum()) for k, (_, b) in actors.items()}
    out = {}
    for name in cases:
        med = statistics.median(times[name])
        out[name] = dict(seconds=med, real_tokens=real_of[name], s_per_1k_real_tokens=1e3 * med / real_of[name],
                         **{k.split("/")[1]: v for k, v in metrics[name].items()})
    base = out["no_padding"]["s_per_1k_real_tokens"]
    for name in cases:
        out[name]["ratio_to_no_padding"] = out[name]["s_per_1k_real_tokens"] / base
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--chars-per-token", type=float, default=3.6)
    ap.add_argument("--response-median", type=float, default=900.0)
    ap.add_argument("--response-sigma", type=float, default=0.9)
    ap.add_argument("--max-response", type=int, default=3072)
    ap.add_argument("--scale", type=float, default=0.125)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--budget-tokens", type=int, default=0, help="0: the packed micro-batches' mean, in whole rows")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    from steer_megatron.parallel import spawn_ranks

    seq = lengths(args)
    (out,) = spawn_ranks(worker, 1, args, seq, timeout=3600)
    result = dict(args=vars(args), lengths=dict(min=min(seq), max=max(seq), mean=sum(seq) / len(seq)), cases=out)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
