"""The test bed's data plane between simulated nodes: an HTTP forward proxy per node (what
kube-proxy and the wire are on a real cluster) that routes `<svc>.<ns>.svc` to the local process
of a ready endpoint and shapes every exchange like the link between the two nodes' pools, and
entry listeners: the same as a reverse proxy for one HTTP Service port, or a byte forwarder
(`ShapingForwarder`) for a port that is not HTTP/1, such as gRPC's.

Shaping follows the simulator state (the same file the metrics simulator reports from), so a
link the operator *sees* at 2 Mbit/s also *carries* 2 Mbit/s:
- bandwidth: one `LinkPacer` per directed pool link, shared by every connection on that link;
  bytes are forwarded in chunks, each released when the link would have finished sending it;
- latency: half the RTT before a request is forwarded and half before its response is.

Traffic only ever goes to 127.0.0.1; Kubernetes pod IPs are never dialled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from partita.testbed import simstate
from partita.testbed.errors import TestbedError

log = logging.getLogger(__name__)

CHUNK = 16 * 1024
MAX_HEAD = 64 * 1024
CONNECT_TIMEOUT_S = 2.0
# How much link time an idle link may lend (see LinkPacer).
BURST_S = 0.005
# Sleeps shorter than this are skipped; the pacer's debt carries over, so nothing is lost.
MIN_SLEEP_S = 0.0005
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "upgrade",
    }
)
SERVICE_SUFFIXES = (".svc.cluster.local", ".svc")


class RouteError(TestbedError):
    """A request the proxy cannot route; answered with `status` and a v2 `{"error": ...}` body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---- shaping arithmetic (pure) ---------------------------------------------------------------


class LinkPacer:
    """A token bucket in virtual-time form: the link is busy until `busy_until`; sending n bytes
    extends that by n*8/rate, and the sender waits until its bytes are through.

    The bucket holds at most `burst_s` of the rate: enough to absorb a sender's sleep overshoot
    (without it every late wake-up would be lost link time), small enough that a 16 KiB tensor
    on an idle 2 Mbit/s link still takes about 65 ms, as on a real link. Concurrent senders
    queue behind each other, so they share the rate."""

    def __init__(self, bandwidth_bps: float, burst_s: float = BURST_S) -> None:
        self.bandwidth_bps = bandwidth_bps
        self.burst_s = burst_s
        self.busy_until = 0.0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int, now: float) -> float:
        """Seconds the caller must wait before the `nbytes` count as delivered (may be <= 0)."""
        with self._lock:
            start = max(now - self.burst_s, self.busy_until)
            self.busy_until = start + nbytes * 8.0 / self.bandwidth_bps
            return self.busy_until - now


@dataclass(frozen=True)
class Shaping:
    """What one direction of an exchange costs: half the RTT once, and the link's pacer."""

    one_way_delay_s: float
    pacer: LinkPacer | None

    def transfer_time(self, nbytes: int) -> float:
        """Ideal time for `nbytes` on an idle link (what the shaper aims for)."""
        wire = nbytes * 8.0 / self.pacer.bandwidth_bps if self.pacer else 0.0
        return self.one_way_delay_s + wire


UNSHAPED = Shaping(0.0, None)


class LinkTable:
    """Directed pool-to-pool links from the simulator state, with one pacer per link that
    survives reloads (a rate change applies to bytes sent after it)."""

    def __init__(self, links: Iterable[simstate.LinkState] = ()) -> None:
        self._lock = threading.Lock()
        self._links: dict[tuple[str, str], simstate.LinkState] = {}
        self._pacers: dict[tuple[str, str], LinkPacer] = {}
        self.update(links)

    def update(self, links: Iterable[simstate.LinkState]) -> None:
        with self._lock:
            self._links = {(lk.source, lk.target): lk for lk in links}
            for key, pacer in self._pacers.items():
                if key in self._links:
                    pacer.bandwidth_bps = self._links[key].bandwidth_bps

    def shaping(self, source_pool: str, target_pool: str) -> Shaping:
        """The link's shaping; the same pool without its own link is not shaped."""
        key = (source_pool, target_pool)
        with self._lock:
            link = self._links.get(key)
            if link is None:
                return UNSHAPED
            pacer = self._pacers.get(key)
            if pacer is None:
                pacer = self._pacers[key] = LinkPacer(link.bandwidth_bps)
            return Shaping(link.rtt_s / 2.0, pacer if link.bandwidth_bps > 0 else None)


