"""The loop's decisions for one model, as pure code with an injected clock: deploy, switch only
when ready, drain then delete, keep when nothing changed, move on node loss, keep on stale
metrics, give way to a higher priority, retry what the cluster refused, learn node speeds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from partita.api.meta import ConditionStatus
from partita.control.outcome import EventType
from partita.control.step import (
    LEARN_MIN_SHARE,
    REAPPLY_AFTER_S,
    ApplyRevision,
    DeleteRevisions,
    Failure,
    ModelInputs,
    ModelState,
    Readiness,
    StepResult,
    SwitchEntry,
    Timing,
    step,
)
from partita.model.types import CutPoint, ModelProfile, NodeCost, OpClass, TensorInfo
from partita.planner import (
    ClusterSnapshot,
    Compression,
    DevicePoolState,
    LinkEstimate,
    ModelRequest,
    NodeState,
    Rescheduling,
    ShardPlacement,
    Slo,
    Stage,
    Tier,
    plan_for,
)

MiB = 2**20
TIMING = Timing(drain_s=5.0, deploy_timeout_s=60.0)


def _t(name: str, nbytes: int) -> TensorInfo:
    return TensorInfo(name, "float32", (nbytes // 4,), nbytes)


PROFILE = ModelProfile(
    digest="2" * 64,
    inputs=(_t("x", 600_000),),
    outputs=(_t("y", 4_000),),
    nodes=tuple(
        NodeCost(i, f"n{i}", "Conv", OpClass.CONV, 10**9, MiB, 4096, MiB) for i in range(4)
    ),
    cut_points=(CutPoint(2, (_t("h", 50_000),), 50_000, 2 * 10**9, 2 * MiB),),
    total_flops=4 * 10**9,
    param_bytes=4 * MiB,
)
REQUEST = ModelRequest(
    name="m",
    namespace="ns",
    data_source="edge",
    rescheduling=Rescheduling(min_improvement=0.4, cooldown_s=30.0),
)


def snapshot(bandwidth_bps: float, edge_ready: bool = True) -> ClusterSnapshot:
    speed_edge = {c: 2e9 for c in OpClass}
    speed_cloud = {c: 4e10 for c in OpClass}
    return ClusterSnapshot(
        nodes=(
            NodeState("edge-1", "edge", Tier.EDGE, 4.0, 4096 * MiB, speed_edge, ready=edge_ready),
            NodeState("cloud-1", "cloud", Tier.CLOUD, 32.0, 65536 * MiB, speed_cloud),
        ),
        pools=(DevicePoolState("edge", Tier.EDGE), DevicePoolState("cloud", Tier.CLOUD)),
        links=(LinkEstimate("edge", "cloud", bandwidth_bps, 0.02),),
    )


SLOW, FAST = snapshot(1e6), snapshot(1e9)  # 1 Mbit/s: compute at the edge; 1 Gbit/s: cloud


def inputs(
    snap: ClusterSnapshot,
    revisions: Mapping[int, bool] | None = None,
    *,
    fresh: bool = True,
    request: ModelRequest = REQUEST,
    **more: object,
) -> ModelInputs:
    ready = {
        r: Readiness(ok, "ready" if ok else "0/1 ready") for r, ok in (revisions or {}).items()
    }
    return ModelInputs(request, PROFILE, snap, fresh, ready, **more)  # type: ignore[arg-type]


def run(state: ModelState, inp: ModelInputs, now: float) -> StepResult:
    return step(state, inp, now, TIMING)


def conditions(result: StepResult) -> dict[str, tuple[ConditionStatus, str]]:
    return {c.type: (c.status, c.reason) for c in result.report.conditions}


def serving(snap: ClusterSnapshot, now: float = 0.0) -> ModelState:
    """A model whose first revision was deployed at t=0 and took the traffic at `now`."""
    first = run(ModelState(), inputs(snap), 0.0)
    return run(first.state, inputs(snap, {1: True}), now).state


def test_first_placement_deploys_and_switches_only_when_ready() -> None:
    r = run(ModelState(), inputs(FAST), 0.0)
    assert r.actions == (ApplyRevision(r.state.rollout.plan),)  # type: ignore[union-attr]
    assert r.report.phase == "Deploying" and r.state.revision == 1
    assert conditions(r)["Ready"] == (ConditionStatus.FALSE, "Deploying")
    assert [e.reason for e in r.report.events] == ["Planned"]
    # Objects exist, not ready: wait, no switch, nothing applied again.
    waiting = run(r.state, inputs(FAST, {1: False}), 1.0)
    assert waiting.actions == () and waiting.report.phase == "Deploying"
    assert waiting.wake_at == 60.0  # the rollout's deadline
    ready = run(waiting.state, inputs(FAST, {1: True}), 2.0)
    assert ready.actions == (SwitchEntry(1),)
    assert ready.report.phase == "Ready" and ready.state.serving is not None
    assert conditions(ready)["Ready"] == (ConditionStatus.TRUE, "Serving")
    assert [e.reason for e in ready.report.events] == ["Deployed"]


def test_nothing_changed_means_no_action_and_no_event() -> None:
    state = serving(FAST)
    for now in (40.0, 80.0, 120.0):
        r = run(state, inputs(FAST, {1: True}), now)
        assert r.actions == () and r.report.events == ()
        assert r.report.phase == "Ready" and r.state.serving == state.serving
        state = r.state


def test_objects_still_missing_after_a_while_are_applied_again() -> None:
    first = run(ModelState(), inputs(FAST), 0.0)
    soon = run(first.state, inputs(FAST, {}), 1.0)
    assert soon.actions == ()  # the watch has not shown them yet
    late = run(soon.state, inputs(FAST, {}), REAPPLY_AFTER_S + 0.5)
    assert [type(a) for a in late.actions] == [ApplyRevision]


def test_node_loss_moves_make_before_break_then_drains_and_deletes() -> None:
    state = serving(SLOW)
    assert state.serving is not None and state.serving.stages[0].pool == "edge"
    lost = snapshot(1e6, edge_ready=False)
    r = run(state, inputs(lost, {1: True}), 5.0)  # within the cooldown: node loss moves anyway
    assert [type(a) for a in r.actions] == [ApplyRevision]
    assert r.state.rollout is not None and r.state.rollout.plan.revision == 2
    assert all(s.pool == "cloud" for s in r.state.rollout.plan.stages)
    assert r.report.phase == "Deploying"
    assert conditions(r)["Ready"] == (ConditionStatus.TRUE, "Serving")  # revision 1 serves
    assert [e.reason for e in r.report.events] == ["Rescheduling"]
    switched = run(r.state, inputs(lost, {1: True, 2: True}), 6.0)
    assert switched.actions == (SwitchEntry(2),)
    assert [e.reason for e in switched.report.events] == ["Rescheduled"]
    draining = run(switched.state, inputs(lost, {1: True, 2: True}), 8.0)
    assert draining.actions == () and draining.wake_at == 11.0
    done = run(draining.state, inputs(lost, {1: True, 2: True}), 11.5)
    assert done.actions == (DeleteRevisions(frozenset({2})),)


def test_a_rescheduling_knob_change_moves_nothing() -> None:
    # A better plan exists, but not by minImprovement: it stays, also when the user then
    # changes the cooldown (the knobs say when to move, not what the plan must be).
    patient = replace(REQUEST, rescheduling=Rescheduling(min_improvement=0.99, cooldown_s=30.0))
    first = run(ModelState(), inputs(SLOW, request=patient), 0.0)
    state = run(first.state, inputs(SLOW, {1: True}, request=patient), 1.0).state
    kept = run(state, inputs(FAST, {1: True}, request=patient), 100.0)
    assert kept.actions == ()
    knob = replace(patient, rescheduling=Rescheduling(min_improvement=0.99, cooldown_s=7.0))
    r = run(kept.state, inputs(FAST, {1: True}, request=knob), 101.0)
    assert r.actions == () and r.report.phase == "Ready"
    assert r.state.serving is not None and r.state.serving.request == knob
    assert r.state.serving.placement == state.serving.placement  # type: ignore[union-attr]


def test_stale_metrics_keep_the_plan() -> None:
    state = serving(SLOW)
    # The link got a thousand times faster, but nothing fresh says so: no new revision.
    r = run(state, inputs(FAST, {1: True}, fresh=False), 100.0)
    assert r.actions == ()
    assert conditions(r)["MetricsFresh"] == (ConditionStatus.FALSE, "Stale")
    moved = run(state, inputs(FAST, {1: True}), 100.0)
    assert [type(a) for a in moved.actions] == [ApplyRevision]


def test_a_spec_change_that_keeps_the_placement_redeploys_nothing() -> None:
    state = serving(FAST)
    stricter = replace(REQUEST, slo=Slo(p95_latency_s=10.0))
    r = run(state, inputs(FAST, {1: True}, request=stricter), 100.0)
    assert r.actions == ()
    assert r.state.serving is not None and r.state.serving.request == stricter
    assert r.state.serving.revision == 1


def test_a_serving_model_gives_way_to_a_higher_priority_one() -> None:
    low = replace(REQUEST, name="low", priority=1, pools=("edge",), cpu=3.0)
    high = replace(REQUEST, name="high", priority=9, pools=("edge",), cpu=3.0)
    deploying = run(ModelState(), inputs(FAST, request=low), 0.0).state
    state = run(deploying, inputs(FAST, {1: True}, request=low), 1.0).state
    assert state.serving is not None
    # One edge node of 4 cores, 3 per model: the newcomer takes it and the low one yields.
    high_plan = run(ModelState(), inputs(FAST, request=high), 2.0).state.rollout
    assert high_plan is not None
    others = [(high, PROFILE, high_plan.plan)]
    r = run(state, inputs(FAST, {1: True}, request=low, others=others), 3.0)
    assert r.actions == (DeleteRevisions(frozenset()),)
    assert r.report.phase == "Unschedulable" and "higher-priority" in r.report.message
    assert conditions(r)["Planned"] == (ConditionStatus.FALSE, "Preempted")
    assert r.state.serving is None
    assert [(e.type, e.reason) for e in r.report.events] == [(EventType.WARNING, "Preempted")]
    # Later steps keep saying why, and it is placed again once capacity returns.
    later = run(r.state, inputs(FAST, request=low, others=others), 4.0)
    assert later.report.phase == "Unschedulable" and later.actions == ()
    assert conditions(later)["Ready"] == (ConditionStatus.FALSE, "Preempted")
    back = run(later.state, inputs(FAST, request=low), 5.0)
    assert back.report.phase == "Deploying" and not back.state.preempted


def test_a_rollout_whose_node_is_lost_is_given_up_and_planned_again() -> None:
    first = run(ModelState(), inputs(SLOW), 0.0)
    assert first.state.rollout is not None
    assert first.state.rollout.plan.stages[0].pool == "edge"
    r = run(first.state, inputs(snapshot(1e6, edge_ready=False), {1: False}), 1.0)
    assert r.actions[0] == DeleteRevisions(frozenset())  # nothing served yet, nothing kept
    assert isinstance(r.actions[1], ApplyRevision) and r.actions[1].plan.revision == 2
    assert all(s.pool != "edge" for s in r.actions[1].plan.stages)
    assert "DeployFailed" in [e.reason for e in r.report.events]


def test_a_rollout_not_ready_by_its_deadline_is_given_up() -> None:
    state = serving(FAST)
    moved = run(state, inputs(snapshot(1e6), {1: True}), 100.0)
    assert moved.state.rollout is not None
    late = run(moved.state, inputs(snapshot(1e6), {1: True, 2: False}), 161.0)
    assert late.actions[0] == DeleteRevisions(frozenset({1}))
    assert "DeployFailed" in [e.reason for e in late.report.events]


def test_what_the_cluster_refused_is_retried_after_the_backoff() -> None:
    first = run(ModelState(), inputs(FAST), 0.0)
    failure = Failure("Forbidden", "cannot create Secret ns/m-stage-token: 403 Forbidden", 1, 4.0)
    refused = replace(first.state, failure=failure)
    r = run(refused, inputs(FAST, {}), 1.0)
    assert r.actions == () and r.wake_at == 4.0
    assert conditions(r)["Planned"] == (ConditionStatus.FALSE, "Forbidden")
    assert conditions(r)["Ready"] == (ConditionStatus.FALSE, "Forbidden")
    assert "403" in r.report.message
    again = run(refused, inputs(FAST, {}), 4.5)
    assert [type(a) for a in again.actions] == [ApplyRevision]


def test_revisions_a_crash_left_behind_are_deleted() -> None:
    state = serving(FAST)
    r = run(state, inputs(FAST, {1: True, 7: False}), 50.0)
    assert r.actions == (DeleteRevisions(frozenset({1})),)


def _slow_node(state: ModelState) -> tuple[str, dict[tuple[int, int, str], float]]:
    """Stage 0's node, and a server report of four times its predicted compute: the node is
    slower than profiled."""
    plan = state.serving
    assert plan is not None
    node = plan.stages[0].shards[0].node
    return node, {(plan.revision, 0, node): plan.prediction.stages[0].compute_s * 4}


def test_observed_compute_refines_the_node_speed() -> None:
    state = serving(FAST)
    node, observed = _slow_node(state)
    r = run(state, inputs(FAST, {1: True}, observed_compute=observed, observed_at=99.0), 100.0)
    assert r.state.speed_factors[node] < 1.0


def test_each_observation_teaches_once() -> None:
    # Every status write wakes the loop: the same observation is seen by several steps.
    state = serving(FAST)
    node, observed = _slow_node(state)
    first = run(state, inputs(FAST, {1: True}, observed_compute=observed, observed_at=99.0), 100.0)
    factor = first.state.speed_factors[node]
    again = first.state
    for t in (100.5, 101.0, 101.5):
        seen = inputs(FAST, {1: True}, observed_compute=observed, observed_at=99.0)
        again = run(again, seen, t).state
    assert again.speed_factors[node] == factor
    # The next poll teaches again: the factor moves on toward what it measured.
    later = inputs(FAST, {1: True}, observed_compute=observed, observed_at=101.0)
    assert run(again, later, 102.0).state.speed_factors[node] < factor


def test_a_new_revision_learns_nothing_from_what_its_predecessor_measured() -> None:
    # Revision 1 runs the whole model on edge-1; revision 2 only its first half there. The
    # step that switches to 2 still sees what revision 1's server measured on edge-1.
    eager = replace(REQUEST, rescheduling=Rescheduling(min_improvement=0.1, cooldown_s=0.0))
    first = run(ModelState(), inputs(snapshot(1e5), request=eager), 0.0)
    whole = run(first.state, inputs(snapshot(1e5), {1: True}, request=eager), 1.0).state
    assert whole.serving is not None and whole.serving.stages[0].end == 4
    moving = run(whole, inputs(snapshot(1e6), {1: True}, request=eager), 50.0).state
    assert moving.rollout is not None
    half = moving.rollout.plan.stages[0]
    assert (half.shards[0].node, half.end) == ("edge-1", 2)
    measured = {(1, 0, "edge-1"): whole.serving.prediction.stages[0].compute_s}
    seen = inputs(
        snapshot(1e6), {1: True, 2: True}, request=eager, observed_compute=measured,
        observed_at=55.0,
    )  # fmt: skip
    switched = run(moving, seen, 56.0)
    assert switched.actions[0] == SwitchEntry(2)
    assert "edge-1" not in switched.state.speed_factors


def test_a_relay_stage_teaches_nothing_about_node_speed() -> None:
    def stage(i: int, start: int, end: int, node: str, pool: str) -> Stage:
        return Stage(
            index=i,
            pool=pool,
            start=start,
            end=end,
            shards=(ShardPlacement(node, 1.0),),
            inputs=("x",),
            outputs=("y",),
            input_compression=Compression.NONE,
        )

    # Stage 0 holds none of the four operators: below LEARN_MIN_SHARE of the FLOPs.
    assert LEARN_MIN_SHARE > 0
    stages = (stage(0, 0, 0, "edge-1", "edge"), stage(1, 0, 4, "cloud-1", "cloud"))
    plan = plan_for(REQUEST, stages, PROFILE, FAST)
    state = ModelState(serving=plan, revision=1, serving_since=0.0)
    observed = {(1, 0, "edge-1"): 0.002, (1, 1, "cloud-1"): 10.0}
    r = run(state, inputs(FAST, {1: True}, observed_compute=observed, observed_at=99.0), 100.0)
    assert "edge-1" not in r.state.speed_factors
    assert r.state.speed_factors["cloud-1"] < 1.0


def test_int8_over_the_measured_budget_is_planned_again_in_float32() -> None:
    from partita.planner import Compression, Partitioning, Quantization

    # Only int8 fits the edge node: the first plan runs int8; its measured drop is too high.
    tight = replace(
        REQUEST,
        pools=("edge",),
        partitioning=Partitioning(mode="none"),
        quantization=Quantization(allowed=True, max_accuracy_drop=0.01, measured_accuracy_drop=0.0),
    )
    small = replace(
        FAST,
        nodes=tuple(
            replace(n, memory_allocatable=35 * MiB) if n.pool == "edge" else n for n in FAST.nodes
        ),
    )  # float32 needs 37 MiB there, int8 34 MiB
    measured: list[Any] = []

    def over_budget(plan: Any) -> str | None:
        measured.append(plan)
        return "the plan's measured top1-disagreement is 0.0400 over 32 inputs, above 0.01"

    first = run(ModelState(), inputs(small, request=tight, accuracy_check=over_budget), 0.0)
    assert measured and any(s.int8 for s in measured[0].stages)
    assert first.actions == () and first.report.phase == "Planning"
    assert conditions(first)["Planned"] == (ConditionStatus.FALSE, "AccuracyRefused")
    assert [e.reason for e in first.report.events] == ["AccuracyRefused"]
    assert first.state.no_int8 is not None and first.wake_at == 0.0
    # The next step plans without int8: no cut past fp16, no int8 stage.
    again = run(first.state, inputs(small, request=tight, accuracy_check=over_budget), 0.0)
    assert len(measured) == 1
    assert again.report.phase == "Unschedulable"  # float32 fits nowhere, and it says so
    assert not any(isinstance(a, ApplyRevision) for a in again.actions)
    assert Compression.INT8 not in {s.input_compression for p in measured for s in p.stages}
