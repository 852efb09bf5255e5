"""Is a demo task learnable by RL at all? Two checks on a demo assets directory, outside the trainer.

    python tools/rl_sanity_check.py grpo ASSETS_DIR --lr 3e-4 --steps 30        # plain GRPO loop
    python tools/rl_sanity_check.py sharpness ASSETS_DIR                         # J along its gradient

ASSETS_DIR is one `.cache/demo_assets/<key>/` (model/, train.parquet, test.parquet).

`grpo` is a deliberately independent GRPO loop (HF generate, AdamW or SGD, PPO clip 0.2/0.28,
token-mean, 32 prompts x 8 samples, 4 mini-batches per step) that prints train accuracy each
step and held-out accuracy (mean@4) every 5: if it cannot raise accuracy, the trainer cannot be
blamed. `sharpness` takes J = mean probability of the exact correct answer over 64 training
prompts (teacher-forced, no sampling noise) and reports J after steps of growing norm along the
exact gradient of J and along one sampled GRPO gradient: how far a step can go before it hurts.
docs/benchmarks.md (CPU demo) has the numbers that led to the digit-sorting task.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from steer_megatron.rewards.math_rules import integer_reward  # noqa: E402


class Task:
    def __init__(self, root: Path):
        self.tok = AutoTokenizer.from_pretrained(root / "model")
        self.model = AutoModelForCausalLM.from_pretrained(root / "model")
        self.train = [self._item(r) for _, r in pd.read_parquet(root / "train.parquet").iterrows()]
        self.test = [self._item(r) for _, r in pd.read_parquet(root / "test.parquet").iterrows()]

    def _item(self, row) -> tuple[list[int], str]:
        out = self.tok.apply_chat_template(list(row["prompt"]), add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out), row["reward_model"]["ground_truth"]

    @torch.no_grad()
    def sample(self, items, n: int, max_new: int = 16):
        """n samples per item at T=1: (prompts, responses ending at eos, 0/1 rewards)."""
        tok = self.tok
        prompts = [p for p, _ in items for _ in range(n)]
        truths = [t for _, t in items for _ in range(n)]
        w = max(map(len, prompts))
        ids = torch.full((len(prompts), w), tok.pad_token_id)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # generate() needs left padding
            ids[i, w - len(p):], attn[i, w - len(p):] = torch.tensor(p), 1
        out = self.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new, do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0)
        resps = []
        for row in out[:, w:].tolist():
            stop = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            resps.append(row[:stop])
        rewards = torch.tensor([integer_reward(tok.decode(r, skip_special_tokens=True), t) for r, t in zip(resps, truths)])
        return prompts, resps, rewards

    def batch(self, prompts, resps):
        """Right-padded ids and the response mask in next-token layout (as the trainer)."""
        seqs = [p + r for p, r in zip(prompts, resps)]
        ids = torch.full((len(seqs), max(map(len, seqs))), self.tok.pad_token_id)
        mask = torch.zeros(len(seqs), ids.shape[1] - 1)
        for i, (p, r) in enumerate(zip(prompts, resps)):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            mask[i, len(p) - 1 : len(p) - 1 + len(r)] = 1
        return ids, mask

    def token_logp(self, ids):
        return torch.log_softmax(self.model(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]


def group_advantages(rewards: torch.Tensor, n: int) -> torch.Tensor:
    g = rewards.view(-1, n)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).flatten()


def run_grpo(task: Task, args) -> None:
    m = task.model
    opt = (torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9) if args.optimizer == "sgd"
           else torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.01))
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)

    def evaluate():
        m.eval()
        return float(task.sample(task.test, 4)[2].mean())

    print(f"step 0 eval mean@4 {evaluate():.3f}", flush=True)
    for step in range(1, args.steps + 1):
        m.eval()
        prompts, resps, rewards = task.sample(rng.sample(task.train, 32), 8)
        adv = group_advantages(rewards, 8)
        ids, mask = task.batch(prompts, resps)
        with torch.no_grad():
            old = task.token_logp(ids)
        m.train()
        mb = len(ids) // 4
        for s in range(0, len(ids), mb):
            sl = slice(s, s + mb)
            ratio = torch.exp(task.token_logp(ids[sl]) - old[sl])
            a = adv[sl, None]
            pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
            loss = (pg * mask[sl]).sum() / mask[sl].sum()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
        line = f"step {step} train accuracy {float(rewards.mean()):.3f}"
        if step % 5 == 0:
            line += f" eval mean@4 {evaluate():.3f}"
        print(line, flush=True)


def run_sharpness(task: Task, args) -> None:
    m, tok = task.model, task.tok
    items = random.Random(args.seed).sample(task.train, 64)
    gold = [tok(f"Answer: {t}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, t in items]
    gids, gmask = task.batch([p for p, _ in items], gold)
    params = list(m.parameters())

    def J() -> float:
        with torch.no_grad():
            return float(((task.token_logp(gids) * gmask).sum(1)).exp().mean())

    def flat_grad(loss) -> torch.Tensor:
        m.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in params]).clone()

    grad_j = flat_grad(((task.token_logp(gids) * gmask).sum(1)).exp().mean())
    torch.manual_seed(args.seed)
    prompts, resps, rewards = task.sample(items, 8)
    adv = group_advantages(rewards, 8)
    ids, mask = task.batch(prompts, resps)
    grad_g = flat_grad((adv[:, None] * task.token_logp(ids) * mask).sum() / mask.sum())
    cos = float(torch.nn.functional.cosine_similarity(grad_g, grad_j, 0))
    print(f"J {J():.4f}, sampled accuracy {float(rewards.mean()):.3f}, cos(GRPO gradient, grad J) {cos:.3f}")
    base = [p.detach().clone() for p in params]
    for name, vec in (("grad J", grad_j), ("GRPO", grad_g)):
        unit, row = vec / vec.norm(), []
        for eta in (0.0, 1e-3, 3e-3, 0.01, 0.03, 0.1):
            off = 0
            for p, b in zip(params, base):
                p.data.copy_(b + eta * unit[off : off + p.numel()].view_as(p))
                off += p.numel()
            row.append(f"{eta:g}: {J():.4f}")
        print(f"J after a step of norm eta along {name}: " + ", ".join(row))
    for p, b in zip(params, base):
        p.data.copy_(b)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("check", choices=("grpo", "sharpness"))
    ap.add_argument("assets", type=Path, help="a demo assets directory (.cache/demo_assets/<key>)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (args.assets / "model").is_dir() or not (args.assets / "train.parquet").is_file():
        ap.error(f"{args.assets} is not a demo assets directory (needs model/, train.parquet, test.parquet)")
    task = Task(args.assets)
    (run_grpo if args.check == "grpo" else run_sharpness)(task, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
