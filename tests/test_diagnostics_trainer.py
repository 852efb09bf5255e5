"""The entropy diagnostics inside the real trainer: the probe's diag/* metrics, the w_min closed
loop's direction and bounds, the in-step trim, resume continuing the same w_min sequence, and
config validation."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from steer_megatron.config import ConfigError, load_config, validate_config
from steer_megatron.parallel import spawn_ranks
from tests.test_trainer import assert_same_metrics, train_worker

# The CPU demo's own model and task at a few sequences per step (demo.* left alone: whatever the
# demo builds, the diagnostics must work on it).
SMALL = ["trainer.rollout_batch_size=8", "trainer.mini_batch_size=4", "trainer.micro_batch_size=4", "rollout.n=4",
         "trainer.save_every=0", "eval.every=0", "logging.tensorboard=false"]

# A band far below any step's entropy change (|dH| ~ 1e-3 on the demo): every step lies above it (too
# little entropy lost), so the controller must raise log w_min by max_step per step, to its ceiling 1,
# and then go on into the LR scale (split range) up to its bound 2. Trims are on, but a band beyond the
# step's change cannot be reached by shrinking the step: they must leave every step alone.
DIAG = ["diagnostics.probe_every=1", "diagnostics.closed_loop.enabled=true", "diagnostics.closed_loop.trims=2",
        "diagnostics.closed_loop.band=[-1.0,-0.5]", "diagnostics.closed_loop.w_min_bounds=[0.3,1.0]",
        "diagnostics.closed_loop.lr_scale_bounds=[0.5,2.0]", "diagnostics.closed_loop.max_step=0.5",
        "algorithm.steer.w_min=0.8"]
STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_cache_root):
    """One closed-loop run checkpointing at steps 2 and 3, and a copy of it resumed from step 2."""
    from steer_megatron.demo_assets.assets import build_demo_assets

    root = tmp_path_factory.mktemp("diag_runs")
    base = SMALL + [f"demo.cache_dir={demo_cache_root}", f"trainer.output_dir={root}", *DIAG,
                    f"trainer.total_steps={STEPS}", "trainer.save_every=2", "trainer.keep_last=2"]
    build_demo_assets(load_config(None, base).demo)
    full = Path(spawn_ranks(train_worker, 1, base + ["trainer.run_name=full"])[0])
    # a copy cut back to step 2 (cheaper than a third run): the held batch file and metrics come along
    shutil.copytree(full, root / "cut")
    (root / "cut" / "run_identity.sha256").unlink()  # the run name is part of a run's identity
    cut = Path(spawn_ranks(train_worker, 1, base + ["trainer.run_name=cut",
                                                    f"trainer.resume={root / 'cut/checkpoints/iter_0000002'}"])[0])
    return full, cut


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_probe_logs_finite_correlations_and_closed_loop_moves_w_min_then_the_lr(runs):
    full, _ = runs
    rows = _rows(full)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        for form in ("release", "paper", "exact"):
            assert math.isfinite(r[f"diag/pearson_{form}"]) and math.isfinite(r[f"diag/spearman_{form}"])
        assert r["diag/tokens"] > 0 and math.isfinite(r["diag/measured_dH_mean"])
        assert r["diag/step_dH"] != 0 and r["diag/in_band"] == 0.0
        assert (r["diag/step_scale"], r["diag/trims"], r["diag/step_dH_raw"]) == (1.0, 0.0, r["diag/step_dH"])
    # the probe measures the same held batch (the run's first rollout batch) every step
    assert len({r["diag/tokens"] for r in rows}) == 1
    # the values each step trained with: w_min 0.8 -> 0.8 e^0.5 = 1.32, past its ceiling, so w_min 1 and
    # LR x 1.32; then LR x 2.17, clipped to 2
    assert [r["diag/w_min"] for r in rows] == pytest.approx([0.8, 1.0, 1.0])
    assert [r["diag/lr_scale"] for r in rows] == pytest.approx([1.0, 0.8 * math.exp(0.5), 2.0])
    assert [r["actor/lr"] for r in rows] == pytest.approx([rows[0]["actor/lr"]] * STEPS)  # the schedule is untouched
    assert (full / "diagnostics" / "probe_batch.pt").is_file()
    meta = json.loads((full / "checkpoints" / "iter_0000003" / "meta.json").read_text())
    assert meta["extra"]["diagnostics"]["controller"] == pytest.approx({"w_min": 1.0, "lr_scale": 2.0})
    assert meta["extra"]["diagnostics"]["probe_batch"]["source_step"] == 0


def test_resume_continues_the_w_min_and_lr_scale_sequence_and_the_probe(runs):
    full, cut = runs
    # same w_min, LR scale, step dH and probe correlations after the restart (the checkpoint at step 2
    # holds LR x 2: a resume that lost it would train step 3 at x 1 and its dH would differ)
    assert_same_metrics(_rows(cut), _rows(full))


TRIM_BAND = (0.0002, 0.001)


@pytest.fixture(scope="module")
def trim_runs(tmp_path_factory, demo_cache_root):
    """The trim with a band of small entropy rises (on this small demo the first steps raise the
    entropy by more than that), and the probe, at PP = 1 and at PP = 2 (two pipeline stages)."""
    from steer_megatron.demo_assets.assets import build_demo_assets

    root = tmp_path_factory.mktemp("trim_runs")
    lo, hi = TRIM_BAND
    args = SMALL + [f"demo.cache_dir={demo_cache_root}", f"trainer.output_dir={root}", "trainer.total_steps=3",
                    "diagnostics.probe_every=1", "diagnostics.closed_loop.enabled=true",
                    f"diagnostics.closed_loop.band=[{lo},{hi}]", "diagnostics.closed_loop.trims=2",
                    "diagnostics.closed_loop.min_step_scale=0.25"]
    build_demo_assets(load_config(None, args).demo)
    pp1 = _rows(Path(spawn_ranks(train_worker, 1, args + ["trainer.run_name=pp1"])[0]))
    pp2 = _rows(Path(spawn_ranks(train_worker, 2, args + ["trainer.run_name=pp2", "parallel.pp=2"])[0]))
    return pp1, pp2


def test_trim_shrinks_steps_that_overshoot_the_band(trim_runs):
    """A step past the band is scaled back and re-measured (the rescaling itself is checked
    against recorded weights in tests/test_step_trim.py); one short of it, or inside it, is left
    alone."""
    rows, _ = trim_runs
    (lo, hi), min_scale = TRIM_BAND, 0.25
    centre, trimmed = (lo + hi) / 2, 0
    for r in rows:
        raw, dh, s, n = r["diag/step_dH_raw"], r["diag/step_dH"], r["diag/step_scale"], r["diag/trims"]
        if lo <= raw <= hi or not 0 < centre < raw:  # inside, or short of the band: nothing to trim
            assert (s, n, dh) == (1.0, 0.0, raw)
            continue
        trimmed += 1
        # at most 2 tries and one pass to go back to the best of them; never further from the band
        miss = lambda x: max(lo - x, x - hi, 0.0)  # noqa: E731
        assert min_scale <= s <= 1 and 1 <= n <= 3 and miss(dh) <= miss(raw) + 1e-6
        assert lo <= dh <= hi or n >= 2 or s == min_scale  # stops once inside, or out of tries
        assert r["diag/in_band"] == float(lo <= dh <= hi)
    assert trimmed >= 1, [(r["diag/step_dH_raw"], r["diag/step_dH"]) for r in rows]


def test_trim_and_probe_give_the_same_numbers_on_two_pipeline_stages(trim_runs):
    """Every stage scales its own weights by the same s, and the change measured on the last
    stage reaches both: the PP = 2 run trims the same steps by the same fractions as PP = 1."""
    pp1, pp2 = trim_runs
    assert [r["step"] for r in pp2] == [r["step"] for r in pp1] == [1, 2, 3]
    for a, b in zip(pp1, pp2):
        # The two layouts reduce in different orders, so their fp32 weights after a step differ by
        # rounding, and each measured change (a difference of two fp32 mean entropies of size H) by
        # a few ulps of H: 64 ulps bounds it with room (about 0.5 ulp is typical).
        ulp_h = torch.finfo(torch.float32).eps * max(a["actor/entropy"], b["actor/entropy"])
        diffs = [abs(b[k] - a[k]) for k in ("diag/step_dH_raw", "diag/step_dH")]
        assert max(diffs) <= 64 * ulp_h, (diffs, ulp_h)
        # The scale is computed from those changes (s = centre / dH on the first interpolation, at most
        # two interpolations): it may move by s * (its inputs' difference / their size) per
        # interpolation, not by a fixed amount.
        noise = max(*diffs, ulp_h)
        s = a["diag/step_scale"]
        tol = 4 * s * noise / min(abs(a["diag/step_dH_raw"]), abs(a["diag/step_dH"]))
        assert abs(b["diag/step_scale"] - s) <= tol, (b["diag/step_scale"], s, tol)
        assert b["diag/trims"] == a["diag/trims"] and b["diag/tokens"] == a["diag/tokens"]
        for form in ("release", "exact"):
            assert b[f"diag/pearson_{form}"] == pytest.approx(a[f"diag/pearson_{form}"], abs=1e-3)
    assert any(r["diag/step_scale"] < 1 for r in pp2)


@pytest.mark.parametrize("overrides, match", [
    (["diagnostics.closed_loop.enabled=true", "algorithm.policy_loss=grpo"], "needs algorithm.policy_loss=steer"),
    (["diagnostics.closed_loop.enabled=true", "diagnostics.closed_loop.band=[0.01,-0.01]"], r"closed_loop.band=.*low < high"),
    (["diagnostics.closed_loop.enabled=true", "diagnostics.closed_loop.w_min_bounds=[0.5,1.5]"], r"w_min_bounds=.*0 < low"),
    (["diagnostics.closed_loop.enabled=true", "diagnostics.closed_loop.w_min_bounds=[0.05,0.5]"],
     r"algorithm.steer.w_min=0.8 .* inside diagnostics.closed_loop.w_min_bounds"),
    (["diagnostics.closed_loop.enabled=true", "diagnostics.closed_loop.gain=0"], "gain=0.0 and max_step"),
    (["diagnostics.closed_loop.enabled=true", "diagnostics.closed_loop.lr_scale_bounds=[0.5,0.9]"],
     r"lr_scale_bounds=\[0.5, 0.9\]: must be \[low, high\] with 0 < low <= 1 <= high"),
    (["diagnostics.closed_loop.enabled=true", "diagnostics.closed_loop.lr_scale_bounds=[0.5]"], r"lr_scale_bounds=\[0.5\]"),
    (["diagnostics.closed_loop.enabled=true", "diagnostics.closed_loop.lr_scale_bounds=[0.25,1.0]",
      "diagnostics.closed_loop.band=[-0.004,0.001]"], r"band's high end must be <= 0; lower it or set lr_scale_bounds"),
    (["diagnostics.closed_loop.enabled=true", "diagnostics.closed_loop.trims=-1"], r"trims=-1 and min_step_scale"),
    (["diagnostics.closed_loop.trims=2"], r"trims=2 trims steps against the closed loop's band: set .*enabled=true"),
    (["diagnostics.closed_loop.enabled=true", "diagnostics.closed_loop.min_step_scale=0"], r"0 < min_step_scale <= 1"),
    (["diagnostics.probe_every=-1"], "diagnostics.probe_every=-1"),
    (["diagnostics.probe_every=2", "algorithm.kl_coef=0.1"], r"probe_every=2 with algorithm.kl_coef=0.1: .* set one of them to 0"),
    (["diagnostics.probe_prompts=999"], "diagnostics.probe_prompts=999"),
])
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_probe_batch_must_split_over_data_parallel_ranks():
    cfg = load_config(None, ["diagnostics.probe_every=5", "diagnostics.probe_prompts=1", "rollout.n=8",
                             "trainer.micro_batch_size=16"])
    with pytest.raises(ConfigError, match=r"diagnostics.probe_prompts=1 .* multiple of 2 prompts"):
        validate_config(cfg, world_size=1, check_paths=False)
    cfg.diagnostics.probe_prompts = 2
    assert validate_config(cfg, world_size=1, check_paths=False) == 1
