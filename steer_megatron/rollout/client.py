"""Async rollout client: n samples per prompt with token log-probs from SGLang /generate.

One HTTP request per prompt (its n samples ride in it): sglang-router only accepts a
string rid, and SGLang batches concurrent requests itself. The rid is deterministic,
f"{run_id}-{step}-{prompt index}", so a retry is the same request: each prompt has one
result slot filled by one answer, a given-up attempt is aborted on its worker before the
retry goes to another endpoint, and the CPU engine seeds sampling from the rid, so a
retry even reproduces the same tokens.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable, Sequence

import aiohttp

from steer_megatron.rollout.types import RolloutConfig, RolloutResult, Sample, SamplingConfig


class RolloutError(RuntimeError):
    """A prompt could not be completed (after retries) or the request itself is wrong."""


class MalformedResponse(RolloutError):
    """The server answered 200 with a body that is not SGLang's /generate shape."""


class _Retryable(Exception):
    pass


def parse_generate_response(body: Any, *, n: int, prompt_index: int, rid: str, worker: str, latency_s: float = 0.0) -> list[Sample]:
    """Check one /generate answer (n samples of one prompt) and turn it into Samples."""
    items = body if isinstance(body, list) else [body]
    where = f"/generate answer from {worker} for rid {rid!r}"
    if len(items) != n:
        raise MalformedResponse(f"{where}: expected {n} samples (sampling_params.n), got {len(items)}")
    samples = []
    for j, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
            raise MalformedResponse(f"{where}: sample {j} has no meta_info object")
        meta, ids = item["meta_info"], item.get("output_ids")
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise MalformedResponse(f"{where}: sample {j} output_ids must be a list of ints (is the server run with --skip-tokenizer-init?)")
        finish = meta.get("finish_reason")
        if not isinstance(finish, dict) or finish.get("type") not in ("stop", "length", "abort"):
            raise MalformedResponse(f"{where}: sample {j} meta_info.finish_reason must be {{type: stop|length|abort}}, got {finish!r}")
        lps = meta.get("output_token_logprobs")
        if not isinstance(lps, list) or len(lps) != len(ids):
            raise MalformedResponse(f"{where}: sample {j} meta_info.output_token_logprobs must hold one entry per output id "
                                    f"({len(ids)}); send return_logprob=true")
        if any(not isinstance(e, list) or len(e) != 3 or e[1] != t for e, t in zip(lps, ids)):
            raise MalformedResponse(f"{where}: sample {j} output_token_logprobs entries must be [logprob, token_id, text] matching output_ids")
        if meta.get("completion_tokens", len(ids)) != len(ids):
            raise MalformedResponse(f"{where}: sample {j} completion_tokens={meta.get('completion_tokens')} != len(output_ids)={len(ids)}")
        matched = finish.get("matched")
        samples.append(Sample(
            prompt_index=prompt_index, sample_index=j, rid=rid, output_ids=ids,
            logprobs=[float(e[0]) for e in lps], finish_reason=finish["type"],
            matched_stop=matched if isinstance(matched, int) else None,
            prompt_tokens=int(meta.get("prompt_tokens", 0)), weight_version=meta.get("weight_version"), worker=worker,
            latency_s=latency_s,
        ))
    return samples


