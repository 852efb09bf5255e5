"""Reference implementations from the `verl` wheel on PyPI, loaded at test time (never copied).

verl 0.9.1 holds the public reference code of vanilla PPO, GSPO, CISPO, KL-Cov, Clip-Cov
(`verl/trainer/ppo/core_algos.py`), its rollout correction (`rollout_corr_helper.py`) and the
DAPO scorer (`verl/utils/reward_score/math_dapo.py`). Importing `verl` itself pulls ray and
tensordict and pins transformers < 5.11, so this shim does not import the package: it downloads
the wheel once (`pip download --no-deps`, cached in `.cache/ref_wheels/`), unpacks it, and loads
the few files the tests need by path, after putting minimal stand-ins into `sys.modules` for the
names those files import at top level:

  verl.utils.device          get_device_name / get_torch_device (CPU answers)
  verl.utils                 as_torch_index, group_mean_std (advantage helpers the tests never call)
  verl.utils.import_utils    deprecated (a pass-through decorator)
  verl.trainer.config, verl.trainer.config.algorithm, verl.workers.config, .actor, verl.protocol
                             empty config / data classes (type names for annotations and isinstance)
  tensordict                 only when it is not installed, and only while torch_functional loads

`verl.utils.torch_functional` is the wheel's own file (masked_mean / masked_sum / masked_whiten),
so the reference arithmetic is all verl's. Tests call `load()` and skip with the reason when the
package index cannot be reached.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest

VERL_VERSION = "0.9.1"
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "ref_wheels"


def _wheel() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(f"verl-{VERL_VERSION}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(CACHE),
           f"verl=={VERL_VERSION}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    found = sorted(CACHE.glob(f"verl-{VERL_VERSION}-*.whl"))
    if res.returncode or not found:
        pytest.skip(f"verl=={VERL_VERSION} wheel not available (package index unreachable?): {res.stderr.strip()[-300:]}")
    return found[0]


def _module(name: str, **attrs) -> types.ModuleType:
    mod = sys.modules.get(name) or types.ModuleType(name)
    mod.__path__ = getattr(mod, "__path__", [])  # a package, so submodules resolve
    for k, v in attrs.items():
        setattr(mod, k, v)
    sys.modules[name] = mod
    return mod


class _AttrConfig:
    """Stand-in for verl's config dataclasses: attributes plus dict-style .get()."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def get(self, key, default=None):
        return self.__dict__.get(key, default)


@dataclass
class _DataProto:
    tensors: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, tensors):
        return cls(tensors)


def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@lru_cache(maxsize=1)
def _root() -> Path:
    root = CACHE / f"verl-{VERL_VERSION}"
    if not (root / "verl" / "trainer" / "ppo" / "core_algos.py").is_file():
        with zipfile.ZipFile(_wheel()) as z:
            z.extractall(root)
    return root


@lru_cache(maxsize=1)
def load() -> types.SimpleNamespace:
    """(core_algos, rollout_corr, math_dapo, ActorConfig) from the verl wheel."""
    root = _root() / "verl"
    stub_tensordict = False
    if "tensordict" not in sys.modules:
        try:
            import tensordict  # noqa: F401
        except ImportError:
            _module("tensordict", TensorDict=type("TensorDict", (), {}))
            stub_tensordict = True
    import torch

    _module("verl")
    _module("verl.utils", as_torch_index=None, group_mean_std=None)
    _module("verl.utils.device", get_device_name=lambda: "cpu", get_torch_device=lambda: torch.cpu)
    _module("verl.utils.import_utils", deprecated=lambda *a, **k: (lambda fn: fn))
    actor_config = type("ActorConfig", (_AttrConfig,), {})
    _module("verl.trainer")
    _module("verl.trainer.config", AlgoConfig=type("AlgoConfig", (_AttrConfig,), {}))
    _module("verl.trainer.config.algorithm", RolloutCorrectionConfig=type("RolloutCorrectionConfig", (_AttrConfig,), {}))
    _module("verl.workers")
    _module("verl.workers.config", ActorConfig=actor_config)
    _module("verl.workers.config.actor", PolicyLossConfig=type("PolicyLossConfig", (_AttrConfig,), {}))
    _module("verl.protocol", DataProto=_DataProto)
    _module("verl.trainer.ppo")
    verl_f = _load_file("verl.utils.torch_functional", root / "utils" / "torch_functional.py")
    if stub_tensordict:  # only torch_functional needed the name; other libraries must not see a fake package
        del sys.modules["tensordict"]
    sys.modules["verl.utils"].torch_functional = verl_f
    core = _load_file("verl.trainer.ppo.core_algos", root / "trainer" / "ppo" / "core_algos.py")
    corr = _load_file("verl.trainer.ppo.rollout_corr_helper", root / "trainer" / "ppo" / "rollout_corr_helper.py")
    dapo = _load_file("verl_ref_math_dapo", root / "utils" / "reward_score" / "math_dapo.py")
    return types.SimpleNamespace(core_algos=core, rollout_corr=corr, math_dapo=dapo, ActorConfig=actor_config,
                                 torch_functional=verl_f)


def actor_config(**kw):
    """A verl ActorConfig stand-in with the attributes the policy-loss functions read."""
    base = dict(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0, global_batch_info={})
    base.update(kw)
    return load().ActorConfig(**base)
