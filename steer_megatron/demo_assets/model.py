"""The demo's tiny Qwen2 model: build it, warm it up on worked solutions, measure accuracy.

The warm-up is plain supervised next-token training on "<chat prompt><solution><|im_end|>"
with the loss on the solution only. It is kept short on purpose: RL needs a policy whose
sampled accuracy is well above zero (else GRPO groups carry no signal) and below the
ceiling (else there is nothing left to learn).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from steer_megatron.demo_assets.task import Problem
from steer_megatron.rewards.math_rules import integer_reward


@dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 128


def build_tiny_qwen2(tokenizer: PreTrainedTokenizerBase, spec: TinyModelSpec, seed: int) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    out = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _sft_batch(tokenizer, problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs, masks = [], []
    for p in problems:
        pr = prompt_ids(tokenizer, p.question)
        resp = tokenizer(p.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(pr + resp)
        masks.append([0] * len(pr) + [1] * len(resp))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss_mask = torch.zeros_like(ids)
    for i, (s, m) in enumerate(zip(seqs, masks)):  # right padding, as everywhere in this project
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m)
    return ids, attn, loss_mask


@dataclass
class WarmupResult:
    steps: int
    final_loss: float
    seconds: float


def supervised_warmup(
    model: Qwen2ForCausalLM, tokenizer, problems: list[Problem], *, steps: int, batch_size: int = 64,
    lr: float = 3e-3, seed: int = 0,
) -> WarmupResult:
    """AdamW on the solution tokens with linear-decay LR; problems drawn with a seeded RNG."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    model.train()
    t0, loss_val = time.perf_counter(), math.nan
    for _ in range(steps):
        pick = torch.randint(len(problems), (batch_size,), generator=gen).tolist()
        ids, attn, mask = _sft_batch(tokenizer, [problems[i] for i in pick])
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        tgt, m = ids[:, 1:], mask[:, 1:].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
        loss = (nll * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_val = loss.item()
    model.eval()
    return WarmupResult(steps=steps, final_loss=loss_val, seconds=time.perf_counter() - t0)


@torch.no_grad()
def sampled_accuracy(
    model: Qwen2ForCausalLM, tokenizer, problems: list[Problem], *, temperature: float = 1.0,
    max_new_tokens: int = 32, seed: int = 0, batch_size: int = 128,
) -> float:
    """Fraction of problems whose sampled completion the demo's reward scores 1 (greedy at temperature 0)."""
    model.eval()
    torch.manual_seed(seed)
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [prompt_ids(tokenizer, p.question) for p in chunk]
        width = max(map(len, prompts))
        # generate() needs left padding for a batch; this is evaluation with HF only.
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, **sampling)
        for p, row in zip(chunk, out[:, width:]):
            text = tokenizer.decode(row, skip_special_tokens=True)
            correct += integer_reward(text, str(p.answer)) == 1.0
    return correct / len(problems)
