"""A CPU server that speaks the subset of SGLang's HTTP API the rollout stack uses.

    python -m steer_megatron.rollout.cpu_server --model HF_DIR --port PORT [--skip-tokenizer-init]

Endpoints (shapes as in SGLang 0.5.23, see ../shared/DESIGN.md §4): /generate,
/health, /health_generate, /model_info, /server_info (and their /get_ forms),
/update_weights_from_disk, /init_weights_update_group, /update_weights_from_distributed,
/destroy_weights_update_group (gloo on CPU), /flush_cache, /pause_generation, /continue_generation, /abort_request,
/get_weight_version, /update_weight_version. Requests are batched: whatever is queued when
the engine frees up runs as one batch. Serves until killed.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from aiohttp import web

from steer_megatron.rollout.cpu_engine import CpuEngine, SeqRequest, derive_seed
from steer_megatron.rollout.weight_sync.group import broadcast, new_weight_update_group

log = logging.getLogger("steer_megatron.cpu_server")
VERSION = "0.5.23-steer-cpu"  # the SGLang API version whose shapes we follow

# SGLang's SamplingParams fields (sglang/api/v1/api_types.py); anything else is a 400.
SAMPLING_FIELDS = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width",
    "watermark", "choice",
)
# Accepted by SGLang but not implemented here: a request that sets them to a non-default
# value is refused rather than silently sampled differently.
UNSUPPORTED_DEFAULTS = {
    "stop": (None, [], ""), "stop_regex": (None, [], ""), "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0), "json_schema": (None,),
    "regex": (None,), "ebnf": (None,), "structural_tag": (None,), "logit_bias": (None, {}),
    "custom_params": (None,), "beam_width": (None, 0, 1), "watermark": (None,), "choice": (None, []),
}
TOP_K_ALL = 1 << 30  # SGLang's "no top-k" default


class BadRequest(ValueError):
    pass


@dataclass
class Job:
    seqs: list[SeqRequest]
    future: asyncio.Future


def _field_error(field: str, value, expected: str) -> BadRequest:
    return BadRequest(f"sampling_params.{field}={value!r} is invalid: expected {expected}")


def parse_sampling(params: dict, vocab: int) -> dict:
    """Validate one sampling_params object; returns the engine's keyword arguments."""
    if not isinstance(params, dict):
        raise BadRequest(f"sampling_params must be an object, got {type(params).__name__}")
    for key in params:
        if key not in SAMPLING_FIELDS:
            listed = ", ".join(f"`{f}`" for f in SAMPLING_FIELDS)
            raise BadRequest(f"unknown field `{key}`, expected one of {listed}")
    for key, allowed in UNSUPPORTED_DEFAULTS.items():
        if key in params and params[key] not in allowed:
            hint = " (use stop_token_ids: this server has no detokenizer on the stop path)" if key == "stop" else ""
            raise BadRequest(f"sampling_params.{key} is not supported by the CPU engine{hint}")
    p = {k: v for k, v in params.items() if v is not None}
    temperature = float(p.get("temperature", 1.0))
    top_p, top_k, min_p = float(p.get("top_p", 1.0)), int(p.get("top_k", -1)), float(p.get("min_p", 0.0))
    max_new, min_new, n = int(p.get("max_new_tokens", 128)), int(p.get("min_new_tokens", 0)), int(p.get("n", 1))
    stops = p.get("stop_token_ids") or []
    if temperature < 0:
        raise _field_error("temperature", temperature, ">= 0 (0 means greedy)")
    if not 0 < top_p <= 1:
        raise _field_error("top_p", top_p, "in (0, 1]")
    if top_k == 0 or top_k < -1:
        raise _field_error("top_k", top_k, "-1 (all) or >= 1")
    if not 0 <= min_p <= 1:
        raise _field_error("min_p", min_p, "in [0, 1]")
    if max_new < 0 or min_new < 0 or min_new > max(max_new, 0):
        raise _field_error("max_new_tokens", max_new, f">= 0 and >= min_new_tokens ({min_new})")
    if n < 1:
        raise _field_error("n", n, ">= 1")
    if not isinstance(stops, list) or any(not isinstance(t, int) or not 0 <= t < vocab for t in stops):
        raise _field_error("stop_token_ids", stops, f"a list of token ids in [0, {vocab})")
    seed = p.get("sampling_seed")
    return dict(
        temperature=temperature, top_p=top_p, top_k=-1 if top_k >= TOP_K_ALL else top_k, min_p=min_p,
        max_new_tokens=max_new, min_new_tokens=min_new, stop_token_ids=tuple(stops),
        ignore_eos=bool(p.get("ignore_eos", False)), n=n, sampling_seed=None if seed is None else int(seed),
    )


