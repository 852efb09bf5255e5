"""Peak extra memory of the trainer's loss call for one micro-batch, against the bare logits gradient.

Two parts, printed as tables:
- computed at a recipe's shapes (default: configs/qwen2.5-math-7b_steer.yaml, V = 152,064): the
  bytes each path holds above the logits while the loss runs forward and backward;
- measured on this machine at a small shape: the process's resident memory sampled after every
  aten op (a TorchDispatchMode) during MegatronActor.micro_batch_stats + the policy loss +
  backward, minus what it was before, for the trainer's call and for the previous path
  (token_stats on output[:, :-1], out of place). glibc's mmap threshold is pinned (the tool
  re-executes itself with MALLOC_MMAP_THRESHOLD_) so that freed large buffers leave the RSS at once.

    python tools/bench_loss_path.py [--config CFG] [--vocab 152064] [--b 4 --s 512 --v 32768]
"""
from __future__ import annotations

import argparse
import os
import sys

import _common  # noqa: F401  (repo on sys.path)

GIB = 2**30


def computed(cfg_path: str, vocab: int) -> list[tuple[str, float]]:
    """Bytes above the logits, in GiB, at the recipe's micro-batch (formulas in the rows' names)."""
    from steer_megatron.config import load_config
    from steer_megatron.loss.token_stats import CHUNK_BYTES, padded_vocab_size

    cfg = load_config(cfg_path)
    b, s, tp = cfg.trainer.micro_batch_size, cfg.data.max_prompt_len + cfg.data.max_response_len, cfg.parallel.tp
    v_local = padded_vocab_size(vocab, tp) // tp
    elem = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
    n = b * s
    logits = n * v_local * elem
    # per token: [N, 6] fp32 local stats, the [tp, N, 6] all-gather, ~12 fp32 [N] vectors (log Z,
    # the four statistics, their gradients, the policy loss's terms): a generous bound
    per_token = n * 4 * (6 + 6 * tp + 12)
    rows = [
        (f"logits [{b} x {s}, {v_local}] {cfg.model.dtype} = the bare gradient", logits),
        ("previous path: reshape copy kept for backward + slice's zero-filled gradient + gradient",
         3 * logits + per_token),
        ("trainer now, Triton kernels: gradient written into the logits (in place)", per_token),
        ("trainer now, PyTorch kernels (CPU, or Triton missing): + three fp32 chunk temporaries (measured)",
         per_token + 3 * CHUNK_BYTES),
    ]
    return [(name, v / GIB) for name, v in rows]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_worker(b: int, s: int, v: int, dtype: str):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from steer_megatron.loss import PolicyLossConfig, get_policy_loss, token_stats
    from steer_megatron.loss.policy_losses import PolicyLossInputs
    from steer_megatron.parallel import ParallelLayout, init_parallel
    from steer_megatron.train.actor import ActorBatch, ActorConfig, MegatronActor

    init_parallel(ParallelLayout(), seed=0)
    torch.set_num_threads(1)

    class Peak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.base = self.peak = _rss()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, _rss())
            return out

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, v, (b, s), generator=g)
    mask = torch.ones(b, s - 1, dtype=torch.bool)
    adv, old = torch.randn(b, s - 1, generator=g), -torch.rand(b, s - 1, generator=g)
    loss_fn = get_policy_loss("grpo")
    actor = MegatronActor.__new__(MegatronActor)  # the loss call only: no model
    actor.cfg, actor._tap, actor.loss_fn = ActorConfig(vocab_size=v, policy_loss="grpo"), None, loss_fn

    def loss_of(st):
        inp = PolicyLossInputs(log_prob=st.logprob, old_log_prob=old, advantages=adv, mask=mask, entropy=st.entropy)
        return loss_fn(inp, PolicyLossConfig(entropy_coeff=0.01))[0]

    def trainer(z):
        mb = ActorBatch(input_ids=ids, loss_mask=mask, advantages=adv, old_log_prob=old)
        return torch.autograd.grad(loss_of(actor.micro_batch_stats(z, mb, p2_stats=True)), z)[0]

    def previous(z):
        return torch.autograd.grad(loss_of(token_stats(z[:, :-1], ids[:, 1:], vocab_size=v)), z)[0]

    out = {}
    for name, fn in (("previous", previous), ("trainer", trainer)) * 2:  # the second round is reported
        z = torch.randn(b, s, v, generator=g).to(getattr(torch, dtype)).requires_grad_()
        mode = Peak()
        with mode:
            grad = fn(z)
        extra = mode.peak - mode.base
        out[name] = (extra, z.untyped_storage().nbytes(), grad.untyped_storage().data_ptr() == z.untyped_storage().data_ptr())
        del z, grad
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/qwen2.5-math-7b_steer.yaml")
    ap.add_argument("--vocab", type=int, default=152064, help="the recipe model's vocabulary (Qwen2.5-Math-7B)")
    ap.add_argument("--b", type=int, default=4)
    ap.add_argument("--s", type=int, default=512)
    ap.add_argument("--v", type=int, default=32768)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "131072":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    print(f"computed at {args.config}, V = {args.vocab:,}:\n")
    print("| what | GiB |\n|---|---|")
    for name, gib in computed(args.config, args.vocab):
        print(f"| {name} | {gib:.3f} |")
    from steer_megatron.parallel import spawn_ranks

    (res,) = spawn_ranks(measure_worker, 1, args.b, args.s, args.v, args.dtype)
    print(f"\nmeasured on CPU, logits [{args.b}, {args.s}, {args.v}] {args.dtype}, peak RSS above the start:\n")
    print("| path | peak extra MiB | x the logits gradient | gradient in the logits' storage |\n|---|---|---|---|")
    for name, (extra, nbytes, inplace) in res.items():
        print(f"| {name} | {extra / 2**20:.1f} | {extra / nbytes:.2f} | {inplace} |")


if __name__ == "__main__":
    main()
