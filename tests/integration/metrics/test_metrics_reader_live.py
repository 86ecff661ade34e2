"""The metrics reader against a real Prometheus scraping the metrics simulator and two stage
servers' real `partita_*` series (partita_server.metrics, served over HTTP and listed in the
file_sd file with the labels the local cluster's agent gives them).

Needs only the Debian `prometheus` binary (no apiserver). The last test stops Prometheus and
starts it again, so it runs last.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from partita.metrics import (
    Expectation,
    HopKey,
    Observation,
    Queries,
    StageKey,
    significant_change,
)
from partita.metrics.queries import CHART_KEYS
from partita.metrics.reader import MetricsReader, PollLoop
from partita.testbed import processes, prometheus, simstate
from partita.testbed.layout import parse_nodes
from partita.testbed.simstate import SimState, apply_assignment
from partita_server.metrics import CONTENT_TYPE_LATEST, ServerMetrics

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
RULES = Path(__file__).parents[3] / "charts" / "partita" / "files" / "prometheus-rules.yaml"

pytestmark = pytest.mark.skipif(
    not Path(PROMETHEUS).exists(), reason="needs the Debian prometheus package (make install)"
)

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.3)


class StageServer:
    """A stage server's metrics registry behind a real HTTP /metrics, fed steady traffic."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = metrics.exposition()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, args=(0.2,), daemon=True).start()


@dataclass
class Bed:
    run_dir: Path
    state_file: Path
    prom_dir: Path
    url: str
    prom_port: int
    prom: processes.Process

    def expectation(self) -> Expectation:
        state = simstate.load(self.state_file)
        return Expectation(
            nodes=frozenset(n.name for n in state.nodes if n.up),
            links=frozenset((lk.source, lk.target) for lk in state.links),
        )

    def start_prometheus(self) -> None:
        cmd = prometheus.command(PROMETHEUS, self.prom_dir / "prometheus.yml",
                                 self.prom_dir / "data", self.prom_port)  # fmt: skip
        self.prom = processes.start("prometheus", cmd, self.run_dir)
        prometheus.wait_ready(self.url, timeout=30)

    def stop_prometheus(self) -> None:
        os.killpg(self.prom.pid, signal.SIGTERM)
        eventually(lambda: True if not processes.alive(self.prom.pid) else None, 20, "exit")


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    run_dir = tmp_path_factory.mktemp("metrics-reader")
    state_file = run_dir / "sim-state.json"
    simstate.save(state_file, SimState.from_layout(parse_nodes("edge-a=2,cloud=1")))
    stop = threading.Event()
    stage0 = StageServer(ServerMetrics("m", "stage-0"))
    stage1 = StageServer(ServerMetrics("m", "stage-1"))

    def traffic() -> None:  # steady requests: 30 ms end to end, 10 ms compute, 1 kB hops
        while not stop.wait(0.05):
            stage0.metrics.observe_request(200, 0.03)
            stage0.metrics.compute.observe(0.010)
            stage0.metrics.observe_hop("stage-1", "http://m-r1-s1.ns.svc:8080", 1000, 0.004)
            stage1.metrics.observe_request(200, 0.015)
            stage1.metrics.compute.observe(0.012)

    threading.Thread(target=traffic, daemon=True).start()
    sim_port, prom_port = processes.free_port(), processes.free_port()
    try:
        sim = processes.start(
            "metricsim",
            [sys.executable, "-m", "partita.testbed.metricsim", "--state", str(state_file),
             "--port", str(sim_port)],
            run_dir,
        )  # fmt: skip

        def sim_up() -> bool | None:
            processes.ensure_running(sim)
            try:
                return (
                    httpx.get(f"http://127.0.0.1:{sim_port}/metrics", timeout=2).is_success or None
                )
            except httpx.HTTPError:
                return None

        eventually(sim_up, 20, "metrics simulator")
        prom_dir = run_dir / "prometheus"
        prometheus.write_config(prom_dir, [f"127.0.0.1:{sim_port}"], scrape_interval=1.0)
        shutil.copy(RULES, prom_dir / "rules" / "partita.yml")
        # labelled as the agent labels a stage pod's target (pod labels partita.dev/* included)
        prometheus.write_server_targets(
            prom_dir,
            [
                prometheus.TargetGroup(
                    (f"127.0.0.1:{server.port}",),
                    {
                        "namespace": "ns",
                        "pod": f"m-r1-s{i}",
                        "node": node,
                        "pool": pool,
                        "model": "m",
                        "revision": "1",
                        "stage": str(i),
                        "component": "stage-server",
                        **({"entry": "true"} if i == 0 else {}),
                    },
                )
                for i, (server, node, pool) in enumerate(
                    [(stage0, "edge-a-1", "edge-a"), (stage1, "cloud-1", "cloud")]
                )
            ],
        )
        b = Bed(run_dir, state_file, prom_dir, f"http://127.0.0.1:{prom_port}", prom_port, sim)
        b.start_prometheus()
        yield b
    finally:
        stop.set()
        stage0.http.shutdown()
        stage1.http.shutdown()
        processes.stop_all(run_dir, grace=5)


def poll(url: str, queries: Queries | None = None, expect: Expectation | None = None,
         timeout_s: float = 5.0) -> Observation:  # fmt: skip
    async def once() -> Observation:
        async with MetricsReader(url, queries, timeout_s=timeout_s) as reader:
            return await reader.poll(expect)

    return asyncio.run(once())


