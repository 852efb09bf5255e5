"""What every weight-sync transport does around its own transfer, and the parity probe.

sync(): pause generation on every worker -> transport pushes the weights (and the new
weight_version) -> flush the prefix cache -> continue generation -> parity probe: greedy
log-probs the servers return for a fixed probe batch must equal the trainer's own for
the same tokens, else the step stops with ParityError. The probe asks for the distribution the
trainer optimises: at rollout temperature 1 greedy decoding (SGLang returns the raw log_softmax
for greedy requests whatever SGLANG_RETURN_ORIGINAL_LOGPROB says); at T != 1 sampling at T, whose
returned log-probs are log_softmax(logits / T) (the fleet's default), the same distribution as the
trainer's logits / T and the rollout log-probs TIS uses.
"""
from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, Union

import torch

from steer_megatron.rollout import http

if TYPE_CHECKING:
    from steer_megatron.rollout.fleet import Fleet

NamedTensors = Iterable[tuple[str, torch.Tensor]]
# A transport takes the HF-named tensors, or a callable producing them (called once per sync).
WeightSource = Union[NamedTensors, Callable[[], NamedTensors]]
# (prompt ids per row, completion ids per row) -> the trainer's log-prob of every completion token.
TrainerLogprobs = Callable[[list[list[int]], list[list[int]]], list[list[float]]]


class WeightSyncError(RuntimeError):
    """A worker refused or failed a weight update."""


class ParityError(WeightSyncError):
    """Servers and trainer disagree on log-probs after a sync: the rollout would be off-policy."""


def named_tensors(source: WeightSource) -> NamedTensors:
    return source() if callable(source) else source


# Headroom over the estimate below. On SmolLM2-135M (fp32, 30 layers x 576) the measured
# server-vs-trainer difference was 1.8e-5 = 1.15 x the estimate; 16x covers other machines'
# kernels and longer probes, and stays under what one stale weight matrix moves after a
# single step at lr 1e-5 (2e-3 to 6e-3 there; docs/benchmarks.md, "Real model").
PARITY_HEADROOM = 16.0


def parity_tolerance(dtype: torch.dtype, num_layers: int, hidden_size: int) -> float:
    """The largest |engine - trainer| log-prob two correct implementations should show.

    Both hold the same weights and differ only in the order they sum in. In fp32 each matmul
    over K terms carries ~eps * sqrt(K) relative rounding (a random walk), and the residual
    stream adds the layers' errors as another random walk: eps * sqrt(L * H). In bf16/fp16 the
    matmuls accumulate in fp32 but every activation is rounded to the narrow type, so the
    per-element rounding eps(dtype) * sqrt(L) dominates. Times PARITY_HEADROOM."""
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32 or dtype == torch.float64:
        return PARITY_HEADROOM * eps * math.sqrt(num_layers * hidden_size)
    return PARITY_HEADROOM * eps * math.sqrt(num_layers)


@dataclass(frozen=True)
class ParityReport:
    weight_version: str
    max_abs_diff: float
    tokens_checked: int


