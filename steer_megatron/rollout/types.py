"""Typed configuration and results of the rollout stack, validated at construction."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishType = Literal["stop", "length", "abort"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class SamplingConfig:
    """SGLang sampling_params for one rollout call (n samples per prompt)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k
    min_p: float = 0.0
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_new_tokens: int = 0
    sampling_seed: int | None = None  # None: the server derives a seed from the request id

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.temperature >= 0, f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check(0 < self.top_p <= 1, f"sampling.top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k == -1 or self.top_k >= 1, f"sampling.top_k must be -1 (off) or >= 1, got {self.top_k}")
        _check(0 <= self.min_p <= 1, f"sampling.min_p must be in [0, 1], got {self.min_p}")
        _check(self.n >= 1, f"sampling.n must be >= 1, got {self.n}")
        _check(0 <= self.min_new_tokens <= self.max_new_tokens,
               f"sampling.min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               f"sampling.stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    def to_sampling_params(self) -> dict[str, Any]:
        """The JSON sampling_params object (only SGLang field names)."""
        params: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens, "temperature": float(self.temperature),
            "top_p": float(self.top_p), "top_k": self.top_k, "min_p": float(self.min_p), "n": self.n,
            "stop_token_ids": list(self.stop_token_ids), "ignore_eos": self.ignore_eos,
            "min_new_tokens": self.min_new_tokens,
        }
        if self.sampling_seed is not None:
            params["sampling_seed"] = self.sampling_seed
        return params


@dataclass(frozen=True)
class RolloutConfig:
    """How the client talks to the fleet."""

    concurrency: int = 32  # most /generate requests in flight
    request_timeout_s: float = 300.0  # one attempt on one worker
    max_attempts: int = 4  # tries per prompt, each on another endpoint when there are several
    retry_backoff_s: float = 0.2
    run_id: str = "rollout"  # request ids are f"{run_id}-{step}-{prompt index}"
    validate_contract: bool = False  # check every request/response against SGLang's api_types.py

    def __post_init__(self) -> None:
        _check(self.concurrency >= 1, f"rollout.concurrency must be >= 1, got {self.concurrency}")
        _check(self.request_timeout_s > 0, f"rollout.request_timeout_s must be > 0, got {self.request_timeout_s}")
        _check(self.max_attempts >= 1, f"rollout.max_attempts must be >= 1, got {self.max_attempts}")
        _check(self.retry_backoff_s >= 0, f"rollout.retry_backoff_s must be >= 0, got {self.retry_backoff_s}")
        _check(bool(self.run_id) and all(c.isalnum() or c in "-_." for c in self.run_id),
               f"rollout.run_id must be non-empty [A-Za-z0-9._-], got {self.run_id!r}")


@dataclass(frozen=True)
class Sample:
    """One completion of one prompt."""

    prompt_index: int
    sample_index: int
    rid: str
    output_ids: list[int]
    logprobs: list[float]  # one per output token, as returned by the server
    finish_reason: FinishType
    matched_stop: int | None  # the stop token that ended it (finish_reason == "stop")
    prompt_tokens: int
    weight_version: str | None
    worker: str = ""  # the endpoint that answered (router or worker URL)
    latency_s: float = 0.0  # of the HTTP request that produced it (shared by its n samples)

    @property
    def length(self) -> int:
        return len(self.output_ids)


@dataclass
class RolloutResult:
    """samples[i][j] is sample j of prompt i, in prompt order."""

    samples: list[list[Sample]]
    attempts: int = 0  # HTTP attempts made (retries included)
    failures: list[str] = field(default_factory=list)  # one line per failed attempt

    def flat(self) -> list[Sample]:
        return [s for group in self.samples for s in group]
