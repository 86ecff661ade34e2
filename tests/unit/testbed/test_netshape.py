"""The agent's data plane arithmetic and HTTP framing: pacing, link lookup, routing by host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from partita.testbed import simstate
from partita.testbed.layout import parse_nodes
from partita.testbed.netshape import (
    Head,
    LinkPacer,
    LinkTable,
    RouteError,
    StateWatcher,
    error_response,
    forward_headers,
    parse_head,
    parse_target,
    request_framing,
    response_framing,
    service_of_host,
    wants_close,
)

MIB = 1024 * 1024


def test_pacer_releases_a_mebibyte_at_the_link_rate() -> None:
    pacer = LinkPacer(10e6, burst_s=0.0)
    now, waited = 100.0, 0.0
    for _ in range(64):  # 64 chunks of 16 KiB, each sent when the previous is through
        delay = pacer.reserve(16 * 1024, now)
        waited += delay
        now += delay
    assert now - 100.0 == pytest.approx(MIB * 8 / 10e6)


def test_pacer_shares_the_rate_between_concurrent_senders() -> None:
    pacer = LinkPacer(8e6, burst_s=0.0)  # 1 MB/s
    first = pacer.reserve(500_000, 0.0)
    second = pacer.reserve(500_000, 0.0)  # queued behind the first
    assert (first, second) == pytest.approx((0.5, 1.0))


def test_pacer_lends_at_most_its_burst_after_idling() -> None:
    pacer = LinkPacer(2e6, burst_s=0.005)
    pacer.reserve(1000, 0.0)
    assert pacer.reserve(16 * 1024, 60.0) == pytest.approx(16 * 1024 * 8 / 2e6 - 0.005)


def test_pacer_makes_up_for_a_late_wake_up() -> None:
    pacer = LinkPacer(8e6, burst_s=0.005)  # 1 MB/s: 1000 bytes per ms
    assert pacer.reserve(10_000, 0.0) == pytest.approx(0.010)
    # the sender slept 3 ms too long; the next chunk is due 3 ms sooner, not 10 ms from now
    assert pacer.reserve(10_000, 0.013) == pytest.approx(0.007)


def _state() -> simstate.SimState:
    return simstate.SimState.from_layout(parse_nodes("edge-a=1,edge-b=1,cloud=1"))


def test_link_table_shapes_across_pools_and_not_inside_one() -> None:
    table = LinkTable(_state().links)
    across = table.shaping("edge-a", "cloud")
    assert across.one_way_delay_s == pytest.approx(0.010)
    assert across.pacer is not None and across.pacer.bandwidth_bps == 100e6
    assert across.transfer_time(MIB) == pytest.approx(0.010 + MIB * 8 / 100e6)
    inside = table.shaping("edge-a", "edge-a")
    assert inside.pacer is None and inside.one_way_delay_s == 0.0


def test_link_table_update_changes_the_rate_of_the_existing_pacer() -> None:
    state = _state()
    table = LinkTable(state.links)
    pacer = table.shaping("edge-a", "cloud").pacer
    slow = simstate.apply_assignment(state, "link=edge-a:cloud", {"bandwidth": "2Mbit"})
    table.update(slow.links)
    again = table.shaping("edge-a", "cloud")
    assert again.pacer is pacer and pacer is not None and pacer.bandwidth_bps == 2e6
    assert table.shaping("cloud", "edge-a").pacer.bandwidth_bps == 100e6  # type: ignore[union-attr]


def test_state_watcher_reloads_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = _state()
    simstate.save(path, state)
    table = LinkTable()
    watcher = StateWatcher(path, table)
    assert watcher.poll() is True
    assert watcher.poll() is False
    simstate.save(path, simstate.apply_assignment(state, "link=cloud:edge-b", {"rtt": "80ms"}))
    assert watcher.poll() is True
    assert table.shaping("cloud", "edge-b").one_way_delay_s == pytest.approx(0.040)


def test_state_watcher_keeps_links_when_the_file_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    simstate.save(path, _state())
    table = LinkTable()
    watcher = StateWatcher(path, table)
    watcher.poll()
    path.write_text("{not json")
    assert watcher.poll() is False
    assert table.shaping("edge-a", "cloud").pacer is not None


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("m-r1-s1.models.svc", ("models", "m-r1-s1")),
        ("m-r1-s1.models.svc.cluster.local", ("models", "m-r1-s1")),
        ("M.Models.SVC.", ("models", "m")),
        ("m.models", None),
        ("example.org.", None),
        ("localhost", None),
        ("a.b.c.svc", None),
    ],
)
def test_service_of_host(host: str, expected: tuple[str, str] | None) -> None:
    assert service_of_host(host) == expected


def test_parse_target_absolute_and_origin_forms() -> None:
    t = parse_target("POST", "http://next.ns.svc:8000/v2/models/m/infer?x=1", None)
    assert (t.namespace, t.service, t.port, t.path) == (
        "ns",
        "next",
        8000,
        "/v2/models/m/infer?x=1",
    )
    t = parse_target("GET", "http://next.ns.svc.cluster.local", None)
    assert (t.port, t.path) == (80, "/")
    t = parse_target("GET", "/v2/health/ready", "next.ns.svc:8000")
    assert (t.service, t.port, t.path) == ("next", 8000, "/v2/health/ready")


@pytest.mark.parametrize(
    ("method", "target", "status", "fragment"),
    [
        ("CONNECT", "next.ns.svc:443", 405, "CONNECT"),
        ("GET", "https://next.ns.svc/", 400, "https"),
        ("GET", "http://10.244.0.5:8000/", 502, "not a Service host"),
    ],
)
def test_parse_target_refuses_what_it_cannot_route(
    method: str, target: str, status: int, fragment: str
) -> None:
    with pytest.raises(RouteError) as err:
        parse_target(method, target, None)
    assert err.value.status == status and fragment in str(err.value)


def test_parse_head_and_framing() -> None:
    head = parse_head(
        b"POST http://a.b.svc:8000/x HTTP/1.1\r\nHost: a.b.svc:8000\r\n"
        b"Content-Length: 12\r\nProxy-Connection: keep-alive\r\nConnection: X-Drop\r\n"
        b"X-Drop: 1\r\nInference-Header-Content-Length: 7\r\n\r\n"
    )
    assert head.get("content-length") == "12"
    assert request_framing(head).kind == "length" and request_framing(head).length == 12
    kept = [k for k, _ in forward_headers(head)]
    assert kept == ["Host", "Content-Length", "Inference-Header-Content-Length"]
    chunked = Head("POST / HTTP/1.1", (("Transfer-Encoding", "gzip, chunked"),))
    assert request_framing(chunked).kind == "chunked"
    assert request_framing(Head("GET / HTTP/1.1", ())).kind == "none"


@pytest.mark.parametrize(
    ("start", "headers", "method", "kind"),
    [
        ("HTTP/1.1 200 OK", (("Content-Length", "5"),), "GET", "length"),
        ("HTTP/1.1 200 OK", (("Content-Length", "5"),), "HEAD", "none"),
        ("HTTP/1.1 204 No Content", (), "GET", "none"),
        ("HTTP/1.1 200 OK", (("Transfer-Encoding", "chunked"),), "POST", "chunked"),
        ("HTTP/1.0 200 OK", (), "GET", "close"),
    ],
)
def test_response_framing(
    start: str, headers: tuple[tuple[str, str], ...], method: str, kind: str
) -> None:
    assert response_framing(Head(start, headers), method).kind == kind


def test_bad_heads_are_refused_with_a_reason() -> None:
    with pytest.raises(RouteError, match="malformed header"):
        parse_head(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
    with pytest.raises(RouteError, match="Content-Length"):
        request_framing(Head("POST / HTTP/1.1", (("Content-Length", "-3"),)))


def test_connection_close_rules() -> None:
    assert wants_close(Head("GET / HTTP/1.1", (("Connection", "close"),)), "HTTP/1.1")
    assert not wants_close(Head("GET / HTTP/1.1", ()), "HTTP/1.1")
    assert wants_close(Head("GET / HTTP/1.0", ()), "HTTP/1.0")


def test_error_response_carries_a_v2_error_body() -> None:
    raw = error_response(503, "Service ns/x has no ready endpoints")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert json.loads(body) == {"error": "Service ns/x has no ready endpoints"}
    assert f"Content-Length: {len(body)}".encode() in head