def complete(bed: Bed, queries: Queries | None = None) -> Observation:
    """The first poll that has every node, link, stage, hop and model."""

    def probe() -> Observation | None:
        obs = poll(bed.url, queries, bed.expectation())
        ok = obs.fresh and len(obs.stages) == 2 and obs.hops and obs.models
        return obs if ok and all(s.compute_s for s in obs.stages.values()) else None

    return eventually(probe, 25, "complete observation")


def test_a_poll_has_one_value_per_node_and_link(bed: Bed) -> None:
    obs = complete(bed)
    state = simstate.load(bed.state_file)
    assert obs.problems == ()
    assert set(obs.nodes) == {n.name for n in state.nodes}
    for n in state.nodes:
        usage = obs.nodes[n.name]
        assert usage.cpu_utilisation == pytest.approx(n.cpu_utilisation, abs=1e-6)
        assert usage.memory_available == pytest.approx(n.memory_bytes * (1 - n.memory_used), abs=1)
        assert usage.memory_total == n.memory_bytes
    assert set(obs.links) == {(lk.source, lk.target) for lk in state.links}
    for lk in state.links:
        seen = obs.links[(lk.source, lk.target)]
        assert (seen.bandwidth_bps, seen.rtt_s) == pytest.approx((lk.bandwidth_bps, lk.rtt_s))


def test_stage_hop_and_model_figures_come_from_the_servers_series(bed: Bed) -> None:
    obs = complete(bed)
    entry = obs.stages[StageKey("ns", "m", "0", revision="1", node="edge-a-1")]
    last = obs.stages[StageKey("ns", "m", "1", revision="1", node="cloud-1")]
    assert entry.compute_s == pytest.approx(0.010)
    assert last.compute_s == pytest.approx(0.012)
    # every request in one histogram bucket: histogram_quantile interpolates inside it
    assert entry.latency_p95_s == pytest.approx(0.025 + 0.025 * 0.95)
    assert last.latency_p95_s == pytest.approx(0.01 + 0.015 * 0.95)
    hop = obs.hops[HopKey("ns", "m", "0", "1", revision="1", node="edge-a-1")]
    assert hop.seconds == pytest.approx(0.004)
    assert hop.bytes_per_s is not None and hop.bytes_per_s > 0
    assert obs.models == {("ns", "m"): pytest.approx(0.025 + 0.025 * 0.95)}


def test_the_recorded_series_give_the_same_observation(bed: Bed) -> None:
    raw = complete(bed)
    recorded = complete(bed, Queries.recorded())
    assert recorded.nodes.keys() == raw.nodes.keys()
    assert recorded.links == raw.links
    assert recorded.stages.keys() == raw.stages.keys()
    assert recorded.models == raw.models


def test_a_link_change_is_observed_and_is_a_significant_change(bed: Bed) -> None:
    before = complete(bed)
    simstate.update(
        bed.state_file,
        lambda s: apply_assignment(s, "link=edge-a:cloud", {"bandwidth": "5Mbit", "rtt": "40ms"}),
    )

    def changed() -> Observation | None:
        obs = poll(bed.url, expect=bed.expectation())
        link = obs.links.get(("edge-a", "cloud"))
        return obs if link and link.bandwidth_bps == pytest.approx(5e6) else None

    after = eventually(changed, 15, "edge-a->cloud at 5 Mbit/s")
    assert after.links[("edge-a", "cloud")].rtt_s == pytest.approx(0.04)
    assert after.links[("cloud", "edge-a")] == before.links[("cloud", "edge-a")]
    lines = significant_change(before, after, kinds=("node", "link"))
    assert sorted(lines) == [
        "link edge-a->cloud bandwidth_bps 1e+08 -> 5e+06",
        "link edge-a->cloud rtt_s 0.02 -> 0.04",
    ]


def test_a_bad_query_is_a_problem_not_an_exception(bed: Bed) -> None:
    complete(bed)
    obs = poll(bed.url, Queries(link_rtt="rate(probe_icmp_duration_seconds"), bed.expectation())
    assert not obs.fresh
    (problem,) = obs.problems
    assert problem.startswith("query linkRttSeconds failed: refused (bad_data)")
    assert obs.nodes and all(link.rtt_s is None for link in obs.links.values())


def test_a_prometheus_that_never_answers_times_out() -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        obs = poll(url, timeout_s=0.5)
    assert not obs.fresh
    assert set(obs.problems) == {
        f"query {CHART_KEYS[name]} failed: no answer within 0.5 s" for name in Queries().enabled()
    }


def test_prometheus_stopping_keeps_the_last_observation_and_starting_clears_it(bed: Bed) -> None:
    complete(bed)
    seen: list[Observation] = []

    async def three_polls() -> PollLoop:
        async with MetricsReader(bed.url, timeout_s=3.0) as reader:
            loop = PollLoop(reader, 1.0, seen.append, expect=bed.expectation)
            await loop.poll_once()
            await asyncio.to_thread(bed.stop_prometheus)
            await loop.poll_once()
            await asyncio.to_thread(bed.start_prometheus)
            await loop.poll_once()
            return loop

    loop = asyncio.run(three_polls())
    up, down, back = seen
    assert up.fresh
    assert not down.fresh
    assert down.nodes == up.nodes and down.links == up.links and down.taken_at == up.taken_at
    assert len(down.problems) == 1 and "unreachable" in down.problems[0]
    assert bed.url in down.problems[0]
    # the TSDB survives the restart, so the first poll after it is complete again
    assert back.fresh, back.problems
    assert back.taken_at > up.taken_at
    assert loop.last_fresh_at == back.taken_at
