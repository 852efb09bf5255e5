"""Load a script from tools/ as a module, so tests call the same functions users run."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_tool(name: str):
    """tools/<name>.py as a module (the tools put the repo on sys.path through tools/_common.py)."""
    tools = Path(__file__).resolve().parents[1] / "tools"
    sys.path.insert(0, str(tools))
    try:
        spec = importlib.util.spec_from_file_location(name, tools / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(tools))
    return mod
