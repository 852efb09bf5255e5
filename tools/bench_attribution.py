"""Cost of steer.form=attribution against release: time of one update, the forms alternating in
one process (a shared machine's load then hits both alike), and peak resident memory, each form
in its own fresh process (peak RSS is per process).

  python tools/bench_attribution.py --hf .cache/demo_assets/<hash>/model --seqs 16 --len 96
  python tools/bench_attribution.py --hf .cache/models/smollm2-135m-instruct --seqs 4 --len 96 --reps 1

Random tokens (the cost does not depend on them), the second half of each row is the response,
advantages +-1; Adam after one warm-up update, fp32, one mini-batch per update, TP = DP = 1.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time


def _worker(hf: str, form: str, seqs: int, length: int, mbs: int, reps: int) -> dict:
    import torch

    from steer_megatron.loss import PolicyLossConfig
    from steer_megatron.models import build_gpt_model, load_hf_weights, parse_hf_config
    from steer_megatron.parallel import ParallelLayout, init_parallel
    from steer_megatron.train.actor import ActorBatch, ActorConfig, MegatronActor
    from steer_megatron.train.optim import OptimSettings, wrap_for_training

    init_parallel(ParallelLayout(), seed=0)
    arch = parse_hf_config(hf)
    model, vocab = build_gpt_model(arch, params_dtype=torch.float32)
    load_hf_weights(model, hf, arch)
    ddp, opt, sched = wrap_for_training(model, OptimSettings(lr=1e-6))
    loss = PolicyLossConfig(steer={"form": form, "group": "mini_batch"})
    actor = MegatronActor(ddp, opt, ActorConfig(vocab_size=vocab.size, micro_batch_size=mbs, mini_batch_size=seqs,
                                                policy_loss="steer", loss=loss), sched)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab.size, (seqs, length), generator=g)
    mask = torch.zeros(seqs, length - 1, dtype=torch.bool)
    mask[:, length // 2:] = True
    adv = (torch.randint(0, 2, (seqs, 1), generator=g).float() * 2 - 1) * mask
    times, old_times = [], []
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(reps + 1):  # the first update builds Adam's state: not timed
        batch = ActorBatch(input_ids=ids, loss_mask=mask, advantages=adv)
        t0 = time.perf_counter()
        actor.old_pass(batch)
        t1 = time.perf_counter()
        actor.update(batch)
        t2 = time.perf_counter()
        if i:
            old_times.append(t1 - t0)
            times.append(t2 - t1)
    # the extra passes alone (what update() adds for this form), same batch and weights
    from steer_megatron.train.attribution import entropy_attribution

    extra = []
    for _ in range(reps):
        t0 = time.perf_counter()
        entropy_attribution(actor, batch, mask.sum())
        extra.append(time.perf_counter() - t0)
    return {"form": form, "update_s": statistics.median(times), "old_pass_s": statistics.median(old_times),
            "attribution_passes_s": statistics.median(extra),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_updates_mib": rss0 / 1024, "params": sum(p.numel() for p in model.parameters())}


def _interleaved(hf: str, forms: list[str], seqs: int, length: int, mbs: int, reps: int) -> dict:
    """Both forms in one process, alternating, on one model: a shared machine's load hits both alike."""
    import torch

    from steer_megatron.loss import PolicyLossConfig
    from steer_megatron.models import build_gpt_model, load_hf_weights, parse_hf_config
    from steer_megatron.parallel import ParallelLayout, init_parallel
    from steer_megatron.train.actor import ActorBatch, ActorConfig, MegatronActor
    from steer_megatron.train.optim import OptimSettings, wrap_for_training

    init_parallel(ParallelLayout(), seed=0)
    arch = parse_hf_config(hf)
    model, vocab = build_gpt_model(arch, params_dtype=torch.float32)
    load_hf_weights(model, hf, arch)
    ddp, opt, sched = wrap_for_training(model, OptimSettings(lr=1e-6))
    actors = {f: MegatronActor(ddp, opt, ActorConfig(
        vocab_size=vocab.size, micro_batch_size=mbs, mini_batch_size=seqs, policy_loss="steer",
        loss=PolicyLossConfig(steer={"form": f, "group": "mini_batch"})), sched) for f in forms}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab.size, (seqs, length), generator=g)
    mask = torch.zeros(seqs, length - 1, dtype=torch.bool)
    mask[:, length // 2:] = True
    adv = (torch.randint(0, 2, (seqs, 1), generator=g).float() * 2 - 1) * mask
    times = {f: [] for f in forms}
    for i in range(reps + 1):
        for f, actor in actors.items():
            batch = ActorBatch(input_ids=ids, loss_mask=mask, advantages=adv)
            actor.old_pass(batch)
            t0 = time.perf_counter()
            actor.update(batch)
            if i:  # the first round builds Adam's state
                times[f].append(time.perf_counter() - t0)
    return {f"{f}_update_s": statistics.median(t) for f, t in times.items()} | {
        f"{f}_update_all_s": t for f, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--len", type=int, default=96)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--forms", default="release,attribution")
    args = ap.parse_args(argv)
    from steer_megatron.parallel import spawn_ranks

    forms = args.forms.split(",")
    # time: both forms alternating in one process; peak memory: each form in its own process
    timing = spawn_ranks(_interleaved, 1, args.hf, forms, args.seqs, args.len, args.mbs, args.reps, timeout=3600)[0]
    rows = [spawn_ranks(_worker, 1, args.hf, f, args.seqs, args.len, args.mbs, 1, timeout=3600)[0] for f in forms]
    print(json.dumps({"args": vars(args), "interleaved_timing": timing, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
