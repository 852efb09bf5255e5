"""Every field of the run config is read by the component it configures, or refused at start-up.

A short trainer run records which config fields the code reads (the config dataclasses' attribute
access is tracked in the rank process; reads by the config module itself, its validation and
serialisation, and the run identity do not count). A field nobody reads must be in READ_ELSEWHERE
with the run setting that reads it, or the test fails: the next unread key is caught here, not by a
user's out-of-memory error.
"""
import dataclasses
import sys
import typing

import pytest

from steer_megatron import config as config_mod
from steer_megatron.config import RunConfig, load_config
from steer_megatron.parallel import spawn_ranks

# Readers that do not configure anything: the schema, its validation and serialisation.
_NOT_A_USE = ("steer_megatron.config", "dataclasses", "omegaconf", "copy")

# Fields this run cannot read, each with the setting or path that reads it (checked by other tests).
READ_ELSEWHERE = {
    "algorithm.kl_coef": "read by the reference policy and the loss (tests/test_trainer.py::test_kl_penalty_*); "
                         "refused with the probe this run uses",
    "model.tokenizer_path": "a tokenizer apart from the model (the demo sets none)",
    "parallel.distributed_optimizer": "read by train/settings.optim_settings (tests/test_memory_knobs.py)",
    "parallel.overlap_param_gather": "read by train/settings.optim_settings (tests/test_memory_knobs.py)",
    "rollout.server_urls": "pre-started servers (tests/test_slurm_jobs.py)",
    "rollout.router_url": "an external router (tests/test_slurm_jobs.py)",
    "rollout.tp_size": "rollout.engine=sglang and the nccl transport's group size",
    "rollout.weight_sync_address": "rollout.weight_sync=nccl (tests/test_trainer.py)",
    "rollout.weight_sync_bucket_mb": "rollout.weight_sync=nccl (tests/test_trainer.py)",
    "algorithm.adv.gtpo_alpha1": "adv.estimator=gtpo (tests/test_objectives.py, tests/test_paper_grid.py)",
    "algorithm.adv.gtpo_alpha2": "adv.estimator=gtpo (tests/test_objectives.py, tests/test_paper_grid.py)",
    "algorithm.adv.w_reinforce_lambda": "adv.estimator=w_reinforce (tests/test_paper_grid.py)",
    "data.max_response_len": "the default of rollout.max_new_tokens and eval.max_new_tokens (an interpolation)",
    "algorithm.kl_type": "the KL estimate with kl_coef > 0 (tests/test_policy_losses.py, tests/test_trainer.py::test_kl_penalty_*)",
    "algorithm.kl_cov.ratio": "policy_loss=kl_cov (tests/test_policy_losses.py, tests/test_paper_grid.py)",
    "algorithm.kl_cov.coef": "policy_loss=kl_cov (tests/test_policy_losses.py, tests/test_paper_grid.py)",
    "algorithm.clip_cov.ratio": "policy_loss=clip_cov (tests/test_policy_losses.py, tests/test_paper_grid.py)",
    "algorithm.clip_cov.lb": "policy_loss=clip_cov (tests/test_policy_losses.py, tests/test_paper_grid.py)",
    "algorithm.clip_cov.ub": "policy_loss=clip_cov (tests/test_policy_losses.py, tests/test_paper_grid.py)",
    "algorithm.entropy_adv.alpha": "policy_loss=entropy_adv (tests/test_policy_losses.py, tests/test_paper_grid.py)",
    "algorithm.entropy_adv.kappa": "policy_loss=entropy_adv (tests/test_policy_losses.py, tests/test_paper_grid.py)",
    "algorithm.rollout_correction.level": "rollout_correction.mode != none (tests/test_objectives.py, tests/test_paper_grid.py)",
    "algorithm.rollout_correction.upper": "rollout_correction.mode != none (tests/test_objectives.py, tests/test_paper_grid.py)",
    "algorithm.rollout_correction.lower": "rollout_correction.mode icepop / mask (tests/test_objectives.py)",
    "algorithm.steer.w_max": "steer.mapping=linear (tests/test_steer_weights.py)",
    "logging.wandb_project": "wandb runs",
    "logging.wandb_entity": "wandb runs",
}

OVERRIDES = [  # the CPU demo, small, with the optional paths this run can take switched on
    "demo.num_digits=3", "demo.n_train=81", "demo.n_test=19", "demo.warmup_steps=60",
    "trainer.rollout_batch_size=8", "trainer.mini_batch_size=4", "trainer.micro_batch_size=4", "rollout.n=4",
    "trainer.total_steps=2", "trainer.save_every=1", "eval.every=2", "eval.max_prompts=4",
    "diagnostics.probe_every=1", "diagnostics.closed_loop.enabled=true", "diagnostics.closed_loop.trims=1",
    "algorithm.dynamic_sampling.enabled=true",
]


def _config_classes() -> dict[type, str]:
    """Every config dataclass reachable from RunConfig, with its dotted path."""
    out: dict[type, str] = {}

    def walk(cls, prefix):
        out[cls] = prefix
        hints = typing.get_type_hints(cls, vars(config_mod))
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            if dataclasses.is_dataclass(t):
                walk(t, f"{prefix}{f.name}.")

    walk(RunConfig, "")
    return out


def all_fields() -> set[str]:
    return {f"{prefix}{f.name}" for cls, prefix in _config_classes().items() for f in dataclasses.fields(cls)
            if not dataclasses.is_dataclass(typing.get_type_hints(cls, vars(config_mod))[f.name])}


def _tracked_run(overrides, out_dir):
    reads: set[str] = set()
    classes = _config_classes()
    for cls, prefix in classes.items():
        names = {f.name for f in dataclasses.fields(cls)}

        def tracked(self, name, _prefix=prefix, _names=names, _get=object.__getattribute__):
            if name in _names:
                frame = sys._getframe(1)
                caller = frame.f_globals.get("__name__", "")
                # a component's dataclass validating itself (__post_init__) is not a use either
                if not caller.startswith(_NOT_A_USE) and frame.f_code.co_name != "__post_init__":
                    reads.add(_prefix + name)
            return _get(self, name)

        cls.__getattribute__ = tracked
    from steer_megatron.train.loop import train

    train(load_config(None, [*overrides, f"trainer.output_dir={out_dir}"]))
    return reads


@pytest.mark.slow
def test_every_setting_is_read_by_its_component(tmp_path, demo_cache_root):
    over = OVERRIDES + [f"demo.cache_dir={demo_cache_root}"]  # tests/test_trainer.py's demo assets, built once
    reads = spawn_ranks(_tracked_run, 1, over, str(tmp_path), timeout=1200)[0]
    fields = all_fields()
    assert set(READ_ELSEWHERE) <= fields, sorted(set(READ_ELSEWHERE) - fields)  # no stale entries
    # the code reward's section goes to it whole (driver: dataclasses.asdict(cfg.reward.code)), field
    # by field into its sandbox limits (tests/test_code_reward.py checks they are applied)
    unread = sorted(f for f in fields - reads - set(READ_ELSEWHERE) if not f.startswith("reward.code."))
    assert not unread, f"config fields nothing reads during a trainer run: {unread}"