def _as_list(value, batch: int, name: str) -> list:
    if isinstance(value, list):
        if len(value) != batch:
            raise BadRequest(f"{name} has {len(value)} entries for a batch of {batch} prompts")
        return value
    return [value] * batch


class CpuServer:
    def __init__(self, engine: CpuEngine, *, host: str, port: int, served_model_name: str,
                 skip_tokenizer_init: bool, max_batch_size: int, weight_version: str):
        self.engine = engine
        self.host, self.port = host, port
        self.served_model_name = served_model_name
        self.skip_tokenizer_init = skip_tokenizer_init
        self.max_batch_size = max_batch_size
        self.weight_version = weight_version
        self.tokenizer = None
        if not skip_tokenizer_init:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(engine.model_path)
        self.pending: deque[Job] = deque()
        self.wakeup = asyncio.Event()
        self.active: list[SeqRequest] = []  # sequences of the batch now decoding
        self.paused = False
        # One thread runs batches; a second runs weight loads and group work, so a
        # weight update can proceed while the generation thread is parked by a pause.
        self.gen_pool = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self.ctl_pool = ThreadPoolExecutor(1, thread_name_prefix="control")
        self.update_groups: dict[str, object] = {}  # group_name -> process group (as SGLang keys them)

    # ---- batching loop ----
    def submit(self, job: Job) -> None:
        self.pending.append(job)
        self.wakeup.set()

    async def batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
            jobs = [self.pending.popleft()]
            size = len(jobs[0].seqs)
            while self.pending and size + len(self.pending[0].seqs) <= self.max_batch_size:
                jobs.append(self.pending.popleft())
                size += len(jobs[-1].seqs)
            seqs = [s for j in jobs for s in j.seqs]
            self.active = seqs
            try:
                await loop.run_in_executor(self.gen_pool, self.engine.generate, seqs, lambda: self.paused)
                for j in jobs:
                    if not j.future.done():
                        j.future.set_result(None)
            except Exception as e:  # noqa: BLE001 - reported to each waiting request
                log.exception("generation failed")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
            finally:
                self.active = []

    # ---- /generate ----
    def build_seqs(self, body: dict) -> tuple[list[list[SeqRequest]], list[bool], bool]:
        if not isinstance(body, dict):
            raise BadRequest("the /generate body must be a JSON object")
        if body.get("stream"):
            raise BadRequest("stream=true is not supported by the CPU engine; send stream=false")
        ids = body.get("input_ids")
        if ids is None and body.get("text") is not None:
            if self.tokenizer is None:
                raise BadRequest("text input needs the tokenizer; this server runs with --skip-tokenizer-init: send input_ids")
            text = body["text"]
            ids = [self.tokenizer.encode(t) for t in text] if isinstance(text, list) else self.tokenizer.encode(text)
        if not isinstance(ids, list) or not ids:
            raise BadRequest("input_ids must be a non-empty list of token ids or a list of such lists")
        single = not isinstance(ids[0], list)
        prompts = [ids] if single else ids
        vocab = self.engine.vocab_size
        for i, prompt in enumerate(prompts):
            if not prompt or any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt):
                raise BadRequest(f"input_ids[{i}] must be a non-empty list of ints in [0, {vocab})")
        batch = len(prompts)
        rid = body.get("rid")
        if rid is None:
            rids = [uuid.uuid4().hex for _ in prompts]
        elif isinstance(rid, str):  # one string for a batch: one rid per prompt derived from it
            rids = [rid] if single else [f"{rid}-{i}" for i in range(batch)]
        elif single:
            raise BadRequest("rid must be a string for a single prompt")
        else:
            rids = [str(r) for r in _as_list(rid, batch, "rid")]
        params = _as_list(body.get("sampling_params") or {}, batch, "sampling_params")
        want_lp = [bool(x) for x in _as_list(body.get("return_logprob") or False, batch, "return_logprob")]
        start = _as_list(body.get("logprob_start_len", -1), batch, "logprob_start_len")
        if any(lp and s not in (-1, None) for lp, s in zip(want_lp, start)):
            raise BadRequest("logprob_start_len other than -1 (input-token log-probs) is not supported by the CPU engine")
        out: list[list[SeqRequest]] = []
        for prompt, rid, raw in zip(prompts, rids, params):
            sp = parse_sampling(raw, vocab)
            n, seed = sp.pop("n"), sp.pop("sampling_seed")
            if len(prompt) + sp["max_new_tokens"] > self.engine.max_context:
                raise BadRequest(f"prompt ({len(prompt)}) + max_new_tokens ({sp['max_new_tokens']}) exceeds the context length {self.engine.max_context}")
            out.append([SeqRequest(rid=rid if n == 1 else f"{rid}_{j}", prompt=list(prompt),
                                   seed=derive_seed(rid, j, seed), **sp) for j in range(n)])
        return out, want_lp, single

    def render(self, seq: SeqRequest, want_logprob: bool, latency: float) -> dict:
        meta = {
            "id": seq.rid, "finish_reason": seq.finish, "prompt_tokens": len(seq.prompt),
            "completion_tokens": len(seq.output_ids), "cached_tokens": 0,
            "weight_version": self.weight_version, "e2e_latency": latency,
        }
        if want_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(seq.logprobs, seq.output_ids)]
        out = {"output_ids": list(seq.output_ids), "meta_info": meta}
        if self.tokenizer is not None:  # SGLang sends no "text" under --skip-tokenizer-init
            out = {"text": self.tokenizer.decode(seq.output_ids, skip_special_tokens=True), **out}
        return out

    async def generate(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        try:
            body = await request.json()
            groups, want_lp, single = self.build_seqs(body)
        except (BadRequest, ValueError, TypeError) as e:
            return web.json_response({"error": {"message": str(e)}}, status=400)
        seqs = [s for g in groups for s in g]
        job = Job(seqs, asyncio.get_running_loop().create_future())
        self.submit(job)
        try:
            await job.future
        except asyncio.CancelledError:  # client went away: stop spending compute on it
            for s in seqs:
                s.aborted = True
            raise
        except Exception as e:  # noqa: BLE001
            return web.json_response({"error": {"message": f"generation failed: {e}"}}, status=500)
        latency = time.perf_counter() - t0
        rendered = [self.render(s, lp, latency) for g, lp in zip(groups, want_lp) for s in g]
        return web.json_response(rendered[0] if single and len(rendered) == 1 else rendered)

    # ---- health and info ----
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def health_generate(self, request: web.Request) -> web.Response:
        job = Job([SeqRequest(rid=f"HEALTH_CHECK_{uuid.uuid4().hex}", prompt=[0], max_new_tokens=1, temperature=0.0)],
                  asyncio.get_running_loop().create_future())
        self.submit(job)
        try:
            await asyncio.wait_for(asyncio.shield(job.future), timeout=20)
        except Exception:  # noqa: BLE001 - any failure means unhealthy
            return web.Response(status=503)
        return web.Response(status=200)

    async def model_info(self, request: web.Request) -> web.Response:
        cfg = self.engine.model.config
        return web.json_response({
            "model_path": self.engine.model_path, "served_model_name": self.served_model_name,
            "tokenizer_path": self.engine.model_path, "is_generation": True,
            "preferred_sampling_params": None, "weight_version": self.weight_version, "load_format": None,
            "reasoning_parser": None, "tool_call_parser": None,
            "model_type": getattr(cfg, "model_type", None), "architectures": getattr(cfg, "architectures", None),
        })

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "model_path": self.engine.model_path, "served_model_name": self.served_model_name,
            "tokenizer_path": self.engine.model_path, "max_context_length": self.engine.max_context,
            "version": VERSION, "internal_states": [], "host": self.host, "port": self.port,
            "skip_tokenizer_init": self.skip_tokenizer_init, "dtype": str(self.engine.dtype).removeprefix("torch."),
            "max_running_requests": self.max_batch_size, "frontend": "steer_megatron.cpu_server",
            "disaggregation_mode": "null", "weight_version": self.weight_version,
        })

    # ---- control plane ----
    def _abort_all(self) -> int:
        count = 0
        for job in self.pending:
            for s in job.seqs:
                s.aborted, count = True, count + 1
        for s in self.active:
            s.aborted, count = True, count + 1
        return count

    async def _body(self, request: web.Request) -> dict:
        if not request.can_read_body:
            return {}
        body = await request.json()
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if body.get("abort_all"):
            self._abort_all()
        else:
            rid = str(body.get("rid", ""))
            for s in [s for job in self.pending for s in job.seqs] + self.active:
                if s.rid == rid or s.rid.startswith(f"{rid}_"):
                    s.aborted = True
        return web.Response(status=200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        mode = (await self._body(request)).get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            return web.json_response({"error": {"message": f"mode must be abort, retract or in_place, got {mode!r}"}}, status=400)
        if mode == "abort":
            self._abort_all()
        self.paused = True
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        self.paused = False
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def flush_cache(self, request: web.Request) -> web.Response:
        # No prefix cache across requests here: the KV cache lives only inside one batch.
        return web.Response(text="Cache flushed.\nPlease check backend logs for more details. "
                                 "(When there are running or waiting requests, the operation will not be performed.)\n")

    async def get_weight_version(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": self.weight_version})

    async def update_weight_version(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if not isinstance(body.get("new_version"), str):
            return web.json_response({"success": False, "message": "new_version (a string) is required"}, status=400)
        self.weight_version = body["new_version"]
        return web.json_response({"success": True, "message": f"Weight version updated to {self.weight_version}",
                                  "new_version": self.weight_version})

    async def _weight_update(self, body: dict, load) -> web.Response:
        paused = 0
        if body.get("abort_all_requests"):
            paused = self._abort_all()
        try:
            await asyncio.get_running_loop().run_in_executor(self.ctl_pool, load)
        except Exception as e:  # noqa: BLE001 - the caller gets the reason
            return web.json_response({"success": False, "message": f"Failed to update weights: {e}", "num_paused_requests": paused}, status=400)
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
        return web.json_response({"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": paused})

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if not isinstance(body.get("model_path"), str):
            return web.json_response({"success": False, "message": "model_path (a string) is required", "num_paused_requests": 0}, status=400)
        return await self._weight_update(body, lambda: self.engine.load_weights_from_disk(body["model_path"]))

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        try:
            args = (str(body["master_address"]), int(body["master_port"]), int(body["rank_offset"]), int(body["world_size"]),
                    str(body.get("group_name", "weight_update_group")), str(body.get("backend", "nccl")))
        except (KeyError, ValueError) as e:
            return web.json_response({"success": False, "message": f"bad request: {e!r}"}, status=400)
        if args[5] != "gloo":
            return web.json_response({"success": False, "message": f"backend {args[5]!r} needs GPUs; the CPU engine joins with backend 'gloo'"}, status=400)

        def join():
            self.update_groups[args[4]] = new_weight_update_group(args[0], args[1], args[2], args[3], args[4], "gloo")[0]

        try:
            await asyncio.get_running_loop().run_in_executor(self.ctl_pool, join)
        except Exception as e:  # noqa: BLE001
            return web.json_response({"success": False, "message": f"Failed to init group: {e}"}, status=400)
        return web.json_response({"success": True, "message": "Succeeded to initialize custom process group."})

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        group = self.update_groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            return web.json_response({"success": False, "message": f"no weight update group {body.get('group_name')!r}: "
                                      "call /init_weights_update_group first"}, status=400)
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list) and len(names) == len(dtypes) == len(shapes)):
            return web.json_response({"success": False, "message": "names, dtypes and shapes must be lists of one length"}, status=400)

        def receive():
            # Same order as the sender: one broadcast per tensor, all in flight, then wait.
            tensors = [torch.empty(shape, dtype=getattr(torch, dtype)) for dtype, shape in zip(dtypes, shapes)]
            for work in [broadcast(group, t) for t in tensors]:
                work.wait()
            self.engine.load_state(dict(zip(names, tensors)))

        return await self._weight_update(body, receive)

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        name = (await self._body(request)).get("group_name", "weight_update_group")
        if self.update_groups.pop(name, None) is None:
            return web.json_response({"success": False, "message": f"no weight update group {name!r}"}, status=400)
        return web.json_response({"success": True, "message": f"Destroyed weight update group {name!r}."})

    def app(self) -> web.Application:
        @web.middleware
        async def bad_request_is_400(request: web.Request, handler):
            try:
                return await handler(request)
            except (BadRequest, ValueError) as e:  # malformed JSON or fields: the client's fault
                return web.json_response({"error": {"message": f"{request.path}: {e}"}}, status=400)

        app = web.Application(client_max_size=64 << 20, middlewares=[bad_request_is_400])
        r = app.router
        r.add_post("/generate", self.generate)
        r.add_put("/generate", self.generate)
        for path, handler in [("/health", self.health), ("/health_generate", self.health_generate),
                              ("/model_info", self.model_info), ("/get_model_info", self.model_info),
                              ("/server_info", self.server_info), ("/get_server_info", self.server_info),
                              ("/get_weight_version", self.get_weight_version), ("/flush_cache", self.flush_cache)]:
            r.add_get(path, handler)
        for path, handler in [("/flush_cache", self.flush_cache), ("/abort_request", self.abort_request),
                              ("/pause_generation", self.pause_generation), ("/continue_generation", self.continue_generation),
                              ("/update_weights_from_disk", self.update_weights_from_disk),
                              ("/init_weights_update_group", self.init_weights_update_group),
                              ("/update_weights_from_distributed", self.update_weights_from_distributed),
                              ("/destroy_weights_update_group", self.destroy_weights_update_group),
                              ("/update_weight_version", self.update_weight_version)]:
            r.add_post(path, handler)

        async def start_loop(app):
            app["batch_loop"] = asyncio.create_task(self.batch_loop())

        app.on_startup.append(start_loop)
        return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="SGLang-protocol CPU server backed by a transformers model")
    parser.add_argument("--model", "--model-path", dest="model", required=True, help="HF model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--skip-tokenizer-init", action="store_true", help="as SGLang: ids in, ids out, no text")
    parser.add_argument("--max-batch-size", type=int, default=64, help="most sequences decoded together")
    parser.add_argument("--weight-version", default="default")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--return-original-logprob", action="store_true",
                        default=os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true"),
                        help="log-probs before temperature (SGLang: env SGLANG_RETURN_ORIGINAL_LOGPROB=1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s cpu_server:%(port)s %(message)s".replace("%(port)s", str(args.port)))
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = CpuEngine(args.model, dtype=getattr(torch, args.dtype), return_original_logprob=args.return_original_logprob)
    server = CpuServer(engine, host=args.host, port=args.port, served_model_name=args.served_model_name or args.model,
                       skip_tokenizer_init=args.skip_tokenizer_init, max_batch_size=args.max_batch_size,
                       weight_version=args.weight_version)
    log.info("serving %s on http://%s:%d", args.model, args.host, args.port)
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
