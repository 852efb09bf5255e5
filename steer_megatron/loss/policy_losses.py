"""Policy losses keyed by name: STEER, GRPO (PPO clip) and the paper's per-token baselines.

Each registered loss maps per-token inputs to a per-token loss matrix plus metrics;
`get_policy_loss(name)` wraps it with the shared steps (rollout correction: TIS / IcePop /
masked IS, aggregation, KL to a reference) and returns a callable giving (loss, metrics). Metrics are
detached 0-dim tensors, so nothing in here forces a host sync; log them once per step.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from steer_megatron.loss.aggregation import AGG_MODES, aggregate
from steer_megatron.loss.rollout_correction import RolloutCorrection, correction
from steer_megatron.loss.steer import SteerConfig, omega, weights_from_omega

_LOG_RATIO_CAP = 20.0  # exp(20) already saturates every clip; keeps inf out of the graph
KL_TYPES = ("k1", "k3")


@dataclass(frozen=True)
class PolicyLossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip_c: float | None = 10.0  # None disables dual clip
    loss_agg_mode: str = "token-mean"
    steer: SteerConfig = field(default_factory=SteerConfig)
    kl_coef: float = 0.0  # KL to a reference policy; 0 disables (the paper uses none)
    kl_type: str = "k3"
    # -coef * H (with gradient, aggregated like the policy loss) added to every loss, as the STEER
    # release does; `entropy_reg` (PPO clip + this bonus) refuses 0
    entropy_coeff: float = 0.0
    # `kl_cov` and `clip_cov` (Cui et al. 2025): the original 7B scripts' values
    # (PRIME-RL/Entropy-Mechanism-of-RL recipe/dapo/7b_kl_cov.sh: k_percent 0.2 %, ppo_kl_coef 1;
    # 7b_clip_cov.sh: clip_cov_ratio 0.0002, lb 1, ub 5)
    kl_cov_ratio: float = 0.002
    kl_cov_coef: float = 1.0
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    entropy_adv_alpha: float = 0.4  # `entropy_adv` (Cheng et al. 2025)
    entropy_adv_kappa: float = 2.0
    tis_cap: float | None = None  # truncated importance sampling vs rollout log-probs
    # TIS / IcePop / masked IS vs rollout log-probs (loss.rollout_correction); tis_cap is its token-truncate case
    rollout_correction: RolloutCorrection = field(default_factory=RolloutCorrection)
    prob_threshold: float = 0.5  # high/low-probability split for the quadrant counts
    seed: int = 0  # the run seed: clip_cov's random token choice draws from (seed, PolicyLossInputs.draw_key)

    def __post_init__(self):
        if not (0 <= self.clip_low <= 1 and self.clip_high >= 0):
            raise ValueError(f"clip_low={self.clip_low} must be in [0, 1] and clip_high={self.clip_high} >= 0")
        if not (0 < self.kl_cov_ratio <= 1 and 0 < self.clip_cov_ratio <= 1 and self.clip_cov_lb < self.clip_cov_ub):
            raise ValueError(f"kl_cov_ratio={self.kl_cov_ratio} and clip_cov_ratio={self.clip_cov_ratio} must be in (0, 1] "
                             f"and clip_cov_lb={self.clip_cov_lb} < clip_cov_ub={self.clip_cov_ub}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"dual_clip_c={self.dual_clip_c} must be > 1 (or None to disable dual clip)")
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode={self.loss_agg_mode!r}: choose one of {AGG_MODES}")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"kl_type={self.kl_type!r}: choose one of {KL_TYPES}")
        if self.entropy_coeff < 0:
            raise ValueError(f"entropy_coeff={self.entropy_coeff} must be >= 0 (0 = no entropy bonus)")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap={self.tis_cap} must be > 0 (or None to disable)")
        if isinstance(self.steer, dict):  # convenience for configs built from plain dicts
            object.__setattr__(self, "steer", SteerConfig(**self.steer))
        if isinstance(self.rollout_correction, dict):
            object.__setattr__(self, "rollout_correction", RolloutCorrection(**self.rollout_correction))
        if self.tis_cap is not None and self.rollout_correction.mode != "none":
            raise ValueError(f"tis_cap={self.tis_cap} and rollout_correction.mode={self.rollout_correction.mode!r} both "
                             f"correct for the rollout policy: use one (tis_cap = mode 'truncate', level 'token')")

    @property
    def correction(self) -> RolloutCorrection:
        """The rollout correction in force (tis_cap spelled as token-level truncation)."""
        if self.tis_cap is not None:
            return RolloutCorrection(mode="truncate", level="token", upper=self.tis_cap)
        return self.rollout_correction


@dataclass
class PolicyLossInputs:
    """Per-token tensors, all [batch, tokens] (or [tokens]); `mask` marks response tokens."""

    log_prob: torch.Tensor  # current policy, with grad
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None  # current policy (with grad for entropy_reg)
    old_entropy: torch.Tensor | None = None  # from the old-log-prob pass (STEER release/paper)
    sum_p2: torch.Tensor | None = None  # current policy, for STEER exact
    sum_p2_logp: torch.Tensor | None = None
    ref_log_prob: torch.Tensor | None = None  # for kl_coef > 0
    rollout_log_prob: torch.Tensor | None = None  # for tis_cap
    token_normalizer: float | torch.Tensor | None = None  # see aggregation.aggregate
    dp_group: object = None  # for steer.group == "dp"
    omega_range: torch.Tensor | None = None  # steer.group == "mini_batch": [min, max] |Omega| (steer.old_policy_omega_range)
    # steer.form == "attribution": each token's dH_total_j per unit LR, A r D / N (steer_megatron.train.attribution)
    attribution: torch.Tensor | None = None
    # Identifies this call (step, epoch, mini-batch, micro-batch, DP rank) for losses that draw
    # random numbers (clip_cov): with the run seed it fixes the draw, equal on every TP rank.
    draw_key: tuple = ()


PerTokenLoss = Callable[[PolicyLossInputs, PolicyLossConfig], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]
_REGISTRY: dict[str, PerTokenLoss] = {}


def register_policy_loss(name: str):
    def deco(fn: PerTokenLoss) -> PerTokenLoss:
        if name in _REGISTRY:
            raise ValueError(f"policy loss {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def policy_loss_names() -> list[str]:
    return sorted(_REGISTRY)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over valid entries; 0 when there are none."""
    if not x.numel():
        return x.new_zeros(())
    hi = torch.where(mask, x, torch.full_like(x, -torch.inf)).amax()
    return torch.where(mask.any(), hi, torch.zeros_like(hi))


