"""In-step feedback for the entropy closed loop: shrink a step that moved the entropy too far.

The w_min / LR loop (controller.py) sets its actuators before a step, so it can only move the
mean entropy change; on the CPU demo the step-to-step scatter is larger than the band and nothing
known before a step predicts it (docs/entropy_diagnostics.md). This part acts after the step has
been measured: if its entropy change lies outside the band, it moves the weights back along the
step, to theta_0 + s * (theta_1 - theta_0) with min_scale <= s < 1, measures again, and repeats
up to `trims` times. It is a backtracking line search on the measured entropy change, as TRPO
backtracks on the measured KL (Schulman et al. 2015, arXiv 1502.05477, appendix C).

It only ever shrinks the step the optimizer took: growing it would go past where its gradients
were computed, while a shrunk step stays on the optimizer's own path. So it can only help when
the band lies between 0 and the step's change (a step that lost too much entropy, for a band of
losses). The optimizer's moments keep the whole step's gradients; only the weights move back.
What the loop logs as the step's change is measured on the weights it keeps.
"""
from __future__ import annotations

from typing import Callable

import torch

from steer_megatron.train.optim import trained_tensors
from steer_megatron.train.actor import MegatronActor


def next_trim_scale(points: list[tuple[float, float]], low: float, high: float, min_scale: float) -> float | None:
    """The next fraction s of the step to try, from the (s, dH) measured so far (the first is
    (1.0, the untrimmed change)); None when no shrinking reaches the band.

    The target is the band's centre. dH(0) = 0 exactly, so the centre is bracketed between s = 0
    and the untrimmed step whenever it lies between 0 and that step's change; inside the bracket
    the next try is the linear interpolation (regula falsi), which stays inside it, clamped to
    [min_scale, 1)."""
    centre = (low + high) / 2
    s1, d1 = points[0]
    if s1 != 1.0:
        raise ValueError(f"the first point must be the untrimmed step (1.0, dH), got {points[0]}")
    if not (min(0.0, d1) < centre < max(0.0, d1)):
        return None
    near = [(0.0, 0.0)] + [p for p in points if (p[1] - centre) * d1 < 0]  # the side of 0, below the centre's |dH|
    far = [p for p in points if (p[1] - centre) * d1 >= 0]  # at or past the centre
    (sa, da), (sb, db) = max(near), min(far)
    s = sa + (centre - da) * (sb - sa) / (db - da) if db != da else (sa + sb) / 2
    s = min(max(s, min_scale), sb)
    if any(abs(s - p[0]) < 1e-9 for p in points):  # pinned at min_scale and already measured there
        return None
    return s


def search_step_scale(measure: Callable[[], float], scale: Callable[[float], None], raw: float, low: float,
                      high: float, trims: int, min_scale: float) -> tuple[float, float, int]:
    """Up to `trims` tries of next_trim_scale, from the untrimmed step's change `raw`; stops once
    inside the band. dH need not be monotone along the step, so it keeps the scale that came
    closest to the band, and measures that again on the weights kept (getting back to it rounds
    differently). `scale(s)` moves the weights, `measure()` gives their change (collective: every
    rank must make the same calls). Returns (scale kept, its measured change, measurements made)."""
    points, dh, passes = [(1.0, raw)], raw, 0
    while len(points) <= trims and not low <= dh <= high:
        s = next_trim_scale(points, low, high, min_scale)
        if s is None:
            break
        scale(s)
        dh, passes = measure(), passes + 1
        points.append((s, dh))
    best = min(points, key=lambda p: (max(low - p[1], p[1] - high, 0.0), -p[0]))
    if best[0] != points[-1][0]:
        scale(best[0])
        dh, passes = measure(), passes + 1
    return best[0], dh, passes


class StepTrim:
    """The weights before one step, so the step can be scaled back: `scale(s)` puts every trained
    tensor (model parameters and the optimizer's main copies, consistently on every DP / TP / PP
    rank) at theta_0 + s * (theta_1 - theta_0). Costs one copy of those tensors while held."""

    def __init__(self, actor: MegatronActor):
        self.start = [(p, p.detach().clone()) for p in trained_tensors(actor)]
        self.s = 1.0  # the fraction of the step the live weights hold now

    @torch.no_grad()
    def scale(self, s: float) -> None:
        if not 0 < s <= 1:
            raise ValueError(f"step scale {s} must lie in (0, 1]")
        ratio = s / self.s
        for live, start in self.start:
            if live.dtype == torch.float32:
                live.sub_(start).mul_(ratio).add_(start)
            else:  # bf16 / fp16 weights: work in fp32 and round once
                live.copy_(live.float().sub_(start.float()).mul_(ratio).add_(start.float()))
        self.s = s
