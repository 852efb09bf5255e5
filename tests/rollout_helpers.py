"""Shared helpers of the rollout tests (plain functions; each test module wraps them in
fixtures, and the on-disk cache under the session's base temp dir shares the work)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures_models import build_tiny_qwen2


def tiny_model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.getbasetemp() / "tiny_qwen2"
    if not (out / "config.json").exists():
        build_tiny_qwen2(out)
    return out


def contract_or_skip():
    """SGLang's api_types.py module, or skip with the reason (offline and not cached)."""
    from steer_megatron.rollout.contract import ContractUnavailable, fetch_contract, load_contract

    try:
        return load_contract(str(fetch_contract()))
    except ContractUnavailable as e:
        pytest.skip(f"SGLang contract unavailable: {e}")
