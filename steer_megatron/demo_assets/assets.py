"""Build (once) and cache the CPU demo's assets: tokenizer + warmed-up tiny Qwen2 + parquets.

The cache directory is keyed by a hash of every parameter that shapes the assets, so
changing demo.* in the config builds a new set and never reuses a stale one. A build is
written to a temporary directory and renamed into place when complete, so a crash never
leaves a half-built set that looks finished.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from steer_megatron.config import DemoConfig, RunConfig
from steer_megatron.demo_assets.model import (
    TinyModelSpec,
    build_tiny_qwen2,
    sampled_accuracy,
    supervised_warmup,
)
from steer_megatron.demo_assets.task import make_splits, write_parquet
from steer_megatron.demo_assets.tokenizer import build_char_tokenizer

log = logging.getLogger(__name__)

# Bump when the build recipe changes in a way the parameters do not capture.
RECIPE_VERSION = 3  # 2: byte-level tokenizer (loads the same through AutoTokenizer); 3: digit sorting
_KEY_FIELDS = ("seed", "num_digits", "n_train", "n_test", "hidden_size", "num_layers",
               "warmup_steps", "warmup_lr", "warmup_batch_size")


@dataclass(frozen=True)
class DemoAssets:
    root: Path
    model_dir: Path  # HF model directory, tokenizer files included
    train_file: Path
    test_file: Path
    report: dict  # accuracy before/after warm-up, timings


def assets_key(demo: DemoConfig) -> str:
    params = {k: getattr(demo, k) for k in _KEY_FIELDS} | {"recipe": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _spec(demo: DemoConfig) -> TinyModelSpec:
    h = demo.hidden_size
    if h % 4:
        raise ValueError(f"demo.hidden_size={h} must be a multiple of 4 (4 attention heads)")
    return TinyModelSpec(hidden_size=h, intermediate_size=3 * h, num_hidden_layers=demo.num_layers)


def build_demo_assets(demo: DemoConfig) -> DemoAssets:
    """The cached assets for `demo`, building them first if needed (about a minute on 2 cores)."""
    root = Path(demo.cache_dir) / assets_key(demo)
    if (root / "report.json").is_file():
        return _assets(root)
    # One thread: the model's matmuls are tiny, and on a shared 2-core machine a second
    # OpenMP thread made the warm-up 5x slower (spin-waiting against other processes).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _build(demo, root)
    finally:
        torch.set_num_threads(threads)
    return _assets(root)


def _build(demo: DemoConfig, root: Path) -> None:
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train, test = make_splits(demo.num_digits, demo.n_train, demo.n_test, demo.seed)
    write_parquet(train, "train", tmp / "train.parquet")
    write_parquet(test, "test", tmp / "test.parquet")
    tok = build_char_tokenizer()
    model = build_tiny_qwen2(tok, _spec(demo), seed=demo.seed)
    acc = lambda: sampled_accuracy(model, tok, test, temperature=1.0, seed=demo.seed)  # noqa: E731
    greedy = lambda: sampled_accuracy(model, tok, test, temperature=0.0)  # noqa: E731
    report = {"test_accuracy_t1_before": acc(), "test_accuracy_greedy_before": greedy()}
    warm = supervised_warmup(model, tok, train, steps=demo.warmup_steps, batch_size=demo.warmup_batch_size,
                             lr=demo.warmup_lr, seed=demo.seed)
    report |= {
        "test_accuracy_t1_after": acc(), "test_accuracy_greedy_after": greedy(),
        "warmup_steps": warm.steps, "warmup_final_loss": warm.final_loss, "warmup_seconds": warm.seconds,
        "params": dataclasses.asdict(demo),
    }
    model_dir = tmp / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    try:
        tmp.rename(root)
    except OSError:  # another process finished the same build first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("demo assets in %s: test accuracy at T=1 %.2f -> %.2f after %d warm-up steps (%.0f s)",
             root, report["test_accuracy_t1_before"], report["test_accuracy_t1_after"], warm.steps, warm.seconds)


def _assets(root: Path) -> DemoAssets:
    return DemoAssets(root=root, model_dir=root / "model", train_file=root / "train.parquet",
                      test_file=root / "test.parquet", report=json.loads((root / "report.json").read_text()))


def apply_demo_assets(cfg: RunConfig) -> DemoAssets | None:
    """With demo.enabled, build/reuse the assets and point the config at them (in place)."""
    if not cfg.demo.enabled:
        return None
    assets = build_demo_assets(cfg.demo)
    cfg.model.hf_path = str(assets.model_dir)
    cfg.model.tokenizer_path = None
    cfg.data.train_files = [str(assets.train_file)]
    if not cfg.eval.files:
        cfg.eval.files = [str(assets.test_file)]
    return assets
