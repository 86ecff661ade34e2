"""The operator's /metrics over a real socket: what Prometheus scrapes, in its text format,
and nothing left listening once the operator stops."""

from __future__ import annotations

import socket

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from partita.control.outcome import Outcome
from partita.control.telemetry import Telemetry


def test_metrics_are_served_and_the_port_is_released() -> None:
    t = Telemetry()
    t.reconciled("DevicePool", "pool", Outcome())
    port = t.serve("127.0.0.1:0")
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(r.text)}
        assert {"partita_reconciles", "partita_metrics_fresh", "partita_planning_seconds"} <= names
    finally:
        t.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
