"""Closed loop on STEER's w_min: hold the measured per-step entropy change inside a band.

w_min is the weight floor of the tokens predicted to move entropy most; lowering it is meant to
damp the step's entropy change in whichever direction it goes, raising it (towards 1 = plain
GRPO) lets it through. (An assumption: on the CPU demo w_min barely moved the entropy change,
see docs/entropy_diagnostics.md.) So the controller acts on the *magnitude*: outside the band it moves log w_min by

    delta = -gain * (measured - nearest band edge) * sign(measured) / (high - low)

(too far from zero -> damp, too close to zero -> release), clamped to +-max_step per update and
w_min to its bounds. Inside the band nothing changes (a dead band keeps w_min still while the
entropy behaves). Off by default. Its input is the step's measured mean entropy change,
step_entropy_change() below (one extra forward pass on the step's own batch, DP-averaged).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from steer_megatron.train.actor import ActorBatch, ActorConfig, MegatronActor


class WMinController:
    def __init__(
        self, target_low: float, target_high: float, w_min_init: float = 0.8,
        w_min_bounds: tuple[float, float] = (0.05, 1.0), gain: float = 0.5, max_step: float = 0.5,
    ):
        lo, hi = w_min_bounds
        if not target_low < target_high:
            raise ValueError(f"diagnostics.closed_loop.band=[{target_low}, {target_high}]: need low < high")
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"diagnostics.closed_loop.w_min_bounds=({lo}, {hi}): need 0 < low <= high <= 1 "
                             "(the exp mapping's weights lie in [w_min, 1])")
        if not lo <= w_min_init <= hi:
            raise ValueError(f"w_min_init={w_min_init} lies outside w_min_bounds=({lo}, {hi})")
        if gain <= 0 or max_step <= 0:
            raise ValueError(f"diagnostics.closed_loop.gain={gain} and max_step={max_step} must be > 0")
        self.low, self.high = target_low, target_high
        self.bounds = (lo, hi)
        self.gain, self.max_step = gain, max_step
        self.w_min = w_min_init

    def in_band(self, measured: float) -> bool:
        return self.low <= measured <= self.high

    def update(self, measured_dH_per_step: float) -> float:
        """Feed the entropy change measured in the last step; returns the w_min for the next one."""
        m = float(measured_dH_per_step)
        if not math.isfinite(m):
            raise ValueError(f"closed loop got a non-finite entropy change {m}; check the step's metrics")
        if self.in_band(m):
            return self.w_min
        edge = self.high if m > self.high else self.low
        step = -self.gain * (m - edge) * math.copysign(1.0, m) / (self.high - self.low)
        step = max(-self.max_step, min(self.max_step, step))
        lo, hi = self.bounds
        self.w_min = min(hi, max(lo, self.w_min * math.exp(step)))
        return self.w_min

    def state_dict(self) -> dict:
        return {"w_min": self.w_min}

    def load_state_dict(self, state: dict) -> None:
        self.w_min = float(state["w_min"])


def with_w_min(cfg: ActorConfig, w_min: float) -> ActorConfig:
    """The actor config with STEER's w_min replaced (configs are frozen: assign the result to actor.cfg)."""
    if cfg.policy_loss != "steer":
        raise ValueError(f"the w_min closed loop needs algorithm.policy_loss=steer, got {cfg.policy_loss!r}")
    steer = dataclasses.replace(cfg.loss.steer, w_min=w_min)
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, steer=steer))


@torch.no_grad()
def step_entropy_change(actor: MegatronActor, batch: ActorBatch) -> float | None:
    """Mean over the valid tokens of H_after - H_before for the step that just ran on `batch`
    (batch.old_entropy holds H_before), over the whole data-parallel group, so every DP rank
    feeds its controller the same number. Collective; one extra forward pass; None off the last
    pipeline stage (the only stage whose loss reads w_min)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if batch.old_entropy is None:
        raise ValueError("step_entropy_change needs batch.old_entropy from the pre-update compute_log_probs")
    _, after = actor.compute_log_probs(batch)
    if after is None:
        return None
    mask = batch.loss_mask.bool()
    total = torch.stack([(after - batch.old_entropy)[mask].double().sum(), mask.sum().double()])
    if dist.is_initialized():
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    return float(total[0] / total[1]) if total[1] > 0 else 0.0
