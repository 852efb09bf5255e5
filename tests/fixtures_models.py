"""A tiny random Qwen2 causal LM saved as a real HuggingFace model directory.

Used by the rollout tests as the model behind the CPU SGLang-protocol servers and as the
"trainer" whose log-probs the servers must reproduce. Words -> ids with a WordLevel
tokenizer so that token ids are easy to reason about in assertions.
"""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(250)]
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def build_tiny_qwen2(out_dir: Path, *, seed: int = 0, vocab_size: int = 256) -> Path:
    """Write config.json, model.safetensors, generation_config.json and tokenizer files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    assert len(vocab) <= vocab_size
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=vocab["<eos>"],
        pad_token_id=vocab["<pad>"],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    # Larger-than-default init so the random model's distribution is far from uniform:
    # greedy ties and near-ties (which would make greedy comparisons fragile) become rare.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = vocab["<eos>"]
    model.generation_config.pad_token_id = vocab["<pad>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def perturbed_state(model_dir: Path, *, scale: float = 0.05, seed: int = 1) -> dict[str, torch.Tensor]:
    """The model's weights plus Gaussian noise: stands in for one trainer update."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (t + scale * torch.randn(t.shape, generator=gen)).contiguous()
        for name, t in model.state_dict().items()
    }


def hf_logprob_scorer(model):
    """The trainer side of the parity probe: log_softmax of one full forward per row."""

    @torch.no_grad()
    def score(prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        rows = []
        for prompt, completion in zip(prompts, completions):
            logits = model(torch.tensor([prompt + completion])).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            rows.append([float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(completion)])
        return rows

    return score
