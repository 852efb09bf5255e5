#!/usr/bin/env python
"""mean@k of a model on a verl-layout RL parquet at a given temperature, per extra_info.level
when rows carry one: is a task in the range where RL has something to learn?

  python tools/base_accuracy.py --hf .cache/models/smollm2-135m-instruct --data .cache/data/arith/test.parquet \\
      --n-prompts 60 --k 4 --max-new-tokens 96

Prompts go through the chat template (data.apply_chat_template's default); sampling runs on the
CPU rollout engine, stopping on the tokenizer's end-of-turn token; rewards come from the data
source's registered reward, applied to the reply only.
"""
from __future__ import annotations

import argparse
import collections
import time

import _common  # noqa: F401  (puts the repo on sys.path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--n-prompts", type=int, default=24)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from steer_megatron.data.rl_dataset import encode_prompt
    from steer_megatron.rewards import get_reward_fn
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
    for s in seqs:
        r = rows[int(s.rid.split("_")[0])]
        fn = get_reward_fn(r["data_source"], r["reward_model"].get("style")).fn
        score = fn(tok.decode(s.output_ids, skip_special_tokens=True), r["reward_model"]["ground_truth"])
        per_level[(r.get("extra_info") or {}).get("level", "all")].append(score)
    tokens = sum(len(s.output_ids) for s in seqs)
    for level in sorted(per_level, key=str):
        v = per_level[level]
        print(f"level {level}: mean@{args.k} {sum(v) / len(v):.3f} over {len(v) // args.k} prompts")
    allv = [x for v in per_level.values() for x in v]
    print(f"all: mean@{args.k} {sum(allv) / len(allv):.3f}; {tokens} tokens in {seconds:.0f} s ({tokens / seconds:.0f} tokens/s)")
    print("example reply:", repr(tok.decode(seqs[0].output_ids, skip_special_tokens=True)[:300]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