def _ratio(inp: PolicyLossInputs) -> torch.Tensor:
    return torch.exp((inp.log_prob - inp.old_log_prob.detach()).clamp(-_LOG_RATIO_CAP, _LOG_RATIO_CAP))


def _ppo_clip(adv: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor, cfg: PolicyLossConfig):
    """Per-token dual-clip PPO loss and where each clip fired (those tokens get no gradient)."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    loss = torch.maximum(unclipped, clipped)
    high = (adv > 0) & (ratio > 1 + cfg.clip_high)
    low = (adv < 0) & (ratio < 1 - cfg.clip_low)
    dual = torch.zeros_like(high)
    if cfg.dual_clip_c is not None:
        bound = -adv * cfg.dual_clip_c
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
    metrics = {
        "clipfrac_high": masked_mean(high.float(), mask),
        "clipfrac_low": masked_mean(low.float(), mask),
        "clipfrac_dual": masked_mean(dual.float(), mask),
    }
    return loss, high | low | dual, metrics


@register_policy_loss("grpo")
def _grpo(inp: PolicyLossInputs, cfg: PolicyLossConfig):
    loss, _, metrics = _ppo_clip(inp.advantages, _ratio(inp), inp.mask, cfg)
    return loss, metrics


@register_policy_loss("steer")
def _steer(inp: PolicyLossInputs, cfg: PolicyLossConfig):
    ratio = _ratio(inp)
    loss, clipped, metrics = _ppo_clip(inp.advantages, ratio, inp.mask, cfg)
    sc = cfg.steer
    if sc.form == "attribution":
        if inp.attribution is None:
            raise ValueError("steer form 'attribution' needs PolicyLossInputs.attribution (MegatronActor.update "
                             "computes it per mini-batch with steer_megatron.train.attribution.entropy_attribution)")
        # clipped tokens get no gradient, so they contribute nothing to the step's entropy change
        om = torch.where(clipped, torch.zeros_like(inp.attribution), inp.attribution.detach().float())
    elif sc.form == "exact":
        if inp.entropy is None or inp.sum_p2 is None or inp.sum_p2_logp is None:
            raise ValueError("steer form 'exact' needs entropy, sum_p2 and sum_p2_logp of the current policy (token_stats)")
        om = omega(inp.advantages, inp.log_prob, inp.old_log_prob, inp.entropy, form="exact",
                   sum_p2=inp.sum_p2, sum_p2_logp=inp.sum_p2_logp, clip_mask=clipped)
    else:
        if inp.old_entropy is None:
            raise ValueError(f"steer form {sc.form!r} needs old_entropy (the old policy's entropy from the old-log-prob pass)")
        om = omega(inp.advantages, inp.log_prob, inp.old_log_prob, inp.old_entropy, form=sc.form, clip_mask=clipped)
    w = weights_from_omega(om.abs(), inp.mask.bool(), sc, dp_group=inp.dp_group, omega_range=inp.omega_range)
    mask = inp.mask.bool()
    metrics.update(
        omega_mean=masked_mean(om, mask),
        omega_absmax=masked_max(om.abs(), mask),
        weight_mean=masked_mean(w, mask),
        weight_min=-masked_max(-w, mask),
        weight_max=masked_max(w, mask),
        weight_frac_floor=masked_mean((w <= sc.w_min * (1 + 1e-6)).float(), mask),
    )
    return loss * w, metrics


@register_policy_loss("entropy_reg")
def _entropy_reg(inp: PolicyLossInputs, cfg: PolicyLossConfig):
    """The PPO clip; the shared wrapper adds -entropy_coeff * H, which this name requires to be > 0."""
    if cfg.entropy_coeff <= 0:
        raise ValueError(f"policy loss entropy_reg with entropy_coeff={cfg.entropy_coeff}: set "
                         f"algorithm.entropy_coeff > 0 (the paper's entropy-regularisation baseline), or use grpo")
    loss, _, metrics = _ppo_clip(inp.advantages, _ratio(inp), inp.mask, cfg)
    return loss, metrics


def _centred_cov(inp: PolicyLossInputs) -> torch.Tensor:
    """Per-token covariance term (A - mean A)(log p - mean log p) over valid tokens."""
    mask = inp.mask.bool()
    lp = inp.log_prob.detach()
    return (inp.advantages - masked_mean(inp.advantages, mask)) * (lp - masked_mean(lp, mask))


@register_policy_loss("kl_cov")
def _kl_cov(inp: PolicyLossInputs, cfg: PolicyLossConfig):
    """Unclipped PG; a KL penalty |log p - log p_old| on the top kl_cov_ratio tokens by covariance."""
    ratio = _ratio(inp)
    mask = inp.mask.bool()
    loss = -inp.advantages * ratio
    cov = torch.where(mask, _centred_cov(inp), torch.full_like(ratio, -torch.inf)).flatten()
    n_valid = int(mask.sum())  # this baseline needs a count to pick k tokens
    k = min(n_valid, max(1, int(n_valid * cfg.kl_cov_ratio))) if n_valid else 0
    chosen = torch.zeros_like(cov, dtype=torch.bool)
    if k:
        chosen[cov.topk(k).indices] = True
    chosen = chosen.view_as(ratio)
    penalty = cfg.kl_cov_coef * (inp.log_prob - inp.old_log_prob.detach()).abs()
    loss = torch.where(chosen, loss + penalty, loss)
    return loss, {"kl_cov_frac": masked_mean(chosen.float(), mask)}


def draw_generator(seed: int, key: tuple) -> torch.Generator:
    """A CPU generator seeded from the run seed and a call's key: a fresh, reproducible draw per
    call, identical on every rank that passes the same key (no collective needed)."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(key)).encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@register_policy_loss("clip_cov")