class StateWatcher:
    """Re-reads the simulator state file when its (inode, mtime, size) changes; writers replace
    the file atomically, so a changed stat means a whole new state."""

    def __init__(self, path: Path, table: LinkTable) -> None:
        self.path = path
        self.table = table
        self._seen: tuple[int, int, int] | None = None
        self.state: simstate.SimState | None = None

    def poll(self) -> bool:
        """Reload if changed; True when the table was updated."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._seen:
            return False
        try:
            state = simstate.load(self.path)
        except TestbedError as exc:
            log.warning("keeping the previous link shaping: %s", exc)
            return False
        self._seen = key
        self.state = state
        self.table.update(state.links)
        return True


# ---- HTTP/1.1 framing (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """A request or response head: start line and headers in their original order."""

    start: str
    headers: tuple[tuple[str, str], ...]

    def get(self, name: str) -> str | None:
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None

    def tokens(self, name: str) -> set[str]:
        lname = name.lower()
        return {
            t.strip().lower()
            for k, v in self.headers
            if k.lower() == lname
            for t in v.split(",")
            if t.strip()
        }


def parse_head(raw: bytes) -> Head:
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes any byte
        raise RouteError(400, f"undecodable HTTP head: {exc}") from None
    lines = text.split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise RouteError(400, f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return Head(lines[0], tuple(headers))


def render_head(start: str, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [start, *(f"{k}: {v}" for k, v in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


@dataclass(frozen=True)
class Framing:
    """How a message body ends: `length` bytes, chunked, at connection close, or no body."""

    kind: str  # "none" | "length" | "chunked" | "close"
    length: int = 0


NO_BODY = Framing("none")


def request_framing(head: Head) -> Framing:
    if "chunked" in head.tokens("transfer-encoding"):
        return Framing("chunked")
    length = head.get("content-length")
    if length is None:
        return NO_BODY
    try:
        n = int(length)
    except ValueError:
        raise RouteError(400, f"bad Content-Length {length!r}") from None
    if n < 0:
        raise RouteError(400, f"bad Content-Length {length!r}")
    return Framing("length", n) if n else NO_BODY


def response_framing(head: Head, request_method: str) -> Framing:
    parts = head.start.split(" ", 2)
    try:
        status = int(parts[1])
    except (IndexError, ValueError):
        raise RouteError(502, f"upstream sent a bad status line {head.start[:80]!r}") from None
    if request_method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return NO_BODY
    if "chunked" in head.tokens("transfer-encoding"):
        return Framing("chunked")
    length = head.get("content-length")
    if length is None:
        return Framing("close")
    try:
        n = int(length)
    except ValueError:
        raise RouteError(502, f"upstream sent a bad Content-Length {length!r}") from None
    return Framing("length", n) if n else NO_BODY


@dataclass(frozen=True)
class Target:
    """Where a request is going: a Service by namespace, name and port, and the path."""

    namespace: str
    service: str
    port: int
    path: str


def service_of_host(host: str) -> tuple[str, str] | None:
    """`svc.ns.svc` or `svc.ns.svc.cluster.local` -> (ns, svc); anything else -> None."""
    name = host.lower().rstrip(".")
    for suffix in SERVICE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        return None
    parts = name.split(".")
    if len(parts) != 2 or not all(parts):
        return None
    return parts[1], parts[0]


def split_host_port(authority: str, default_port: int) -> tuple[str, int]:
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit():
        return authority, default_port
    return host, int(port)


def parse_target(method: str, target: str, host_header: str | None) -> Target:
    """The Service a forward-proxy request is for: absolute-form (`http://svc.ns.svc:8000/p`),
    or origin-form with a service Host header."""
    if method == "CONNECT":
        raise RouteError(405, "CONNECT is not supported: stage traffic is plain HTTP")
    if target.startswith("http://"):
        rest = target[len("http://") :]
        authority, slash, path = rest.partition("/")
        path = slash + path if slash else "/"
    elif target.startswith("https://"):
        raise RouteError(400, f"{target[:80]}: https is not proxied, stage traffic is plain HTTP")
    else:
        authority, path = host_header or "", target
    host, port = split_host_port(authority, 80)
    svc = service_of_host(host)
    if svc is None:
        raise RouteError(
            502,
            f"{host!r} is not a Service host; use http://<service>.<namespace>.svc:<port>",
        )
    return Target(svc[0], svc[1], port, path or "/")


def forward_headers(head: Head) -> list[tuple[str, str]]:
    """The request's headers minus hop-by-hop ones (and those its Connection header names)."""
    drop = HOP_BY_HOP | head.tokens("connection")
    return [(k, v) for k, v in head.headers if k.lower() not in drop]


