"""The metrics simulator scraped by a real Prometheus: every node's series and every link's
probes arrive with the labels the operator queries, and state changes reach Prometheus.

Needs only the Debian `prometheus` binary (no apiserver), so it runs without the local cluster.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from partita.testbed import processes, prometheus, simstate
from partita.testbed.layout import parse_nodes
from partita.testbed.simstate import SimState, apply_assignment

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

pytestmark = pytest.mark.skipif(
    not Path(PROMETHEUS).exists(), reason="needs the Debian prometheus package (make install)"
)

# The operator's default queries (see partita.metrics); windows short for a 1 s scrape.
CPU_UTILISATION = (
    '1 - sum by (node) (rate(node_cpu_seconds_total{mode="idle"}[4s]))'
    " / sum by (node) (rate(node_cpu_seconds_total[4s]))"
)
MEMORY_AVAILABLE = "max by (node) (node_memory_MemAvailable_bytes)"
RTT = 'avg by (source_pool, target_pool) (probe_icmp_duration_seconds{phase="rtt"})'
BANDWIDTH = (
    "avg by (source_pool, target_pool) (8 * iperf3_received_bytes / iperf3_received_seconds)"
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


@dataclass(frozen=True)
class Bed:
    run_dir: Path
    state_file: Path
    metrics_url: str
    prometheus_url: str
    config: Path


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    run_dir = tmp_path_factory.mktemp("metrics")
    state_file = run_dir / "sim-state.json"
    simstate.save(state_file, SimState.from_layout(parse_nodes("edge-a=2,edge-b=1,cloud=1")))
    sim_port, prom_port = processes.free_port(), processes.free_port()
    try:
        sim = processes.start(
            "metricsim",
            [
                sys.executable,
                "-m",
                "partita.testbed.metricsim",
                "--state",
                str(state_file),
                "--port",
                str(sim_port),
            ],
            run_dir,
        )
        metrics_url = f"http://127.0.0.1:{sim_port}"

        def sim_up() -> bool | None:
            processes.ensure_running(sim)
            try:
                return httpx.get(f"{metrics_url}/metrics", timeout=2).status_code == 200 or None
            except httpx.HTTPError:
                return None

        eventually(sim_up, 20, "metrics simulator")
        config = prometheus.write_config(
            run_dir / "prometheus", [f"127.0.0.1:{sim_port}"], scrape_interval=1.0
        )
        prom = processes.start(
            "prometheus",
            prometheus.command(PROMETHEUS, config, run_dir / "prometheus" / "data", prom_port),
            run_dir,
        )
        url = f"http://127.0.0.1:{prom_port}"
        prometheus.wait_ready(url, timeout=30)
        processes.ensure_running(prom)
        yield Bed(run_dir, state_file, metrics_url, url, config)
    finally:
        processes.stop_all(run_dir, grace=5)


def per(bed: Bed, promql: str, *keys: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(labels[k] for k in keys): value
        for labels, value in prometheus.query(bed.prometheus_url, promql)
    }


def test_generated_config_passes_promtool(bed: Bed) -> None:
    r = subprocess.run(
        [PROMTOOL, "check", "config", str(bed.config)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_exposition_passes_promtool_lint(bed: Bed) -> None:
    body = httpx.get(f"{bed.metrics_url}/metrics", timeout=5).text
    r = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, text=True, check=False
    )
    # The only complaint allowed is the one real node_exporter gets too: its
    # node_memory_MemTotal_bytes-style names are not snake_case.
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert all(c.startswith("node_memory_Mem") and "camelCase" in c for c in complaints), complaints
    assert r.returncode in (0, 3), r.stdout + r.stderr  # 3: lint findings only


def test_every_node_has_cpu_and_memory_and_every_link_a_value(bed: Bed) -> None:
    state = simstate.load(bed.state_file)
    names = {(n.name,) for n in state.nodes}

    def complete(promql: str) -> dict[tuple[str, ...], float] | None:
        got = per(bed, promql, "node")
        return got if set(got) == names else None

    avail = eventually(lambda: complete(MEMORY_AVAILABLE), 20, "memory of every node")
    for n in state.nodes:
        assert avail[(n.name,)] == pytest.approx(n.memory_bytes * (1 - n.memory_used), abs=1)
    cpu = eventually(lambda: complete(CPU_UTILISATION), 20, "CPU utilisation of every node")
    for n in state.nodes:
        assert cpu[(n.name,)] == pytest.approx(n.cpu_utilisation, abs=1e-6)
    links = {(lk.source, lk.target): lk for lk in state.links}
    rtt = per(bed, RTT, "source_pool", "target_pool")
    bw = per(bed, BANDWIDTH, "source_pool", "target_pool")
    assert set(rtt) == set(bw) == set(links)
    for pair, lk in links.items():
        assert rtt[pair] == pytest.approx(lk.rtt_s)
        assert bw[pair] == pytest.approx(lk.bandwidth_bps)


def test_a_link_change_reaches_prometheus(bed: Bed) -> None:
    simstate.update(
        bed.state_file,
        lambda s: apply_assignment(s, "link=edge-a:cloud", {"bandwidth": "5Mbit", "rtt": "40ms"}),
    )

    def changed() -> tuple[float, float] | None:
        bw = per(bed, BANDWIDTH, "source_pool", "target_pool")
        rtt = per(bed, RTT, "source_pool", "target_pool")
        pair = ("edge-a", "cloud")
        done = bw.get(pair) == pytest.approx(5e6) and rtt.get(pair) == pytest.approx(0.04)
        return (bw[pair], rtt[pair]) if done else None

    eventually(changed, 15, "edge-a:cloud at 5 Mbit/s, 40 ms")
    other = per(bed, BANDWIDTH, "source_pool", "target_pool")
    assert other[("edge-b", "cloud")] == pytest.approx(100e6)
    assert other[("cloud", "edge-a")] == pytest.approx(100e6)


def test_a_node_that_goes_down_disappears_and_its_load_shows(bed: Bed) -> None:
    simstate.update(bed.state_file, lambda s: simstate.set_node_up(s, "edge-b-1", False))
    simstate.update(bed.state_file, lambda s: apply_assignment(s, "node=cloud-1", {"cpu": "0.9"}))

    def settled() -> dict[tuple[str, ...], float] | None:
        mem = per(bed, MEMORY_AVAILABLE, "node")
        cpu = per(bed, CPU_UTILISATION, "node")
        gone = ("edge-b-1",) not in mem
        busy = cpu.get(("cloud-1",), 0) == pytest.approx(0.9, abs=1e-6)
        return cpu if gone and busy else None

    eventually(settled, 20, "edge-b-1 gone and cloud-1 at 90 % CPU")
    probes = prometheus.query(bed.prometheus_url, 'probe_success{target_pool="edge-b"}')
    assert probes and all(value == 0 for _, value in probes)
