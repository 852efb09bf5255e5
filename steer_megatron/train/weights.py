"""Push the trainer's weights to the rollout fleet and check parity, as one collective.

Rank 0 drives the transport (HTTP to the workers) while every rank takes part in the
collectives behind it: streaming the HF-layout weights out of the TP/PP shards, and the parity
probe's trainer-side log-probs, which the sharded model can only compute all together.
"""
from __future__ import annotations

from typing import Sequence

import torch

from steer_megatron.models.hf_export import iter_hf_weights
from steer_megatron.rollout.weight_sync import ParityProbe
from steer_megatron.rollout.weight_sync.base import WeightSync
from steer_megatron.train.actor import ActorBatch, MegatronActor
from steer_megatron.train.control import ControlPlane


def actor_logprobs(actor: MegatronActor, control: ControlPlane, prompts, completions, pad_id: int):
    """Collective: the actor's log-probs of each completion given its prompt, on rank 0."""
    from megatron.core import parallel_state as ps

    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    mask = torch.zeros(len(seqs), length - 1, dtype=torch.bool)
    logp, _ = actor.compute_log_probs(ActorBatch(input_ids=ids, loss_mask=mask))
    mine = None
    if logp is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        mine = [logp[i, len(p) - 1 : len(p) - 1 + len(c)].tolist() for i, (p, c) in enumerate(zip(prompts, completions))]
    found = control.gather(mine)
    return None if found is None else next(r for r in found if r is not None)


class WeightPublisher:
    """`publish(version)` on every rank after each optimizer step."""

    def __init__(self, actor: MegatronActor, control: ControlPlane, sync: WeightSync | None,
                 probe_prompts: Sequence[Sequence[int]], *, pad_id: int, atol: float, dtype: torch.dtype,
                 temperature: float = 1.0):
        self.actor, self.control, self.sync, self.pad_id, self.dtype = actor, control, sync, pad_id, dtype
        if temperature != actor.cfg.temperature:
            raise ValueError(f"WeightPublisher: rollout temperature {temperature} differs from the actor's "
                             f"{actor.cfg.temperature}: the parity probe would compare two distributions")
        if control.is_driver and sync is not None:
            # the trainer scores softmax(logits / T): probe that distribution (greedy = raw logits at T = 1)
            sync.probe = ParityProbe(prompts=tuple(tuple(p) for p in probe_prompts),
                                     trainer_logprobs=self._driver_logprobs, atol=atol,
                                     temperature=0.0 if temperature == 1.0 else temperature)

    def _driver_logprobs(self, prompts, completions):
        self.control.broadcast(("probe", prompts, completions))
        return actor_logprobs(self.actor, self.control, prompts, completions, self.pad_id)

    def publish(self, version: int | str):
        """Rank 0 returns the SyncReport; other ranks None. Raises ParityError on mismatch."""
        weights = iter_hf_weights(self.actor.model, dst="rank0", dtype=self.dtype)
        if not self.control.is_driver:
            for _ in weights:
                pass
            while True:  # serve the driver's probe requests until it says done
                msg = self.control.broadcast()
                if msg[0] == "done":
                    if msg[1]:
                        raise RuntimeError(f"weight sync failed on rank 0: {msg[1]}")
                    return None
                actor_logprobs(self.actor, self.control, msg[1], msg[2], self.pad_id)
        try:
            report = self.sync.sync(weights, version)
        except Exception as e:
            self.control.broadcast(("done", f"{type(e).__name__}: {e}"))
            raise
        self.control.broadcast(("done", None))
        return report

