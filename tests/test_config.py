"""Config loading, the shipped configs' hyper-parameters, validation errors, hashing."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from steer_megatron.config import (
    CONFIG_DIR,
    ConfigError,
    RunConfig,
    config_from_yaml,
    config_hash,
    config_to_yaml,
    load_config,
    save_config,
    validate_config,
)

DATASETS = Path("/work/shared/datasets")


@pytest.fixture(autouse=True)
def _paths_env(monkeypatch):
    monkeypatch.setenv("STEER_DATA_DIR", str(DATASETS))


def test_every_shipped_config_loads():
    names = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    assert {"cpu_demo.yaml", "qwen2.5-math-7b_grpo.yaml", "qwen2.5-math-7b_steer.yaml",
            "qwen2.5-math-7b_steer_extreme.yaml"} <= set(names)
    for n in names:
        assert isinstance(load_config(CONFIG_DIR / n), RunConfig)


def test_default_is_the_cpu_demo():
    cfg = load_config()
    assert cfg.demo.enabled and cfg.rollout.engine == "cpu" and cfg.model.hf_path is None
    assert cfg.rollout.max_new_tokens == cfg.data.max_response_len  # interpolated default


def test_7b_configs_carry_the_paper_hyper_parameters():
    steer = load_config(CONFIG_DIR / "qwen2.5-math-7b_steer.yaml")
    grpo = load_config(CONFIG_DIR / "qwen2.5-math-7b_grpo.yaml")
    extreme = load_config(CONFIG_DIR / "qwen2.5-math-7b_steer_extreme.yaml")
    for cfg in (steer, grpo, extreme):  # DESIGN.md section 1, release hyper-parameters
        assert cfg.optim.lr == 1e-6
        assert (cfg.trainer.rollout_batch_size, cfg.rollout.n, cfg.trainer.mini_batch_size) == (512, 8, 32)
        assert cfg.algorithm.dual_clip_c == 10.0
        assert cfg.algorithm.kl_coef == 0.0 and cfg.algorithm.entropy_coeff == 0.0
        assert (cfg.data.max_prompt_len, cfg.data.max_response_len) == (1024, 3072)
        assert cfg.data.train_files == [str(DATASETS / "DAPO-Math-17k.parquet")]
    assert (steer.algorithm.clip_low, steer.algorithm.clip_high) == (0.2, 0.28)
    assert steer.algorithm.policy_loss == "steer" and grpo.algorithm.policy_loss == "grpo"
    assert (steer.algorithm.steer.mapping, steer.algorithm.steer.w_min, steer.algorithm.steer.form) == ("exp", 0.8, "release")
    assert (extreme.algorithm.clip_low, extreme.algorithm.clip_high) == (0.99, 5.0)
    assert extreme.algorithm.policy_loss == "steer"
    # the extreme file changes only the clip range and the run name
    extreme.algorithm.clip_low, extreme.algorithm.clip_high = 0.2, 0.28
    extreme.trainer.run_name = steer.trainer.run_name
    assert extreme == steer
    for cfg in (steer, grpo):  # the release's batch layout: 8 sequences per micro-batch, prompts mixed
        assert (cfg.trainer.micro_batch_size, cfg.trainer.balance_batch, cfg.algorithm.token_mean_over) == (8, True, "micro_batch")
    assert steer.algorithm.steer.group == "micro_batch"
    rec = load_config(CONFIG_DIR / "qwen2.5-math-7b_steer_group_mini_batch.yaml")
    assert (rec.algorithm.steer.group, rec.algorithm.token_mean_over) == ("mini_batch", "mini_batch")


def test_loss_settings_reach_the_policy_loss_config():
    from steer_megatron.train.settings import policy_loss_config

    cfg = load_config(None, ["algorithm.entropy_coeff=0.003", "algorithm.kl_cov.ratio=0.01", "algorithm.kl_cov.coef=2",
                             "algorithm.clip_cov.ratio=0.001", "algorithm.clip_cov.lb=0.5", "algorithm.clip_cov.ub=4",
                             "algorithm.steer.group=mini_batch", "algorithm.steer.form=exact", "trainer.seed=7",
                             "algorithm.entropy_adv.alpha=0.3", "algorithm.entropy_adv.kappa=3", "algorithm.kl_type=k1",
                             "algorithm.loss_agg_mode=seq-mean-token-sum-norm"])
    pl = policy_loss_config(cfg)
    assert (pl.entropy_adv.alpha, pl.entropy_adv.kappa, pl.kl_type, pl.loss_agg_mode) == (0.3, 3.0, "k1", "seq-mean-token-sum-norm")
    assert (pl.entropy_coeff, pl.kl_cov.ratio, pl.kl_cov.coef) == (0.003, 0.01, 2.0)
    assert (pl.clip_cov.ratio, pl.clip_cov.lb, pl.clip_cov.ub, pl.seed) == (0.001, 0.5, 4.0, 7)
    assert (pl.steer.group, pl.steer.form) == ("mini_batch", "exact")
    default = policy_loss_config(load_config(None))
    assert (default.kl_cov.ratio, default.clip_cov.ratio, default.entropy_coeff) == (0.002, 0.0002, 0.0)


def test_one_schema_per_loss_component():
    """The YAML's algorithm.* components are the loss's own dataclasses, so the same value fails the
    same way from a YAML override and from library code (the checks live in loss/schema.py only)."""
    from steer_megatron.algorithms.controller import ClosedLoopConfig
    from steer_megatron.loss import PolicyLossConfig, SteerConfig
    from steer_megatron.loss.rollout_correction import RolloutCorrection

    alg = RunConfig().algorithm
    assert type(alg.steer) is SteerConfig and type(alg.rollout_correction) is RolloutCorrection
    assert type(RunConfig().diagnostics.closed_loop) is ClosedLoopConfig
    for override, build in [
        ("algorithm.steer.w_min=1.5", lambda: SteerConfig(w_min=1.5, w_max=2.0)),
        ("algorithm.clip_low=0", lambda: PolicyLossConfig(clip_low=0.0)),
        ("algorithm.rollout_correction.level=word", lambda: RolloutCorrection(level="word")),
        ("algorithm.kl_type=k2", lambda: PolicyLossConfig(kl_type="k2")),
        ("diagnostics.closed_loop.gain=0", lambda: ClosedLoopConfig(gain=0.0)),
    ]:
        with pytest.raises(ValueError) as lib:
            build()
        with pytest.raises(ConfigError) as yaml:
            load_config(None, [override] + (["algorithm.steer.w_max=2"] if "w_min" in override else []))
        assert str(lib.value) in str(yaml.value), (override, str(lib.value), str(yaml.value))


def test_overrides_and_typed_values():
    cfg = load_config(None, ["trainer.total_steps=3", "algorithm.steer.w_min=0.5", "data.max_response_len=12"])
    assert cfg.trainer.total_steps == 3 and cfg.algorithm.steer.w_min == 0.5
    assert cfg.rollout.max_new_tokens == 12


@pytest.mark.parametrize(
    "override, match",
    [
        ("trainer.totl_steps=3", r"bad key `trainer.totl_steps`"),
        ("data.max_prompt_len=abc", r"bad key `data.max_prompt_len`.*could not be converted"),
        ("trainer.total_steps", r"not of the form key=value"),
        ("algorithm.steer.mapping=cubic", r"algorithm.steer.mapping='cubic': must be one of \['exp', 'linear'\]"),
        ("trainer.mini_batch_size=5", r"rollout_batch_size=32 is not divisible by trainer.mini_batch_size=5"),
        ("rollout.n=1", r"rollout.n=1: GRPO needs at least 2"),
        ("algorithm.dual_clip_c=0.5", r"dual_clip_c=0.5 must be > 1"),
        ("rollout.max_new_tokens=99", r"rollout.max_new_tokens=99 exceeds data.max_response_len=16"),
        ("optim.lr=0", r"optim.lr=0.0: must be > 0"),
        ("algorithm.policy_loss=entropy_reg", r"entropy_reg with algorithm.entropy_coeff=0 is plain GRPO"),
        ("algorithm.token_mean_over=sequence", r"algorithm.token_mean_over='sequence': must be one of"),
        ("algorithm.clip_cov.lb=6", r"clip_cov.lb=6.0 < clip_cov.ub=5.0"),
        ("rollout.temperature=0", r"rollout.temperature=0.0 must be > 0"),
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(CONFIG_DIR / "cpu_demo.yaml") + "\nrollout:\n  temprature: 0.7\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: bad key `rollout.temprature`"):
        load_config(bad)


def test_base_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_parallel_layout_checks():
    cfg = load_config(CONFIG_DIR / "qwen2.5-math-7b_steer.yaml")  # tp=4, micro 8
    assert validate_config(cfg, world_size=16, num_attention_heads=28, num_query_groups=4, check_paths=False) == 4
    with pytest.raises(ConfigError, match="world size 6 is not divisible by parallel.tp\\*pp\\*cp = 4"):
        validate_config(cfg, world_size=6, check_paths=False)
    with pytest.raises(ConfigError, match="does not divide the model's 2 query groups"):
        validate_config(cfg, num_attention_heads=28, num_query_groups=2, check_paths=False)
    # 32 prompts x 8 = 256 sequences over dp = 1024 / 4 = 256 ranks: 1 each, not 8 per micro-batch
    with pytest.raises(ConfigError, match="256 sequences does not split into 256 data-parallel ranks x"):
        validate_config(cfg, world_size=1024, check_paths=False)
    cfg.trainer.micro_batch_size = 3
    with pytest.raises(ConfigError, match="micro_batch_size=3"):
        validate_config(cfg, world_size=8, check_paths=False)


def test_path_checks(monkeypatch):
    cfg = load_config(CONFIG_DIR / "qwen2.5-math-7b_grpo.yaml")
    cfg.model.hf_path = str(DATASETS)  # any existing directory stands in for the model here
    validate_config(cfg)
    cfg.eval.files.append("/nope/bench.parquet")
    with pytest.raises(ConfigError, match="eval.files: /nope/bench.parquet does not exist"):
        validate_config(cfg)
    cfg.eval.files.pop()
    cfg.model.hf_path = None
    with pytest.raises(ConfigError, match="model.hf_path is null"):
        validate_config(cfg)


def test_yaml_round_trip_and_hash(tmp_path):
    cfg = load_config(CONFIG_DIR / "qwen2.5-math-7b_steer.yaml")
    again = load_config(CONFIG_DIR / "qwen2.5-math-7b_steer.yaml")
    assert config_hash(cfg) == config_hash(again) and len(config_hash(cfg)) == 64
    assert config_from_yaml(config_to_yaml(cfg)) == cfg
    again.algorithm.steer = dataclasses.replace(again.algorithm.steer, w_min=0.81)  # components are frozen
    assert config_hash(again) != config_hash(cfg)
    path = save_config(cfg, tmp_path / "ckpt")
    assert config_from_yaml(path.read_text()) == cfg
    assert (tmp_path / "ckpt" / "config.sha256").read_text().strip() == config_hash(cfg)
