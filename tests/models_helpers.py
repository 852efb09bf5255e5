"""Helpers for tests/test_models_*.py: tiny random HF models and rank workers (module level,
so spawn_ranks can import them)."""
from __future__ import annotations

import os

import torch

# megatron-core's llama3 scaling fixes original_max_position_embeddings to 8192 (transformers
# warns it exceeds the tiny max_position_embeddings; harmless). theta 10000 puts several
# frequencies in the scaled bands.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=200, max_position_embeddings=128)


def make_hf_model(out_dir: str, family: str = "qwen2", tie: bool = False, seed: int = 0,
                  max_shard_size: str = "60KB", dtype: torch.dtype = torch.float32, **overrides) -> str:
    """Save a tiny random HF model (every weight random, biases and norms included)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    kw = dict(TINY, tie_word_embeddings=tie, rms_norm_eps=1e-5)
    kw.update(overrides)
    if "rope_parameters" not in kw:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 50000.0 if family == "qwen2" else 500000.0}
    cfg = (Qwen2Config if family == "qwen2" else LlamaConfig)(**kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    model.to(dtype).save_pretrained(out_dir, max_shard_size=max_shard_size)
    return out_dir


def hf_logits(hf_dir: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(ids).logits


def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab (unpadded) logits on every rank of the last stage, None elsewhere.

    Pipeline stages hand activations on with send/recv (simple, forward only)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from steer_megatron.models.hf_import import unwrap

    m = unwrap(model)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    pp = ps.get_pipeline_model_parallel_world_size()
    with torch.no_grad():
        if pp > 1 and not ps.is_pipeline_first_stage():
            cfg = m.config
            hidden = torch.empty(ids.shape[1], ids.shape[0], cfg.hidden_size, dtype=cfg.params_dtype)
            dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
            m.set_input_tensor(hidden)
        out = m(input_ids=ids, position_ids=pos, attention_mask=None)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            return None
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out[..., : m.vocab_info.size]


def load_and_logits(hf_dir: str, tp: int, pp: int, ids: torch.Tensor) -> torch.Tensor | None:
    """Rank worker: build at tp x pp, load HF weights, return logits (last stage) or None."""
    from steer_megatron.models import build_gpt_model, load_hf_weights, parse_hf_config
    from steer_megatron.parallel import ParallelLayout, init_parallel

    init_parallel(ParallelLayout(tp=tp, pp=pp))
    model, _ = build_gpt_model(parse_hf_config(hf_dir))
    load_hf_weights(model, hf_dir)
    return megatron_logits(model, ids)


def check_models(hf_dirs: list[str], tp: int, pp: int, ids: torch.Tensor, export_root: str | None) -> dict:
    """Rank worker: for each HF dir build at tp x pp, load, compute logits, and (if export_root)
    export back to HF under export_root/<basename>. Returns {dir: logits or None}."""
    import torch.distributed as dist

    from steer_megatron.models import build_gpt_model, export_hf_checkpoint, load_hf_weights, parse_hf_config
    from steer_megatron.parallel import ParallelLayout, init_parallel

    from steer_megatron.models import iter_hf_buckets

    init_parallel(ParallelLayout(tp=tp, pp=pp))
    logits, stage = {}, {}
    for d in hf_dirs:
        model, _ = build_gpt_model(parse_hf_config(d))
        load_hf_weights(model, d)
        logits[d] = megatron_logits(model, ids)
        if export_root:
            export_hf_checkpoint(model, os.path.join(export_root, os.path.basename(d)), source_dir=d,
                                 max_shard_bytes=100_000)
        # the weight-sync form: each stage's TP-rank 0 yields its own stage's tensors, in buckets
        buckets = list(iter_hf_buckets(model, 50_000, dst="stage"))
        stage[d] = {n: t.clone() for b in buckets for n, t in b}
        dist.barrier()
    return pack(dict(logits=logits, stage=stage))


# ---------------------------------------------------------------------------------------------
# Training helpers (dist-checkpoint tests)


def build_training(hf_dir: str, tp: int, pp: int, padded_vocab: int | None = None, load_hf: bool = True,
                   distributed: bool = False):
    """Model (megatron DDP-wrapped) + megatron optimizer at tp x pp."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from steer_megatron.models import build_gpt_model, load_hf_weights, parse_hf_config
    from steer_megatron.parallel import ParallelLayout, init_parallel

    init_parallel(ParallelLayout(tp=tp, pp=pp))
    gpt, _ = build_gpt_model(parse_hf_config(hf_dir), padded_vocab=padded_vocab)
    if load_hf:
        load_hf_weights(gpt, hf_dir)
    gpt.config.finalize_model_grads_func = finalize_model_grads
    model = DistributedDataParallel(gpt.config, DistributedDataParallelConfig(use_distributed_optimizer=distributed), gpt)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=1.0, params_dtype=torch.float32,
                        use_distributed_optimizer=distributed),
        [model],
    )
    return model, opt


