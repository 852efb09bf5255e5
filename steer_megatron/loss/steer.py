"""STEER's per-token entropy-change estimate (Omega) and the token weights derived from it.

Omega is the first-order change of the state's entropy that one policy-gradient step on a token
causes, per unit learning rate. Three forms (DESIGN.md section 1), with L(a) = log p(a) + H:
  release: -(A / p_old) * p (1 - p) L(o)                  p current policy, H old policy (as released)
  paper:   -(A / p_old) * p (1 - p)^2 L(o) * I_clip      Theorem 1 / eq. 9 (learning rate folded out)
  exact:   -(A p / p_old) * [p L(o) - sum_a p_a^2 L(a)] * I_clip
           the exact first order, for a tabular softmax, of the step the PPO surrogate -A * r makes
           (its logit gradient is A * r * (e_o - pi), r = p / p_old); 0 where the clip (or dual
           clip) fired, since those tokens get no gradient. p, H and the sum p^2 terms all from the
           current policy.
  attribution: A r D / N, each token's first-order contribution to the change of the whole batch's
           summed entropy under the real (shared-weight, preconditioned) step, with
           D = d/d eps log p(theta + eps * P grad_theta sum_i H_i); computed by the actor
           (steer_megatron.train.attribution) before each mini-batch's step, 0 where the clip fired.
The release and paper forms weight the log-prob gradient by A / p_old without the factor p, which
is not the surrogate's own step; `exact` is. The sign is the predicted direction of the entropy
change; weights use |Omega|.
"""
from __future__ import annotations

import math
import torch
import torch.distributed as dist

from steer_megatron.loss.schema import (  # noqa: F401 (re-exported)
    ALL_FORMS,
    FORM_FLOORS,
    FORMS,
    GROUPS,
    MAPPINGS,
    MODEL_FORMS,
    OMEGA_FLOOR,
    SteerConfig,
)

_P_EPS = 1e-8


