"""Batched token generation with a transformers causal LM: the engine behind cpu_server.

Static batching with a KV cache: prompts are left-padded into one batch, decoded step by
step until every row has stopped, rows that stop early keep feeding a pad token (their
outputs are already final). Sampling follows SGLang's order: temperature, then top-k,
top-p and min-p, and the returned log-probs follow SGLang's rule (see `logprob_rows`).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


@dataclass
class SeqRequest:
    """One sequence to generate (a prompt expanded n times gives n of these)."""

    rid: str
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int = 0
    # Output, filled by the engine.
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: dict | None = None
    aborted: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


def derive_seed(rid: str, index: int, sampling_seed: int | None) -> int:
    """Per-sample seed: a retried request (same rid) samples exactly the same tokens."""
    key = f"{sampling_seed}:{index}" if sampling_seed is not None else f"{rid}:{index}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def logprob_rows(logits: torch.Tensor, seqs: list[SeqRequest], original: bool) -> torch.Tensor:
    """SGLang 0.5.23's returned log-probs (srt/layers/sampler.py): log_softmax of the raw
    logits for greedy requests or when SGLANG_RETURN_ORIGINAL_LOGPROB is set, else
    log_softmax(logits / temperature); top-k/top-p never enter the returned value."""
    temps = torch.tensor(
        [1.0 if (original or s.greedy) else s.temperature for s in seqs], dtype=logits.dtype
    ).unsqueeze(1)
    return torch.log_softmax(logits / temps, dim=-1)


def sample_row(logits: torch.Tensor, seq: SeqRequest, gen: torch.Generator) -> int:
    if seq.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / seq.temperature, dim=-1)
    if 0 < seq.top_k < probs.numel():
        kth = torch.topk(probs, seq.top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if seq.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (torch.cumsum(sorted_p, 0) - sorted_p) > seq.top_p * sorted_p.sum()
        probs = probs.clone()
        probs[order[drop]] = 0.0
    if seq.min_p > 0.0:
        probs = torch.where(probs < seq.min_p * probs.max(), torch.zeros_like(probs), probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


class CpuEngine:
    """One transformers model, fp32 by default; thread-safe weight swaps between steps."""

    def __init__(self, model_path: str, *, dtype: torch.dtype = torch.float32, return_original_logprob: bool = False):
        from transformers import AutoModelForCausalLM

        self.model_path = model_path
        self.dtype = dtype
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        self.return_original_logprob = return_original_logprob
        cfg = self.model.config
        eos = self.model.generation_config.eos_token_id
        eos = cfg.eos_token_id if eos is None else eos
        self.eos_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        pad = self.model.generation_config.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))
        self.vocab_size = int(cfg.vocab_size)
        self.max_context = int(getattr(cfg, "max_position_embeddings", 4096))
        # transformers 5 renamed past_key_values to cache; 4.x only knows the old name.
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        # Held for one decode step at a time, so a weight update lands between steps.
        self.lock = threading.Lock()

    # ---- weights ----
    def load_weights_from_disk(self, model_path: str) -> None:
        """Load every *.safetensors tensor under model_path into the live model (strict names)."""
        from safetensors.torch import load_file

        folder = Path(model_path)
        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
        state: dict[str, torch.Tensor] = {}
        for name in files:
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder / name} is missing (listed by {index.name if index.exists() else 'default layout'})")
            state.update(load_file(str(folder / name)))
        own = self.model.state_dict()
        given = {own[n].data_ptr() for n in state if n in own}  # a tied tensor comes with its twin
        missing = [n for n in own if n not in state and own[n].data_ptr() not in given]
        if missing:
            raise KeyError(f"{model_path} lacks {len(missing)} weights of the served model, e.g. {missing[:5]}: "
                           "a disk update must carry the whole model")
        self.load_state(state)
        self.model_path = model_path

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise KeyError(f"weights not in the served model: {unknown[:5]} (of {len(unknown)})")
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != served {tuple(own[name].shape)}")
        with self.lock, torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor.to(own[name].dtype))

    # ---- generation ----
    def generate(self, seqs: list[SeqRequest], is_paused: Callable[[], bool] = lambda: False) -> None:
        """Fill output_ids/logprobs/finish of every sequence. While is_paused() no step is
        taken (a weight update may land meanwhile); aborted sequences finish at once."""
        from transformers import DynamicCache

        gens = [torch.Generator().manual_seed(s.seed) for s in seqs]
        width = max(len(s.prompt) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt):] = torch.tensor(s.prompt)
            mask[i, width - len(s.prompt):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        live = [s.finish is None for s in seqs]
        step_ids, step_pos = ids, positions
        for step in range(max(s.max_new_tokens for s in seqs)):
            while is_paused() and not all(s.aborted for s, alive in zip(seqs, live) if alive):
                time.sleep(0.01)
            for i, s in enumerate(seqs):
                if live[i] and s.aborted:
                    s.finish = {"type": "abort", "message": "Abort in progress.", "status_code": 200, "err_type": None}
                    live[i] = False
            if not any(live):
                break
            with self.lock, torch.no_grad():
                out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                                 use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
            logits = out.logits[:, -1, :].float()
            logprobs = logprob_rows(logits, seqs, self.return_original_logprob)
            nxt = torch.full((len(seqs), 1), self.pad_id, dtype=torch.long)
            for i, s in enumerate(seqs):
                if not live[i]:
                    continue
                row = logits[i]
                if len(s.output_ids) < s.min_new_tokens:  # SGLang: stop tokens masked until min_new_tokens
                    row = row.clone()
                    row[list(self._stops(s))] = float("-inf")
                token = sample_row(row, s, gens[i])
                s.output_ids.append(token)
                s.logprobs.append(float(logprobs[i, token]))
                nxt[i, 0] = token
                if token in self._stops(s) and len(s.output_ids) >= s.min_new_tokens:
                    s.finish = {"type": "stop", "matched": token}
                    live[i] = False
                elif len(s.output_ids) >= s.max_new_tokens:
                    s.finish = {"type": "length", "length": s.max_new_tokens}
                    live[i] = False
            mask = torch.cat([mask, torch.ones((len(seqs), 1), dtype=torch.long)], dim=1)
            step_pos = step_pos[:, -1:] + 1
            step_ids = nxt
        for s in seqs:  # max_new_tokens == 0
            if s.finish is None:
                s.finish = {"type": "length", "length": s.max_new_tokens}

    def _stops(self, s: SeqRequest) -> set[int]:
        return set(s.stop_token_ids) | (set() if s.ignore_eos else set(self.eos_ids))