def wants_close(head: Head, version: str) -> bool:
    conn = head.tokens("connection") | head.tokens("proxy-connection")
    if version == "HTTP/1.0":
        return "keep-alive" not in conn
    return "close" in conn


def error_response(status: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    reason = {400: "Bad Request", 405: "Method Not Allowed", 502: "Bad Gateway"}.get(
        status, "Service Unavailable"
    )
    return (
        render_head(
            f"HTTP/1.1 {status} {reason}",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ],
        )
        + body
    )


# ---- the proxy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A ready endpoint of a Service: a local process's port, on a simulated node (or on none:
    the test bed's own processes, such as Prometheus, are in no pool and never shaped)."""

    key: str  # namespace/pod, or namespace/service for one of the test bed's processes
    port: int  # on 127.0.0.1
    node: str
    pool: str


Resolver = Callable[[Target], list[Endpoint]]


class _Upstream:
    def __init__(
        self, endpoint: Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.endpoint, self.reader, self.writer = endpoint, reader, writer

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class _Listener:
    """A loopback listener that keeps its connections' tasks, so closing it ends them; each
    connection goes to `_serve` and is closed when that returns."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> int:
        self._server = await asyncio.start_server(self._on_client, host, port, limit=MAX_HEAD)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            writer.close()
            self._conns.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class ShapingProxy(_Listener):
    """One listener: a forward proxy for a simulated node (`service` None: route by the request's
    host) or an entry reverse proxy for one Service (clients call it directly). Connections are
    kept alive; each stays on its endpoint while that endpoint is ready (as kube-proxy keeps a
    TCP connection on one backend), and a new endpoint is picked round-robin otherwise."""

    def __init__(
        self,
        name: str,
        source_pool: str,
        resolver: Resolver,
        links: LinkTable,
        *,
        service: tuple[str, str, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name, self.source_pool, self.service = name, source_pool, service
        self._resolver, self._links, self._clock = resolver, links, clock
        self._rr: dict[tuple[str, str, int], int] = {}
        super().__init__()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: _Upstream | None = None
        try:
            while True:
                raw = await _read_head(reader)
                if raw is None:
                    break
                try:
                    upstream, keep = await self._exchange(raw, reader, writer, upstream)
                except RouteError as exc:
                    log.info("%s: %s", self.name, exc)
                    with contextlib.suppress(ConnectionError):
                        writer.write(error_response(exc.status, str(exc)))
                        await writer.drain()
                    break
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # closing the listener; end quietly (asyncio logs a cancelled handler task)
        finally:
            if upstream is not None:
                upstream.close()

    def _target(self, head: Head) -> tuple[str, Target]:
        parts = head.start.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise RouteError(400, f"malformed request line {head.start[:80]!r}")
        method, target, _ = parts
        if self.service is not None:
            ns, svc, port = self.service
            return method, Target(ns, svc, port, target if target.startswith("/") else "/")
        return method, parse_target(method, target, head.get("host"))

    async def _exchange(
        self,
        raw: bytes,
        creader: asyncio.StreamReader,
        cwriter: asyncio.StreamWriter,
        upstream: _Upstream | None,
    ) -> tuple[_Upstream | None, bool]:
        received = self._clock()  # the propagation delay counts from here, not after routing
        head = parse_head(raw)
        method, target = self._target(head)
        version = head.start.rsplit(" ", 1)[1]
        framing = request_framing(head)
        endpoints = self._resolver(target)
        if not endpoints:
            raise RouteError(
                503, f"Service {target.namespace}/{target.service} has no ready endpoints"
            )
        if upstream is not None and (upstream.endpoint not in endpoints or not upstream.usable()):
            upstream.close()
            upstream = None
        if upstream is None:
            upstream = await self._connect(target, endpoints)
        ep = upstream.endpoint
        out = self._links.shaping(self.source_pool, ep.pool)
        back = self._links.shaping(ep.pool, self.source_pool)
        headers = forward_headers(head)
        request_head = render_head(f"{method} {target.path} {version}", headers)
        try:
            await self._delay(received + out.one_way_delay_s - self._clock())
            await self._send(upstream.writer, request_head, out)
            await _copy_body(creader, framing, self._sender(upstream.writer, out))
            resp_raw = await _read_head(upstream.reader)
            while resp_raw is not None and resp_raw[9:10] == b"1":
                cwriter.write(resp_raw)  # 100 Continue and friends pass through unshaped
                resp_raw = await _read_head(upstream.reader)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            upstream.close()
            raise RouteError(502, f"{ep.key} (port {ep.port}) dropped the request: {exc}") from None
        if resp_raw is None:
            upstream.close()
            raise RouteError(502, f"{ep.key} (port {ep.port}) closed without answering")
        answered = self._clock()
        resp = parse_head(resp_raw)
        rframing = response_framing(resp, method)
        await self._delay(answered + back.one_way_delay_s - self._clock())
        await self._send(cwriter, resp_raw, back)
        await _copy_body(upstream.reader, rframing, self._sender(cwriter, back))
        upstream_close = rframing.kind == "close" or "close" in resp.tokens("connection")
        if upstream_close:
            upstream.close()
            return None, False
        return upstream, not wants_close(head, version)

    async def _connect(self, target: Target, endpoints: list[Endpoint]) -> _Upstream:
        key = (target.namespace, target.service, target.port)
        start = self._rr.get(key, 0)
        self._rr[key] = start + 1
        failures = []
        for i in range(len(endpoints)):
            ep = endpoints[(start + i) % len(endpoints)]
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", ep.port, limit=MAX_HEAD),
                    CONNECT_TIMEOUT_S,
                )
            except (OSError, TimeoutError) as exc:
                failures.append(f"{ep.key}: {exc}")
                continue
            return _Upstream(ep, reader, writer)
        raise RouteError(
            502,
            f"Service {target.namespace}/{target.service}: no endpoint accepted a connection "
            f"({'; '.join(failures)})",
        )

    async def _delay(self, seconds: float) -> None:
        await _pause(seconds)

    def _sender(
        self, writer: asyncio.StreamWriter, shaping: Shaping
    ) -> Callable[[bytes], Awaitable[None]]:
        async def send(data: bytes) -> None:
            await self._send(writer, data, shaping)

        return send

    async def _send(self, writer: asyncio.StreamWriter, data: bytes, shaping: Shaping) -> None:
        await _paced_write(writer, data, shaping, self._clock)


class ShapingForwarder(_Listener):
    """One entry listener for a Service port that is not HTTP/1 (gRPC's cleartext HTTP/2,
    `appProtocol: kubernetes.io/h2c`): bytes, not messages. Each connection goes to one ready
    endpoint, picked round-robin when it opens (kube-proxy balances per connection, so a gRPC
    channel stays on one backend), and each direction is shaped like the link between
    `source_pool` and the endpoint's pool: every chunk is released half the RTT after it
    arrived, paced by the link's shared pacer."""

    QUEUED_CHUNKS = 64  # per direction: back-pressure once this much is in flight

    def __init__(
        self,
        name: str,
        source_pool: str,
        resolver: Resolver,
        links: LinkTable,
        *,
        service: tuple[str, str, int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name, self.source_pool, self.service = name, source_pool, service
        self._resolver, self._links, self._clock = resolver, links, clock
        self._rr = 0
        super().__init__()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            ep, up_reader, upstream = await self._connect()
            await asyncio.gather(
                self._pipe(reader, upstream, self.source_pool, ep.pool),
                self._pipe(up_reader, writer, ep.pool, self.source_pool),
            )
        except RouteError as exc:
            log.info("%s: %s", self.name, exc)  # the client sees the connection closed
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if upstream is not None:
                upstream.close()

    async def _connect(self) -> tuple[Endpoint, asyncio.StreamReader, asyncio.StreamWriter]:
        ns, svc, port = self.service
        endpoints = self._resolver(Target(ns, svc, port, ""))
        if not endpoints:
            raise RouteError(503, f"Service {ns}/{svc} port {port} has no ready endpoints")
        start, self._rr = self._rr, self._rr + 1
        failures = []
        for i in range(len(endpoints)):
            ep = endpoints[(start + i) % len(endpoints)]
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", ep.port), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError) as exc:
                failures.append(f"{ep.key}: {exc}")
                continue
            return ep, reader, writer
        raise RouteError(
            502, f"Service {ns}/{svc} port {port}: no endpoint accepted ({'; '.join(failures)})"
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        source_pool: str,
        target_pool: str,
    ) -> None:
        """Copy one direction until its end of stream, then half-close the other side. The
        link is looked up per chunk, so a changed RTT or rate applies to open connections."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(self.QUEUED_CHUNKS)

        async def receive() -> None:
            with contextlib.suppress(ConnectionError):  # a reset ends it as an end of stream
                while data := await reader.read(CHUNK):
                    await queue.put((self._clock(), data))
            await queue.put(None)

        receiving = asyncio.ensure_future(receive())
        try:
            while (item := await queue.get()) is not None:
                received, data = item
                shaping = self._links.shaping(source_pool, target_pool)
                await _pause(received + shaping.one_way_delay_s - self._clock())
                await _paced_write(writer, data, shaping, self._clock)
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
        finally:
            receiving.cancel()


async def _pause(seconds: float) -> None:
    if seconds > MIN_SLEEP_S:
        await asyncio.sleep(seconds)


async def _paced_write(
    writer: asyncio.StreamWriter, data: bytes, shaping: Shaping, clock: Callable[[], float]
) -> None:
    """Write `data` in chunks, each once the link's pacer says the previous are through."""
    for i in range(0, len(data), CHUNK):
        chunk = data[i : i + CHUNK]
        if shaping.pacer is not None:
            await _pause(shaping.pacer.reserve(len(chunk), clock()))
        writer.write(chunk)
        await writer.drain()


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The next message head, or None at a clean end of stream between messages."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise
    except asyncio.LimitOverrunError:
        raise RouteError(400, f"HTTP head longer than {MAX_HEAD} bytes") from None


async def _copy_body(
    reader: asyncio.StreamReader, framing: Framing, out: Callable[[bytes], Awaitable[None]]
) -> None:
    """Forward one body byte for byte (chunk framing included) through `out`."""
    if framing.kind == "none":
        return
    if framing.kind == "length":
        left = framing.length
        while left:
            data = await reader.read(min(CHUNK, left))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            await out(data)
        return
    if framing.kind == "close":
        while data := await reader.read(CHUNK):
            await out(data)
        return
    while True:  # chunked
        line = await reader.readuntil(b"\r\n")
        await out(line)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise RouteError(400, f"bad chunk size line {line[:40]!r}") from None
        if size == 0:
            while True:  # trailers, then the empty line
                trailer = await reader.readuntil(b"\r\n")
                await out(trailer)
                if trailer == b"\r\n":
                    return
        left = size + 2  # data and its CRLF
        while left:
            data = await reader.read(min(CHUNK, left))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            await out(data)
