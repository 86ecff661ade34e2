"""The operator's own series as a scrape shows them: moves counted by the reason the real
rescheduler gave, the serving plan as gauges that go with the model, errors by reason, the
planner's link estimates marked measured or declared."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_control_step import FAST, SLOW, inputs, run, serving
from test_control_step import snapshot as make_snapshot

from partita.api.edgemodel import EdgeModel
from partita.control.loop import pre_plan_report
from partita.control.outcome import Event, EventType, Outcome
from partita.control.status import loop_status, node_speeds
from partita.control.step import ModelState
from partita.control.telemetry import (
    IMPROVEMENT,
    NODE_LOST,
    RESCHEDULE_REASONS,
    Telemetry,
)
from partita.metrics.observation import LinkObservation, Observation

MODEL = EdgeModel.parse(
    {
        "apiVersion": "partita.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {
            "source": {"uri": "file:///m.onnx", "sha256": "a" * 64},
            "dataSource": "edge",
            "slo": {"p95LatencySeconds": 0.25},
        },
    }
)


def scrape(t: Telemetry) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of a scrape by sample name (`partita_reschedules_total`, ...)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(generate_latest(t.registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def value(samples: dict[str, Any], name: str, **labels: str) -> float | None:
    hits = [
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    ]
    assert len(hits) <= 1, (name, labels, hits)
    return hits[0] if hits else None


def test_a_move_to_a_faster_link_counts_as_an_improvement() -> None:
    t = Telemetry()
    before = serving(SLOW, now=10.0)  # on the edge: the link is slow
    moved = run(before, inputs(FAST, {1: True}), 100.0)  # the link got fast: to the cloud
    assert moved.state.rollout is not None and moved.state.rollout.reason == "Rescheduled"
    t.stepped(MODEL, before, moved.state, 0.004)
    got = scrape(t)
    assert value(got, "partita_reschedules_total", reason=IMPROVEMENT) == 1.0
    # Every other reason is a series at 0, so a rate over it is 0 and not "no data".
    others = [r for r in RESCHEDULE_REASONS if r != IMPROVEMENT]
    assert [value(got, "partita_reschedules_total", reason=r) for r in others] == [0.0] * len(
        others
    )
    assert value(got, "partita_planning_seconds_count", namespace="ns", model="m") == 1.0
    # The next steps wait for the rollout: no second count.
    waiting = run(moved.state, inputs(FAST, {1: True, 2: False}), 101.0)
    t.stepped(MODEL, moved.state, waiting.state, 0.001)
    assert value(scrape(t), "partita_reschedules_total", reason=IMPROVEMENT) == 1.0


def test_losing_the_node_of_the_plan_counts_as_node_lost() -> None:
    t = Telemetry()
    before = serving(SLOW, now=10.0)
    lost = run(before, inputs(make_snapshot(1e6, edge_ready=False), {1: True}), 11.0)
    assert lost.state.rollout is not None, lost.report.message
    t.stepped(MODEL, before, lost.state, 0.002)
    assert value(scrape(t), "partita_reschedules_total", reason=NODE_LOST) == 1.0


def test_the_serving_plan_is_a_set_of_gauges_that_goes_with_the_model() -> None:
    t = Telemetry()
    state = serving(FAST, now=5.0)
    report = run(state, inputs(FAST, {1: True}), 6.0).report
    speeds = node_speeds(state.serving, FAST, {"cloud-1": 0.5}, set())
    status = loop_status(state, report, [], now="", generation=1, observed_p95_s=0.2, speeds=speeds)
    t.model_status(MODEL, status)
    got = scrape(t)
    assert value(got, "partita_model_phase", phase="Ready") == 1.0
    assert value(got, "partita_model_phase", phase="Unschedulable") == 0.0
    assert value(got, "partita_model_slo_seconds", model="m") == 0.25
    assert value(got, "partita_plan_revision", namespace="ns", model="m") == 1.0
    plan = state.serving
    assert plan is not None
    servers = {
        (lab["stage"], lab["pool"], lab["node"]) for lab, _ in got["partita_plan_stage_info"]
    }
    assert servers == {(str(s.index), s.pool, s.nodes[0]) for s in plan.stages}
    predicted = value(got, "partita_model_predicted_latency_seconds", model="m")
    assert predicted == pytest.approx(status.plan.predicted_p95_ms / 1000)  # type: ignore[union-attr]
    assert value(got, "partita_model_observed_latency_seconds", model="m") == pytest.approx(0.2)
    assert value(got, "partita_node_speed_gflops", node="cloud-1", source="learned") == 20.0
    t.retain([])  # the EdgeModel was deleted
    got = scrape(t)
    assert "partita_model_phase" not in got and "partita_plan_stage_info" not in got


def test_reconciles_and_errors_by_kind_and_reason() -> None:
    t = Telemetry()
    t.reconciled("EdgeModel", "profile", Outcome({}, ()))
    failed = Outcome(
        {}, (Event(EventType.WARNING, "DigestMismatch", "sha256 differs"),), retry_after_s=5
    )
    t.reconciled("EdgeModel", "profile", failed)
    t.reconciled("DevicePool", "pool", Outcome({}, (), permanent_error="bad"))
    got = scrape(t)
    assert value(got, "partita_reconciles_total", kind="EdgeModel", controller="profile") == 2.0
    assert value(got, "partita_reconcile_errors_total", reason="DigestMismatch") == 1.0
    assert value(got, "partita_reconcile_errors_total", kind="DevicePool") == 1.0
    assert value(got, "partita_reconcile_errors_total", reason="PermanentError") == 1.0


def test_link_estimates_say_whether_they_were_measured() -> None:
    t = Telemetry()
    obs = Observation(taken_at=1_700_000_000.0, links={("edge", "cloud"): LinkObservation(1e9)})
    t.observed(obs)
    t.freshness(True)
    t.cluster(FAST, obs)
    got = scrape(t)
    assert value(got, "partita_link_bandwidth_estimate_bps", source="measured") == 1e9
    assert value(got, "partita_link_rtt_estimate_seconds", source_pool="edge") == 0.02
    assert value(got, "partita_node_info", node="edge-1", pool="edge", tier="edge") == 1.0
    assert value(got, "partita_metrics_fresh") == 1.0
    assert value(got, "partita_metrics_last_poll_timestamp_seconds") == 1_700_000_000.0
    t.cluster(SLOW, None)  # no measurement: the DevicePools' declared figures
    assert value(scrape(t), "partita_link_bandwidth_estimate_bps", source="declared") == 1e6


def test_a_model_that_is_not_planned_yet_has_a_phase_and_no_plan() -> None:
    t = Telemetry()
    status = loop_status(
        ModelState(), pre_plan_report(MODEL), [], now="", generation=1, observed_p95_s=None,
        speeds=[],
    )  # fmt: skip
    t.model_status(MODEL, status)
    got = scrape(t)
    assert value(got, "partita_model_phase", phase="Pending") == 1.0
    assert "partita_plan_revision" not in got
