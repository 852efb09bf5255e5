"""The loss's settings: one dataclass per component, defined and validated here, once.

The YAML loader nests them in `algorithm.*` (config.AlgorithmConfig) and the library takes them
whole (PolicyLossConfig below, built from that section by `policy_loss_config_from`), so a value
the YAML accepts is a value the loss accepts and the checks cannot drift apart. Messages name the
YAML key. No torch here: the config loader and the planner import this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

# STEER (loss/steer.py; ../shared/DESIGN.md section 1)
FORMS = ("release", "paper", "exact")
MAPPINGS = ("exp", "linear")
# Over which tokens min/max |Omega| (the weights' normalisation) are taken:
#   micro_batch: the valid tokens of the local micro-batch, at the current policy (as released);
#   dp:          those of the micro-batches that run at the same time on every DP rank (one all-reduce);
#   mini_batch:  every valid token of the whole mini-batch on every DP rank, from the old-policy
#                pass, computed once before the update (omega_range): the weights then do not
#                depend on how the mini-batch is split into micro-batches or DP ranks.
GROUPS = ("micro_batch", "dp", "mini_batch")
OMEGA_FLOOR = 0.02  # the release's floor on max|Omega| for the exp mapping
# Forms whose per-token values the actor computes from the model itself (not from token statistics):
# the loss receives them in PolicyLossInputs.attribution (train/attribution.py).
MODEL_FORMS = ("attribution",)
ALL_FORMS = FORMS + MODEL_FORMS
# The exp mapping's default floor per form. 0.02 fits the tabular Omega's scale (nats per unit
# LR on one softmax); the attribution is per unit LR of the whole step divided by the token count,
# orders of magnitude smaller and batch-size dependent, so its floor is 0: relative, the token with
# the largest |dH_total_j| gets w_min. steer.omega_floor, when set, overrides the form's default.
FORM_FLOORS = {"release": OMEGA_FLOOR, "paper": OMEGA_FLOOR, "exact": OMEGA_FLOOR, "attribution": 0.0}
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k3")
CORRECTION_MODES = ("none", "truncate", "icepop", "mask")
CORRECTION_LEVELS = ("token", "sequence", "geometric")


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r}: must be one of {list(choices)}")


@dataclass(frozen=True)
class SteerConfig:
    """`algorithm.steer`: how Omega is formed and mapped to token weights (loss/steer.py)."""

    form: str = "release"  # release | paper | exact | attribution (README "STEER forms")
    mapping: str = "exp"  # exp | linear
    w_min: float = 0.8
    w_max: float = 1.0
    # exp mapping: k = -ln(w_min) / max(max|Omega|, floor); None = the form's default (FORM_FLOORS)
    omega_floor: float | None = None
    # over which tokens min/max |Omega| are taken (GROUPS; README "STEER forms, groups, temperature
    # and aggregation"): micro_batch (as released; the release's per-GPU micro-batch is 8 sequences
    # with prompts mixed: trainer.micro_batch_size=8, trainer.balance_batch=true) | dp | mini_batch
    # (recommended: the whole mini-batch on every DP rank from the old-policy pass, split-independent)
    group: str = "micro_batch"

    def __post_init__(self):
        _choice("algorithm.steer.form", self.form, ALL_FORMS)
        _choice("algorithm.steer.mapping", self.mapping, MAPPINGS)
        _choice("algorithm.steer.group", self.group, GROUPS)
        if not 0 < self.w_min <= self.w_max:
            raise ValueError(f"algorithm.steer.w_min={self.w_min}, w_max={self.w_max}: need 0 < w_min <= w_max")
        if self.omega_floor is not None and self.omega_floor < 0:
            raise ValueError(f"algorithm.steer.omega_floor={self.omega_floor} must be >= 0 "
                             f"(or null for the form's default)")
        # w_min = 1 is plain GRPO (k = 0, every weight 1): the closed loop's upper bound
        if self.mapping == "exp" and self.w_min > 1:
            raise ValueError(f"algorithm.steer.w_min={self.w_min}: the exp mapping needs w_min <= 1 "
                             f"(its weights lie in [w_min, 1])")

    @property
    def floor(self) -> float:
        """The exp mapping's floor on max|Omega| for this form."""
        return FORM_FLOORS[self.form] if self.omega_floor is None else self.omega_floor


@dataclass(frozen=True)
class RolloutCorrection:
    """`algorithm.rollout_correction`: correct the loss for pi_old / pi_rollout (loss/rollout_correction.py).
    algorithm.tis_cap is its mode=truncate, level=token case."""

    mode: str = "none"  # none | truncate (TIS) | icepop | mask (masked IS: out-of-band tokens/sequences dropped)
    level: str = "token"  # token | sequence (product of token ratios) | geometric (their geometric mean)
    upper: float = 2.0
    lower: float | None = None  # icepop / mask band low end; None = 1 / upper

    def __post_init__(self):
        _choice("algorithm.rollout_correction.mode", self.mode, CORRECTION_MODES)
        _choice("algorithm.rollout_correction.level", self.level, CORRECTION_LEVELS)
        if not self.upper > 0 or (self.lower is not None and not 0 < self.lower <= self.upper):
            raise ValueError(f"algorithm.rollout_correction lower={self.lower}, upper={self.upper}: "
                             f"need 0 < lower <= upper")

    @property
    def band(self) -> tuple[float, float]:
        return (1.0 / self.upper if self.lower is None else self.lower), self.upper

    @property
    def drops_tokens(self) -> bool:
        return self.mode == "mask"


