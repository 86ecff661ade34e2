"""The loop's status, both ways: what a step writes (phase, plan, rollout, conditions, node
speeds) and what a restarted loop reads back (the same placements, revision and times)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from test_control_step import FAST, PROFILE, REQUEST, SLOW, inputs, run, serving

from partita.api.edgemodel import EdgeModel, EdgeModelStatus
from partita.api.meta import Condition, ConditionStatus
from partita.control.loop import deployment_info, pod_info, pre_plan_report, readiness
from partita.control.status import loop_status, node_speeds, state_from_status, status_fields
from partita.control.step import ModelState
from partita.planner import Plan

NOW = "2026-12-01T10:00:00Z"


def written(state: ModelState, report: object, old: list[Condition] | None = None) -> dict:
    return status_fields(
        loop_status(
            state,
            report,  # type: ignore[arg-type]
            old or [],
            now=NOW,
            generation=4,
            observed_p95_s=0.1234,
            speeds=node_speeds(state.serving, FAST, {"cloud-1": 0.5}, set()),
        )
    )


def test_a_step_writes_the_plan_the_rollout_and_its_own_conditions_only() -> None:
    state = serving(SLOW, now=10.0)
    moved = run(state, inputs(FAST, {1: True}), 100.0)  # a faster link: a rollout to the cloud
    foreign = Condition(type="Profiled", status=ConditionStatus.TRUE, reason="Profiled")
    status = written(moved.state, moved.report, [foreign])
    assert status["phase"] == "Deploying"
    assert {c["type"] for c in status["conditions"]} == {"Planned", "Ready", "MetricsFresh"}
    plan, rollout = status["plan"], status["rollout"]
    assert plan["revision"] == 1 and rollout["revision"] == 2
    assert plan["since"] == "1970-01-01T00:00:10Z" and plan["observedP95Ms"] == 123.4
    stage, first = plan["stages"][0], state.serving.stages[0]  # type: ignore[union-attr]
    assert (stage["pool"], stage["start"], stage["end"]) == ("edge", 0, first.end)
    assert stage["shards"] == [{"node": "edge-1", "proportion": 1.0}]
    assert rollout["stages"][0]["pool"] == "cloud"
    # cloud-1 was learned at half its profiled 40 GFLOP/s; edge-1 is as profiled.
    assert status["nodeSpeeds"] == [
        {"node": "cloud-1", "gflops": 20.0, "source": "learned"},
        {"node": "edge-1", "gflops": 2.0, "source": "profiled"},
    ]
    assert "model" not in status and "observedGeneration" not in status  # the reconciler's


def test_a_restarted_loop_adopts_what_the_status_recorded() -> None:
    state = serving(SLOW, now=10.0)
    moved = run(state, inputs(FAST, {1: True}), 100.0)
    status = EdgeModelStatus.model_validate(written(moved.state, moved.report))
    back = state_from_status(status, REQUEST, PROFILE, FAST, existing_revisions=[1, 2])
    assert back.serving is not None and moved.state.serving is not None
    assert back.serving.placement == moved.state.serving.placement
    assert back.serving_since == 10.0
    assert back.rollout is not None and moved.state.rollout is not None
    assert back.rollout.plan.placement == moved.state.rollout.plan.placement
    assert back.rollout.since == 100.0
    assert back.revision == 2
    # The adopted state steps on without deploying anything new.
    again = run(back, inputs(FAST, {1: True, 2: True}), 101.0)
    assert [type(a).__name__ for a in again.actions] == ["SwitchEntry"]


def test_a_status_from_another_model_file_is_not_adopted() -> None:
    state = serving(FAST)
    doc = written(state, run(state, inputs(FAST, {1: True}), 50.0).report)
    doc["plan"]["stages"][0]["end"] = 99  # past the end of this profile
    status = EdgeModelStatus.model_validate(doc)
    back = state_from_status(status, REQUEST, PROFILE, FAST, existing_revisions=[5])
    assert back.serving is None and back.revision == 5
    assert state_from_status(None, REQUEST, PROFILE, FAST).serving_since == -math.inf


def _model(conditions: list[dict]) -> EdgeModel:
    return EdgeModel.parse(
        {
            "metadata": {"name": "m", "namespace": "ns"},
            "spec": {"source": {"uri": "file:///m.onnx", "sha256": "a" * 64}, "dataSource": "e"},
            "status": {"conditions": conditions},
        }
    )


def test_the_phase_before_a_plan_follows_the_reconciler_conditions() -> None:
    assert pre_plan_report(_model([])).phase == "Pending"
    fetched = {"type": "ModelFetched", "status": "True", "reason": "DigestVerified"}
    profiled = {"type": "Profiled", "status": "True", "reason": "Profiled"}
    assert pre_plan_report(_model([fetched, profiled])).phase == "Planning"
    wrong = {**fetched, "status": "False", "reason": "DigestMismatch", "message": "fix sha256"}
    report = pre_plan_report(_model([wrong]))
    assert report.phase == "Failed" and report.message == "fix sha256"
    ready = {c.type: (c.status, c.reason) for c in report.conditions}["Ready"]
    assert ready == (ConditionStatus.FALSE, "DigestMismatch")


def test_readiness_names_the_servers_not_ready() -> None:
    state = serving(FAST)
    assert state.serving is not None
    body = {
        "metadata": {
            "name": "m-r1-s0",
            "namespace": "ns",
            "labels": {
                "partita.dev/component": "stage-server",
                "partita.dev/model": "m",
                "partita.dev/revision": "1",
            },
        },
        "spec": {"replicas": 1},
        "status": {
            "conditions": [
                {
                    "type": "ReplicaFailure",
                    "status": "True",
                    "reason": "FailedCreate",
                    "message": "exceeded quota",
                }
            ]
        },
    }
    info = deployment_info(body)
    assert info is not None and info.revision == 1 and not info.ready
    got = readiness("m", state.serving, {info.name: info})
    assert not got.ready and "FailedCreate: exceeded quota" in got.detail
    assert deployment_info({"metadata": {"labels": {}}}) is None
    assert "not created yet" in readiness("m", state.serving, {}).detail


def test_a_pod_that_cannot_run_says_why_in_the_readiness() -> None:
    state = serving(FAST)
    assert state.serving is not None
    tags = {"partita.dev/component": "stage-server", "partita.dev/model": "m",
            "partita.dev/revision": "1", "partita.dev/stage": "0"}  # fmt: skip
    pod = pod_info(
        {
            "metadata": {"name": "m-r1-s0-abc", "namespace": "ns", "labels": tags},
            "status": {
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/6 nodes are available: 1 node(s) had untolerated taint",
                    }
                ]
            },
        }
    )
    assert pod is not None and pod.server == "m-r1-s0"
    deployment = deployment_info(
        {"metadata": {"name": "m-r1-s0", "namespace": "ns", "labels": tags}, "spec": {}}
    )
    assert deployment is not None
    got = readiness("m", state.serving, {deployment.name: deployment}, {pod.server: pod.problem})
    assert "m-r1-s0: Unschedulable: 0/6 nodes are available" in got.detail
    image = {"reason": "ErrImagePull", "message": "no such image"}
    waiting = {"containerStatuses": [{"state": {"waiting": image}}]}
    pulled = pod_info({"metadata": {"labels": tags}, "status": waiting})
    assert pulled is not None and pulled.problem == "ErrImagePull: no such image"
    # A gateway's pod is named for its server: the first stage's and a later stage's.
    for label, server in (("gw", "m-r1-gw"), ("gw-2", "m-r1-s2-gw")):
        gateway = pod_info({"metadata": {"labels": {**tags, "partita.dev/stage": label}}})
        assert gateway is not None and gateway.server == server


def test_routers_avoid_only_the_plans_nodes_in_their_own_pool() -> None:
    from partita.api.devicepool import DevicePool
    from partita.control.inputs import node_info
    from partita.control.loop import _entry_placement

    def node(name: str, pool: str) -> Any:
        labels = {"partita.dev/pool": pool}
        ready = {"conditions": [{"type": "Ready", "status": "True"}]}
        return node_info({"metadata": {"name": name, "labels": labels}, "status": ready})

    edge = DevicePool.parse(
        {
            "metadata": {"name": "e"},
            "spec": {"tier": "edge", "nodeSelector": {"partita.dev/pool": "e"}},
        }
    )
    nodes = [node("e-1", "e"), node("e-2", "e"), node("c-1", "c"), node("c-2", "c")]
    on_cloud, at_edge = serving(FAST).serving, serving(SLOW).serving
    assert on_cloud is not None and at_edge is not None
    moves = [replace_nodes(on_cloud, "c-1"), replace_nodes(on_cloud, "c-2")]
    # A move between cloud nodes renders the routers' placement unchanged.
    placements = {_entry_placement(_model([]), [edge], nodes, [plan]) for plan in moves}
    assert len(placements) == 1 and next(iter(placements)).avoid == ()
    beside = _entry_placement(_model([]), [edge], nodes, [replace_nodes(at_edge, "e-1")])
    assert beside.avoid == ("e-1",) and beside.replicas == 1


def replace_nodes(plan: Plan, node: str) -> Plan:
    """`plan` with every shard on `node`."""
    stages = tuple(
        dataclasses.replace(s, shards=tuple(dataclasses.replace(p, node=node) for p in s.shards))
        for s in plan.stages
    )
    return dataclasses.replace(plan, stages=stages)
