"""The metrics simulator's exposition: the exporters' names and labels, counters that follow
the state over (injected) time, seeded jitter, and state changes picked up from the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from partita.testbed import simstate
from partita.testbed.layout import parse_nodes
from partita.testbed.metricsim import IPERF3_PERIOD_S, NodeExporterSim
from partita.testbed.simstate import SimState, apply_assignment

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scrape(sim: NodeExporterSim) -> Series:
    """Parse with prometheus_client's parser, so the format itself is checked too."""
    out: Series = {}
    for fam in text_string_to_metric_families(sim.render()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def pick(series: Series, name: str, **labels: str) -> list[float]:
    want = set(labels.items())
    return [v for (n, lbl), v in series.items() if n == name and want <= set(lbl)]


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    path = tmp_path / "state.json"
    simstate.save(path, SimState.from_layout(parse_nodes("edge-a=2,cloud=1")))
    return path


def test_every_node_exports_node_exporter_series(state_file: Path) -> None:
    clock = FakeClock()
    series = scrape(NodeExporterSim(state_file, clock=clock))
    state = simstate.load(state_file)
    for n in state.nodes:
        assert pick(series, "node_memory_MemTotal_bytes", node=n.name, instance=n.name) == [
            float(n.memory_bytes)
        ]
        (avail,) = pick(series, "node_memory_MemAvailable_bytes", node=n.name)
        assert avail == pytest.approx(n.memory_bytes * (1 - n.memory_used), abs=1)
        cpus = {
            dict(lbl)["cpu"]
            for (name, lbl), _ in series.items()
            if name == "node_cpu_seconds_total" and dict(lbl)["node"] == n.name
        }
        assert len(cpus) == n.cpu
        for metric in ("node_network_receive_bytes_total", "node_network_transmit_bytes_total"):
            assert len(pick(series, metric, node=n.name, device="eth0")) == 1


def test_cpu_counters_integrate_the_utilisation_over_time(state_file: Path) -> None:
    clock = FakeClock()
    simstate.update(state_file, lambda s: apply_assignment(s, "node=edge-a-1", {"cpu": "0.75"}))
    sim = NodeExporterSim(state_file, clock=clock)
    before = scrape(sim)
    clock.now += 10.0
    after = scrape(sim)

    def delta(mode: str) -> float:
        key = (
            "node_cpu_seconds_total",
            (("cpu", "2"), ("instance", "edge-a-1"), ("mode", mode), ("node", "edge-a-1")),
        )
        return after[key] - before[key]

    assert delta("idle") == pytest.approx(2.5)
    assert delta("user") + delta("system") == pytest.approx(7.5)


def test_a_state_change_shows_in_the_next_scrape(state_file: Path) -> None:
    clock = FakeClock()
    sim = NodeExporterSim(state_file, clock=clock)
    scrape(sim)
    simstate.update(
        state_file,
        lambda s: apply_assignment(s, "link=edge-a:cloud", {"bandwidth": "5Mbit", "rtt": "40ms"}),
    )
    clock.now += 2.0
    series = scrape(sim)
    got = pick(series, "iperf3_received_bytes", source_pool="edge-a", target_pool="cloud")
    secs = pick(series, "iperf3_received_seconds", source_pool="edge-a", target_pool="cloud")
    assert [8 * b / s for b, s in zip(got, secs, strict=True)] == [5e6, 5e6]  # one per edge-a node
    rtt = pick(series, "probe_icmp_duration_seconds", phase="rtt", source_pool="edge-a")
    assert rtt == pytest.approx([0.04, 0.04])
    back = pick(series, "iperf3_received_bytes", source_pool="cloud", target_pool="edge-a")
    assert back == [100e6 / 8 * IPERF3_PERIOD_S]


def test_link_series_name_the_probing_node(state_file: Path) -> None:
    series = scrape(NodeExporterSim(state_file, clock=FakeClock()))
    probers = {
        dict(lbl)["node"]
        for (name, lbl) in series
        if name == "probe_success" and dict(lbl)["target_pool"] == "cloud"
    }
    assert probers == {"edge-a-1", "edge-a-2"}
    assert all(v == 1.0 for v in pick(series, "iperf3_up"))


def test_a_node_that_is_down_exports_nothing(state_file: Path) -> None:
    clock = FakeClock()
    sim = NodeExporterSim(state_file, clock=clock)
    simstate.update(state_file, lambda s: simstate.set_node_up(s, "cloud-1", False))
    clock.now += 1
    series = scrape(sim)
    assert pick(series, "node_memory_MemTotal_bytes", node="cloud-1") == []
    assert pick(series, "probe_success", node="cloud-1") == []
    # Probes into the dead pool fail and measure nothing.
    assert pick(series, "probe_success", target_pool="cloud") == [0.0, 0.0]
    assert pick(series, "iperf3_received_bytes", target_pool="cloud") == []


def test_jitter_stays_within_bounds_and_repeats_with_the_seed(state_file: Path) -> None:
    simstate.update(
        state_file, lambda s: apply_assignment(s, "sim", {"jitter": "0.2", "seed": "3"})
    )

    def rtts() -> list[float]:
        clock = FakeClock()
        sim = NodeExporterSim(state_file, clock=clock)
        values = []
        for _ in range(8):
            clock.now += 2
            values += pick(scrape(sim), "probe_icmp_duration_seconds", source_pool="edge-a")
        return values

    first = rtts()
    assert all(0.016 - 1e-12 <= v <= 0.024 + 1e-12 for v in first)
    assert len(set(first)) > 8  # it does move (16 values: 8 scrapes x 2 probers)
    assert rtts() == first  # same seed, same sequence


def test_a_broken_state_file_keeps_the_last_good_state(state_file: Path) -> None:
    clock = FakeClock()
    sim = NodeExporterSim(state_file, clock=clock)
    first = pick(scrape(sim), "node_memory_MemTotal_bytes")
    state_file.write_text("{not json")
    assert pick(scrape(sim), "node_memory_MemTotal_bytes") == first
