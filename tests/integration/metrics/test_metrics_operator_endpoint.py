"""The operator's HTTP endpoint over a real socket: /metrics in Prometheus's text format,
/healthz following the control loop, and nothing left listening once it stops."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from partita.control.endpoint import Endpoint, parse_address
from partita.control.outcome import Outcome
from partita.control.telemetry import Telemetry


def test_metrics_and_health_are_served_and_the_port_is_released() -> None:
    t = Telemetry()
    t.reconciled("DevicePool", "pool", Outcome())
    healthy = [True]

    async def scenario() -> int:
        endpoint = Endpoint("127.0.0.1:0", healthy=lambda: healthy[0], exposition=t.exposition)
        port = await endpoint.start()
        try:
            async with httpx.AsyncClient(trust_env=False) as client:
                r = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/plain")
                names = {f.name for f in text_string_to_metric_families(r.text)}
                want = {"partita_reconciles", "partita_metrics_fresh", "partita_planning_seconds"}
                assert want <= names
                assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
                healthy[0] = False  # the loop stopped or hangs: the liveness probe restarts it
                assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 503
                missing = await client.get(f"http://127.0.0.1:{port}/v1/models/{'0' * 64}")
                assert missing.status_code == 404  # no distribution without a key
        finally:
            await endpoint.stop()
        return port

    port = asyncio.run(scenario())
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


@pytest.mark.parametrize("bad", ["8080", "host:", "h:99999", "h:port"])
def test_an_address_names_what_is_wrong(bad: str) -> None:
    with pytest.raises(ValueError, match="must be HOST:PORT"):
        parse_address(bad)
    assert parse_address(":8080") == ("0.0.0.0", 8080)
