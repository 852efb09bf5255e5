"""Shared bits of the conversion tools (argument parsing helpers, repo import path)."""
from __future__ import annotations

import os
import re
import sys

# `python tools/x.py` from a checkout works without installing the package.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def dtype_arg(value: str) -> str | None:
    return None if value == "auto" else value
