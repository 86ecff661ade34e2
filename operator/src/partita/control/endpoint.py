"""The operator's one HTTP endpoint (`partita operator --listen HOST:PORT`, the chart's port
`http`): its liveness (`/healthz`), its own metrics (`/metrics`, `partita.control.telemetry`)
and the verified model files stage servers fetch (`/v1/models/<sha256>`,
`partita.control.distribution`), served inside the operator's event loop."""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web

from partita.control import distribution

log = logging.getLogger("partita.endpoint")


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT (an empty host: every interface) -> (host, port); ValueError naming it."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address {address!r} must be HOST:PORT, e.g. 0.0.0.0:8080")
    return host.strip("[]") or "0.0.0.0", int(port)


class Endpoint:
    """`healthy()` says whether the control loop runs (a liveness probe restarts the pod
    when it does not); `exposition()` renders /metrics; `models` serves model files when the
    operator distributes them (a key and where each verified file lies)."""

    def __init__(
        self,
        address: str,
        *,
        healthy: Callable[[], bool],
        exposition: Callable[[], bytes],
        models: tuple[bytes, distribution.Locate] | None = None,
    ) -> None:
        self._host, self._port = parse_address(address)
        self._healthy, self._exposition = healthy, exposition
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/metrics", self._metrics)
        if models is not None:
            distribution.add_routes(app, *models)
        self._runner = web.AppRunner(app, access_log=None)
        self.port = 0

    async def _health(self, _: web.Request) -> web.Response:
        ok = self._healthy()
        return web.json_response({"ok": ok}, status=200 if ok else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self._exposition(), content_type="text/plain", charset="utf-8")

    async def start(self) -> int:
        """Listen; the port (the one picked when the address's port is 0)."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else self._port
        log.info(
            "operator endpoint on %s:%d (/healthz, /metrics, /v1/models)", self._host, self.port
        )
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()
