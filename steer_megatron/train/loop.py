"""The GRPO/STEER training loop, top to bottom.

Every rank trains (Megatron-Core, DP x TP x PP); rank 0 also drives the rollout fleet, the
reward workers, evaluation and logging (see driver.py), and hands each step's batch to the
others over the control plane. A step: rollouts -> rewards -> advantages -> old log-prob and
entropy pass -> policy-loss updates -> weight sync with a parity probe -> metrics. Checkpoints
every `trainer.save_every` steps and when SIGTERM/SIGUSR1 arrives; `trainer.resume=auto` picks
up the latest complete one and continues with the same data order and RNG.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from steer_megatron.config import RunConfig, config_to_dict, validate_config
from steer_megatron.algorithms.advantages import gtpo_token_advantages
from steer_megatron.diagnostics.hook import DiagnosticsHook
from steer_megatron.loss.rollout_correction import mismatch_metrics
from steer_megatron.models.checkpoint import find_latest, load_checkpoint, read_meta, save_checkpoint
from steer_megatron.models.hf_config import build_gpt_model, parse_hf_config
from steer_megatron.models.hf_export import export_hf_checkpoint
from steer_megatron.models.hf_import import load_hf_weights
from steer_megatron.parallel import ParallelLayout, init_parallel
from steer_megatron.rollout.weight_sync.base import parity_tolerance
from steer_megatron.train.actor import ActorConfig, MegatronActor
from steer_megatron.train.control import ControlPlane, StopRequest
from steer_megatron.train.driver import Driver
from steer_megatron.train.optim import wrap_for_training
from steer_megatron.train.reference import ReferencePolicy
from steer_megatron.train.rollout_pipeline import RolloutPipeline
from steer_megatron.train.run_dir import RunDir
from steer_megatron.train.settings import DTYPES, model_settings, optim_settings, policy_loss_config
from steer_megatron.train.weights import WeightPublisher


def train(cfg: RunConfig) -> Path:
    """Run (or resume) training; returns the run directory. Collective: call on every rank."""
    init_parallel(ParallelLayout(tp=cfg.parallel.tp, pp=cfg.parallel.pp, cp=cfg.parallel.cp), seed=cfg.trainer.seed)
    from megatron.core import parallel_state as ps

    control = ControlPlane()
    stop = StopRequest()
    if cfg.demo.enabled:  # the embedded CPU default builds its model and data once, on rank 0
        cfg = control.broadcast(Driver.prepare_demo(cfg) if control.is_driver else None)
    arch = parse_hf_config(cfg.model.hf_path)
    dp = validate_config(cfg, world_size=torch.distributed.get_world_size(), num_attention_heads=arch.num_attention_heads,
                         num_query_groups=arch.num_kv_heads)
    run = RunDir(cfg, control)

    # -- the policy on Megatron-Core, from the latest checkpoint of this run or from the HF model
    if cfg.trainer.resume == "auto":
        latest = find_latest(run.checkpoints)
    else:
        latest = None if cfg.trainer.resume == "none" else cfg.trainer.resume
    meta = read_meta(latest) if latest else None
    model, vocab = build_gpt_model(arch, params_dtype=DTYPES[cfg.model.dtype], seed=cfg.trainer.seed,
                                   padded_vocab=meta.padded_vocab_size if meta else None, **model_settings(cfg))
    if not latest:
        load_hf_weights(model, cfg.model.hf_path, arch)
    ddp, optimizer, scheduler = wrap_for_training(model, optim_settings(cfg))
    n = cfg.rollout.n
    actor = MegatronActor(ddp, optimizer, ActorConfig(
        vocab_size=vocab.size, micro_batch_size=cfg.trainer.micro_batch_size,
        mini_batch_size=cfg.trainer.mini_batch_size * n // dp, ppo_epochs=cfg.trainer.ppo_epochs,
        policy_loss=cfg.algorithm.policy_loss, loss=policy_loss_config(cfg), loss_kernel=cfg.algorithm.loss_kernel,
        fused_lm_head=cfg.algorithm.fused_lm_head, temperature=cfg.rollout.temperature,
        balance_batch=cfg.trainer.balance_batch, token_mean_over=cfg.algorithm.token_mean_over,
        pack_sequences=cfg.trainer.pack_sequences,
        max_tokens_per_micro_batch=cfg.trainer.max_tokens_per_micro_batch), scheduler)
    # the initial policy, frozen, when the loss has a KL penalty to it
    reference = ReferencePolicy.build(arch, cfg.model.hf_path, params_dtype=DTYPES[cfg.model.dtype],
                                      padded_vocab=vocab.padded_size, cfg=actor.cfg, seed=cfg.trainer.seed,
                                      **model_settings(cfg)) if cfg.algorithm.kl_coef > 0 else None
    start_step, sampler_state, diag_state = 0, None, None
    if latest:  # same data order, RNG, optimizer, LR schedule and diagnostics as if never stopped
        meta = load_checkpoint(latest, ddp, optimizer)
        start_step, sampler_state, diag_state = meta.step, meta.extra.get("sampler"), meta.extra.get("diagnostics")
        scheduler.load_state_dict(meta.extra["scheduler"])
    # optional entropy probe and closed loop on w_min (docs/entropy_diagnostics.md); None when off
    diag = DiagnosticsHook.build(cfg, control, run.path, actor, dp, diag_state)

    # -- rank 0: data, rewards, rollout fleet, logging
    driver = Driver(cfg, run, sampler_state, resume_step=start_step if latest else None, dp=dp) if control.is_driver else None
    publisher = WeightPublisher(actor, control, driver.weight_sync if driver else None,
                                driver.probe_prompts if driver else [], pad_id=control.broadcast(driver.pad_id if driver else None),
                                atol=cfg.rollout.parity_atol or parity_tolerance(DTYPES[cfg.model.dtype], arch.num_layers,
                                                                                 arch.hidden_size),
                                dtype=DTYPES[cfg.model.dtype], temperature=cfg.rollout.temperature)
    # trainer.async_rollout: rank 0 generates step k + 1's batch while step k trains (rollout_pipeline.py)
    pipeline = RolloutPipeline(driver.rollout_batch, driver.sampler, ahead=cfg.trainer.async_rollout) if driver else None
    if driver and cfg.trainer.async_rollout and cfg.algorithm.tis_cap is None and cfg.algorithm.rollout_correction.mode == "none":
        driver.console.print("[yellow]trainer.async_rollout: samples are one step stale and nothing corrects for it; "
                             "set algorithm.tis_cap or algorithm.rollout_correction.mode[/]")
    origin = time.perf_counter()  # the timeline/* metrics count from here
    try:
        publisher.publish(start_step)  # the fleet serves exactly the weights we train from
        if driver and cfg.eval.every and cfg.eval.at_start and start_step == 0:
            driver.log(0, driver.evaluate(0))
        for step in range(start_step, cfg.trainer.total_steps):
            t0 = time.perf_counter()
            rollout = pipeline.take(step) if driver else None
            if driver and step + 1 < cfg.trainer.total_steps:
                pipeline.prefetch(step + 1)  # no-op unless trainer.async_rollout
            batch = control.broadcast(rollout.batch if driver else None)
            timing = {"timing/rollout_s": time.perf_counter() - t0}

            local = batch.dp_slice(ps.get_data_parallel_rank(), dp, balance_rows=actor.cfg.mini_batch_size
                                   if cfg.trainer.max_tokens_per_micro_batch else None)
            t1 = t_train = time.perf_counter()
            actor.old_pass(local)  # old_log_prob, old_entropy (and what STEER's group needs)
            if reference:
                local.ref_log_prob = reference.log_probs(local)
            if cfg.algorithm.adv.estimator == "gtpo" and local.old_entropy is not None:
                a = cfg.algorithm.adv  # GTPO shapes rewards with the old policy's entropy (algorithms/advantages.py)
                local.advantages = gtpo_token_advantages(local.rewards.sum(-1) / local.loss_mask.sum(-1).clamp(min=1), local.old_entropy, local.loss_mask,
                                                         cfg.rollout.n, alpha1=a.gtpo_alpha1, alpha2=a.gtpo_alpha2,
                                                         dp_group=ps.get_data_parallel_group() if dp > 1 else None)
            timing["timing/old_logprob_s"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            if diag:
                diag.before_update(actor)  # keeps the starting weights when the closed loop may trim the step
            train_metrics = actor.update(local, step=step)
            on_last_stage = local.old_log_prob is not None  # where the statistics and the loss live
            if on_last_stage:
                gap = (local.old_log_prob - local.rollout_log_prob).abs()[local.loss_mask]
                train_metrics["rollout_train_logprob_gap"] = float(gap.mean()) if gap.numel() else 0.0
                train_metrics.update(mismatch_metrics(local.old_log_prob, local.rollout_log_prob, local.loss_mask))
            timing["timing/update_s"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            diag_metrics = diag.after_update(step, actor, batch, local) if diag else {}
            timing["timing/diagnostics_s"] = time.perf_counter() - t1

            t_trained = time.perf_counter()
            if driver:  # the batch generated ahead must come from the weights before this step's update
                timing["timing/rollout_wait_s"] = pipeline.wait()
            t1 = time.perf_counter()
            report = publisher.publish(step + 1)
            timing["timing/weight_sync_s"] = time.perf_counter() - t1
            if driver:
                g0, g1 = rollout.generate_span
                timing.update({"timing/rollout_generate_s": g1 - g0, "timeline/rollout_start": g0 - origin,
                               "timeline/rollout_end": g1 - origin, "timeline/train_start": t_train - origin,
                               "timeline/train_end": t_trained - origin, "timeline/sync_start": t1 - origin,
                               "timeline/sync_end": time.perf_counter() - origin})
            gathered = control.gather(train_metrics if on_last_stage and ps.get_tensor_model_parallel_rank() == 0 else None)

            done = step + 1 == cfg.trainer.total_steps
            stopping = control.any(stop.requested)
            if driver:
                timing["timing/step_s"] = time.perf_counter() - t0
                driver.finish_step(step + 1, [g for g in gathered if g is not None], timing, report,
                                   lr=scheduler.get_lr(optimizer.param_groups[0]), diag=diag_metrics,
                                   rollout_metrics=rollout.metrics)
                if cfg.eval.every and (step + 1) % cfg.eval.every == 0:
                    driver.log(step + 1, driver.evaluate(step + 1))
            if done or stopping or (cfg.trainer.save_every and (step + 1) % cfg.trainer.save_every == 0):
                extra = {"scheduler": scheduler.state_dict(), "sampler": pipeline.sampler_state() if driver else None,
                         "diagnostics": diag.state_dict() if diag else None}
                save_checkpoint(run.checkpoints, step + 1, ddp, optimizer, extra=extra, config=config_to_dict(cfg),
                                keep_last=cfg.trainer.keep_last)
            if stopping and not done:
                if driver:
                    driver.console.print(f"[yellow]signal {stop.signum}: saved step {step + 1}, exiting to be resumed[/]")
                return run.path
        export_hf_checkpoint(ddp, run.hf_export, source_dir=cfg.model.hf_path, overwrite=True)
        run.mark_done()
        return run.path
    finally:
        if driver:
            pipeline.close()
            driver.close()
        stop.restore()