@dataclass(frozen=True)
class KlCovConfig:
    """`algorithm.kl_cov` (Cui et al. 2025). Defaults: the original 7B script (PRIME-RL/Entropy-Mechanism-of-RL
    recipe/dapo/7b_kl_cov.sh: k_percent 0.2 %, ppo_kl_coef 1)."""

    ratio: float = 0.002  # fraction of valid tokens, top by covariance, that get the |log ratio| penalty
    coef: float = 1.0

    def __post_init__(self):
        if not 0 < self.ratio <= 1 or self.coef < 0:
            raise ValueError(f"algorithm.kl_cov.ratio={self.ratio} must be in (0, 1] and coef={self.coef} >= 0")


@dataclass(frozen=True)
class ClipCovConfig:
    """`algorithm.clip_cov` (Cui et al. 2025). Defaults: the original 7B script (recipe/dapo/7b_clip_cov.sh)."""

    ratio: float = 0.0002  # max(int(ratio * tokens), 1) tokens per micro-batch lose their gradient
    lb: float = 1.0  # candidates: covariance strictly inside (lb, ub), not clipped by the PPO clip
    ub: float = 5.0

    def __post_init__(self):
        if not 0 < self.ratio <= 1 or not self.lb < self.ub:
            raise ValueError(f"algorithm.clip_cov.ratio={self.ratio} must be in (0, 1] and "
                             f"clip_cov.lb={self.lb} < clip_cov.ub={self.ub}")


@dataclass(frozen=True)
class EntropyAdvConfig:
    """`algorithm.entropy_adv` (Cheng et al. 2025): A + min(alpha * H, |A| / kappa)."""

    alpha: float = 0.4
    kappa: float = 2.0

    def __post_init__(self):
        if self.alpha < 0 or not self.kappa > 0:
            raise ValueError(f"algorithm.entropy_adv.alpha={self.alpha} must be >= 0 and kappa={self.kappa} > 0")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Everything a registered policy loss reads (loss/policy_losses.py). The scalars are the
    `algorithm.*` keys of the same name; the components are the dataclasses above."""

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
    kl_cov: KlCovConfig = field(default_factory=KlCovConfig)
    clip_cov: ClipCovConfig = field(default_factory=ClipCovConfig)
    entropy_adv: EntropyAdvConfig = field(default_factory=EntropyAdvConfig)
    tis_cap: float | None = None  # truncated importance sampling vs rollout log-probs
    rollout_correction: RolloutCorrection = field(default_factory=RolloutCorrection)
    prob_threshold: float = 0.5  # high/low-probability split for the quadrant counts
    seed: int = 0  # the run seed: clip_cov's random token choice draws from (seed, PolicyLossInputs.draw_key)

    def __post_init__(self):
        for name, cls in _COMPONENTS.items():  # plain dicts (configs built from JSON) become their dataclass
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, cls(**getattr(self, name)))
        if not (0 < self.clip_low <= 1 and self.clip_high > 0):
            raise ValueError(f"algorithm.clip_low={self.clip_low} must be in (0, 1] and clip_high={self.clip_high} > 0")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"algorithm.dual_clip_c={self.dual_clip_c} must be > 1 (the dual-clip bound is c * |A|; "
                             f"None disables it)")
        _choice("algorithm.loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        _choice("algorithm.kl_type", self.kl_type, KL_TYPES)
        if self.kl_coef < 0:
            raise ValueError(f"algorithm.kl_coef={self.kl_coef} must be >= 0 (0 = no KL to the reference)")
        if self.entropy_coeff < 0:
            raise ValueError(f"algorithm.entropy_coeff={self.entropy_coeff} must be >= 0 (it adds -coef * H to the loss)")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"algorithm.tis_cap={self.tis_cap} must be > 0 or null")
        if self.tis_cap is not None and self.rollout_correction.mode != "none":
            raise ValueError(f"algorithm.tis_cap={self.tis_cap} and algorithm.rollout_correction.mode="
                             f"{self.rollout_correction.mode} both correct for the rollout policy: keep one "
                             f"(tis_cap is mode=truncate, level=token)")

    @property
    def correction(self) -> RolloutCorrection:
        """The rollout correction in force (tis_cap spelled as token-level truncation)."""
        if self.tis_cap is not None:
            return RolloutCorrection(mode="truncate", level="token", upper=self.tis_cap)
        return self.rollout_correction


_COMPONENTS = {"steer": SteerConfig, "rollout_correction": RolloutCorrection, "kl_cov": KlCovConfig,
               "clip_cov": ClipCovConfig, "entropy_adv": EntropyAdvConfig}


def policy_loss_config_from(algorithm, seed: int) -> PolicyLossConfig:
    """The loss settings of a run config's `algorithm` section: every PolicyLossConfig field is the
    key of the same name there (components passed whole), plus the run seed."""
    return PolicyLossConfig(seed=seed, **{f.name: getattr(algorithm, f.name) for f in fields(PolicyLossConfig)
                                          if f.name not in ("seed", "prob_threshold")})


__all__ = [
    "AGG_MODES", "CORRECTION_LEVELS", "CORRECTION_MODES", "ClipCovConfig", "EntropyAdvConfig", "FORMS", "GROUPS",
    "KL_TYPES", "KlCovConfig", "MAPPINGS", "OMEGA_FLOOR", "PolicyLossConfig", "RolloutCorrection", "SteerConfig",
    "policy_loss_config_from",
]
