"""kube-proxy's part of the kubelet: Services routed to the local processes behind them.

- one shaping forward proxy per simulated node (pods get it as HTTP_PROXY), routing
  `<svc>.<ns>.svc` through EndpointSlices (`netshape` shapes the bytes like the pools' link);
- one entry listener per port of a data-source Service (clients call it directly): a reverse
  proxy for an HTTP/1 port, a byte forwarder for any other (gRPC's `kubernetes.io/h2c`);
- the `kubernetes` Service: a TCP forwarder from a loopback address of this cluster, port 443,
  to the apiserver, which pods know as `kubernetes.default.svc` and KUBERNETES_SERVICE_HOST.

Endpoints are pods the agent runs, or this machine's address in a selectorless Service's
EndpointSlice (how the test bed publishes its own Prometheus), dialled as 127.0.0.1. Nothing
else is ever dialled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from partita.testbed.errors import TestbedError
from partita.testbed.kubelet.podspec import LocalPorts
from partita.testbed.netshape import (
    Endpoint,
    LinkTable,
    RouteError,
    ShapingForwarder,
    ShapingProxy,
    StateWatcher,
    Target,
)

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
HTTP1_PROTOCOLS = frozenset({"", "http"})  # appProtocol of ports the HTTP proxy understands
STATE_POLL_S = 0.25
T = TypeVar("T")


@dataclass(frozen=True)
class EntryPort:
    """One entry listener: a port of a data-source Service, called from its `pool`; `raw`
    ports (not HTTP/1, e.g. gRPC's `kubernetes.io/h2c`) are carried as bytes."""

    namespace: str
    service: str
    port: int
    pool: str
    raw: bool

    def address(self, local_port: int) -> str:
        """What a client dials: an HTTP base URL, or host:port (a gRPC target) for bytes."""
        return f"127.0.0.1:{local_port}" if self.raw else f"http://127.0.0.1:{local_port}"


def entry_ports(key: str, svc: Mapping[str, Any], pool: str) -> dict[str, EntryPort]:
    """Every port of the data-source Service `key` (namespace/name), by services.json key: the
    first HTTP/1 port as `key` itself, each other port as `key:<port name or number>`."""
    ns, name = key.split("/", 1)
    out: dict[str, EntryPort] = {}
    for p in (svc.get("spec") or {}).get("ports") or []:
        raw = str(p.get("appProtocol") or "").lower() not in HTTP1_PROTOCOLS
        entry = EntryPort(ns, name, int(p["port"]), pool, raw)
        out[key if not raw and key not in out else f"{key}:{p.get('name') or p['port']}"] = entry
    return out


@dataclass(frozen=True)
class LocalPod:
    """A pod the agent runs, as routing sees it: where its container ports listen here."""

    key: str  # namespace/name
    node: str
    pool: str
    ports: LocalPorts

    def endpoint(self, container_port: int | str | None) -> Endpoint:
        return Endpoint(self.key, self.ports.local(container_port), self.node, self.pool)


def endpoints_for(
    target: Target,
    services: Mapping[str, Mapping[str, Any]],
    slices: Mapping[str, Mapping[str, Any]],
    pods: Mapping[str, LocalPod],
    host_ips: frozenset[str],
) -> list[Endpoint]:
    """The ready endpoints of the target's Service port, as kube-proxy finds them: its
    EndpointSlices' pods that run here (`pods`: namespace/name -> local pod), each at the local
    port of the containerPort the slice gives for that Service port (or, without one, of the
    port's `targetPort`, by name or number), and addresses of this machine (`host_ips`, a
    Service of the test bed's own processes) as loopback. RouteError when the Service or its
    port does not exist."""
    svc = services.get(f"{target.namespace}/{target.service}")
    if svc is None:
        raise RouteError(502, f"no Service {target.namespace}/{target.service}")
    ports = (svc.get("spec") or {}).get("ports") or []
    port = next((p for p in ports if p.get("port") == target.port), None)
    if port is None:
        known = ", ".join(str(p.get("port")) for p in ports) or "none"
        raise RouteError(
            502,
            f"Service {target.namespace}/{target.service} has no port {target.port} "
            f"(ports: {known})",
        )
    target_port = port.get("targetPort", port.get("port"))
    out: list[Endpoint] = []
    for sl in slices.values():
        meta = sl["metadata"]
        if meta.get("namespace") != target.namespace:
            continue
        if (meta.get("labels") or {}).get(SERVICE_NAME_LABEL) != target.service:
            continue
        slice_port = next(
            (p.get("port") for p in sl.get("ports") or [] if p.get("name") == port.get("name")),
            None,
        )
        for ep in sl.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") is False:
                continue
            ref = ep.get("targetRef") or {}
            found: Endpoint | None = None
            if ref.get("kind") == "Pod":
                pod = pods.get(f"{ref.get('namespace', target.namespace)}/{ref.get('name')}")
                if pod is not None:
                    wanted = slice_port if slice_port is not None else target_port
                    found = pod.endpoint(wanted)
            elif slice_port is not None and set(ep.get("addresses") or ()) & host_ips:
                key = f"{target.namespace}/{target.service}"
                found = Endpoint(key, int(slice_port), "", "")
            if found is not None and found not in out:
                out.append(found)
    return out


class ServiceProxy:
    """The asyncio side: node proxies, entry listeners, the `kubernetes` Service forwarder and
    the simulator state watcher, all in one event loop thread."""

    def __init__(self, state_file: Path, resolver: Callable[[Target], list[Endpoint]]) -> None:
        self.links = LinkTable()
        self.watcher = StateWatcher(state_file, self.links)
        self.resolver = resolver
        self.loop = asyncio.new_event_loop()
        self.node_proxies: dict[str, ShapingProxy] = {}
        self.entries: dict[str, tuple[EntryPort, ShapingProxy | ShapingForwarder]] = {}
        self._servers: list[asyncio.Server] = []
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="service-proxy", daemon=True)
        self._started = threading.Event()

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(10):
            raise TestbedError("the agent's service proxy did not start within 10 s")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        self.watcher.poll()
        self._started.set()
        while not self._stopping.is_set():
            self.watcher.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), STATE_POLL_S)
        for proxy in [*self.node_proxies.values(), *(e[1] for e in self.entries.values())]:
            await proxy.close()
        for server in self._servers:
            server.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def add_node_proxy(self, node: str, pool: str) -> int:
        proxy = ShapingProxy(f"proxy/{node}", pool, self.resolver, self.links)
        self.node_proxies[node] = proxy
        return await proxy.start()

    async def forward(self, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        """Bytes to `listen` go to `upstream` unchanged (TLS passes through end to end)."""

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(*upstream)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        self._servers.append(await asyncio.start_server(on_client, *listen))

    async def set_entries(
        self, desired: Mapping[str, EntryPort], preferred: Mapping[str, int]
    ) -> dict[str, int]:
        """Entry listeners for exactly `desired` (services.json key -> port); keep ports."""
        for key in list(self.entries):
            spec, listener = self.entries[key]
            if desired.get(key) != spec:
                await listener.close()
                del self.entries[key]
        for key, spec in desired.items():
            if key in self.entries:
                continue
            kind = ShapingForwarder if spec.raw else ShapingProxy
            listener = kind(
                f"entry/{key}",
                spec.pool,
                self.resolver,
                self.links,
                service=(spec.namespace, spec.service, spec.port),
            )
            try:
                await listener.start(preferred.get(key, 0))
            except OSError:
                await listener.start(0)
            self.entries[key] = (spec, listener)
        return {k: e[1].port for k, e in self.entries.items()}

    def stop(self) -> None:
        if self._stopping is not None:
            self.loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)
