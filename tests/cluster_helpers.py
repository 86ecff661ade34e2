"""Helpers for tests against the local cluster (a plain module: tests import it by name,
tests/ being on sys.path through its conftest)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any


def eventually(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not seen within {timeout} s (last: {last!r})")


def get_json(cluster: Any, *args: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)
