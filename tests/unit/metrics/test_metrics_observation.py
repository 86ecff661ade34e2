"""Prometheus answers to Observations: keys, averaging, missing data, staleness, change."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest

from partita.metrics import (
    Expectation,
    HopKey,
    LinkObservation,
    NodeUsage,
    Observation,
    StageKey,
    StageObservation,
    build_observation,
    is_stale,
    significant_change,
)
from partita.metrics.reader import QueryFailed, parse_query_response


def vector(*series: tuple[dict[str, str], float | str]) -> dict[str, Any]:
    """An /api/v1/query answer as Prometheus writes it (values are strings)."""
    return {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": labels, "value": [1717000000.123, str(value)]}
                for labels, value in series
            ],
        },
    }


def test_a_vector_answer_gives_labels_and_values() -> None:
    doc = vector(({"node": "edge-a-1"}, 0.25), ({"node": "cloud-1"}, "NaN"))
    samples = parse_query_response(doc)
    assert samples[0] == ({"node": "edge-a-1"}, 0.25)
    assert math.isnan(samples[1][1])


def test_a_scalar_answer_has_no_labels() -> None:
    doc = {"status": "success", "data": {"resultType": "scalar", "result": [1.0, "3"]}}
    assert parse_query_response(doc) == [({}, 3.0)]


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"status": "error", "errorType": "bad_data", "error": "parse error"}, "bad_data"),
        ({"status": "success", "data": {"resultType": "matrix", "result": []}}, "matrix"),
        ({"status": "success", "data": {"resultType": "vector", "result": [{}]}}, "malformed"),
        ({"status": "success"}, "no data.result"),
        ([], "not a JSON object"),
    ],
)
def test_a_bad_answer_says_what_was_wrong(doc: Any, says: str) -> None:
    with pytest.raises(QueryFailed, match=says):
        parse_query_response(doc)


def samples(doc: dict[str, Any]) -> list[tuple[dict[str, str], float]]:
    return [(dict(labels), value) for labels, value in parse_query_response(doc)]


def test_nodes_links_stages_hops_and_models_are_keyed_by_their_labels() -> None:
    results = {
        "node_cpu_utilisation": samples(vector(({"node": "edge-a-1"}, 0.5))),
        # an unaggregated query: one series per instance, `host:port` stripped, averaged
        "node_memory_available": samples(
            vector(({"instance": "edge-a-1:9100"}, 1e9), ({"instance": "edge-a-1:9100"}, 3e9))
        ),
        "link_bandwidth": samples(vector(({"source_pool": "edge-a", "target_pool": "cloud"}, 5e6))),
        "link_rtt": samples(vector(({"source": "edge-a", "target": "cloud"}, 0.04))),
        "stage_compute": samples(
            vector(({"namespace": "ns", "model": "m", "stage": "stage-1", "node": "c-1"}, 0.02))
        ),
        "stage_latency_p95": samples(
            vector(({"namespace": "ns", "model": "m", "stage": "1", "node": "c-1"}, 0.1))
        ),
        "hop_bytes_rate": samples(
            vector(({"namespace": "ns", "model": "m", "stage": "0", "next_stage": "stage-1"}, 1e5))
        ),
        "model_latency_p95": samples(vector(({"namespace": "ns", "model": "m"}, 0.3))),
    }
    obs = build_observation(results, taken_at=100.0)
    assert obs.fresh and obs.problems == ()
    assert obs.nodes == {"edge-a-1": NodeUsage(0.5, 2e9, None)}
    assert obs.links == {("edge-a", "cloud"): LinkObservation(5e6, 0.04)}
    stage = obs.stages[StageKey("ns", "m", "1", node="c-1")]
    assert (stage.compute_s, stage.latency_p95_s) == (0.02, 0.1)
    assert obs.hops[HopKey("ns", "m", "0", "1")].bytes_per_s == 1e5
    assert obs.models == {("ns", "m"): 0.3}


def test_nan_is_no_data_and_unlabelled_series_are_reported() -> None:
    results = {
        "node_cpu_utilisation": samples(vector(({"node": "a"}, "NaN"), ({"job": "x"}, 0.1))),
        "model_latency_p95": samples(vector(({"namespace": "ns", "model": "m"}, "NaN"))),
    }
    obs = build_observation(results, taken_at=0.0)
    assert obs.nodes == {} and obs.models == {}
    assert obs.fresh  # nothing was expected
    assert obs.problems == ("query cpuBusy: 1 series without a node or instance label, ignored",)


def test_what_is_expected_and_missing_makes_it_not_fresh() -> None:
    results = {
        "node_cpu_utilisation": samples(vector(({"node": "a"}, 0.1))),
        "node_memory_available": samples(vector(({"node": "a"}, 1e9))),
        "link_bandwidth": samples(vector(({"source_pool": "edge-a", "target_pool": "cloud"}, 1e8))),
        "link_rtt": samples(vector(({"source_pool": "edge-a", "target_pool": "cloud"}, 0.02))),
    }
    expect = Expectation(
        nodes=frozenset({"a", "b"}), links=frozenset({("edge-a", "cloud"), ("edge-b", "cloud")})
    )
    obs = build_observation(results, taken_at=0.0, expect=expect)
    assert not obs.fresh
    assert "no node metrics for b (cpuBusy, memoryAvailableBytes)" in obs.problems
    assert "no link metrics for edge-b->cloud (linkBandwidthBps, linkRttSeconds)" in obs.problems
    assert not any(" a " in p or "edge-a->" in p for p in obs.problems)


def test_a_failed_query_makes_it_not_fresh_and_a_disabled_one_is_not_missed() -> None:
    obs = build_observation(
        {"node_cpu_utilisation": [({"node": "a"}, 0.1)]},
        taken_at=0.0,
        failures=["Prometheus at http://127.0.0.1:1 unreachable: refused"],
        expect=Expectation(nodes=frozenset({"a"}), links=frozenset({("x", "y")})),
    )
    # memory and link queries did not run: nothing is reported missing for them
    assert obs.problems == ("Prometheus at http://127.0.0.1:1 unreachable: refused",)
    assert not obs.fresh


def test_staleness_follows_age_and_freshness() -> None:
    obs = Observation(taken_at=100.0)
    assert not is_stale(obs, now=130.0, max_age=60.0)
    assert is_stale(obs, now=161.0, max_age=60.0)
    assert is_stale(replace(obs, fresh=False), now=100.0, max_age=60.0)
    assert is_stale(None, now=0.0, max_age=60.0)


def observed(bw: float, cpu: float, compute: float = 0.02) -> Observation:
    return Observation(
        taken_at=0.0,
        nodes={"edge-a-1": NodeUsage(cpu, 2e9, 4e9)},
        links={("edge-a", "cloud"): LinkObservation(bw, 0.02)},
        stages={StageKey("ns", "m", "0"): StageObservation(compute, None)},
        models={("ns", "m"): 0.2},
    )


def test_jitter_within_the_threshold_is_no_change() -> None:
    base = observed(100e6, 0.5)
    for factor in (0.81, 0.9, 1.1, 1.19):
        assert significant_change(base, observed(100e6 * factor, 0.5 * factor)) == []


def test_a_collapsed_link_and_a_busy_node_are_changes() -> None:
    lines = significant_change(observed(100e6, 0.05), observed(2e6, 0.9))
    assert "link edge-a->cloud bandwidth_bps 1e+08 -> 2e+06" in lines
    assert "node edge-a-1 cpu_utilisation 0.05 -> 0.9" in lines
    assert len(lines) == 2
    assert significant_change(observed(100e6, 0.05), observed(2e6, 0.9), kinds=("node",)) == [
        "node edge-a-1 cpu_utilisation 0.05 -> 0.9"
    ]


def test_small_values_move_against_a_floor_not_their_own_size() -> None:
    # an idle node from 5 % to 7 % CPU is +40 % of itself but noise for the planner
    assert significant_change(observed(100e6, 0.05), observed(100e6, 0.07)) == []
    assert significant_change(observed(100e6, 0.05), observed(100e6, 0.2)) != []


def test_things_that_appear_or_go_are_changes() -> None:
    old = observed(100e6, 0.5)
    new = replace(old, links={}, models={("ns", "m"): 0.2, ("ns", "n"): 0.1})
    lines = significant_change(old, new)
    assert lines == ["link edge-a->cloud gone", "model ns/n appeared"]
    assert significant_change(None, old) == ["first observation"]
