"""Measure each token's entropy change across one real update on Megatron, and undo the update.

`measure_entropy_change` records log p, entropy, sum p^2 and sum p^2 log p at every response
position, runs ONE optimizer step through `MegatronActor.update` (the actor's loss, optimizer, LR
schedule, DDP; the batch is one mini-batch and one epoch), recomputes the same statistics and
returns them flat over the valid tokens. `TrainingSnapshot` captures everything an update
changes (model weights, optimizer main params and moments, LR-scheduler step, RNG states) so a
probe inside the trainer leaves training bit-for-bit unchanged.

Collective: every rank of the model-parallel group calls these together (the actor's schedule
and DDP all-reduce run inside). Per-token results live on the last pipeline stage.
"""
from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from typing import Callable

import torch

from steer_megatron.diagnostics.entropy_change import EntropyChangeData, analyze, flat_metrics, omega_forms
from steer_megatron.train.actor import ActorBatch, MegatronActor
from steer_megatron.train.optim import torch_optimizers, trained_tensors


def _clone(v):
    return v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)


class TrainingSnapshot:
    """A copy of the state one `actor.update` changes; `restore()` puts it back (repeatable).

    Covers model parameters (megatron DDP keeps them in its param buffer: restored in place),
    the optimizer's own parameters (fp32 main copies under bf16 / the distributed optimizer's
    shards), its per-parameter state (Adam moments, step counts; empty before the first step),
    param-group hyper-parameters (the LR the scheduler writes), the scheduler's step counter, an
    fp16 loss scaler and the CPU / CUDA / megatron-tracker RNG states (dropout draws).
    """

    def __init__(self, actor: MegatronActor):
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        self.actor = actor
        self.opts = torch_optimizers(actor.optimizer)
        self.params = [(p, p.detach().clone()) for p in trained_tensors(actor)]
        self.opt_state = [{p: {k: _clone(v) for k, v in s.items()} for p, s in opt.state.items()} for opt in self.opts]
        self.groups = [[{k: _clone(v) for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in self.opts]
        subs = getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
        self.scalers = [(s.grad_scaler, s.grad_scaler.state_dict()) for s in subs if getattr(s, "grad_scaler", None)]
        sched = actor.scheduler
        self.sched_steps = None if sched is None else sched.num_steps
        self.rng_cpu = torch.get_rng_state()
        self.rng_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.rng_tracker = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}

    @torch.no_grad()
    def restore(self) -> None:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        for live, saved in self.params:
            live.copy_(saved)
        for opt, state, groups in zip(self.opts, self.opt_state, self.groups):
            opt.state = defaultdict(dict, {p: {k: _clone(v) for k, v in s.items()} for p, s in state.items()})
            for g, saved in zip(opt.param_groups, groups):
                g.update({k: _clone(v) for k, v in saved.items()})
        for scaler, state in self.scalers:
            scaler.load_state_dict(copy.deepcopy(state))
        if self.sched_steps is not None:
            self.actor.scheduler.num_steps = self.sched_steps
        torch.set_rng_state(self.rng_cpu)
        if self.rng_cuda is not None:
            torch.cuda.set_rng_state_all(self.rng_cuda)
        get_cuda_rng_tracker().set_states({k: v.clone() for k, v in self.rng_tracker.items()})
        # The probe's gradients must not leak into anything that reads grads before the next zeroing.
        self.actor.model.zero_grad_buffer()
        self.actor.optimizer.zero_grad()


@dataclasses.dataclass
class _Stats:
    log_prob: torch.Tensor
    entropy: torch.Tensor
    sum_p2: torch.Tensor
    sum_p2_logp: torch.Tensor


@torch.no_grad()
def _full_stats(actor: MegatronActor, batch: ActorBatch) -> _Stats | None:
    """All four token statistics [B, L-1] in one forward pass (compute_log_probs returns two), through
    the actor's own schedule: same micro-batching, pipeline and context-parallel path as training."""
    st = actor.token_statistics(batch, p2_stats=True)
    return None if st is None else _Stats(st["logprob"], st["entropy"], st["sum_p2"], st["sum_p2_logp"])


def one_step_actor(actor: MegatronActor, n_sequences: int) -> MegatronActor:
    """An actor sharing model, optimizer and scheduler whose update() is exactly one optimizer step
    over `n_sequences` (one mini-batch, one epoch); the trainer's actor is left untouched."""
    mbs = actor.cfg.micro_batch_size
    if n_sequences % mbs:
        raise ValueError(f"the measured batch has {n_sequences} sequences: it must be a multiple of "
                         f"micro_batch_size={mbs} (one optimizer step over the whole batch)")
    cfg = dataclasses.replace(actor.cfg, mini_batch_size=n_sequences, ppo_epochs=1)
    return MegatronActor(actor.model, actor.optimizer, cfg, actor.scheduler)


def measure_entropy_change(
    actor: MegatronActor, batch: ActorBatch, *, undo: bool = True, lr: float | None = None,
) -> tuple[EntropyChangeData | None, dict[str, float]]:
    """One real update on `batch` (needs advantages) and the per-token entropy change it caused.

    old_log_prob / old_entropy are set from the pre-step pass (on-policy, ratio 1 at the step).
    undo: restore weights, optimizer, scheduler and RNG afterwards (always on in a probe).
    lr: override the optimizer's LR for this step only (then undo is required).
    Returns (data, update metrics); data is None off the last pipeline stage.
    """
    if batch.advantages is None:
        raise ValueError("measure_entropy_change needs batch.advantages (GRPO advantages per token)")
    if lr is not None and not undo:
        raise ValueError("an LR override would leak into training: pass undo=True with lr")
    snap = TrainingSnapshot(actor) if undo else None
    try:
        before = _full_stats(actor, batch)
        work = dataclasses.replace(batch)
        if before is not None:
            work.old_log_prob, work.old_entropy = before.log_prob, before.entropy
            work.old_sum_p2, work.old_sum_p2_logp = before.sum_p2, before.sum_p2_logp  # steer.group=mini_batch, exact
        stepper = one_step_actor(actor, len(batch))
        if lr is not None:
            _set_lr(actor, lr)
            stepper.scheduler = None  # keep the override out of the schedule's bookkeeping
        used_lr = float(torch_optimizers(actor.optimizer)[0].param_groups[0]["lr"])  # what step() applies
        metrics = stepper.update(work)
        after = _full_stats(actor, batch)
        mirror = _mirrored_stats(actor, batch, snap) if snap is not None else None
    finally:
        if snap is not None:
            snap.restore()
    if before is None:
        return None, metrics
    mask = batch.loss_mask.bool()
    adv = batch.advantages[mask]
    lp = before.log_prob[mask]
    data = EntropyChangeData(
        measured=(after.entropy - before.entropy)[mask],
        omega=omega_forms(adv, lp, before.entropy[mask], before.sum_p2[mask], before.sum_p2_logp[mask]),
        advantages=adv, prob=lp.exp(), entropy=before.entropy[mask],
        ratio_after=(after.log_prob[mask] - lp).exp(),
        first_order=None if mirror is None else ((after.entropy - mirror.entropy) / 2)[mask],
        meta={"lr": used_lr, "policy_loss": actor.cfg.policy_loss, "sequences": len(batch),
              "update_metrics": {k: float(v) for k, v in metrics.items()}},
    )
    return data, metrics


@torch.no_grad()
def _mirrored_stats(actor: MegatronActor, batch: ActorBatch, snap: TrainingSnapshot) -> _Stats | None:
    """Statistics at theta - delta (every trained tensor mirrored through its saved value), so that
    (H(theta + delta) - H(theta - delta)) / 2 is grad H . delta up to third order: the parameter-space
    first order along the actual update, without a JVP through megatron's layers. The caller restores."""
    for live, saved in snap.params:
        live.copy_(2 * saved - live)
    return _full_stats(actor, batch)


def _set_lr(actor: MegatronActor, lr: float) -> None:
    for opt in torch_optimizers(actor.optimizer):
        for g in opt.param_groups:
            g["lr"] = lr


class EntropyProbe:
    """Every `every_k` steps, measure Omega against the real entropy change on a held batch.

    Runs one update on a snapshot and restores it, so training is unchanged (weights, Adam moments,
    LR schedule and RNG bit-for-bit). Cost: two forward passes and one forward/backward over the
    held batch. Collective: call on every rank with that rank's DP slice of the held batch.
    """

    def __init__(self, every_k: int, held_batch: ActorBatch, *, prob_threshold: float = 0.5, n_bins: int = 20):
        if every_k < 1:
            raise ValueError(f"diagnostics.probe_every={every_k} must be >= 1 (leave the probe out to disable it)")
        if held_batch.advantages is None:
            raise ValueError("EntropyProbe needs a held batch with advantages (e.g. one rollout batch kept aside)")
        self.every_k, self.batch = every_k, held_batch
        self.prob_threshold, self.n_bins = prob_threshold, n_bins
        self.last_report: dict | None = None

    def maybe_run(
        self, step: int, actor: MegatronActor,
        pool: Callable[[EntropyChangeData | None], EntropyChangeData | None] | None = None,
    ) -> dict[str, float] | None:
        """Metrics `diag/*` at steps divisible by every_k (on the last stage; {} elsewhere), else None.
        pool (collective, optional): merges the ranks' per-token data before the analysis, returning
        None where no analysis is wanted (the trainer pools every DP slice on rank 0)."""
        if step % self.every_k:
            return None
        data, _ = measure_entropy_change(actor, self.batch, undo=True)
        if pool is not None:
            data = pool(data)
        if data is None:
            return {}
        loss = actor.cfg.loss
        self.last_report = analyze(data, prob_threshold=self.prob_threshold, clip_low=loss.clip_low,
                                   clip_high=loss.clip_high, n_bins=self.n_bins)
        return flat_metrics(self.last_report)