@dataclass(frozen=True)
class ParityProbe:
    """A fixed probe batch and the trainer's scorer; `run` checks every worker directly."""

    prompts: tuple[tuple[int, ...], ...]
    trainer_logprobs: TrainerLogprobs
    max_new_tokens: int = 8
    atol: float = 1e-5
    timeout_s: float = 120.0
    temperature: float = 0.0  # 0: greedy (raw logits = the T = 1 policy); else sample at the rollout temperature

    def __post_init__(self) -> None:
        if not self.prompts or any(len(p) == 0 for p in self.prompts):
            raise ValueError("ParityProbe.prompts must be a non-empty tuple of non-empty token-id tuples")
        if self.max_new_tokens < 1 or self.atol <= 0 or self.temperature < 0:
            raise ValueError("ParityProbe.max_new_tokens must be >= 1, atol > 0 and temperature >= 0")

    def request(self, version: str) -> dict[str, Any]:
        return {
            "input_ids": [list(p) for p in self.prompts],
            "sampling_params": {"temperature": float(self.temperature), "max_new_tokens": self.max_new_tokens},
            "return_logprob": True, "logprob_start_len": -1,
            "rid": [f"parity-{version}-{i}" for i in range(len(self.prompts))],
        }

    def run(self, worker_urls: Sequence[str], version: str) -> ParityReport:
        worst, checked = 0.0, 0
        answers = http.on_all(list(worker_urls), lambda u: http.call("POST", f"{u}/generate", self.request(version), timeout=self.timeout_s))
        for url, answer in zip(worker_urls, answers):
            items = answer if isinstance(answer, list) else [answer]
            if len(items) != len(self.prompts):
                raise ParityError(f"{url}: parity probe expected {len(self.prompts)} answers, got {len(items)}")
            served = [it["meta_info"].get("weight_version") for it in items]
            if any(v != version for v in served):
                raise ParityError(f"{url} serves weight_version {served[0]!r} after syncing version {version!r}: the update did not land")
            completions = [it["output_ids"] for it in items]
            server_lp = [[e[0] for e in it["meta_info"]["output_token_logprobs"]] for it in items]
            trainer_lp = self.trainer_logprobs([list(p) for p in self.prompts], completions)
            for row, (s_row, t_row) in enumerate(zip(server_lp, trainer_lp)):
                diff = (torch.tensor(s_row, dtype=torch.float64) - torch.tensor(t_row, dtype=torch.float64)).abs()
                checked += diff.numel()
                if diff.numel() and float(diff.max()) > worst:
                    worst = float(diff.max())
                if diff.numel() and float(diff.max()) > self.atol:
                    pos = int(diff.argmax())
                    raise ParityError(
                        f"weight sync parity failed on {url} (version {version}): probe row {row}, token {pos} "
                        f"(id {completions[row][pos]}): server log-prob {s_row[pos]:.8f} vs trainer {t_row[pos]:.8f}, "
                        f"|diff| {float(diff.max()):.3e} > atol {self.atol:.1e}. Check the exported names/layouts "
                        f"(a missed or mis-permuted tensor), the dtype of both sides, and that the server returns log-probs at the rollout temperature "
                        f"(SGLANG_RETURN_ORIGINAL_LOGPROB unset or 0)."
                    )
        return ParityReport(version, worst, checked)


@dataclass(frozen=True)
class SyncReport:
    weight_version: str
    workers: tuple[str, ...]
    seconds: float
    bytes_sent: int
    parity: ParityReport | None


class WeightSync(ABC):
    """One subclass per transport. `targets` is a Fleet (its live workers are synced and it
    learns the new weights for replacements) or a fixed list of worker URLs."""

    def __init__(self, targets: "Fleet | Sequence[str]", *, probe: ParityProbe | None = None,
                 pause_mode: str = "retract", timeout_s: float = 1800.0):
        if pause_mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause_mode must be abort, retract or in_place, got {pause_mode!r}")
        self.targets = targets
        self.probe = probe
        self.pause_mode = pause_mode
        self.timeout_s = timeout_s

    def worker_urls(self) -> list[str]:
        urls = list(self.targets) if isinstance(self.targets, (list, tuple)) else self.targets.sync_urls
        if not urls:
            raise WeightSyncError("no live rollout worker to sync weights to")
        return [u.rstrip("/") for u in urls]

    @abstractmethod
    def push(self, urls: list[str], source: WeightSource, version: str) -> tuple[int, str | None]:
        """Transfer the weights and set weight_version on every worker. Returns (bytes sent,
        a model path a restarted worker can load them from, or None)."""

    def sync(self, source: WeightSource, version: int | str) -> SyncReport:
        fleet = None if isinstance(self.targets, (list, tuple)) else self.targets
        with fleet.exclusive() if fleet is not None else contextlib.nullcontext():
            version, urls, t0 = str(version), self.worker_urls(), time.perf_counter()
            self._post_all(urls, "/pause_generation", {"mode": self.pause_mode})
            try:
                sent, path = self.push(urls, source, version)
                self._post_all(urls, "/flush_cache", None)
            finally:  # never leave the fleet paused, even when the step is about to fail
                self._post_all(urls, "/continue_generation", {})
            if fleet is not None:  # what the servers now hold, whatever the probe finds
                fleet.record_weights(path, version)
            parity = self.probe.run(urls, version) if self.probe is not None else None
        return SyncReport(version, tuple(urls), time.perf_counter() - t0, sent, parity)

    def _post_all(self, urls: list[str], path: str, body: Any) -> list[Any]:
        def one(url: str) -> Any:
            try:
                answer = http.call("POST", url + path, body, timeout=self.timeout_s)
            except http.HttpError as e:
                raise WeightSyncError(f"{path} failed on {url}: {e}") from e
            if isinstance(answer, dict) and answer.get("success") is False:
                raise WeightSyncError(f"{path} failed on {url}: {answer.get('message')}")
            return answer

        return http.on_all(urls, one)