def _clip_cov(inp: PolicyLossInputs, cfg: PolicyLossConfig):
    """PPO clip without dual clip; max(int(ratio * n), 1) tokens, drawn at random among those the
    clip left alone whose covariance lies strictly inside (lb, ub), contribute nothing."""
    ratio = _ratio(inp)
    mask = inp.mask.bool()
    loss, clipped, metrics = _ppo_clip(inp.advantages, ratio, mask, replace(cfg, dual_clip_c=None))
    cov = _centred_cov(inp)
    band = mask & ~clipped & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    k = max(int(cfg.clip_cov_ratio * int(mask.sum())), 1)  # this baseline needs a count to pick k tokens
    cand = band.flatten().nonzero().squeeze(-1)
    drop = torch.zeros(band.numel(), dtype=torch.bool, device=band.device)
    if cand.numel():
        pick = torch.randperm(cand.numel(), generator=draw_generator(cfg.seed, inp.draw_key))[:k].to(cand.device)
        drop[cand[pick]] = True
    drop = drop.view_as(band)
    loss = torch.where(drop, torch.zeros_like(loss), loss)
    metrics["clip_cov_frac"] = masked_mean(drop.float(), mask)
    return loss, metrics


@register_policy_loss("entropy_adv")
def _entropy_adv(inp: PolicyLossInputs, cfg: PolicyLossConfig):
    """Advantage shaped by entropy: A + min(alpha * H, |A| / kappa), H detached."""
    if inp.entropy is None:
        raise ValueError("entropy_adv needs the current policy's entropy from token_stats")
    bonus = torch.minimum(cfg.entropy_adv_alpha * inp.entropy.detach(), inp.advantages.abs() / cfg.entropy_adv_kappa)
    loss, _, metrics = _ppo_clip(inp.advantages + bonus, _ratio(inp), inp.mask, cfg)
    metrics["entropy_adv_bonus"] = masked_mean(bonus, inp.mask.bool())
    return loss, metrics


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled tokens: k1 = log ratio, k3 = Schulman's k3."""
    diff = ref_log_prob.detach() - log_prob
    if kind == "k1":
        return -diff
    if kind == "k3":
        diff = diff.clamp(-_LOG_RATIO_CAP, _LOG_RATIO_CAP)
        return torch.exp(diff) - diff - 1
    raise ValueError(f"kl_type={kind!r}: choose one of {KL_TYPES}")


