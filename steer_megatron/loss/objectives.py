"""More policy objectives, registered beside the PPO-clip family of policy_losses.py.

  gspo          GSPO (Zheng et al. 2025, arXiv 2507.18071): PPO clip on the sequence ratio
                s_i = exp(mean_t log(p / p_old)), token form s_it = sg(s_i) * p / sg(p)
  cispo         CISPO (MiniMax-M1, arXiv 2506.13585): REINFORCE with a clipped, detached IS
                weight: -sg(clip(r, 1 - low, 1 + high)) * A * log p
  steer_gspo,   the same objectives times STEER's token weights (as Tencent/G-Core-GH composes
  steer_cispo   them); I_clip of the `paper` form is the objective's own "no gradient" mask
  w_reinforce   PPO clip on W-REINFORCE advantages (Zhu et al. 2025, arXiv 2506.01347):
                +lambda for a correct sample, -1 for a wrong one (algorithm.adv.estimator=w_reinforce)
  psr, nsr      its ablations: correct samples only (+1) / wrong samples only (-1), the rest masked
  gtpo          PPO clip on GTPO's entropy-shaped token advantages (Tan et al. 2025,
                arXiv 2508.04349; algorithm.adv.estimator=gtpo, algorithms/advantages.py)

Equal to their references: tests/test_objectives.py compares gspo / cispo with verl 0.9.1's
functions (loaded from the wheel) and the advantage estimators with float64 re-derivations.
"""
from __future__ import annotations

import torch

from steer_megatron.loss.policy_losses import (
    PolicyLossConfig,
    PolicyLossInputs,
    _ppo_clip,
    _ratio,
    masked_max,
    masked_mean,
    register_policy_loss,
    steer_needs,
)
from steer_megatron.loss.steer import omega, weights_from_omega

_GSPO_LOG_RATIO_MAX = 10.0  # verl / the GSPO reference clamp the sequence log-ratio from above only


def _sequence_log_ratio(inp: PolicyLossInputs) -> torch.Tensor:
    """[B, T] -> [B, 1]: mean over valid tokens of log p - log p_old (detached)."""
    if inp.log_prob.dim() != 2:
        raise ValueError(f"gspo needs [batch, tokens] inputs (one row per sequence), got {tuple(inp.log_prob.shape)}")
    m = inp.mask.to(inp.log_prob.dtype)
    lr = (inp.log_prob.detach() - inp.old_log_prob.detach()) * m
    return lr.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)


def _gspo_terms(inp: PolicyLossInputs, cfg: PolicyLossConfig):
    log_s = (inp.log_prob - inp.log_prob.detach() + _sequence_log_ratio(inp)).clamp(max=_GSPO_LOG_RATIO_MAX)
    s = torch.exp(log_s)
    adv = inp.advantages
    unclipped, clipped = -adv * s, -adv * s.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    no_grad = clipped > unclipped  # the clipped branch wins: its value is constant in theta
    mask = inp.mask.bool()
    seq_clipped = (no_grad & mask).any(-1).float()
    metrics = {"clipfrac": masked_mean(no_grad.float(), mask), "seq_ratio_mean": masked_mean(s.detach(), mask),
               "seq_clipfrac": seq_clipped.mean() if seq_clipped.numel() else seq_clipped.new_zeros(())}
    return torch.maximum(unclipped, clipped), no_grad, metrics


def _cispo_terms(inp: PolicyLossInputs, cfg: PolicyLossConfig):
    ratio = _ratio(inp)
    w = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high).detach()
    metrics = {"clipfrac": masked_mean((w != ratio.detach()).float(), inp.mask.bool()), "is_weight_mean": masked_mean(w, inp.mask.bool())}
    return -w * inp.advantages * inp.log_prob, torch.zeros_like(inp.mask, dtype=torch.bool), metrics


def _steer_weighted(inp: PolicyLossInputs, cfg: PolicyLossConfig, loss, no_grad, metrics):
    """STEER's weights from |Omega| (release or paper form) times a base objective's per-token loss."""
    sc = cfg.steer
    if sc.form == "exact":
        raise ValueError("steer.form='exact' is the first order of the PPO surrogate's own update; with gspo/cispo use "
                         "steer.form=release or paper (policy_loss=steer keeps exact)")
    if inp.old_entropy is None:
        raise ValueError(f"steer form {sc.form!r} needs old_entropy (the old policy's entropy from the old-log-prob pass)")
    om = omega(inp.advantages, inp.log_prob, inp.old_log_prob, inp.old_entropy, form=sc.form, clip_mask=no_grad)
    mask = inp.mask.bool()
    w = weights_from_omega(om.abs(), mask, sc, dp_group=inp.dp_group, omega_range=inp.omega_range,
                           cp_group=inp.cp_group)
    metrics.update(omega_mean=masked_mean(om, mask), omega_absmax=masked_max(om.abs(), mask),
                   weight_mean=masked_mean(w, mask), weight_min=-masked_max(-w, mask), weight_max=masked_max(w, mask))
    return loss * w, metrics


@register_policy_loss("gspo")
def _gspo(inp: PolicyLossInputs, cfg: PolicyLossConfig):
    loss, _, metrics = _gspo_terms(inp, cfg)
    return loss, metrics


@register_policy_loss("cispo", token_local=True)
def _cispo(inp: PolicyLossInputs, cfg: PolicyLossConfig):
    loss, _, metrics = _cispo_terms(inp, cfg)
    return loss, metrics


@register_policy_loss("steer_gspo", needs=steer_needs)
def _steer_gspo(inp: PolicyLossInputs, cfg: PolicyLossConfig):
    return _steer_weighted(inp, cfg, *_gspo_terms(inp, cfg))


@register_policy_loss("steer_cispo", needs=steer_needs, token_local=True)
def _steer_cispo(inp: PolicyLossInputs, cfg: PolicyLossConfig):
    return _steer_weighted(inp, cfg, *_cispo_terms(inp, cfg))


def _ppo_on_estimator_advantages(inp: PolicyLossInputs, cfg: PolicyLossConfig):
    loss, _, metrics = _ppo_clip(inp.advantages, _ratio(inp), inp.mask, cfg)
    return loss, metrics


# The objective is the PPO clip; what makes these methods is their advantage estimator, which the
# config ties to the loss name (config.validate_config), so `w_reinforce` never runs on GRPO advantages.
for _name in ("w_reinforce", "psr", "nsr", "gtpo"):  # config.ESTIMATOR_POLICY_LOSS pairs them with their estimators
    register_policy_loss(_name, token_local=True)(_ppo_on_estimator_advantages)
