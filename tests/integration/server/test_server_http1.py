"""The hop client's HTTP/1.1 on real loopback sockets: keep-alive reuse, a connection the
server closed while idle, chunked bodies, timeouts and refused connections."""

from __future__ import annotations

import asyncio

import pytest
from stage_servers import free_port

from partita_server.http1 import Http1Error, Http1Pool


async def _serve(reply: bytes, *, close_after: bool, hang: bool = False):  # type: ignore[no-untyped-def]
    # One event per connection accepted, set once the server has closed it.
    connections: list[asyncio.Event] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        closed = asyncio.Event()
        connections.append(closed)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))  # fmt: skip
                await reader.readexactly(length)
                if hang:
                    await asyncio.sleep(3600)
                writer.write(reply)
                await writer.drain()
                if close_after:  # as a server whose keep-alive timer ran out would
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()
        await writer.wait_closed()
        closed.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], connections


def test_keep_alive_reuse_and_a_connection_closed_while_idle() -> None:
    async def scenario() -> tuple[list[bytes], int, int]:
        reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        kept, kept_port, kept_conns = await _serve(reply, close_after=False)
        closing, closing_port, closing_conns = await _serve(reply, close_after=True)
        pool = Http1Pool()
        bodies = []
        for port in (kept_port,) * 3 + (closing_port,) * 3:
            r = await pool.request("127.0.0.1", port, "POST", "/x", {}, b"abc",
                                   timeout_s=5, connect_timeout_s=1)  # fmt: skip
            bodies.append(r.body)
            if port == closing_port:  # the server has closed the connection it answered on
                await asyncio.wait_for(closing_conns[-1].wait(), timeout=5)
        await pool.close()
        kept.close()
        closing.close()
        return bodies, len(kept_conns), len(closing_conns)

    bodies, kept, closing = asyncio.run(scenario())
    assert bodies == [b"ok"] * 6
    assert kept == 1 and closing == 3  # reused, or reconnected without failing the call


def test_chunked_bodies_timeouts_and_refused_connections() -> None:
    async def scenario() -> None:
        chunked = (b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")  # fmt: skip
        server, port, _ = await _serve(chunked, close_after=False)
        pool = Http1Pool()
        reply = await pool.request("127.0.0.1", port, "GET", "/", {}, timeout_s=5,
                                   connect_timeout_s=1)  # fmt: skip
        assert (reply.status, reply.body) == (503, b"abcde")
        silent, silent_port, _ = await _serve(b"", close_after=False, hang=True)
        with pytest.raises(Http1Error) as caught:
            await pool.request("127.0.0.1", silent_port, "POST", "/", {}, b"x", timeout_s=0.2,
                               connect_timeout_s=1)  # fmt: skip
        assert caught.value.kind == "timeout"
        with pytest.raises(Http1Error) as caught:
            await pool.request("127.0.0.1", free_port(), "GET", "/", {}, timeout_s=2,
                               connect_timeout_s=1)  # fmt: skip
        assert caught.value.kind == "connect"
        await pool.close()
        server.close()
        silent.close()

    asyncio.run(scenario())


def test_requests_go_through_the_proxy_http_proxy_names_except_no_proxy_hosts() -> None:
    """As the test bed routes stage traffic: absolute-form requests to a forward proxy."""

    async def scenario() -> tuple[list[bytes], bytes]:
        seen: list[bytes] = []

        async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                seen.append(head.split(b"\r\n")[0])
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nproxy")
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(proxy, "127.0.0.1", 0)
        direct, direct_port, _ = await _serve(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\ndirect",
                                              close_after=False)  # fmt: skip
        env = {"HTTP_PROXY": f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}",
               "NO_PROXY": "127.0.0.1,localhost"}  # fmt: skip
        pool = Http1Pool.from_env(env)
        for _ in range(2):  # the second call reuses the proxy connection
            reply = await pool.request("s1.team.svc", 8080, "GET", "/v2/models/m", {},
                                       timeout_s=5, connect_timeout_s=1)  # fmt: skip
            assert reply.body == b"proxy"
        bypassed = await pool.request("127.0.0.1", direct_port, "GET", "/", {}, timeout_s=5,
                                      connect_timeout_s=1)  # fmt: skip
        await pool.close()
        server.close()
        direct.close()
        return seen, bypassed.body

    seen, bypassed = asyncio.run(scenario())
    assert seen == [b"GET http://s1.team.svc:8080/v2/models/m HTTP/1.1"] * 2
    assert bypassed == b"direct"