def _check_shapes(inp: PolicyLossInputs) -> None:
    shape = inp.log_prob.shape
    for name in ("old_log_prob", "advantages", "mask", "entropy", "old_entropy", "sum_p2", "sum_p2_logp",
                 "ref_log_prob", "rollout_log_prob"):
        t = getattr(inp, name)
        if t is not None and t.shape != shape:
            raise ValueError(f"policy loss input {name} has shape {tuple(t.shape)}, expected {tuple(shape)} like log_prob")


def _shared_metrics(inp: PolicyLossInputs, cfg: PolicyLossConfig) -> dict[str, torch.Tensor]:
    mask = inp.mask.bool()
    with torch.no_grad():
        lp = inp.log_prob.detach()
        log_ratio = lp - inp.old_log_prob
        m = {
            "ratio_mean": masked_mean(torch.exp(log_ratio.clamp(-_LOG_RATIO_CAP, _LOG_RATIO_CAP)), mask),
            "approx_kl_old": masked_mean(kl_penalty(lp, inp.old_log_prob, "k3"), mask),
            "valid_tokens": mask.sum().float(),
        }
        if inp.entropy is not None:
            m["entropy_mean"] = masked_mean(inp.entropy.detach(), mask)
        high = lp.exp() >= cfg.prob_threshold
        pos, neg = inp.advantages > 0, inp.advantages < 0
        for name, sel in (("pos_high", pos & high), ("pos_low", pos & ~high), ("neg_high", neg & high), ("neg_low", neg & ~high)):
            m[f"quadrant_{name}"] = (sel & mask).sum().float()
    return m


def get_policy_loss(name: str):
    """The named policy loss as `fn(inputs: PolicyLossInputs, cfg: PolicyLossConfig) -> (loss, metrics)`."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown policy loss {name!r}; registered: {policy_loss_names()}")
    per_token = _REGISTRY[name]

    def policy_loss(inp: PolicyLossInputs, cfg: PolicyLossConfig | None = None):
        cfg = cfg or PolicyLossConfig()
        _check_shapes(inp)
        rc = cfg.correction
        weights = None
        if rc.mode != "none":
            if inp.rollout_log_prob is None:
                raise ValueError(f"rollout correction ({'tis_cap' if cfg.tis_cap is not None else rc.mode}) needs "
                                 f"rollout_log_prob (the rollout engine's log-probs)")
            weights, keep = correction(inp.old_log_prob, inp.rollout_log_prob, inp.mask, rc)
            if keep is not None:  # masked IS: out-of-band tokens leave the loss and its token count
                inp = replace(inp, mask=keep)
        loss_mat, metrics = per_token(inp, cfg)
        if weights is not None:
            loss_mat = loss_mat * weights
            metrics["tis_weight_mean" if cfg.tis_cap is not None else "rollout_is_weight_mean"] = masked_mean(weights, inp.mask.bool())
        agg = lambda x: aggregate(x, inp.mask, cfg.loss_agg_mode, token_normalizer=inp.token_normalizer)  # noqa: E731
        pg_loss = agg(loss_mat)
        loss = pg_loss
        if cfg.entropy_coeff:
            if inp.entropy is None:
                raise ValueError(f"entropy_coeff={cfg.entropy_coeff} needs the current policy's entropy (with grad) "
                                 f"from token_stats")
            ent = agg(inp.entropy)
            loss = loss - cfg.entropy_coeff * ent
            metrics["entropy_loss"] = ent.detach()
        if cfg.kl_coef:
            if inp.ref_log_prob is None:
                raise ValueError("kl_coef > 0 needs ref_log_prob (the reference policy's log-probs)")
            kl = agg(kl_penalty(inp.log_prob, inp.ref_log_prob, cfg.kl_type))
            loss = loss + cfg.kl_coef * kl
            metrics["kl_ref"] = kl.detach()
        metrics["pg_loss"] = pg_loss.detach()
        metrics.update(_shared_metrics(inp, cfg))
        return loss, metrics

    policy_loss.__name__ = f"policy_loss_{name}"
    return policy_loss


# GSPO, CISPO, their STEER-weighted forms, W-REINFORCE and GTPO register themselves here.
import steer_megatron.loss.objectives  # noqa: E402,F401
