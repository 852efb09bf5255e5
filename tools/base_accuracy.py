#!/usr/bin/env python
"""mean@k of a model on a verl-layout RL parquet at a given temperature, per extra_info.level
when rows carry one: is a task in the range where RL has something to learn?

  python tools/base_accuracy.py --hf .cache/models/smollm2-135m-instruct --data .cache/data/arith/test.parquet \\
      --n-prompts 60 --k 4 --max-new-tokens 96
  python tools/base_accuracy.py --paired grpo.json steer.json   # two runs' --scores-out on the same prompts

Prompts go through the chat template (data.apply_chat_template's default); sampling runs on the
CPU rollout engine, stopping on the tokenizer's end-of-turn token; rewards come from the data
source's registered reward, applied to the reply only.
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)


def bootstrap_interval(values: list[float], resamples: int, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of `values` under resampling them with replacement."""
    import random

    rng, n = random.Random(seed), len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    cut = int(round((1 - level) / 2 * resamples))
    return means[cut], means[resamples - 1 - cut]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", help="the model's HF directory (required unless --paired)")
    p.add_argument("--data", help="the parquet (required unless --paired)")
    p.add_argument("--n-prompts", type=int, default=24)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", default=None,
                   help="reward name to score with (e.g. last_integer, as configs/smollm2_135m_steer.yaml routes "
                        "synthetic_arith); default: the data source's registered reward")
    p.add_argument("--scores-out", default=None,
                   help="write each prompt's mean@k as JSON (tools/base_accuracy.py --paired A.json B.json compares two)")
    p.add_argument("--bootstrap", type=int, default=2000,
                   help="resamples of the prompts for the 95%% interval of mean@k (0 = none)")
    p.add_argument("--paired", nargs=2, metavar=("A_JSON", "B_JSON"), default=None,
                   help="no generation: the paired bootstrap interval of B - A from two --scores-out files")
    args = p.parse_args(argv)
    if args.paired:
        return paired(*args.paired, resamples=args.bootstrap or 2000, seed=args.seed)
    if not (args.hf and args.data):
        p.error("--hf and --data are required (or --paired A.json B.json)")
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from steer_megatron.data.rl_dataset import encode_prompt
    from steer_megatron.rewards import get_reward_fn
    from steer_megatron.rewards.registry import reward_by_name
    from steer_megatron.rollout.cpu_engine import CpuEngine, SeqRequest, derive_seed

    tok = AutoTokenizer.from_pretrained(args.hf)
    rows = pq.read_table(args.data).to_pylist()[: args.n_prompts]
    engine = CpuEngine(args.hf)
    stops = tuple({i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None})
    seqs = [SeqRequest(rid=f"{i}_{j}", prompt=encode_prompt(tok, r["prompt"], not args.no_chat_template),
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, stop_token_ids=stops,
                       seed=derive_seed(f"{args.seed}/{i}", j, None))
            for i, r in enumerate(rows) for j in range(args.k)]
    t0 = time.perf_counter()
    engine.generate(seqs)
    seconds = time.perf_counter() - t0
    per_level: dict = collections.defaultdict(list)
    per_prompt = [0.0] * len(rows)
    for s in seqs:
        i = int(s.rid.split("_")[0])
        r = rows[i]
        fn = (reward_by_name(args.reward) if args.reward else get_reward_fn(r["data_source"], r["reward_model"].get("style"))).fn
        score = fn(tok.decode(s.output_ids, skip_special_tokens=True), r["reward_model"]["ground_truth"])
        per_level[(r.get("extra_info") or {}).get("level", "all")].append(score)
        per_prompt[i] += score / args.k
    tokens = sum(len(s.output_ids) for s in seqs)
    for level in sorted(per_level, key=str):
        v = per_level[level]
        print(f"level {level}: mean@{args.k} {sum(v) / len(v):.3f} over {len(v) // args.k} prompts")
    allv = [x for v in per_level.values() for x in v]
    print(f"all: mean@{args.k} {sum(allv) / len(allv):.3f}; {tokens} tokens in {seconds:.0f} s ({tokens / seconds:.0f} tokens/s)")
    if args.bootstrap:
        lo, hi = bootstrap_interval(per_prompt, args.bootstrap, seed=args.seed)
        print(f"95% bootstrap interval over the {len(rows)} prompts ({args.bootstrap} resamples): [{lo:.3f}, {hi:.3f}]")
    if args.scores_out:
        Path(args.scores_out).write_text(json.dumps({"hf": args.hf, "data": args.data, "k": args.k, "seed": args.seed,
                                                     "per_prompt": per_prompt}))
    print("example reply:", repr(tok.decode(seqs[0].output_ids, skip_special_tokens=True)[:300]))
    return 0


def paired(a_json: str, b_json: str, *, resamples: int, seed: int) -> int:
    """B - A on the same prompts: the mean difference of each prompt's mean@k and its percentile
    interval under resampling the prompts (the prompts' difficulty cancels in each pair)."""
    a, b = (json.loads(Path(f).read_text()) for f in (a_json, b_json))
    if len(a["per_prompt"]) != len(b["per_prompt"]) or a["data"] != b["data"]:
        raise SystemExit(f"--paired needs scores of the same prompts: {a['data']} ({len(a['per_prompt'])}) vs "
                         f"{b['data']} ({len(b['per_prompt'])})")
    diff = [y - x for x, y in zip(a["per_prompt"], b["per_prompt"])]
    lo, hi = bootstrap_interval(diff, resamples, seed=seed)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print(f"A {mean(a['per_prompt']):.3f}  B {mean(b['per_prompt']):.3f}  B - A {mean(diff):+.3f}, "
          f"95% paired bootstrap interval over {len(diff)} prompts [{lo:+.3f}, {hi:+.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
