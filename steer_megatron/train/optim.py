"""Wrap a megatron-core model for training: DDP, megatron's optimizer and LR scheduler."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_steps: int = 1_000_000  # optimizer steps over which the LR decays (constant if style is "constant")
    decay_style: str = "constant"
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False  # needs use_distributed_optimizer
    bf16: bool = False

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if self.decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"optim.decay_style={self.decay_style!r}: choose constant, linear or cosine")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("overlap_param_gather needs use_distributed_optimizer (it gathers the optimizer's shards)")


def wrap_for_training(model: torch.nn.Module, settings: OptimSettings):
    """(DDP model, MegatronOptimizer, OptimizerParamScheduler) for one model chunk."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=settings.overlap_grad_reduce,
        overlap_param_gather=settings.overlap_param_gather,
        use_distributed_optimizer=settings.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(model.config, ddp_cfg, model)
    # The schedule calls this after the last micro-batch: DP all-reduce of grads, plus the
    # embedding/output-layer sync across pipeline stages. Without it each DP rank steps alone.
    model.config.finalize_model_grads_func = finalize_model_grads
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad, bf16=settings.bf16, params_dtype=torch.bfloat16 if settings.bf16 else torch.float32,
        use_distributed_optimizer=settings.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_cfg, [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if settings.warmup_steps else settings.lr, max_lr=settings.lr,
        min_lr=settings.min_lr, lr_warmup_steps=settings.warmup_steps,
        lr_decay_steps=max(settings.decay_steps, settings.warmup_steps + 1), lr_decay_style=settings.decay_style,
        start_wd=settings.weight_decay, end_wd=settings.weight_decay, wd_incr_steps=1, wd_incr_style="constant",
    )
    return ddp, optimizer, scheduler


def torch_optimizers(optimizer) -> list:
    """The megatron optimizer's underlying torch optimizers (one per chained sub-optimizer)."""
    return [sub.optimizer for sub in getattr(optimizer, "chained_optimizers", [optimizer])]


def trained_tensors(actor) -> list[torch.Tensor]:
    """Every tensor an optimizer step writes, each piece of memory once: the model's parameters
    (in megatron DDP's param buffer) and the optimizer's own parameters (fp32 main copies under
    bf16). An optimizer parameter that is a view into a model parameter (the distributed
    optimizer's shards of fp32 weights) is left out, so an in-place update is not applied twice."""
    params = list(actor.model.parameters())
    for opt in torch_optimizers(actor.optimizer):
        params += [p for g in opt.param_groups for p in g["params"]]
    spans = {}
    for p in params:
        if not p.is_contiguous():
            raise RuntimeError(f"a trained tensor of shape {tuple(p.shape)} is not contiguous; its memory span is unknown")
        start = p.data_ptr()
        spans.setdefault((p.device, start, start + p.numel() * p.element_size()), p)
    kept, reach = [], {}
    for device, start, end in sorted(spans, key=lambda k: (str(k[0]), k[1], -k[2])):
        top = reach.get(device, -1)
        if end <= top:  # inside memory already kept
            continue
        if start < top:
            raise RuntimeError("two trained tensors overlap without one containing the other; cannot update them in place")
        reach[device] = end
        kept.append(spans[(device, start, end)])
    return kept
