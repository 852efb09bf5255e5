"""Sum of the attribution against the measured entropy change of the real step, SGD and Adam.

  python tools/attribution_check.py --hf .cache/demo_assets/<hash>/model --lr 1e-4

For each optimizer: one warm-up update (Adam then has statistics), then sum_j lr * dH_total_j
against the change of the batch's summed entropy over one real update, measured two-sided,
(dH(+A) - dH(-A)) / 2, so that the second-order term drops out. Random tokens, fp32, TP = DP = 1.
"""
from __future__ import annotations

import argparse
import json


def _worker(hf: str, optimizer: str, lr: float, seqs: int, length: int) -> dict:
    from dataclasses import replace

    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from steer_megatron.diagnostics.measure import TrainingSnapshot, _set_lr
    from steer_megatron.loss import PolicyLossConfig
    from steer_megatron.models import build_gpt_model, load_hf_weights, parse_hf_config
    from steer_megatron.parallel import ParallelLayout, init_parallel
    from steer_megatron.train.actor import ActorBatch, ActorConfig, MegatronActor
    from steer_megatron.train.attribution import entropy_attribution

    init_parallel(ParallelLayout(), seed=0)
    arch = parse_hf_config(hf)
    model, vocab = build_gpt_model(arch, params_dtype=torch.float32)
    load_hf_weights(model, hf, arch)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer=optimizer, lr=lr, weight_decay=0.0, clip_grad=0.0,
                                                 sgd_momentum=0.0), [ddp])
    actor = MegatronActor(ddp, opt, ActorConfig(vocab_size=vocab.size, micro_batch_size=4, mini_batch_size=seqs,
                                                policy_loss="grpo", loss=PolicyLossConfig()))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab.size, (seqs, length), generator=g)
    mask = torch.zeros(seqs, length - 1, dtype=torch.bool)
    mask[:, length // 2:] = True
    adv = (torch.randn(seqs, 1, generator=g)) * mask
    batch = ActorBatch(input_ids=ids, loss_mask=mask, advantages=adv)
    warm = ActorBatch(input_ids=torch.randint(0, vocab.size, (seqs, length), generator=g), loss_mask=mask,
                      advantages=torch.randn(seqs, 1, generator=g) * mask)
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
        actor.update(replace(batch, advantages=sign * adv))
        dh = h_total() - h0
        snap.restore()
        return dh

    up, down = change(1.0), change(-1.0)
    predicted = lr * float(attr[mask].double().sum())
    return {"optimizer": optimizer, "lr": lr, "tokens": n, "predicted_sum": predicted, "measured_up": up,
            "measured_down": down, "measured_first_order": (up - down) / 2,
            "ratio": predicted / ((up - down) / 2) if up != down else None, "fd_eps": stats["attr_eps"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--sgd-lr", type=float, default=1e-2)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--len", type=int, default=48)
    args = ap.parse_args(argv)
    from steer_megatron.parallel import spawn_ranks

    rows = [spawn_ranks(_worker, 1, args.hf, o, lr, args.seqs, args.len, timeout=3600)[0]
            for o, lr in (("sgd", args.sgd_lr), ("adam", args.lr))]
    print(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