def train_steps(model, optimizer, batches: list[torch.Tensor]) -> list[float]:
    """One optimizer step per batch through megatron's pipeline schedule; losses (last stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    losses = []
    for ids in batches:
        model.zero_grad_buffer()
        optimizer.zero_grad()

        def forward_step(data_iter, m):
            x = next(data_iter)
            pos = torch.arange(x.shape[1]).unsqueeze(0).expand_as(x)
            out = m(input_ids=x, position_ids=pos, attention_mask=None, labels=torch.roll(x, -1, 1))

            def loss_fn(o):
                loss = o.float().mean()
                return loss, {"loss": loss.detach().clone()}

            return out, loss_fn

        res = fb(forward_step_func=forward_step, data_iterator=iter([ids]), model=[model], num_microbatches=1,
                 seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=False)
        optimizer.step()
        if ps.is_pipeline_last_stage():
            losses.append(float(res[0]["loss"]))
    return losses


def optimizer_moments(model, optimizer) -> dict[str, torch.Tensor]:
    """Adam exp_avg / exp_avg_sq of every parameter in HF layout (on global rank 0)."""
    from steer_megatron.models import iter_hf_weights

    states = {}
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        states.update(sub.optimizer.state)
    out = {}
    for key in ("exp_avg", "exp_avg_sq"):
        for name, t in iter_hf_weights(model, tensor_fn=lambda n, p: states[p][key]):
            out[f"{key}/{name}"] = t.clone()
    return out


def ckpt_worker(hf_dir: str, ckpt_root: str, tp: int, pp: int, batches: list[torch.Tensor], mode: str,
                probe: torch.Tensor, distributed: bool = False) -> dict:
    """mode='save': train len(batches)-2 steps, save, train 2 more.
    mode='resume': load the latest checkpoint, train the last 2 batches.
    Returns logits at the checkpoint, optimizer moments, the losses after it, and meta."""
    from steer_megatron.models.checkpoint import load_checkpoint, read_meta, save_checkpoint

    if mode == "save":
        model, opt = build_training(hf_dir, tp, pp, distributed=distributed)
        before = train_steps(model, opt, batches[:-2])
        save_checkpoint(ckpt_root, len(batches) - 2, model, opt, extra={"data": {"consumed": len(batches) - 2}},
                        config={"lr": 1e-2}, keep_last=2)
        meta = None
    else:
        padded = read_meta(ckpt_root).padded_vocab_size
        model, opt = build_training(hf_dir, tp, pp, padded_vocab=padded, load_hf=False, distributed=distributed)
        before = []
        meta = load_checkpoint(ckpt_root, model, opt).__dict__
    logits = megatron_logits(model, probe)
    moments = None if distributed else optimizer_moments(model, opt)  # a distributed optimizer holds shards
    after = train_steps(model, opt, batches[-2:])
    return pack(dict(logits=logits, moments=moments, before=before, after=after, meta=meta))


def pack(obj) -> bytes:
    """Serialise rank results: many tensors through the spawn queue's fd sharing can race the
    rank's exit, plain bytes cannot."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes):
    import io

    return torch.load(io.BytesIO(data), weights_only=False)


def read_hf(hf_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF safetensors directory (single file or sharded)."""
    from safetensors import safe_open

    from steer_megatron.models.hf_import import hf_weight_map

    out = {}
    for name, path in hf_weight_map(hf_dir).items():
        with safe_open(path, framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def assert_bitwise_equal(a_dir: str, b_dir: str) -> None:
    a, b = read_hf(a_dir), read_hf(b_dir)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def load_ckpt_logits(hf_dir: str, ckpt: str, tp: int, pp: int, ids: torch.Tensor):
    """Rank worker: build at tp x pp with the checkpoint's vocab padding, load the model-only
    dist checkpoint, return logits."""
    from steer_megatron.models import build_gpt_model, parse_hf_config
    from steer_megatron.models.checkpoint import load_checkpoint, read_meta
    from steer_megatron.parallel import ParallelLayout, init_parallel

    init_parallel(ParallelLayout(tp=tp, pp=pp))
    model, _ = build_gpt_model(parse_hf_config(hf_dir), padded_vocab=read_meta(ckpt).padded_vocab_size)
    load_checkpoint(ckpt, model)
    return megatron_logits(model, ids)


def update_gradients(actor, model, batch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One actor.update(batch) whose optimizer step only records the reduced gradients (main_grad,
    after DDP's all-reduce): (gradient per parameter, update metrics); the weights stay as they were."""
    grads: dict[str, torch.Tensor] = {}

    def capture():
        grads.update({k: p.main_grad.detach().clone() for k, p in model.named_parameters()})
        return True, 0.0, None

    actor.optimizer.step = capture
    metrics = actor.update(batch)
    return grads, metrics
