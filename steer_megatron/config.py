"""Run configuration: YAML files in configs/ + command-line dotlist overrides -> typed dataclasses.

    cfg = load_config("configs/qwen2.5-math-7b_steer.yaml", ["trainer.total_steps=10"])

A YAML file may name `base: other.yaml` (relative to itself, or a list of them); the bases
are merged first, then the file, then the overrides. Unknown keys and wrongly typed values
fail at load time naming the key. `validate_config` checks what can only be checked once
everything is known (batch divisibility, parallel layout vs world size and heads, paths).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import II, MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# the loss's components, defined and validated once beside the loss (loss/schema.py)
from steer_megatron.loss.schema import (
    ClipCovConfig,
    EntropyAdvConfig,
    KlCovConfig,
    RolloutCorrection,
    SteerConfig,
    policy_loss_config_from,
)
from steer_megatron.algorithms.controller import ClosedLoopConfig  # defined and validated beside its controller

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "cpu_demo.yaml"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


@dataclass
class ModelConfig:
    # HF model directory (config.json + weights + tokenizer). Null only with demo.enabled,
    # where the demo builds the tiny model and fills it in.
    hf_path: Optional[str] = None
    tokenizer_path: Optional[str] = None  # defaults to hf_path
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16
    # activation recompute (megatron-core): none | selective (attention's core, cheap to redo) |
    # full (every layer's input kept, the layer re-run in backward)
    recompute: str = "none"


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallelism: needs Transformer Engine's attention (refused without it)
    sequence_parallel: bool = False  # needs tp > 1
    distributed_optimizer: bool = False  # ZeRO-1: optimizer state and fp32 main weights sharded over DP
    overlap_grad_reduce: bool = False  # DP gradient reduction in buckets during the backward pass
    overlap_param_gather: bool = False  # with distributed_optimizer: parameter all-gather during the next forward


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    prompt_key: str = "prompt"
    max_prompt_len: int = 1024
    max_response_len: int = 3072
    shuffle: bool = True
    seed: int = 1
    on_malformed: str = "error"  # error | skip (skipped rows are counted and reported)
    # prompts through the tokenizer's chat template with the assistant turn opened (instruct
    # models); false: the messages' contents as plain text (base models without a template)
    apply_chat_template: bool = True


@dataclass
class RolloutConfig:
    engine: str = "cpu"  # cpu (steer_megatron.rollout.cpu_server, transformers) | sglang
    n: int = 8  # samples per prompt (the GRPO group size)
    temperature: float = 1.0  # the trainer optimises softmax(logits / T) too (log-probs, entropy, STEER), as released
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = II("data.max_response_len")
    num_servers: int = 1  # rollout servers the trainer launches (when server_urls is empty)
    tp_size: int = 1  # tensor parallel size of each SGLang server
    server_urls: list[str] = field(default_factory=list)  # pre-started servers; empty = launch
    router_url: Optional[str] = None  # a pre-started sglang-router (e.g. on a Slurm rollout node)
    use_router: bool = True
    concurrency: int = 32  # most /generate requests in flight from the trainer's client
    # weight-sync parity probe: largest |trainer - engine| log-prob allowed after an update;
    # null = derived from the dtype, depth and width (rollout.weight_sync.parity_tolerance)
    parity_atol: Optional[float] = None
    # how new weights reach the workers (steer_megatron.rollout.weight_sync.TRANSPORTS): disk |
    # nccl (a process group from trainer rank 0 into the workers; gloo with the CPU engine)
    weight_sync: str = "disk"
    weight_sync_bucket_mb: int = 512  # nccl: tensors sent per update call
    # nccl: trainer rank 0's address as the workers reach it; null = $MASTER_ADDR, else 127.0.0.1
    weight_sync_address: Optional[str] = None


@dataclass
class AdvantageConfig:
    estimator: str = "grpo"  # grpo | w_reinforce | psr | nsr | gtpo (algorithms/advantages.py)
    norm_by_std: bool = True
    eps: float = 1e-6
    w_reinforce_lambda: float = 0.1  # W-REINFORCE: advantage of a correct sample (wrong: -1); the paper's 0.1
    gtpo_alpha1: float = 1.0  # GTPO: base reward weight (the paper's experiments: 1.0)
    gtpo_alpha2: float = 0.1  # GTPO: entropy-shaped share (0.1)


@dataclass
class DynamicSamplingConfig:
    enabled: bool = False
    max_rounds: int = 10  # rollout rounds per step before giving up refilling the batch


@dataclass
class AlgorithmConfig:
    policy_loss: str = "steer"  # steer | grpo (more registered by steer_megatron.loss)
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip_c: float = 10.0
    loss_agg_mode: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm
    # token-mean's denominator: mini_batch (all valid tokens of the mini-batch on every DP rank; the
    # gradient does not depend on the split) | micro_batch (each micro-batch's token-mean, averaged
    # over micro-batches and DP ranks: the release's verl actor)
    token_mean_over: str = "mini_batch"
    entropy_coeff: float = 0.0  # adds -coef * H (with gradient) to every policy loss, as released
    kl_coef: float = 0.0  # KL(pi || pi_ref) to the initial weights (train/reference.py)
    kl_type: str = "k3"  # k1 | k3: the per-token KL estimate (loss.policy_losses.kl_penalty)
    tis_cap: Optional[float] = None  # truncated importance sampling vs the rollout engine's log-probs
    rollout_correction: RolloutCorrection = field(default_factory=RolloutCorrection)
    steer: SteerConfig = field(default_factory=SteerConfig)
    kl_cov: KlCovConfig = field(default_factory=KlCovConfig)  # policy_loss=kl_cov
    clip_cov: ClipCovConfig = field(default_factory=ClipCovConfig)  # policy_loss=clip_cov
    entropy_adv: EntropyAdvConfig = field(default_factory=EntropyAdvConfig)  # policy_loss=entropy_adv
    adv: AdvantageConfig = field(default_factory=AdvantageConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    # token-statistics kernels (steer_megatron.loss.kernels): auto = Triton on CUDA, PyTorch elsewhere
    loss_kernel: str = "auto"  # auto | torch | triton
    # statistics straight from hidden states x the output weight, logits never stored whole
    # (loss.fused_linear_token_stats: 2 N H V forward + 6 N H V backward); for runs where even the
    # bf16 logits of a micro-batch do not fit
    fused_lm_head: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | linear | cosine (to min_lr_ratio * lr over the run's optimizer steps)
    min_lr_ratio: float = 0.0


@dataclass
class CodeRewardConfig:
    """The `code` reward and its sandbox (steer_megatron.rewards.code_reward; README "Code rewards
    and the sandbox"). Its calls run on their own budget (program_budget_s), not reward.timeout_s."""

    extract: str = "last_block"  # last_block | first_block | whole | last_block_or_whole
    partial_credit: bool = False  # reward = passed tests / tests instead of all-or-nothing
    timeout_s: float = 5.0  # wall clock and CPU seconds per test run
    program_budget_s: float = 60.0  # wall clock for all the tests of one program
    memory_mb: int = 1024  # address space per run
    processes: int = 16  # processes + threads per run
    open_files: int = 64
    file_size_mb: int = 16  # largest file a program may write
    output_mb: float = 8.0  # stdout (or stderr) beyond this stops the run: output_limit
    float_tol: float = 1.0e-6  # numeric output tokens may differ by this
    allow_unisolated: bool = False  # where namespaces are unavailable: run with rlimits only (unsafe)
    uid_base: int = 1000000000  # programs run as uid_base + the judge's pid
    python: Optional[str] = None  # interpreter for programs; null = the trainer's base interpreter
    extra_binds: list[str] = field(default_factory=list)  # host paths shown read-only (e.g. a site-packages)


@dataclass
class RewardConfig:
    timeout_s: float = 5.0  # hard limit per sandboxed reward call
    num_workers: int = 4
    code: CodeRewardConfig = field(default_factory=CodeRewardConfig)
    # data_source glob -> reward name, consulted before the built-in routes (rewards/registry.py),
    # e.g. {math_dapo: dapo_strict_box} scores DAPO-Math as the STEER release does
    routes: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    total_steps: int = MISSING
    rollout_batch_size: int = 512  # prompts per step
    mini_batch_size: int = 32  # prompts per optimizer step
    micro_batch_size: int = 1  # sequences per forward/backward on one data-parallel rank
    # reorder each mini-batch so every micro-batch mixes prompts and lengths (train/balance.py), as
    # verl's balance_batch does before the release's micro-batches; rows otherwise stay in prompt order
    balance_batch: bool = False
    # pack each micro-batch's sequences into rows without padding (train/packing.py; README "Training")
    pack_sequences: bool = False
    # micro-batches by token count instead of micro_batch_size rows, token-balanced across DP ranks
    # (null: off; needs loss_agg_mode=token-mean, token_mean_over=mini_batch, steer.group=mini_batch)
    max_tokens_per_micro_batch: Optional[int] = None
    ppo_epochs: int = 1
    save_every: int = 50  # 0 = only at the end
    keep_last: int = 2
    output_dir: str = "runs"
    run_name: str = "run"
    seed: int = 1
    resume: str = "auto"  # auto (latest complete checkpoint if any) | none | a checkpoint path
    # generate step k + 1's rollouts while step k trains (one-step off-policy; train/rollout_pipeline.py)
    async_rollout: bool = False


@dataclass
class EvalConfig:
    files: list[str] = field(default_factory=list)  # benchmark parquets, or LiveCodeBench .jsonl files
    # Built-in benchmarks (steer_megatron.eval.code_benchmarks.BUILTIN), e.g. [humaneval]
    benchmarks: list[str] = field(default_factory=list)
    every: int = 0  # steps; 0 = off
    n: int = 1  # samples per prompt (copies already in a parquet add up with these)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = II("data.max_response_len")
    max_prompts: Optional[int] = None  # per benchmark, a seeded subsample (for quick checks)
    at_start: bool = True


@dataclass
class LoggingConfig:
    jsonl: bool = True
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    console: bool = True  # print each step's metrics table (the progress bar is always shown)


@dataclass
class DemoConfig:
    """The embedded CPU demo: a tiny Qwen2 + synthetic digit-sorting data, built locally
    (steer_megatron.demo_assets), which fill model.hf_path, data.train_files and eval.files."""

    enabled: bool = False
    seed: int = 0
    num_digits: int = 4  # "Sort 3 1 4 2" -> "Answer: 1234", digits 1-9
    n_train: int = 2000
    n_test: int = 100
    hidden_size: int = 64
    num_layers: int = 2
    warmup_steps: int = 100  # supervised warm-up; accuracy after it: configs/cpu_demo.yaml
    warmup_lr: float = 3e-3
    warmup_batch_size: int = 64
    cache_dir: str = ".cache/demo_assets"


@dataclass
class DiagnosticsConfig:
    """Optional entropy-change diagnostics inside the trainer (docs/entropy_diagnostics.md)."""

    # Every K steps: one update on a held batch, measured and undone (training is unchanged);
    # logs Omega-vs-measured correlations as diag/*. 0 = off.
    probe_every: int = 0
    # The held batch: the first `probe_prompts` groups of the run's first rollout batch, saved
    # in the run directory (so a resumed run probes the same batch). 0 = the whole batch.
    probe_prompts: int = 0
    # Log each step's mean entropy change on its own batch (diag/step_dH; one extra forward
    # pass). Always on with closed_loop.enabled; on its own it gives the open-loop baseline.
    step_change: bool = False
    closed_loop: ClosedLoopConfig = field(default_factory=ClosedLoopConfig)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)


