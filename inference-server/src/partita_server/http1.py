"""A lean HTTP/1.1 client for calls between stage servers: keep-alive connections per
endpoint, Content-Length or chunked bodies, one deadline per call, and a forward proxy when
`HTTP_PROXY` names one (as general clients do; the test bed routes and shapes stage traffic
through one), minus the hosts `NO_PROXY` lists.

General clients spend about a millisecond of Python per request on what a hop between two
known servers does not need (cookies, redirects, proxies, auth flows, header models); a hop's
whole budget is a millisecond. Failures come back as `Http1Error` with a `kind` the hop
client maps to its errors: "connect" (nothing reached the server: another endpoint may be
tried), "timeout", "protocol".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Http1Error", "Http1Pool", "Http1Response"]

MAX_HEADER_BYTES = 64 * 1024


class Http1Error(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Http1Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _bypass(host: str, no_proxy: str) -> bool:
    """Whether `host` is one `NO_PROXY` exempts: `*`, the host itself, or a domain of it."""
    host = host.lower().rstrip(".")
    for entry in (e.strip().lower().rstrip(".") for e in no_proxy.split(",")):
        if entry == "*" or (entry and (host == entry.lstrip(".") or
                                       host.endswith("." + entry.lstrip(".")))):  # fmt: skip
            return True
    return False


class Http1Pool:
    """Idle keep-alive connections by (host, port); a connection serves one call at a time.

    `proxy` (http://HOST:PORT) receives every request whose host `no_proxy` does not exempt,
    in absolute form; `from_env` reads both from `HTTP_PROXY`/`http_proxy` and `NO_PROXY`.
    """

    def __init__(
        self, max_idle_per_host: int = 32, *, proxy: str | None = None, no_proxy: str = ""
    ) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._max_idle = max_idle_per_host
        self._proxy: tuple[str, int] | None = None
        if proxy:
            url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            if url.scheme != "http" or not url.hostname:
                raise ValueError(f"proxy {proxy!r}: only http://HOST:PORT proxies are supported")
            self._proxy = (url.hostname, url.port or 80)
        self._no_proxy = no_proxy

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Http1Pool:
        env = os.environ if env is None else env
        proxy = env.get("HTTP_PROXY") or env.get("http_proxy") or None
        return cls(proxy=proxy, no_proxy=env.get("NO_PROXY") or env.get("no_proxy") or "")

    def _route(self, host: str, port: int, path: str) -> tuple[tuple[str, int], str]:
        """Where to connect, and the request target to send there."""
        if self._proxy is None or _bypass(host, self._no_proxy):
            return (host, port), path
        return self._proxy, f"http://{host}:{port}{path}"

    async def request(
        self,
        host: str,
        port: int,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | Sequence[bytes | memoryview] = b"",
        *,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> Http1Response:
        """One call; `body` may come in parts (e.g. a header and views of tensors), written
        with the request head in one go, uncopied."""
        key, target = self._route(host, port, path)
        parts = [body] if isinstance(body, bytes) else list(body)
        length = sum(memoryview(p).nbytes for p in parts)
        head = [f"{method} {target} HTTP/1.1", f"host: {host}:{port}",
                f"content-length: {length}"]  # fmt: skip
        head += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        try:
            async with asyncio.timeout(timeout_s):
                for attempt in range(2):
                    connection, reused = self._take(key), True
                    if connection is None:
                        connection, reused = await self._connect(*key, connect_timeout_s)
                    reader, writer = connection
                    try:
                        # One write: the server wakes once, to a whole request.
                        writer.writelines([request, *parts])
                        await writer.drain()
                        response, keep = await _read_response(reader)
                    except (ConnectionError, asyncio.IncompleteReadError) as exc:
                        _close(writer)
                        partial = isinstance(exc, asyncio.IncompleteReadError) and exc.partial
                        if reused and attempt == 0 and not partial:
                            continue  # the server had closed this idle connection: a new one
                        raise Http1Error("protocol", f"connection lost ({exc!r})") from exc
                    except BaseException:
                        _close(writer)
                        raise
                    if keep:
                        self._give(key, connection)
                    else:
                        _close(writer)
                    return response
        except TimeoutError as exc:
            raise Http1Error("timeout", f"no answer within {timeout_s:.3f} s") from exc
        raise AssertionError("unreachable: the loop returns or raises")

    async def _connect(self, host: str, port: int, timeout_s: float) -> tuple[_Connection, bool]:
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEADER_BYTES)
        except (OSError, TimeoutError) as exc:
            raise Http1Error("connect", f"cannot connect to {host}:{port} ({exc!r})") from exc
        return (reader, writer), False

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
            _close(writer)
        return None

    def _give(self, key: tuple[str, int], connection: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self._max_idle:
            idle.append(connection)
        else:
            _close(connection[1])

    async def close(self) -> None:
        for idle in self._idle.values():
            for _, writer in idle:
                _close(writer)
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.wait_closed()
        self._idle.clear()


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[Http1Response, bool]:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise Http1Error("protocol", "response headers over 64 KiB") from exc
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise Http1Error("protocol", f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    else:
        length = headers.get("content-length", "0")
        if not length.isdigit():
            raise Http1Error("protocol", f"bad content-length {length!r}")
        body = await reader.readexactly(int(length))
    keep = headers.get("connection", "").lower() != "close" and parts[0] != "HTTP/1.0"
    return Http1Response(int(parts[1]), headers, body), keep
