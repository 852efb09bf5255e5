"""SGLang's own /generate JSON contract, loaded from the sglang wheel by file path.

sglang ships `sglang/api/v1/api_types.py`, generated from its proto schema; its server runs
every /generate body through `GenerateRequest.from_json_value` and answers 400 with the
error text on a violation. The module needs only msgspec, so we load that one file (no
torch/CUDA import of sglang) and validate our client's requests and the CPU server's
responses against the very same decoder.

Fetch it once (pinned version, cached under <repo>/.cache/sglang/, gitignored):
    python -m steer_megatron.rollout.contract --fetch
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

SGLANG_VERSION = "0.5.23"
MEMBER = "sglang/api/v1/api_types.py"
REPO_ROOT = Path(__file__).resolve().parents[2]
# STEER_SGLANG_CONTRACT points at an api_types.py directly (e.g. from an installed sglang).
ENV_PATH = "STEER_SGLANG_CONTRACT"


class ContractUnavailable(RuntimeError):
    """The contract file is not cached and could not be downloaded (offline?)."""


class ContractViolation(ValueError):
    """A request or response does not satisfy SGLang's /generate contract."""


def contract_path(cache_dir: Path | None = None, version: str = SGLANG_VERSION) -> Path:
    if os.environ.get(ENV_PATH):
        return Path(os.environ[ENV_PATH])
    return (cache_dir or REPO_ROOT / ".cache" / "sglang") / version / "api_types.py"


def fetch_contract(cache_dir: Path | None = None, version: str = SGLANG_VERSION, timeout_s: float = 300.0) -> Path:
    """Return the cached api_types.py, downloading sglang==version (no deps) when missing."""
    target = contract_path(cache_dir, version)
    if target.exists():
        return target
    if os.environ.get(ENV_PATH):  # an explicit file is never downloaded over
        raise ContractUnavailable(f"{ENV_PATH}={target} does not exist")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", f"sglang=={version}", "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ContractUnavailable(f"could not run {' '.join(cmd)}: {e}") from e
        wheels = list(Path(tmp).glob("sglang-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ContractUnavailable(
                f"`{' '.join(cmd)}` failed (rc={proc.returncode}): {proc.stderr.strip()[-500:]}; "
                f"without network, put api_types.py at {target} or set {ENV_PATH}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            if MEMBER not in zf.namelist():
                raise ContractUnavailable(f"{wheels[0].name} has no {MEMBER}; pin another sglang version")
            partial = target.with_suffix(".tmp")
            partial.write_bytes(zf.read(MEMBER))
            partial.replace(target)  # atomic: a concurrent reader never sees half a file
    return target


@lru_cache(maxsize=4)
def load_contract(path: str | None = None) -> ModuleType:
    """Import api_types.py by file path (it imports only msgspec and typing)."""
    file = Path(path) if path else contract_path()
    if not file.exists():
        raise ContractUnavailable(f"{file} is missing; run `python -m steer_megatron.rollout.contract --fetch`")
    loader = importlib.machinery.SourceFileLoader("sglang_api_v1_api_types", str(file))  # any file name
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validate_generate_request(body: dict[str, Any], module: ModuleType | None = None) -> Any:
    """Decode a /generate body exactly as SGLang's server does; raise ContractViolation on 400."""
    api = module or load_contract()
    try:
        return api.GenerateRequest.from_json_value(body)
    except api.JsonContractError as e:
        raise ContractViolation(f"/generate request violates SGLang {SGLANG_VERSION}'s contract: {e}") from e


def validate_generate_response(body: Any, module: ModuleType | None = None) -> list[Any]:
    """Decode a /generate response (one object or a list of them) with SGLang's decoder."""
    api = module or load_contract()
    items = body if isinstance(body, list) else [body]
    try:
        return [api.GenerateResponse.from_json_value(item) for item in items]
    except api.JsonContractError as e:
        raise ContractViolation(f"/generate response violates SGLang {SGLANG_VERSION}'s contract: {e}") from e


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fetch", action="store_true", help="download the pinned sglang wheel if not cached")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--strict", action="store_true", help="exit 1 when the file cannot be had (default: warn; tests skip)")
    args = parser.parse_args()
    try:
        path = fetch_contract(args.cache_dir) if args.fetch else contract_path(args.cache_dir)
        load_contract(str(path))
    except ContractUnavailable as e:
        print(f"warning: SGLang contract unavailable, contract tests will skip: {e}", file=sys.stderr)
        sys.exit(1 if args.strict else 0)
    print(path)


if __name__ == "__main__":
    main()