# --------------------------------------------------------------------------------------------
# Loading


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """The file merged over its `base:` files (resolved relative to it), without the key."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path in seen:
        raise ConfigError(f"config `base:` cycle: {' -> '.join(map(str, seen + (path,)))}")
    node = OmegaConf.load(path)
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} must hold a mapping at top level")
    bases = node.pop("base", None)
    if bases is None:
        return node
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged = OmegaConf.create()
    for b in bases:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / b, seen + (path,)))
    return OmegaConf.merge(merged, node)


def _merge_checked(schema: DictConfig, other: DictConfig, what: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, other)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{what}: bad key `{key}`: {first}. Valid keys are the fields of "
                          f"steer_megatron.config.RunConfig") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Merge the YAML at `path` (default: configs/cpu_demo.yaml) and `key=value` overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    cfg = OmegaConf.structured(RunConfig)
    cfg = _merge_checked(cfg, _read_yaml(path), f"config {path}")
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value (e.g. trainer.total_steps=10)")
        cfg = _merge_checked(cfg, OmegaConf.from_dotlist([ov]), f"override {ov!r}")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config {path} leaves required keys unset: {missing}; set them in the YAML or as overrides")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config {path}: {str(exc).splitlines()[0]} (key {getattr(exc, 'full_key', '?')})") from None
    except ValueError as exc:  # a component's own check (its dataclass validates itself), naming its key
        raise ConfigError(f"config {path}: {exc}") from None
    validate_config(obj, check_paths=False)
    return obj


# --------------------------------------------------------------------------------------------
# Validation

_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.recompute": ("none", "selective", "full"),
    "data.on_malformed": ("error", "skip"),
    "rollout.engine": ("cpu", "sglang"),
    "rollout.weight_sync": ("disk", "nccl"),
    "algorithm.token_mean_over": ("mini_batch", "micro_batch"),
    "algorithm.adv.estimator": ("grpo", "w_reinforce", "psr", "nsr", "gtpo"),
    "algorithm.loss_kernel": ("auto", "torch", "triton"),
    "optim.schedule": ("constant", "linear", "cosine"),
}
_POSITIVE = (
    "parallel.tp", "parallel.pp", "parallel.cp", "data.max_prompt_len", "data.max_response_len",
    "rollout.n", "rollout.max_new_tokens", "rollout.num_servers", "rollout.concurrency",
    "rollout.weight_sync_bucket_mb",
    "trainer.total_steps", "trainer.rollout_batch_size", "trainer.mini_batch_size", "trainer.micro_batch_size",
    "trainer.ppo_epochs", "eval.n", "eval.max_new_tokens", "reward.num_workers", "optim.lr", "reward.timeout_s",
    "algorithm.dynamic_sampling.max_rounds", "demo.n_train", "demo.n_test", "demo.hidden_size", "demo.num_layers",
    "demo.warmup_batch_size",
)


def _get(cfg: RunConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate_config(
    cfg: RunConfig,
    *,
    world_size: int | None = None,
    num_attention_heads: int | None = None,
    num_query_groups: int | None = None,
    check_paths: bool = True,
) -> int | None:
    """Raise ConfigError naming the first key that cannot work. Returns the data-parallel size
    when `world_size` is given. Head counts (from the model's config.json) check the TP split."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}={_get(cfg, key)!r}: must be one of {list(choices)}")
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r}: must be > 0")
    alg, tr, ro = cfg.algorithm, cfg.trainer, cfg.rollout
    if ro.parity_atol is not None and not ro.parity_atol > 0:
        raise ConfigError(f"rollout.parity_atol={ro.parity_atol!r}: must be > 0, or null to derive it from the model")
    try:  # the loss's own checks (loss/schema.py), the one place they live
        policy_loss_config_from(alg, seed=tr.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if alg.policy_loss == "entropy_reg" and alg.entropy_coeff == 0:
        raise ConfigError("algorithm.policy_loss=entropy_reg with algorithm.entropy_coeff=0 is plain GRPO: set "
                          "algorithm.entropy_coeff > 0 (e.g. 0.001) or use policy_loss=grpo")
    if not cfg.rollout.temperature > 0:
        raise ConfigError(f"rollout.temperature={cfg.rollout.temperature} must be > 0: the trainer optimises "
                          f"softmax(logits / T), the distribution the rollout samples from")
    _check_objective(cfg, world_size)
    if ro.n < 2 and alg.adv.estimator == "grpo":
        raise ConfigError(f"rollout.n={ro.n}: GRPO needs at least 2 samples per prompt to form a group")
    if tr.rollout_batch_size % tr.mini_batch_size:
        raise ConfigError(
            f"trainer.rollout_batch_size={tr.rollout_batch_size} is not divisible by "
            f"trainer.mini_batch_size={tr.mini_batch_size}: each step must split into whole mini-batches"
        )
    if ro.max_new_tokens > cfg.data.max_response_len:
        raise ConfigError(
            f"rollout.max_new_tokens={ro.max_new_tokens} exceeds data.max_response_len={cfg.data.max_response_len}"
        )
    if ro.engine == "sglang" and ro.server_urls and len(ro.server_urls) != ro.num_servers:
        raise ConfigError(f"rollout.server_urls lists {len(ro.server_urls)} servers but rollout.num_servers={ro.num_servers}")
    tp = cfg.parallel.tp
    if num_attention_heads is not None and num_attention_heads % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide the model's {num_attention_heads} attention heads")
    if num_query_groups is not None and num_query_groups % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide the model's {num_query_groups} query groups (KV heads)")
    _check_batching(cfg)
    if cfg.parallel.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
    if cfg.parallel.overlap_param_gather and not cfg.parallel.distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather=true gathers the distributed optimizer's shards: "
                          "set parallel.distributed_optimizer=true too")
    if cfg.parallel.cp > 1 and importlib.util.find_spec("transformer_engine") is None:
        raise ConfigError(
            f"parallel.cp={cfg.parallel.cp}: megatron-core runs context parallelism only with Transformer Engine's "
            "attention (TEDotProductAttention), and Transformer Engine is not installed; install the `gpu` extra "
            "on a CUDA machine or set parallel.cp=1")
    dp = None
    if world_size is not None:
        model_ranks = tp * cfg.parallel.pp * cfg.parallel.cp
        if world_size % model_ranks:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tp*pp*cp = {model_ranks}; "
                f"launch a multiple of {model_ranks} ranks or change parallel.tp/pp/cp"
            )
        dp = world_size // model_ranks
        seqs = tr.mini_batch_size * ro.n
        if seqs % (dp * tr.micro_batch_size):
            raise ConfigError(
                f"a mini-batch of trainer.mini_batch_size * rollout.n = {seqs} sequences does not split into "
                f"{dp} data-parallel ranks x whole micro-batches of trainer.micro_batch_size={tr.micro_batch_size}"
            )
    _check_diagnostics(cfg, dp)
    _check_code_eval(cfg)
    if check_paths:
        _check_paths(cfg)
    return dp


