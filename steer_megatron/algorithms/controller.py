"""Closed loop on STEER's w_min: hold the measured per-step entropy change inside a band.

w_min is the weight floor of the tokens predicted to move entropy most. On the CPU demo those are
mostly low-probability tokens, which lose entropy whatever their advantage, so lowering w_min
raises the step's entropy change (less entropy lost) and raising it (towards 1 = plain GRPO)
lowers it: measured on one batch (w_min 1.0 -> dH -0.0050, 0.05 -> -0.0031) and over 30 trainer
steps (w_min 0.8 -> mean dH -0.0115, w_min 0.06-0.25 -> -0.0088; docs/entropy_diagnostics.md).
So outside the band the controller moves

    log w_min += gain * (measured - band centre) / (high - low)

(below the band -> lower w_min, above it -> raise w_min), clamped to +-max_step per update and
w_min to its bounds; inside the band nothing changes (a dead band keeps w_min still while the
entropy behaves). Aiming at the centre, not the nearest edge, matters under noise: a loop that
stops at the edge leaves half of the next steps' noise outside. Past w_min's bounds the same
law can move an LR multiplier (lr_scale_bounds; WMinController's docstring says why). The
update is incremental, so log w_min + log lr_scale is the integrator and the controller's only
state. Off by default. Its input is
the step's measured mean entropy change, step_entropy_change() below (one extra forward pass on
the step's own batch, DP-averaged).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from steer_megatron.train.actor import ActorBatch, ActorConfig, MegatronActor


@dataclass
class ClosedLoopConfig:
    """`diagnostics.closed_loop`: move STEER's w_min each step to hold the step's measured entropy
    change inside `band` (WMinController below). Needs algorithm.policy_loss=steer. Past w_min's
    bounds the loop can go on to scale the LR (lr_scale_bounds; off by default), and with trims > 0
    it scales back, inside the step, a step that overshot the band (algorithms/step_trim.py).
    Validated here, once, for the YAML loader and the library alike."""

    enabled: bool = False
    band: list[float] = field(default_factory=lambda: [-0.004, -0.001])  # [low, high], nats/token per step
    gain: float = 0.5  # change of log w_min per band width of error outside the band
    w_min_bounds: list[float] = field(default_factory=lambda: [0.05, 1.0])  # within (0, 1]
    max_step: float = 0.5  # largest change of log w_min (or log LR scale) in one step
    # LR multiplier the loop may use once w_min sits at a bound: [low <= 1, high >= 1]. [1, 1] = w_min only.
    lr_scale_bounds: list[float] = field(default_factory=lambda: [1.0, 1.0])
    # In-step feedback (algorithms/step_trim.py): a step whose measured change lies outside the
    # band is scaled back towards the weights before it, re-measured, up to `trims` times. 0 = off.
    trims: int = 0
    min_step_scale: float = 0.25  # the smallest fraction of a step a trim may keep, in (0, 1]

    def __post_init__(self):
        p = "diagnostics.closed_loop."
        band, wb, lb = list(self.band), list(self.w_min_bounds), list(self.lr_scale_bounds)
        if self.trims and not self.enabled:
            raise ValueError(f"{p}trims={self.trims} trims steps against the closed loop's band: set {p}enabled=true "
                             f"(pin w_min with w_min_bounds=[w,w] for the trim alone), or trims=0")
        if len(band) != 2 or not band[0] < band[1]:
            raise ValueError(f"{p}band={band}: must be [low, high] with low < high "
                             f"(per-step entropy change in nats/token, e.g. [-0.004, -0.001])")
        if len(wb) != 2 or not 0 < wb[0] <= wb[1] <= 1:
            raise ValueError(f"{p}w_min_bounds={wb}: must be [low, high] with 0 < low <= high <= 1 "
                             f"(STEER's exp-mapped weights lie in [w_min, 1])")
        if self.gain <= 0 or self.max_step <= 0:
            raise ValueError(f"{p}gain={self.gain} and max_step={self.max_step}: both must be > 0")
        if len(lb) != 2 or not 0 < lb[0] <= 1 <= lb[1]:
            raise ValueError(f"{p}lr_scale_bounds={lb}: must be [low, high] with 0 < low <= 1 <= high (the LR "
                             f"takes over from w_min at w_min's bounds, where its scale is 1; [1.0, 1.0] = w_min only)")
        if self.trims < 0 or not 0 < self.min_step_scale <= 1:
            raise ValueError(f"{p}trims={self.trims} and min_step_scale={self.min_step_scale}: need trims >= 0 "
                             f"(0 = off) and 0 < min_step_scale <= 1")
        if lb != [1.0, 1.0] and band[1] > 0:
            raise ValueError(f"{p}lr_scale_bounds={lb} with band={band}: scaling the LR only shrinks or grows a "
                             f"falling entropy, so the band's high end must be <= 0; lower it or set "
                             f"lr_scale_bounds=[1.0,1.0]")


class WMinController:
    """The law above on one state, u = log w_min + log lr_scale, split over two actuators.

    w_min is the primary knob: while u lies within log(w_min_bounds) it is w_min itself and the
    LR is untouched. Only past a w_min bound does u spill into an LR multiplier, within
    lr_scale_bounds (a split-range actuator: below the w_min floor the loop shrinks the step,
    above the w_min ceiling it grows it). With lr_scale_bounds (1, 1), the default, this is the
    w_min-only loop. The LR is there because w_min alone barely moves the entropy change on the
    CPU demo (see the module docstring): Adam and gradient clipping renormalise the step, so
    down-weighting a few tokens changes its direction more than its size, and Omega does not
    pick out the tokens whose entropy moves (docs/entropy_diagnostics.md). An LR scale changes
    the size of every Adam step directly. Lowering the LR only shrinks the entropy change towards
    zero, which is the right direction only when the entropy falls, so a band that allows a rise
    (high > 0) cannot use it.
    """

    def __init__(
        self, target_low: float, target_high: float, w_min_init: float = 0.8,
        w_min_bounds: tuple[float, float] = (0.05, 1.0), gain: float = 0.5, max_step: float = 0.5,
        lr_scale_bounds: tuple[float, float] = (1.0, 1.0),
    ):
        c = ClosedLoopConfig(enabled=True, band=[target_low, target_high], gain=gain, max_step=max_step,
                             w_min_bounds=list(w_min_bounds), lr_scale_bounds=list(lr_scale_bounds))
        (lo, hi), (s_lo, s_hi) = c.w_min_bounds, c.lr_scale_bounds
        if not lo <= w_min_init <= hi:
            raise ValueError(f"w_min_init={w_min_init} lies outside w_min_bounds=({lo}, {hi})")
        self.low, self.high = target_low, target_high
        self.bounds, self.lr_bounds = (lo, hi), (s_lo, s_hi)
        self.gain, self.max_step = gain, max_step
        self.u = math.log(w_min_init)

    @property
    def w_min(self) -> float:
        lo, hi = self.bounds
        return min(hi, max(lo, math.exp(self.u)))

    @property
    def lr_scale(self) -> float:
        """1 while w_min is inside its bounds; the part of the demand that w_min could not take beyond them."""
        return math.exp(self.u) / self.w_min

    def in_band(self, measured: float) -> bool:
        return self.low <= measured <= self.high

    def update(self, measured_dH_per_step: float) -> float:
        """Feed the entropy change measured in the last step; returns the w_min for the next one
        (and sets lr_scale for it)."""
        m = float(measured_dH_per_step)
        if not math.isfinite(m):
            raise ValueError(f"closed loop got a non-finite entropy change {m}; check the step's metrics")
        if self.in_band(m):
            return self.w_min
        # dH rises as w_min (then the LR) falls (module docstring)
        step = self.gain * (m - (self.low + self.high) / 2) / (self.high - self.low)
        step = max(-self.max_step, min(self.max_step, step))
        (lo, hi), (s_lo, s_hi) = self.bounds, self.lr_bounds
        self.u = min(math.log(hi * s_hi), max(math.log(lo * s_lo), self.u + step))
        return self.w_min

    def actuate(self, cfg: ActorConfig) -> ActorConfig:
        """The actor config with STEER's w_min and the LR scale set (configs are frozen: assign the
        result to actor.cfg)."""
        if cfg.policy_loss != "steer":
            raise ValueError(f"the w_min closed loop needs algorithm.policy_loss=steer, got {cfg.policy_loss!r}")
        steer = dataclasses.replace(cfg.loss.steer, w_min=self.w_min)
        return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, steer=steer), lr_scale=self.lr_scale)

    @classmethod
    def from_config(cls, c: ClosedLoopConfig, w_min_init: float) -> "WMinController":
        return cls(c.band[0], c.band[1], w_min_init=w_min_init, w_min_bounds=tuple(c.w_min_bounds), gain=c.gain,
                   max_step=c.max_step, lr_scale_bounds=tuple(c.lr_scale_bounds))

    def state_dict(self) -> dict:
        return {"w_min": self.w_min, "lr_scale": self.lr_scale}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints from before the LR actuator carry w_min only
        self.u = math.log(float(state["w_min"])) + math.log(float(state.get("lr_scale", 1.0)))


@torch.no_grad()
def step_entropy_change(actor: MegatronActor, batch: ActorBatch) -> float | None:
    """Mean over the valid tokens of H_after - H_before for the step that just ran on `batch`
    (batch.old_entropy holds H_before), over the whole data-parallel group, so every DP rank
    feeds its controller the same number. Collective; one extra forward pass; None off the last
    pipeline stage (the only stage whose loss reads w_min)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    _, after = actor.compute_log_probs(batch)  # collective over the pipeline: every stage runs it
    if after is None:
        return None
    if batch.old_entropy is None:
        raise ValueError("step_entropy_change needs batch.old_entropy from the pre-update compute_log_probs")
    mask = batch.loss_mask.bool()
    total = torch.stack([(after - batch.old_entropy)[mask].double().sum(), mask.sum().double()])
    if dist.is_initialized():
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    return float(total[0] / total[1]) if total[1] > 0 else 0.0
