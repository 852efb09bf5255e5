"""Rank 0's side of a step: prompts, rollouts, rewards, advantages, evaluation and logging."""
from __future__ import annotations

import dataclasses
import itertools
import os
import random
import time
from pathlib import Path

import torch
from rich.console import Console

from steer_megatron.algorithms.advantages import fill_with_informative_groups
from steer_megatron.config import RunConfig, config_to_yaml
from steer_megatron.data.rl_dataset import load_rl_parquets
from steer_megatron.data.sampler import ResumableSampler
from steer_megatron.eval.code_benchmarks import BUILTIN, file_loader, rows_to_examples
from steer_megatron.eval.metrics import EvalSample, benchmark_metrics, flatten_metrics
from steer_megatron.parallel import free_port_block
from steer_megatron.rewards.scorer import RewardScorer
from steer_megatron.rollout import Fleet, FleetConfig, RolloutClient, RolloutConfig, RouterConfig, SamplingConfig
from steer_megatron.rollout.weight_sync import TransportSettings, make_weight_sync
from steer_megatron.tracking import names
from steer_megatron.tracking.console import make_progress, print_step_summary
from steer_megatron.tracking.metrics_logger import MetricsLogger
from steer_megatron.train.rollout_batch import Group, RolloutBatch, groups_to_batch
from steer_megatron.train.run_dir import RunDir

_PROBE_PROMPTS = 2