# advantage estimator -> the policy loss that is the PPO clip on it (loss/objectives.py registers them)
ESTIMATOR_POLICY_LOSS = {"w_reinforce": "w_reinforce", "psr": "psr", "nsr": "nsr", "gtpo": "gtpo"}


def _check_objective(cfg: RunConfig, world_size: int | None) -> None:
    """Policy loss, advantage estimator, rollout correction and reward routes fit together (torch-free:
    an unknown loss name fails when the actor starts, where the registry is loaded)."""
    alg = cfg.algorithm
    need = {v: k for k, v in ESTIMATOR_POLICY_LOSS.items()}.get(alg.policy_loss)
    if need and alg.adv.estimator != need:
        raise ConfigError(f"algorithm.policy_loss={alg.policy_loss} is the PPO clip on {need} advantages: set "
                          f"algorithm.adv.estimator={need} (got {alg.adv.estimator!r})")
    if alg.adv.estimator in ESTIMATOR_POLICY_LOSS and alg.policy_loss != ESTIMATOR_POLICY_LOSS[alg.adv.estimator]:
        raise ConfigError(f"algorithm.adv.estimator={alg.adv.estimator} goes with algorithm.policy_loss="
                          f"{ESTIMATOR_POLICY_LOSS[alg.adv.estimator]} (got {alg.policy_loss!r})")
    if alg.adv.estimator == "w_reinforce" and not alg.adv.w_reinforce_lambda > 0:
        raise ConfigError(f"algorithm.adv.w_reinforce_lambda={alg.adv.w_reinforce_lambda}: must be > 0 (paper: 0.1)")
    if alg.adv.estimator == "gtpo":
        if cfg.diagnostics.probe_every:
            raise ConfigError("algorithm.adv.estimator=gtpo fills its token advantages inside the step; the entropy "
                              "probe replays a held batch without them: set diagnostics.probe_every=0")
        if alg.dynamic_sampling.enabled:
            raise ConfigError("algorithm.adv.estimator=gtpo shapes rewards over whole prompt groups on each rank; "
                              "dynamic sampling can leave split groups: set algorithm.dynamic_sampling.enabled=false")
        if world_size is not None:
            dp = world_size // (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp)
            if dp and cfg.trainer.rollout_batch_size % dp:
                raise ConfigError(f"algorithm.adv.estimator=gtpo needs whole prompt groups on every data-parallel rank: "
                                  f"trainer.rollout_batch_size={cfg.trainer.rollout_batch_size} must be a multiple of {dp}")
    if cfg.reward.routes:
        from steer_megatron.rewards.registry import reward_by_name

        for pattern, name in cfg.reward.routes.items():
            try:
                reward_by_name(name)
            except KeyError as exc:
                raise ConfigError(f"reward.routes.{pattern}={name!r}: {exc.args[0]}") from None