def omega(
    advantages: torch.Tensor,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    entropy: torch.Tensor,
    *,
    form: str = "release",
    sum_p2: torch.Tensor | None = None,
    sum_p2_logp: torch.Tensor | None = None,
    clip_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Signed per-token Omega (no gradient). Non-finite values become 0, as in the release.

    entropy: the old policy's entropy for `release` (and `paper`); for `exact` pass the current
        policy's entropy together with sum_p2 / sum_p2_logp from the same forward pass.
    clip_mask: `paper` and `exact`, True where the PPO clip (or dual clip) fired: the loss gives those
        tokens no gradient, so I_clip = 0 there (`release` ignores it, as released).
    """
    if form in MODEL_FORMS:
        raise ValueError(f"omega form={form!r} is computed from the model by the actor "
                         "(steer_megatron.train.attribution), not from token statistics")
    if form not in FORMS:
        raise ValueError(f"omega form={form!r}: choose one of {FORMS}")
    with torch.no_grad():
        lp = log_prob.detach().float()
        p = lp.exp().clamp(_P_EPS, 1 - _P_EPS)
        p_old = old_log_prob.detach().float().exp().clamp(_P_EPS, 1.0)
        ent = entropy.detach().float()
        coef = -advantages.detach().float() / p_old
        if form == "exact":
            if sum_p2 is None or sum_p2_logp is None:
                raise ValueError("omega form='exact' needs sum_p2 and sum_p2_logp (from token_stats)")
            own = p * (lp + ent)
            others = sum_p2_logp.detach().float() + ent * sum_p2.detach().float()
            om = coef * p * (own - others)  # logit step weight A * r = (A / p_old) * p
            if clip_mask is not None:
                om = om * (~clip_mask.bool()).float()
        else:
            base = coef * p * (1 - p) * (p.log() + ent)
            if form == "release":
                om = base
            else:
                om = base * (1 - p)
                if clip_mask is not None:
                    om = om * (~clip_mask.bool()).float()
        return torch.where(torch.isfinite(om), om, torch.zeros_like(om))


def _masked_min_max(x: torch.Tensor, mask: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """min and max of x over mask; over the whole data-parallel group when one is given."""
    big = torch.finfo(x.dtype).max
    hi = torch.where(mask, x, torch.full_like(x, -big)).amax() if x.numel() else x.new_tensor(-big)
    lo = torch.where(mask, x, torch.full_like(x, big)).amin() if x.numel() else x.new_tensor(big)
    if group is not None:
        both = torch.stack([hi, -lo])  # one all-reduce for both ends
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        hi, lo = both[0], -both[1]
    # No valid token anywhere: any finite value works, the weights are masked out.
    empty = hi < lo
    return torch.where(empty, torch.zeros_like(lo), lo), torch.where(empty, torch.zeros_like(hi), hi)


def omega_range(abs_omega: torch.Tensor, mask: torch.Tensor, *, dp_group=None) -> torch.Tensor:
    """[min, max] of |Omega| over the valid tokens, across the data-parallel group when one is given
    (steer.group='mini_batch': pass the whole local mini-batch's old-policy |Omega|)."""
    lo, hi = _masked_min_max(abs_omega.detach().float(), mask.bool(), dp_group)
    return torch.stack([lo, hi])


def old_policy_omega_range(
    advantages: torch.Tensor, old_log_prob: torch.Tensor, old_entropy: torch.Tensor, mask: torch.Tensor, *,
    form: str, sum_p2: torch.Tensor | None = None, sum_p2_logp: torch.Tensor | None = None, dp_group=None,
) -> torch.Tensor:
    """steer.group='mini_batch': [min, max] |Omega| over a whole mini-batch (every DP rank when
    dp_group is given) at the old policy (p = p_old, ratio 1, so nothing is clipped), from the
    old-log-prob pass's values; `exact` needs that pass's sum_p2 / sum_p2_logp."""
    om = omega(advantages, old_log_prob, old_log_prob, old_entropy, form=form, sum_p2=sum_p2, sum_p2_logp=sum_p2_logp)
    return omega_range(om.abs(), mask, dp_group=dp_group)


def weights_from_omega(
    abs_omega: torch.Tensor, mask: torch.Tensor, cfg: SteerConfig, *, dp_group=None,
    omega_range: torch.Tensor | None = None, cp_group=None,
) -> torch.Tensor:
    """Map |Omega| to weights: tokens predicted to move entropy most get the smallest weight.

    omega_range: [min, max] |Omega| of the group, required for (and only used by) group='mini_batch'.
    cp_group: under context parallelism the tensors hold one CP rank's share of each sequence, so
    group='micro_batch' takes its min/max over the CP group (and dp_group then includes CP)."""
    mask = mask.bool()
    if cfg.group == "mini_batch":
        if omega_range is None:
            raise ValueError("steer.group='mini_batch' needs omega_range: min/max |Omega| of the whole mini-batch "
                             "from the old-policy pass (PolicyLossInputs.omega_range; MegatronActor.update computes it)")
        lo, hi = omega_range[0].to(abs_omega.dtype), omega_range[1].to(abs_omega.dtype)
        return _map(abs_omega, mask, cfg, lo, hi)
    group = dp_group if cfg.group == "dp" else cp_group
    if cfg.group == "dp" and group is None and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("steer.group='dp' needs the data-parallel process group (dp_group)")
    lo, hi = _masked_min_max(abs_omega, mask, group)
    return _map(abs_omega, mask, cfg, lo, hi)


def _map(abs_omega: torch.Tensor, mask: torch.Tensor, cfg: SteerConfig, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    if cfg.mapping == "exp":
        # a floor of 0 with every |Omega| 0 would divide by 0: the smallest normal keeps k finite (weights 1)
        k = -math.log(cfg.w_min) / torch.clamp(hi, min=max(cfg.floor, torch.finfo(hi.dtype).tiny))
        w = torch.exp(-k * abs_omega).clamp(cfg.w_min, 1.0)
    else:
        span = hi - lo
        frac = torch.where(span > 0, (abs_omega - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.full_like(abs_omega, 0.5))
        w = (cfg.w_max - frac * (cfg.w_max - cfg.w_min)).clamp(cfg.w_min, cfg.w_max)
    return torch.where(mask, w, torch.zeros_like(w))


def steer_weights(
    advantages: torch.Tensor,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    form: str = "release",
    mapping: str = "exp",
    w_min: float = 0.8,
    w_max: float = 1.0,
    group: str = "micro_batch",
    dp_group=None,
    sum_p2: torch.Tensor | None = None,
    sum_p2_logp: torch.Tensor | None = None,
    clip_mask: torch.Tensor | None = None,
    omega_range: torch.Tensor | None = None,
) -> torch.Tensor:
    """STEER token weights shaped like the inputs (0 where mask is False; no gradient).

    min / max |Omega| are taken over the valid tokens of the local micro-batch (group="micro_batch",
    as released), of the micro-batches running at once on every DP rank (group="dp", one small
    all-reduce on dp_group), or given as omega_range (group="mini_batch", old_policy_omega_range).
    """
    cfg = SteerConfig(form=form, mapping=mapping, w_min=w_min, w_max=w_max, group=group)
    om = omega(
        advantages, log_prob, old_log_prob, entropy, form=form, sum_p2=sum_p2, sum_p2_logp=sum_p2_logp, clip_mask=clip_mask
    )
    return weights_from_omega(om.abs(), mask, cfg, dp_group=dp_group, omega_range=omega_range)
