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


def holds_for(check: Callable[[], Any], seconds: float, what: str, interval: float = 1.0) -> Any:
    """Poll `check` for `seconds` (an observation window, not a wait for something to happen);
    fail naming `what` as soon as it is falsy. Returns the last value."""
    deadline = time.monotonic() + seconds
    last = check()
    while time.monotonic() < deadline:
        if not last:
            raise AssertionError(f"{what} stopped holding (last: {last!r})")
        time.sleep(interval)
        last = check()
    if not last:
        raise AssertionError(f"{what} stopped holding (last: {last!r})")
    return last


def settles(value: Callable[[], Any], quiet_s: float, timeout: float, what: str) -> Any:
    """Poll `value` until it has not changed for `quiet_s` seconds; return it. Fail naming
    `what` when it keeps changing past `timeout`."""
    deadline = time.monotonic() + timeout
    last, since = value(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return last
    raise AssertionError(f"{what}: still changing after {timeout} s (last: {last!r})")
