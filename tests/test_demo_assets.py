"""The CPU demo's assets: task, tokenizer, HF model dir, cache, accuracy measurement."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from steer_megatron.config import DemoConfig
from steer_megatron.data import load_rl_parquets
from steer_megatron.demo_assets import assets_key, build_demo_assets
from steer_megatron.demo_assets import assets as assets_mod
from steer_megatron.demo_assets.model import prompt_ids, sampled_accuracy
from steer_megatron.demo_assets.task import make_splits, space_size
from steer_megatron.demo_assets.tokenizer import build_char_tokenizer
from steer_megatron.rewards import RewardScorer


def test_splits_are_distinct_seeded_and_answers_are_sorted_digits():
    train, test = make_splits(3, 500, 200, seed=0)
    assert len(train) == 500 and len(test) == 200 and len(set(train + test)) == 700  # distinct, disjoint
    assert make_splits(3, 500, 200, seed=0) == (train, test) and make_splits(3, 500, 200, seed=1) != (train, test)
    for p in train + test:  # answers checked by re-reading the question text
        digits = re.fullmatch(r"Sort ([1-9]) ([1-9]) ([1-9])", p.question).groups()
        assert p.answer == int("".join(sorted(digits))) and p.solution == f"Answer: {p.answer}"
    assert space_size(3) == 729
    with pytest.raises(ValueError, match="exceeds the 729 distinct problems"):
        make_splits(3, 700, 30, seed=0)
    with pytest.raises(ValueError, match="demo.num_digits=1"):
        make_splits(1, 2, 2, seed=0)


def test_tokenizer_round_trips_task_text():
    tok = build_char_tokenizer()
    for text in ("Sort 3 1 4 2", "Answer: 1234", "a\nb  c"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and tok.decode(ids) == text  # one token per character
    ids = prompt_ids(tok, "Sort 2 1")
    assert tok.decode(ids) == "<|im_start|>user\nSort 2 1<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>"


class _Oracle(torch.nn.Module):
    """generate() that appends "Answer: <right or wrong answer><eos>" to each prompt."""

    def __init__(self, tok, wrong_every: int):
        super().__init__()
        self.tok, self.wrong_every = tok, wrong_every

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        rows = []
        for i, row in enumerate(input_ids):
            text = self.tok.decode(row[attention_mask[i].bool()])
            ans = int("".join(sorted(re.search(r"Sort ([1-9 ]+)", text).group(1).split())))
            if self.wrong_every and i % self.wrong_every == 0:
                ans += 1
            out = self.tok(f"Answer: {ans}", add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            rows.append(row.tolist() + out + [self.tok.pad_token_id] * (max_new_tokens - len(out)))
        return torch.tensor(rows)


def test_sampled_accuracy_counts_right_answers():
    tok = build_char_tokenizer()
    _, test = make_splits(4, 10, 40, seed=0)
    assert sampled_accuracy(_Oracle(tok, 0), tok, test, batch_size=16) == 1.0
    assert sampled_accuracy(_Oracle(tok, 4), tok, test, batch_size=16) == 0.75  # every 4th in each batch wrong


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    demo = DemoConfig(enabled=True, num_digits=3, n_train=60, n_test=20, hidden_size=32, warmup_steps=5,
                      warmup_batch_size=8, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return demo, build_demo_assets(demo)


def test_assets_are_a_real_hf_model_dir_and_verl_parquets(small_demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    demo, assets = small_demo
    assert {p.name for p in assets.model_dir.iterdir()} >= {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    built = build_char_tokenizer()
    for text in ("Sort 9 7 1\nAnswer: 179", "a  b"):  # the reloaded tokenizer keeps spaces and newlines
        assert tok(text, add_special_tokens=False)["input_ids"] == built(text, add_special_tokens=False)["input_ids"]
    assert prompt_ids(tok, "Sort 2 1") == prompt_ids(built, "Sort 2 1")
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tok)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 2)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    examples, report = load_rl_parquets([assets.train_file], tok, max_prompt_len=48)
    assert report.kept == demo.n_train and report.too_long == 0
    with RewardScorer(timeout_s=1.0, num_workers=1) as scorer:
        res = scorer.score([e.data_source for e in examples], [f"Answer: {e.ground_truth}" for e in examples],
                           [e.ground_truth for e in examples])
    assert res.scores == [1.0] * demo.n_train
    assert set(assets.report) >= {"test_accuracy_t1_before", "test_accuracy_t1_after", "warmup_seconds"}


def test_cache_is_reused_and_keyed_by_parameters(small_demo, monkeypatch):
    demo, assets = small_demo

    def no_rebuild(*a, **k):
        raise AssertionError("cached assets were rebuilt")

    monkeypatch.setattr(assets_mod, "supervised_warmup", no_rebuild)
    assert build_demo_assets(demo).root == assets.root
    assert assets_key(dataclasses.replace(demo, warmup_steps=6)) != assets_key(demo)
    assert assets_key(dataclasses.replace(demo, cache_dir="/elsewhere")) == assets_key(demo)


@pytest.mark.slow
def test_default_warmup_lands_in_the_accuracy_window(tmp_path):
    """The shipped demo settings: sampled (T=1) test accuracy well above 0 and below the ceiling."""
    assets = build_demo_assets(dataclasses.replace(DemoConfig(enabled=True), cache_dir=str(tmp_path)))
    r = assets.report
    assert r["test_accuracy_t1_before"] < 0.05
    assert 0.15 <= r["test_accuracy_t1_after"] <= 0.7, r
