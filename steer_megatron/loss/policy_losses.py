"""Policy losses keyed by name: STEER, GRPO (PPO clip) and the paper's per-token baselines.

Each registered loss maps per-token inputs to a per-token loss matrix plus metrics;
`get_policy_loss(name)` wraps it with the shared steps (rollout correction: TIS / IcePop /
masked IS, aggregation, KL to a reference) and returns a callable giving (loss, metrics). Metrics are
detached 0-dim tensors, so nothing in here forces a host sync; log them once per step.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Callable

import torch

from steer_megatron.loss.aggregation import aggregate
from steer_megatron.loss.rollout_correction import correction
from steer_megatron.loss.schema import KL_TYPES, PolicyLossConfig
from steer_megatron.loss.steer import old_policy_omega_range, omega, omega_range, weights_from_omega

_LOG_RATIO_CAP = 20.0  # exp(20) already saturates every clip; keeps inf out of the graph


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
    cp_group: object = None  # context parallelism: the tensors are this CP rank's share of each sequence
    omega_range: torch.Tensor | None = None  # steer.group == "mini_batch": [min, max] |Omega| (steer.old_policy_omega_range)
    # steer.form == "attribution": each token's dH_total_j per unit LR, A r D / N (steer_megatron.train.attribution)
    attribution: torch.Tensor | None = None
    # Identifies this call (step, epoch, mini-batch, micro-batch, DP rank) for losses that draw
    # random numbers (clip_cov): with the run seed it fixes the draw, equal on every TP rank.
    draw_key: tuple = ()


PerTokenLoss = Callable[[PolicyLossInputs, PolicyLossConfig], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass(frozen=True)
class LossNeeds:
    """What a policy loss needs computed for it beyond log_prob, entropy, old_log_prob, old_entropy
    and advantages, declared at registration so the actor asks the loss instead of naming it."""

    p2_stats: bool = False  # sum_p2 / sum_p2_logp of the current policy in every micro-batch
    old_p2_stats: bool = False  # the same from the old-log-prob pass, kept on the batch (old_sum_p2)
    # computed once per mini-batch before its micro-batches run, from the old pass's values of the
    # whole mini-batch (PolicyLossInputs with log_prob = old_log_prob, sum_p2 = old_sum_p2, and the
    # DP group: collective over it); handed to every micro-batch's loss as PolicyLossInputs.omega_range
    mini_batch_stat: Callable[[PolicyLossInputs, PolicyLossConfig], torch.Tensor] | None = None
    # per-token dH_total_j of the whole mini-batch, computed by the actor from the model before the
    # step (train/attribution.py) and handed to the loss as PolicyLossInputs.attribution
    attribution: bool = False


_REGISTRY: dict[str, PerTokenLoss] = {}
_NEEDS: dict[str, Callable[[PolicyLossConfig], LossNeeds]] = {}
_TOKEN_LOCAL: set[str] = set()


def register_policy_loss(name: str, *, needs: Callable[[PolicyLossConfig], LossNeeds] | None = None,
                         token_local: bool = False):
    """Register a per-token loss; `needs(cfg)` says what it needs at those settings (default: nothing more).

    token_local: each token's loss depends only on that token's inputs (and on group statistics the
    loss reduces over the process groups it is handed), so context parallelism may split a sequence
    over ranks; False for losses with per-sequence or cross-token terms (GSPO's sequence ratio,
    Clip-Cov / KL-Cov's covariance selection)."""
    def deco(fn: PerTokenLoss) -> PerTokenLoss:
        if name in _REGISTRY:
            raise ValueError(f"policy loss {name!r} is already registered")
        _REGISTRY[name] = fn
        _NEEDS[name] = needs or (lambda cfg: LossNeeds())
        if token_local:
            _TOKEN_LOCAL.add(name)
        return fn

    return deco


def context_parallel_blocker(name: str, cfg: PolicyLossConfig, token_mean_over: str) -> str | None:
    """Why the named loss at these settings cannot run on sequences split over CP ranks, or None."""
    if name not in _TOKEN_LOCAL:
        return (f"policy loss {name!r} has per-sequence or cross-token terms; context parallelism runs the "
                f"token-local losses {sorted(_TOKEN_LOCAL)}")
    if cfg.loss_agg_mode != "token-mean" or token_mean_over != "mini_batch":
        return (f"loss_agg_mode={cfg.loss_agg_mode!r} / token_mean_over={token_mean_over!r} normalise over whole "
                "sequences or micro-batches; use token-mean over mini_batch (the global token count)")
    if loss_needs(name, cfg).attribution:
        return "steer.form=attribution perturbs the whole model per mini-batch and is not wired for context parallelism"
    return None


def loss_needs(name: str, cfg: PolicyLossConfig) -> LossNeeds:
    """What the named loss needs computed for it at the settings `cfg`."""
    if name not in _NEEDS:
        raise KeyError(f"unknown policy loss {name!r}; registered: {policy_loss_names()}")
    return _NEEDS[name](cfg)


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


@register_policy_loss("grpo", token_local=True)
def _grpo(inp: PolicyLossInputs, cfg: PolicyLossConfig):
    loss, _, metrics = _ppo_clip(inp.advantages, _ratio(inp), inp.mask, cfg)
    return loss, metrics


def old_policy_range(inp: PolicyLossInputs, cfg: PolicyLossConfig) -> torch.Tensor:
    """steer.group=mini_batch: [min, max] |Omega| of the whole mini-batch (every DP rank) at the old policy,
    or for form=attribution of its |dH_total_j|."""
    if cfg.steer.form == "attribution":
        return omega_range(inp.attribution.abs(), inp.mask, dp_group=inp.dp_group)
    if inp.old_entropy is None or (cfg.steer.form == "exact" and inp.sum_p2 is None):
        raise ValueError("steer.group=mini_batch takes min/max |Omega| from the old-log-prob pass: run "
                         "MegatronActor.old_pass(batch) (it fills old_entropy and, for form=exact, old_sum_p2)")
    return old_policy_omega_range(inp.advantages, inp.old_log_prob, inp.old_entropy, inp.mask, form=cfg.steer.form,
                                  sum_p2=inp.sum_p2, sum_p2_logp=inp.sum_p2_logp, dp_group=inp.dp_group)


def steer_needs(cfg: PolicyLossConfig) -> LossNeeds:
    """STEER's inputs: the current sum p^2 terms for the exact form, and with group=mini_batch the
    old-policy range of |Omega| over the mini-batch (plus the old pass's sum p^2 terms for exact)."""
    s = cfg.steer
    whole = s.group == "mini_batch"
    return LossNeeds(p2_stats=s.form == "exact", old_p2_stats=whole and s.form == "exact",
                     mini_batch_stat=old_policy_range if whole else None, attribution=s.form == "attribution")


@register_policy_loss("steer", needs=steer_needs, token_local=True)
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
    w = weights_from_omega(om.abs(), inp.mask.bool(), sc, dp_group=inp.dp_group, omega_range=inp.omega_range,
                           cp_group=inp.cp_group)
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


@register_policy_loss("entropy_reg", token_local=True)
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
    """Unclipped PG; a KL penalty |log p - log p_old| on the top kl_cov.ratio tokens by covariance."""
    ratio = _ratio(inp)
    mask = inp.mask.bool()
    loss = -inp.advantages * ratio
    cov = torch.where(mask, _centred_cov(inp), torch.full_like(ratio, -torch.inf)).flatten()
    n_valid = int(mask.sum())  # this baseline needs a count to pick k tokens
    k = min(n_valid, max(1, int(n_valid * cfg.kl_cov.ratio))) if n_valid else 0
    chosen = torch.zeros_like(cov, dtype=torch.bool)
    if k:
        chosen[cov.topk(k).indices] = True
    chosen = chosen.view_as(ratio)
    penalty = cfg.kl_cov.coef * (inp.log_prob - inp.old_log_prob.detach()).abs()
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
    band = mask & ~clipped & (cov > cfg.clip_cov.lb) & (cov < cfg.clip_cov.ub)
    k = max(int(cfg.clip_cov.ratio * int(mask.sum())), 1)  # this baseline needs a count to pick k tokens
    cand = band.flatten().nonzero().squeeze(-1)
    drop = torch.zeros(band.numel(), dtype=torch.bool, device=band.device)
    if cand.numel():
        pick = torch.randperm(cand.numel(), generator=draw_generator(cfg.seed, inp.draw_key))[:k].to(cand.device)
        drop[cand[pick]] = True
    drop = drop.view_as(band)
    loss = torch.where(drop, torch.zeros_like(loss), loss)
    metrics["clip_cov_frac"] = masked_mean(drop.float(), mask)
    return loss, metrics


@register_policy_loss("entropy_adv", token_local=True)
def _entropy_adv(inp: PolicyLossInputs, cfg: PolicyLossConfig):
    """Advantage shaped by entropy: A + min(alpha * H, |A| / kappa), H detached."""
    if inp.entropy is None:
        raise ValueError("entropy_adv needs the current policy's entropy from token_stats")
    bonus = torch.minimum(cfg.entropy_adv.alpha * inp.entropy.detach(), inp.advantages.abs() / cfg.entropy_adv.kappa)
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
