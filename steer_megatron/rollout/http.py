"""Blocking JSON-over-HTTP calls for the control plane (fleet, router, weight sync).

The data plane (/generate) is async in client.py; control calls are few and sequential,
and run from threads (the health monitor) as well, so the stdlib is the simpler tool.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence


class HttpError(RuntimeError):
    def __init__(self, url: str, status: int | None, message: str):
        super().__init__(f"{url}: {'HTTP ' + str(status) if status else 'no answer'}: {message}")
        self.url, self.status = url, status


def call(method: str, url: str, body: Any = None, *, timeout: float = 30.0) -> Any:
    """Send JSON, return the decoded JSON answer (or text, or None for an empty body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        raise HttpError(url, e.code, e.read().decode(errors="replace")[:2000]) from e
    except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
        raise HttpError(url, None, f"{type(e).__name__}: {getattr(e, 'reason', e)}") from e
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw.decode(errors="replace")


def is_up(url: str, path: str = "/health", timeout: float = 5.0) -> bool:
    try:
        call("GET", url + path, timeout=timeout)
        return True
    except HttpError:
        return False


def on_all(urls: Sequence[str], fn: Callable[[str], Any]) -> list[Any]:
    """fn(url) for every url in parallel; results in url order, first exception re-raised."""
    if len(urls) <= 1:
        return [fn(u) for u in urls]
    with ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(fn, urls))
