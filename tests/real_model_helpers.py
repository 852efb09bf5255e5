"""The real pretrained model of the tests (SmolLM2-135M-Instruct, prepared once and cached under
.cache/models by steer_megatron.prepare_model) and rank workers for tests/test_real_model*.py."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EPS32 = torch.finfo(torch.float32).eps
CHAT_PROMPTS = ["What is 12 + 7?", "Name a primary colour.", "Count from one to five."]


def smollm2_or_skip() -> str:
    """The prepared HF directory; skips (naming the fix) where the gguf extra or wheel is absent.
    `make test` installs both, so there it always runs."""
    from steer_megatron.prepare_model import prepare

    try:
        return str(prepare(cache_dir=REPO / ".cache" / "models"))
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"real model unavailable: {e}")


def chat_ids(tokenizer, questions=CHAT_PROMPTS) -> list[list[int]]:
    out = []
    for q in questions:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        out.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    return out


def logit_rtol(num_layers: int, hidden: int) -> float:
    """Relative logit tolerance between two fp32 implementations that sum in different orders:
    each layer's matmuls carry ~eps*sqrt(K) relative rounding (random-walk summation over K
    terms), and L residual layers add up: eps * L * sqrt(H). 30 layers x 576: 8.6e-5. A wrong or
    mis-sliced tensor changes logits by O(1) relative."""
    return EPS32 * num_layers * math.sqrt(hidden)


def tp_logits_and_stats(hf_dir: str, tp: int, pp: int, ids: torch.Tensor, padded_vocabs=(None,)) -> list:
    """Rank worker: for each padded vocabulary size (None: Megatron's own padding) build at
    tp x pp, load HF weights and forward; see one_model. One process set serves them all."""
    from steer_megatron.parallel import ParallelLayout, init_parallel

    init_parallel(ParallelLayout(tp=tp, pp=pp))
    return [one_model(hf_dir, tp, ids, padded) for padded in padded_vocabs]


def one_model(hf_dir: str, tp: int, ids: torch.Tensor, padded_vocab: int | None) -> dict | None:
    """On the last stage: the gathered real-vocab logits, the padded columns, and token_stats
    (computed on the vocab-sharded logits) of the next-token targets; None on other stages."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from steer_megatron.loss.token_stats import token_stats
    from steer_megatron.models import build_gpt_model, load_hf_weights, parse_hf_config

    model, vocab = build_gpt_model(parse_hf_config(hf_dir), padded_vocab=padded_vocab)
    load_hf_weights(model, hf_dir)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(ids.shape[1], ids.shape[0], model.config.hidden_size)
            dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(input_ids=ids, position_ids=pos, attention_mask=None)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            return None
        # out: [b, s, V_local]; statistics of token t+1 given the prefix up to t
        target = ids[:, 1:]
        st = token_stats(out[:, :-1].contiguous(), target.contiguous(), vocab_size=vocab.size,
                         tp_group=ps.get_tensor_model_parallel_group())
        group = ps.get_tensor_model_parallel_group()
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=group)
        full = torch.cat(parts, dim=-1)
    return dict(logits=full[..., : vocab.size].clone(), padding=full[..., vocab.size:].clone(),
                padded_size=vocab.padded_size, logprob=st.logprob.clone(), entropy=st.entropy.clone())


def stream_roundtrip(hf_dir: str, ckpt_root: str, out_dir: str, tp: int) -> dict:
    """Rank worker (1 rank): HF -> dist checkpoint prepared for tp -> HF, timed."""
    import time

    from steer_megatron.models.convert import dist_checkpoint_to_hf, hf_to_dist_checkpoint

    t0 = time.perf_counter()
    ckpt = hf_to_dist_checkpoint(hf_dir, ckpt_root, tp=tp)
    t1 = time.perf_counter()
    dist_checkpoint_to_hf(ckpt, out_dir, hf_config_dir=hf_dir)
    return dict(to_megatron_s=t1 - t0, to_hf_s=time.perf_counter() - t1, ckpt=ckpt)