def _check_batching(cfg: RunConfig) -> None:
    """trainer.pack_sequences / max_tokens_per_micro_batch fit the loss and layout (the actor checks the same)."""
    tr, alg = cfg.trainer, cfg.algorithm
    if tr.pack_sequences and cfg.parallel.cp > 1:
        raise ConfigError("trainer.pack_sequences=true with parallel.cp > 1 is not supported (THD with context "
                          "parallelism needs padded cu_seqlens): set parallel.cp=1 or pack_sequences=false")
    if cfg.parallel.cp > 1:
        from steer_megatron.loss.policy_losses import context_parallel_blocker

        blocker = context_parallel_blocker(alg.policy_loss, policy_loss_config_from(alg, seed=tr.seed),
                                           alg.token_mean_over)
        if blocker is None and alg.fused_lm_head:
            blocker = "algorithm.fused_lm_head is not wired for context parallelism: set it to false"
        if blocker is not None:
            raise ConfigError(f"parallel.cp={cfg.parallel.cp}: {blocker}, or set parallel.cp=1")
    budget = tr.max_tokens_per_micro_batch
    if budget is None:
        return
    if not budget > 0:
        raise ConfigError(f"trainer.max_tokens_per_micro_batch={budget!r}: must be > 0, or null (off)")
    longest = cfg.data.max_prompt_len + cfg.data.max_response_len
    if budget < longest:
        raise ConfigError(f"trainer.max_tokens_per_micro_batch={budget} is below the longest sequence, "
                          f"data.max_prompt_len + data.max_response_len = {longest}: raise it to at least {longest}")
    if alg.loss_agg_mode != "token-mean" or alg.token_mean_over != "mini_batch":
        raise ConfigError("trainer.max_tokens_per_micro_batch makes the split depend on the lengths: it needs "
                          "algorithm.loss_agg_mode=token-mean and algorithm.token_mean_over=mini_batch "
                          f"(got {alg.loss_agg_mode} / {alg.token_mean_over})")
    if alg.policy_loss == "steer" and alg.steer.group != "mini_batch":
        raise ConfigError("trainer.max_tokens_per_micro_batch needs algorithm.steer.group=mini_batch (weights "
                          f"independent of the split into micro-batches); got {alg.steer.group}")
    if alg.adv.estimator == "gtpo":
        raise ConfigError("trainer.max_tokens_per_micro_batch deals sequences to DP ranks by length, and "
                          "adv.estimator=gtpo needs whole prompt groups on each rank: turn one of them off")


