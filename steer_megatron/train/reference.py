"""The frozen reference policy for a KL penalty (`algorithm.kl_coef > 0`).

The reference is the run's initial policy: a second copy of the model, built at the same layout
as the trained one and loaded from `model.hf_path` (also on resume, where the trained copy comes
from a checkpoint). It adds one forward pass per step over the step's batch, and its weights
(one more copy in `model.dtype`, no gradients or optimizer state) to every rank's memory.
"""
from __future__ import annotations

import torch

from steer_megatron.train.actor import ActorBatch, ActorConfig, MegatronActor


class ReferencePolicy:
    def __init__(self, model: torch.nn.Module, cfg: ActorConfig):
        for p in model.parameters():
            p.requires_grad_(False)
        self._actor = MegatronActor(model, None, cfg)

    @classmethod
    def build(cls, arch, hf_path: str, *, params_dtype: torch.dtype, padded_vocab: int, cfg: ActorConfig,
              seed: int, **model_settings) -> "ReferencePolicy":
        """Collective: every rank builds and loads its shard of the initial weights."""
        from steer_megatron.models.hf_config import build_gpt_model
        from steer_megatron.models.hf_import import load_hf_weights

        model, _ = build_gpt_model(arch, params_dtype=params_dtype, seed=seed, padded_vocab=padded_vocab,
                                   **model_settings)
        load_hf_weights(model, hf_path, arch)
        return cls(model, cfg)

    def log_probs(self, batch: ActorBatch) -> torch.Tensor | None:
        """[B, L-1] log-probs of the batch's tokens under the reference (last stage; None elsewhere)."""
        log_prob, _ = self._actor.compute_log_probs(batch)
        return log_prob
