"""The simulator state and the `partita testbed set` grammar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from partita.testbed import simstate
from partita.testbed.errors import TestbedError
from partita.testbed.layout import parse_nodes
from partita.testbed.simstate import SimState, apply_assignment


@pytest.fixture
def state() -> SimState:
    return SimState.from_layout(parse_nodes("edge-a=2,edge-b=1,cloud=1"))


def test_from_layout_keeps_capacity_and_links(state: SimState) -> None:
    layout = parse_nodes("edge-a=2,edge-b=1,cloud=1")
    assert [(n.name, n.pool, n.tier, n.cpu, n.memory_bytes) for n in state.nodes] == [
        (n.name, n.pool, n.tier, n.cpu, n.memory_bytes) for n in layout.nodes
    ]
    assert {(lk.source, lk.target): (lk.bandwidth_bps, lk.rtt_s) for lk in state.links} == {
        (lk.source, lk.target): (lk.bandwidth_bps, lk.rtt_s) for lk in layout.links
    }
    assert all(n.up and 0 <= n.cpu_utilisation < 1 for n in state.nodes)


def test_save_then_load_round_trips_and_leaves_no_temp_file(
    state: SimState, tmp_path: Path
) -> None:
    path = tmp_path / "state.json"
    changed = apply_assignment(state, "sim", {"jitter": "0.2", "seed": "7"})
    simstate.save(path, changed)
    assert simstate.load(path) == changed
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_node_cpu_and_memory_change_only_that_node(state: SimState) -> None:
    new = apply_assignment(state, "node=edge-a-2", {"cpu": "0.9", "memory": "70%"})
    assert new.node("edge-a-2").cpu_utilisation == 0.9
    assert new.node("edge-a-2").memory_used == pytest.approx(0.7)
    assert new.node("edge-a-1") == state.node("edge-a-1")
    assert state.node("edge-a-2").cpu_utilisation != 0.9  # the old state is unchanged


def test_node_network_rates_are_stored_in_bytes(state: SimState) -> None:
    new = apply_assignment(state, "node=cloud-1", {"rx": "8Mbit", "tx": "16Kbit"})
    assert new.node("cloud-1").rx_bytes_per_s == 1e6
    assert new.node("cloud-1").tx_bytes_per_s == 2e3


def test_link_change_is_one_direction(state: SimState) -> None:
    new = apply_assignment(state, "link=edge-a:cloud", {"bandwidth": "5Mbit", "rtt": "40ms"})
    assert new.link("edge-a", "cloud").bandwidth_bps == 5e6
    assert new.link("edge-a", "cloud").rtt_s == pytest.approx(0.04)
    assert new.link("cloud", "edge-a") == state.link("cloud", "edge-a")


def test_link_wildcard_changes_every_matching_link(state: SimState) -> None:
    new = apply_assignment(state, "link=*:cloud", {"bandwidth": "2Mbit"})
    assert {lk.source for lk in new.links if lk.bandwidth_bps == 2e6} == {"edge-a", "edge-b"}


def test_unknown_node_lists_the_nodes(state: SimState) -> None:
    with pytest.raises(TestbedError, match=r"unknown node 'edge-9'.*edge-a-1, edge-a-2"):
        apply_assignment(state, "node=edge-9", {"cpu": "0.5"})


def test_unknown_pool_lists_the_pools(state: SimState) -> None:
    with pytest.raises(TestbedError, match=r"unknown pool 'nowhere'; pools: edge-a, edge-b, cloud"):
        apply_assignment(state, "link=edge-a:nowhere", {"bandwidth": "5Mbit"})


def test_link_of_a_pool_to_itself_does_not_exist(state: SimState) -> None:
    with pytest.raises(TestbedError, match=r"no such link.*edge-a:cloud"):
        apply_assignment(state, "link=edge-a:edge-a", {"rtt": "1ms"})


@pytest.mark.parametrize(
    ("target", "values", "message"),
    [
        ("node=edge-a-1", {"disk": "0.5"}, r"unknown key 'disk'; keys for node: cpu, memory"),
        ("link=edge-a:cloud", {"cpu": "0.5"}, r"unknown key 'cpu'; keys for link: bandwidth, rtt"),
        ("node=edge-a-1", {"cpu": "1.5"}, r"cpu='1.5': must be a fraction between 0 and 1"),
        ("node=edge-a-1", {"cpu": "lots"}, r"cpu='lots'.*example: cpu=0.9"),
        ("link=edge-a:cloud", {"bandwidth": "5 furlongs"}, r"bandwidth='5 furlongs'.*5Mbit"),
        ("link=edge-a:cloud", {"bandwidth": "0Mbit"}, r"must be above 0"),
        ("link=edge-a:cloud", {"rtt": "40"}, r"rtt='40'.*unit must be"),
        ("node=edge-a-1", {"up": "maybe"}, r"must be true or false"),
        ("link=edge-a", {"rtt": "4ms"}, r"SOURCE_POOL:TARGET_POOL"),
        ("pod=x", {"cpu": "0.5"}, r"expected node=NAME, link="),
        ("node=edge-a-1", {}, r"nothing to set"),
    ],
)
def test_grammar_errors_say_what_and_how(
    state: SimState, target: str, values: dict[str, str], message: str
) -> None:
    with pytest.raises(TestbedError, match=message):
        apply_assignment(state, target, values)


def test_set_node_up_toggles_only_that_node(state: SimState) -> None:
    down = simstate.set_node_up(state, "edge-b-1", False)
    assert [n.name for n in down.nodes if not n.up] == ["edge-b-1"]
    assert simstate.set_node_up(down, "edge-b-1", True) == state


def test_load_explains_a_missing_or_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(TestbedError, match=r"no simulator state; is the local cluster up"):
        simstate.load(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "nodes": [{"name": "x"}], "links": []}))
    with pytest.raises(TestbedError, match=r"bad.json: not a simulator state"):
        simstate.load(bad)


def test_update_applies_changes_in_sequence(state: SimState, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    simstate.save(path, state)
    simstate.update(path, lambda s: apply_assignment(s, "node=edge-a-1", {"cpu": "0.3"}))
    simstate.update(path, lambda s: apply_assignment(s, "node=edge-a-2", {"cpu": "0.4"}))
    got = simstate.load(path)
    assert (got.node("edge-a-1").cpu_utilisation, got.node("edge-a-2").cpu_utilisation) == (
        0.3,
        0.4,
    )