class RolloutClient:
    """Sends /generate to a router URL or directly to worker URLs, with failover between them."""

    def __init__(self, endpoints: Sequence[str], config: RolloutConfig = RolloutConfig()):
        if not endpoints:
            raise ValueError("RolloutClient needs at least one endpoint (a router URL or worker URLs)")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.config = config
        self.suspect: set[str] = set()  # endpoints that failed recently: tried last
        self._contract = None
        if config.validate_contract:
            from steer_megatron.rollout.contract import load_contract

            self._contract = load_contract()

    def set_endpoints(self, endpoints: Sequence[str]) -> None:
        """Replace the endpoint list (the fleet calls this when workers die or come back)."""
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.suspect &= set(self.endpoints)

    def request_body(self, prompt: Sequence[int], sampling: SamplingConfig, rid: str) -> dict[str, Any]:
        body = {"input_ids": list(prompt), "sampling_params": sampling.to_sampling_params(),
                "return_logprob": True, "logprob_start_len": -1, "rid": rid, "stream": False}
        if self._contract is not None:
            from steer_megatron.rollout.contract import validate_generate_request

            validate_generate_request(body, self._contract)
        return body

    def _order(self, prompt_index: int) -> list[str]:
        """Endpoints to try for one prompt: rotated by prompt index, suspects last."""
        k = prompt_index % len(self.endpoints)
        rotated = self.endpoints[k:] + self.endpoints[:k]
        return [e for e in rotated if e not in self.suspect] + [e for e in rotated if e in self.suspect]

    async def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, step: int | str = 0,
                       on_prompt_done: Callable[[list[Sample]], None] | None = None) -> RolloutResult:
        """n samples per prompt, returned in prompt order; raises RolloutError if any prompt fails.
        on_prompt_done(samples) runs as each prompt completes (progress bars, streaming)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
        result = RolloutResult(samples=[[] for _ in prompts])
        gate = asyncio.Semaphore(self.config.concurrency)
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=self.config.concurrency)) as session:
            async def run(i: int) -> None:
                rid = f"{self.config.run_id}-{step}-{i}"
                body = self.request_body(prompts[i], sampling, rid)
                async with gate:
                    # Attempts are sequential and a given-up one is aborted before the next,
                    # so exactly one answer fills the prompt's single slot.
                    result.samples[i] = await self._with_retries(session, body, i, rid, sampling.n, result)
                if on_prompt_done is not None:
                    on_prompt_done(result.samples[i])

            tasks = [asyncio.ensure_future(run(i)) for i in range(len(prompts))]
            try:
                await asyncio.gather(*tasks)
            except BaseException:  # one prompt failed for good: stop the others cleanly
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return result

    def generate_sync(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, step: int | str = 0,
                      on_prompt_done: Callable[[list[Sample]], None] | None = None) -> RolloutResult:
        return asyncio.run(self.generate(prompts, sampling, step=step, on_prompt_done=on_prompt_done))

    async def _with_retries(self, session: aiohttp.ClientSession, body: dict, i: int, rid: str, n: int,
                            result: RolloutResult) -> list[Sample]:
        failures: list[str] = []
        tried: list[str] = []
        for attempt in range(self.config.max_attempts):
            order = self._order(i)
            fresh = [e for e in order if e not in tried]
            url = fresh[0] if fresh else order[attempt % len(order)]  # each endpoint once, then cycle
            tried.append(url)
            result.attempts += 1
            try:
                return await self._attempt(session, url, body, i, rid, n)
            except _Retryable as e:
                line = f"{rid} attempt {attempt + 1} on {url}: {e}"
                failures.append(line)
                result.failures.append(line)
                await self._abort(session, url, rid)
                await asyncio.sleep(self.config.retry_backoff_s * (attempt + 1))
        raise RolloutError(f"prompt {i} (rid {rid}) failed after {self.config.max_attempts} attempts:\n  " + "\n  ".join(failures))

    async def _attempt(self, session: aiohttp.ClientSession, url: str, body: dict, i: int, rid: str, n: int) -> list[Sample]:
        t0 = time.perf_counter()
        try:
            async with session.post(f"{url}/generate", json=body) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            self.suspect.add(url)
            raise _Retryable(f"{type(e).__name__}: {e}") from e
        if status >= 500 or status in (408, 429):
            self.suspect.add(url)
            raise _Retryable(f"HTTP {status}: {text[:300]}")
        if status != 200:
            raise RolloutError(f"{url}/generate refused rid {rid!r} with HTTP {status}: {text[:1000]}")
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as e:  # a worker dying mid-answer
            raise _Retryable(f"truncated JSON: {e}") from e
        if self._contract is not None:
            from steer_megatron.rollout.contract import validate_generate_response

            validate_generate_response(payload, self._contract)
        samples = parse_generate_response(payload, n=n, prompt_index=i, rid=rid, worker=url, latency_s=time.perf_counter() - t0)
        if any(s.finish_reason == "abort" for s in samples):
            # Aborted by a pause or a weight update, not a sample of the policy: ask again.
            raise _Retryable("the server aborted the request (paused or updating weights)")
        self.suspect.discard(url)
        return samples

    async def _abort(self, session: aiohttp.ClientSession, url: str, rid: str) -> None:
        """Best effort: stop a worker from finishing an attempt we gave up on (a router 404s this)."""
        try:
            async with session.post(f"{url}/abort_request", json={"rid": rid}, timeout=aiohttp.ClientTimeout(total=2)):
                pass
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
            pass
