"""The real-data path end to end on a DAPO-Math-17k slice: parquet -> chat template ->
tiny random Qwen2 completions -> rewards (junk 0, ground truth 1, wrong 0)."""
from __future__ import annotations

import torch

from steer_megatron.data import ResumableSampler, load_rl_parquets
from steer_megatron.demo_assets.model import TinyModelSpec, build_tiny_qwen2
from steer_megatron.demo_assets.tokenizer import build_char_tokenizer
from steer_megatron.rewards import RewardScorer

DAPO = "/work/shared/datasets/DAPO-Math-17k.parquet"


@torch.no_grad()
def test_dapo_slice_through_tiny_random_model_and_rewards():
    tok = build_char_tokenizer()
    examples, report = load_rl_parquets([DAPO], tok, max_prompt_len=600, max_rows=64)
    assert report.kept + report.too_long == 64 and report.kept >= 16
    batch = ResumableSampler(examples, seed=0).next_batch(8)
    model = build_tiny_qwen2(tok, TinyModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1), seed=0)
    width = max(len(e.prompt_ids) for e in batch)
    ids = torch.full((len(batch), width), tok.pad_token_id)
    attn = torch.zeros_like(ids)
    for i, e in enumerate(batch):  # left padding for HF generate
        ids[i, width - len(e.prompt_ids):] = torch.tensor(e.prompt_ids)
        attn[i, width - len(e.prompt_ids):] = 1
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=24, do_sample=True, top_k=0)
    junk = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    gts = [e.ground_truth for e in batch]
    wrong = [f"Answer: {int(g) + 1}" if g.lstrip("-").isdigit() else "Answer: 0.123456" for g in gts]
    with RewardScorer(timeout_s=3.0, num_workers=2) as scorer:
        res = scorer.score([e.data_source for e in batch] * 3,
                           junk + [f"Step by step...\n\\boxed{{{g}}}" for g in gts] + wrong, gts * 3)
    n = len(batch)
    assert res.scores == [0.0] * n + [1.0] * n + [0.0] * n
    assert res.n_timeouts == 0