def _check_diagnostics(cfg: RunConfig, dp: int | None) -> None:
    d, tr, n = cfg.diagnostics, cfg.trainer, cfg.rollout.n
    if d.probe_every < 0:
        raise ConfigError(f"diagnostics.probe_every={d.probe_every}: must be >= 0 (0 = no probe)")
    if d.probe_every and cfg.algorithm.kl_coef > 0:
        raise ConfigError(f"diagnostics.probe_every={d.probe_every} with algorithm.kl_coef={cfg.algorithm.kl_coef}: the "
                          "probe's held batch has no reference log-probs for the KL term yet; set one of them to 0")
    if not 0 <= d.probe_prompts <= tr.rollout_batch_size:
        raise ConfigError(f"diagnostics.probe_prompts={d.probe_prompts}: must be in [0, trainer.rollout_batch_size="
                          f"{tr.rollout_batch_size}] (0 = the whole first rollout batch)")
    if d.probe_every and d.probe_prompts and dp is not None and d.probe_prompts * n % (dp * tr.micro_batch_size):
        raise ConfigError(f"diagnostics.probe_prompts={d.probe_prompts} x rollout.n={n} sequences do not split into {dp} "
                          f"data-parallel ranks x whole micro-batches of trainer.micro_batch_size={tr.micro_batch_size}; "
                          f"use a multiple of {dp * tr.micro_batch_size // math.gcd(dp * tr.micro_batch_size, n)} prompts")
    c = d.closed_loop  # its own settings are checked by ClosedLoopConfig; here what it needs from the rest
    if not c.enabled:
        return
    if cfg.algorithm.policy_loss != "steer":
        raise ConfigError(f"diagnostics.closed_loop.enabled=true moves STEER's w_min: it needs algorithm.policy_loss=steer "
                          f"(got {cfg.algorithm.policy_loss!r}); set closed_loop.enabled=false for other losses")
    if not c.w_min_bounds[0] <= cfg.algorithm.steer.w_min <= c.w_min_bounds[1]:
        raise ConfigError(f"algorithm.steer.w_min={cfg.algorithm.steer.w_min} is the closed loop's starting point: it must "
                          f"lie inside diagnostics.closed_loop.w_min_bounds={list(c.w_min_bounds)}")


