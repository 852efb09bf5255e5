"""The run config -> the settings objects of the loss, the optimizer and the model dtype."""
from __future__ import annotations

from steer_megatron.config import RunConfig
from steer_megatron.loss.schema import PolicyLossConfig, policy_loss_config_from
from steer_megatron.models.hf_export import DTYPES
from steer_megatron.train.optim import OptimSettings

__all__ = ["DTYPES", "model_settings", "optim_settings", "policy_loss_config"]

# model.recompute -> megatron-core TransformerConfig fields
_RECOMPUTE = {
    "none": {},
    "selective": dict(recompute_granularity="selective"),  # attention's softmax(QK^T)V, megatron's default module
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def model_settings(cfg: RunConfig) -> dict:
    """TransformerConfig fields the run config sets beyond the HF architecture (memory knobs)."""
    return dict(sequence_parallel=cfg.parallel.sequence_parallel, **_RECOMPUTE[cfg.model.recompute])


def policy_loss_config(cfg: RunConfig) -> PolicyLossConfig:
    """algorithm.* -> the loss's settings: the same component dataclasses, passed whole (loss/schema.py)."""
    return policy_loss_config_from(cfg.algorithm, seed=cfg.trainer.seed)


def optim_settings(cfg: RunConfig) -> OptimSettings:
    o = cfg.optim
    updates = cfg.trainer.total_steps * cfg.trainer.ppo_epochs * (cfg.trainer.rollout_batch_size // cfg.trainer.mini_batch_size)
    return OptimSettings(lr=o.lr, min_lr=o.lr * o.min_lr_ratio, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
                         adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.grad_clip, warmup_steps=o.warmup_steps,
                         decay_steps=updates, decay_style=o.schedule, bf16=cfg.model.dtype == "bfloat16",
                         use_distributed_optimizer=cfg.parallel.distributed_optimizer,
                         overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
                         overlap_param_gather=cfg.parallel.overlap_param_gather)
