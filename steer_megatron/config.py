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
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import II, MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# the loss's components, defined and validated once beside the loss (loss/schema.py)
from steer_megatron.loss.schema import (
    ClipCovConfig,
    EntropyAdvConfig,
    KlCovConfig,
    RolloutCorrection,
    SteerConfig,
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

def validate_config(cfg: RunConfig, **options) -> int | None:
    """Raise ConfigError naming the first key that cannot work; the checks and their keyword options
    (world_size, head counts, check_paths) are steer_megatron.config_checks.check_run_config's.
    Imported here, not at the top: config_checks imports this module's schema."""
    from steer_megatron.config_checks import check_run_config

    return check_run_config(cfg, **options)


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