def _check_code_eval(cfg: RunConfig) -> None:
    from steer_megatron.eval.code_benchmarks import BUILTIN
    from steer_megatron.rewards.code_reward import CodeRewardSettings

    try:
        CodeRewardSettings.from_options(dataclasses.asdict(cfg.reward.code))
    except ValueError as exc:
        raise ConfigError(f"reward.code: {exc}") from None
    for b in cfg.eval.benchmarks:
        if b not in BUILTIN:
            raise ConfigError(f"eval.benchmarks: no built-in benchmark {b!r}; choose from {sorted(BUILTIN)} "
                              f"or list the benchmark's file in eval.files")


def _check_paths(cfg: RunConfig) -> None:
    if not cfg.demo.enabled:
        if cfg.model.hf_path is None:
            raise ConfigError("model.hf_path is null: set it to a HF model directory (or enable demo.enabled)")
        if not cfg.data.train_files:
            raise ConfigError("data.train_files is empty: list one or more verl-layout parquet files")
    for key, paths in (
        ("model.hf_path", [cfg.model.hf_path]),
        ("model.tokenizer_path", [cfg.model.tokenizer_path]),
        ("data.train_files", cfg.data.train_files),
        ("eval.files", cfg.eval.files),
    ):
        for p in paths:
            if p is not None and not Path(p).exists():
                raise ConfigError(f"{key}: {p} does not exist")
    if cfg.trainer.resume not in ("auto", "none") and not Path(cfg.trainer.resume).exists():
        raise ConfigError(f"trainer.resume={cfg.trainer.resume}: no such checkpoint (use auto, none or a path)")


# --------------------------------------------------------------------------------------------
# Serialising


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what is printed at start and saved with checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg)))


def config_from_yaml(text: str) -> RunConfig:
    """Inverse of config_to_yaml (for reading a checkpoint's saved config)."""
    cfg = _merge_checked(OmegaConf.structured(RunConfig), OmegaConf.create(text), "saved config")
    try:
        return OmegaConf.to_object(cfg)
    except ValueError as exc:
        raise ConfigError(f"saved config: {exc}") from None


def config_hash(cfg: RunConfig) -> str:
    """sha256 of the resolved config in canonical JSON; equal configs hash equal."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def save_config(cfg: RunConfig, directory: str | Path) -> Path:
    """Write config.yaml and config.sha256 into `directory` (a checkpoint or run dir)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(config_to_yaml(cfg))
    (d / "config.sha256").write_text(config_hash(cfg) + "\n")
    return d / "config.yaml"