class Driver:
    @staticmethod
    def prepare_demo(cfg: RunConfig) -> RunConfig:
        """Build (or reuse from cache) the CPU demo's model and data; point the config at them."""
        from steer_megatron.demo_assets.assets import apply_demo_assets

        apply_demo_assets(cfg)
        return cfg

    def __init__(self, cfg: RunConfig, run: RunDir, sampler_state: dict | None, *, resume_step: int | None, dp: int):
        from transformers import AutoTokenizer

        self.cfg, self.run, self.dp = cfg, run, dp
        self.console = Console()
        self.console.rule(f"[bold]steer-megatron[/] run {run.path}")
        self.console.print(config_to_yaml(cfg), highlight=False)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.hf_path)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.stop_ids = tuple(sorted({i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}))
        d = cfg.data
        examples, report = load_rl_parquets(d.train_files, tok, max_prompt_len=d.max_prompt_len,
                                            prompt_key=d.prompt_key, on_malformed=d.on_malformed,
                                            apply_chat_template=d.apply_chat_template)
        self.console.print(f"train data: {report.summary()}")
        self.sampler = ResumableSampler(examples, seed=d.seed, shuffle=d.shuffle)
        if sampler_state:
            self.sampler.load_state_dict(sampler_state)
        self.probe_prompts = [e.prompt_ids for e in examples[:_PROBE_PROMPTS]]
        self.eval_sets = self._load_eval_sets()
        self.scorer = RewardScorer(timeout_s=cfg.reward.timeout_s, num_workers=cfg.reward.num_workers,
                                   reward_options={"code": dataclasses.asdict(cfg.reward.code)},
                                   routes=dict(cfg.reward.routes))
        rows = examples + [x for v in self.eval_sets.values() for x in v]  # fail now if a reward cannot run here
        self.scorer.preflight([x.data_source for x in rows], [x.reward_style for x in rows])
        self.fleet = Fleet(self._fleet_config()).start()
        self.client = RolloutClient(self.fleet.endpoints, RolloutConfig(run_id=self._run_id(), concurrency=cfg.rollout.concurrency))
        r = cfg.rollout
        self.weight_sync = make_weight_sync(r.weight_sync, self.fleet, TransportSettings(
            export_root=run.path / "rollout_weights", source_dir=Path(cfg.model.hf_path),
            master_address=r.weight_sync_address or os.environ.get("MASTER_ADDR", "127.0.0.1"),
            bucket_bytes=r.weight_sync_bucket_mb << 20, backend="gloo" if r.engine == "cpu" else "nccl",
            ranks_per_worker=r.tp_size))
        lg = cfg.logging
        self.logger = MetricsLogger(run.path, jsonl=lg.jsonl, tensorboard=lg.tensorboard, wandb_project=lg.wandb_project,
                                    wandb_entity=lg.wandb_entity, run_name=cfg.trainer.run_name, resume_step=resume_step)
        self.progress = make_progress(self.console)
        self.progress.start()
        self.task = self.progress.add_task("training", total=cfg.trainer.total_steps, completed=resume_step or 0)

    # -- setup ----------------------------------------------------------------------------------
    def _run_id(self) -> str:
        # Servers seed sampling from the request id: tie it to the seed, not the run name, so runs
        # that differ only in their loss (GRPO vs STEER) or a resumed run draw the same samples.
        return f"seed{self.cfg.trainer.seed}"

    def _fleet_config(self) -> FleetConfig:
        r = self.cfg.rollout
        engine = "cpu" if r.engine == "cpu" else "sglang"
        common = dict(model_path=self.cfg.model.hf_path, engine=engine, log_dir=str(self.run.logs), tp_size=r.tp_size,
                      use_router=r.use_router or bool(r.router_url))
        if r.server_urls:  # started outside the trainer (Slurm rollout nodes)
            router = RouterConfig()
            if r.router_url:
                host, port = r.router_url.rsplit("//", 1)[-1].rsplit(":", 1)
                router = RouterConfig(host=host, port=int(port))
            return FleetConfig(num_workers=len(r.server_urls), worker_urls=tuple(r.server_urls), router=router,
                               external_router=bool(r.router_url), **common)
        base = free_port_block(r.num_servers + 2)  # workers, then the router and its metrics port
        router = RouterConfig(port=base + r.num_servers, prometheus_port=base + r.num_servers + 1, policy="round_robin")
        return FleetConfig(num_workers=r.num_servers, base_port=base, port_stride=1, router=router, **common)

    def _load_eval_sets(self) -> dict[str, list]:
        e, out = self.cfg.eval, {}
        max_len = self.cfg.data.max_prompt_len
        # built-in coding benchmarks (HumanEval), then files: verl parquets or other formats (LiveCodeBench .jsonl)
        for f in [*e.benchmarks, *e.files]:
            loader = BUILTIN.get(f) if f in e.benchmarks else file_loader(f)
            if loader is not None:
                rows = loader() if f in e.benchmarks else loader(f)
                examples = rows_to_examples(rows, self.tokenizer, max_prompt_len=max_len, source=f)
                summary = f"{len(rows)} problems, {len(rows) - len(examples)} dropped as too long"
            else:
                examples, report = load_rl_parquets([f], self.tokenizer, max_prompt_len=max_len,
                                                    prompt_key=self.cfg.data.prompt_key, on_malformed="skip",
                                                    apply_chat_template=self.cfg.data.apply_chat_template)
                summary = report.summary()
            if e.max_prompts and len(examples) > e.max_prompts:
                examples = random.Random(f"eval/{f}").sample(examples, e.max_prompts)
            name = Path(f).stem.removesuffix(".jsonl")
            out[name] = examples
            self.console.print(f"eval {name}: {len(examples)} prompts ({summary})")
        return out

    # -- a step -----------------------------------------------------------------------------------
    def _sampling(self, n: int, temperature: float, top_p: float, max_new_tokens: int) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              top_k=self.cfg.rollout.top_k, n=n, stop_token_ids=self.stop_ids)

    def _generate_and_score(self, examples, sampling: SamplingConfig, step_tag: str):
        result = self.client.generate_sync([e.prompt_ids for e in examples], sampling, step=step_tag)
        flat = result.flat()
        texts = [self.tokenizer.decode(s.output_ids, skip_special_tokens=True) for s in flat]
        owners = [examples[s.prompt_index] for s in flat]
        scores = self.scorer.score([e.data_source for e in owners], texts, [e.ground_truth for e in owners],
                                   [e.reward_style for e in owners])
        return result, torch.tensor(scores.scores, dtype=torch.float32).view(len(examples), sampling.n), scores

    def rollout_batch(self, step: int) -> RolloutBatch:
        """Step `step`'s batch: prompts, rollouts, rewards, advantages. Touches the sampler, the client and
        the scorer only, so trainer.async_rollout can run it in a thread while the step before trains."""
        r, tr = self.cfg.rollout, self.cfg.trainer
        sampling = self._sampling(r.n, r.temperature, r.top_p, r.max_new_tokens)
        t0 = time.perf_counter()
        rounds = itertools.count()  # dynamic sampling may need several rollout rounds per step
        stats = {"timeouts": 0, "errors": 0}
        reasons: dict[str, int] = {}

        def generate(k: int):
            examples = self.sampler.next_batch(k)
            result, rewards, scores = self._generate_and_score(examples, sampling, f"{step}r{next(rounds)}")
            stats["timeouts"] += scores.n_timeouts
            stats["errors"] += scores.n_errors
            for why, c in scores.reason_counts().items():
                reasons[why] = reasons.get(why, 0) + c
            groups = [(e, result.samples[i], rewards[i]) for i, e in enumerate(examples)]
            return groups, rewards

        ds = self.cfg.algorithm.dynamic_sampling
        metrics: dict[str, float] = {}
        if ds.enabled:
            found = fill_with_informative_groups(generate, tr.rollout_batch_size, max_rounds=ds.max_rounds)
            groups = found.groups
            metrics = {"rollout/dynamic_rounds": found.rounds, "rollout/dynamic_dropped": found.dropped}
            if found.gave_up:
                self.console.print(f"[yellow]{found.message}[/]")
            # every DP rank needs whole micro-batches: drop the groups that do not fit
            unit = self.dp * tr.micro_batch_size
            keep = (len(groups) * r.n // unit) * unit // r.n
            if keep == 0:
                raise RuntimeError(f"dynamic sampling found {len(groups)} informative groups in {found.rounds} rounds, "
                                   f"too few for {self.dp} DP ranks x micro-batch {tr.micro_batch_size}: {found.message}")
            groups = groups[:keep]
        else:
            groups, _ = generate(tr.rollout_batch_size)
        out = groups_to_batch([Group(e.prompt_ids, s, rw) for e, s, rw in groups], self.cfg.algorithm.adv,
                              pad_id=self.pad_id, policy_version=step)
        t1 = time.perf_counter()
        lengths = sum(len(s.output_ids) for g in groups for s in g[1])
        out.metrics = {**metrics, **out.metrics, "rollout/tokens_per_s": float(lengths) / max(t1 - t0, 1e-9),
                       "reward/timeouts": stats["timeouts"], "reward/errors": stats["errors"],
                       **{f"reward/reason/{k}": float(c) for k, c in sorted(reasons.items())}}
        out.generate_span = (t0, t1)
        return out

    def finish_step(self, step: int, rank_metrics: list[dict], timing: dict, report, *, lr: float,
                    diag: dict[str, float] | None = None, rollout_metrics: dict[str, float] | None = None) -> None:
        keys = set().union(*rank_metrics) if rank_metrics else set()
        actor = {f"actor/{k}": sum(m.get(k, 0.0) for m in rank_metrics) / len(rank_metrics) for k in keys}
        actor[names.ENTROPY] = actor.pop("actor/entropy_mean", float("nan"))
        metrics = {**(rollout_metrics or {}), **actor, **timing, "actor/lr": lr, **(diag or {})}
        for phase in ("old_logprob", "update"):  # tokens/s of the trainer's forward (+ backward) passes
            if timing.get(f"timing/{phase}_s") and "rollout/batch_tokens" in metrics:
                metrics[f"timing/{phase}_tokens_per_s"] = metrics["rollout/batch_tokens"] / timing[f"timing/{phase}_s"]
        if report is not None:
            metrics["sync/seconds"] = report.seconds
            if report.parity is not None:
                metrics["sync/parity_max_abs_diff"] = report.parity.max_abs_diff
        self.log(step, metrics)
        if self.cfg.logging.console:  # the per-step table; the progress bar and warnings stay either way
            print_step_summary(step, metrics, self.console)
        self.progress.update(self.task, completed=step)

    def evaluate(self, step: int) -> dict[str, float]:
        e = self.cfg.eval
        sampling = self._sampling(e.n, e.temperature, e.top_p, e.max_new_tokens)
        samples: list[EvalSample] = []
        for bench, examples in self.eval_sets.items():
            result, rewards, scores = self._generate_and_score(examples, sampling, f"eval{step}-{bench}")
            # a reward that says why (code) is correct only on "pass" (partial credit is not a solve)
            ok = [why == "pass" if why is not None else r > 0.5 for r, why in zip(scores.scores, scores.reasons)]
            for i, ex in enumerate(examples):
                samples.extend(EvalSample(bench, ex.index, c) for c in ok[i * e.n:(i + 1) * e.n])
        return flatten_metrics(benchmark_metrics(samples, ks=(1, e.n)))

    def log(self, step: int, metrics: dict) -> None:
        self.logger.log(step, metrics)

    def close(self) -> None:
        self.progress.stop()
        for closer in (self.fleet.stop, self.scorer.close, self.logger.close):
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 - shutting down: report, keep closing the rest
                self.console.print(f"[red]shutdown: {exc!r}[/]")
