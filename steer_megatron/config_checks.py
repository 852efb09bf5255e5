"""The run config's start-up checks: every key that cannot work is refused with a message naming
it and the fix (steer_megatron.config.validate_config calls check_run_config)."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path
from typing import Any

from steer_megatron.config import ConfigError, RunConfig
from steer_megatron.loss.schema import policy_loss_config_from


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


def check_run_config(
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
