"""PlacementService without a cluster: deploy, switch only when ready, learn, keep, move."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from partita.kube.manifests import ModelRef
from partita.kube.placement import PlacementService
from partita.model.types import CutPoint, ModelProfile, NodeCost, OpClass, TensorInfo
from partita.planner import (
    ClusterSnapshot,
    DevicePoolState,
    LinkEstimate,
    ModelRequest,
    NodeState,
    Plan,
    Rescheduling,
    Tier,
)

MiB = 2**20


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
REF = ModelRef("m", "ns", "uid", "file:///m.onnx", None, {}, "edge")
REQUEST = ModelRequest(
    name="m",
    namespace="ns",
    data_source="edge",
    rescheduling=Rescheduling(min_improvement=0.4, cooldown_s=0.0),
)


def _snapshot(bandwidth_bps: float, edge_ready: bool = True) -> ClusterSnapshot:
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


@dataclass
class FakeCluster:
    ready: bool = False
    applied: list[int] = field(default_factory=list)
    entry: list[int] = field(default_factory=list)
    deleted_keeping: list[set[int]] = field(default_factory=list)

    def apply_revision(self, ref: ModelRef, plan: Plan) -> int:
        self.applied.append(plan.revision)
        return 3

    def revision_readiness(self, ref: ModelRef, plan: Plan) -> object:
        @dataclass
        class R:
            ready: bool
            detail: str

        return R(self.ready, "waiting")

    def switch_entry(self, ref: ModelRef, revision: int) -> None:
        self.entry.append(revision)

    def delete_revisions(self, ref: ModelRef, keep: set[int]) -> list[str]:
        self.deleted_keeping.append(keep)
        return []


def _service(cluster: FakeCluster, clock: list[float]) -> PlacementService:
    return PlacementService(cluster, clock=lambda: clock[0], drain_s=5.0)


def test_new_revision_serves_only_when_ready_and_old_goes_after_the_drain() -> None:
    cluster, clock = FakeCluster(), [0.0]
    svc = _service(cluster, clock)
    fast = _snapshot(1e9)
    r = svc.step("ns/m", REF, REQUEST, PROFILE, fast, metrics_fresh=True)
    assert r.phase == "Deploying" and cluster.applied == [1] and cluster.entry == []
    r = svc.step("ns/m", REF, REQUEST, PROFILE, fast, metrics_fresh=True)
    assert r.phase == "Deploying" and cluster.entry == []  # not ready: no switch
    cluster.ready = True
    clock[0] = 1.0
    r = svc.step("ns/m", REF, REQUEST, PROFILE, fast, metrics_fresh=True)
    assert cluster.entry == [1] and r.phase == "Ready"
    assert cluster.deleted_keeping == []  # still draining
    clock[0] = 7.0
    svc.step("ns/m", REF, REQUEST, PROFILE, fast, metrics_fresh=True)
    assert cluster.deleted_keeping == [{1}]


def test_stale_metrics_keep_the_plan_and_node_loss_moves_it() -> None:
    cluster, clock = FakeCluster(ready=True), [0.0]
    svc = _service(cluster, clock)
    svc.step("ns/m", REF, REQUEST, PROFILE, _snapshot(1e6), metrics_fresh=True)
    svc.step("ns/m", REF, REQUEST, PROFILE, _snapshot(1e6), metrics_fresh=True)
    serving = svc.models["ns/m"].serving
    assert serving is not None and cluster.entry == [1]
    clock[0] = 100.0
    # The link got much faster, but nothing fresh says so: no new revision.
    r = svc.step("ns/m", REF, REQUEST, PROFILE, _snapshot(1e9), metrics_fresh=False)
    assert cluster.applied == [1]
    assert ("MetricsFresh", "False") in {(c[0], c[1]) for c in r.conditions}
    # At 1 Mbit/s the 600 kB input costs more than computing at the edge.
    assert serving.stages[0].pool == "edge"
    r = svc.step(
        "ns/m", REF, REQUEST, PROFILE, _snapshot(1e6, edge_ready=False), metrics_fresh=True
    )
    assert cluster.applied[-1] == 2 and "lost" in r.message


def test_observed_compute_refines_the_node_speed() -> None:
    cluster, clock = FakeCluster(ready=True), [0.0]
    svc = _service(cluster, clock)
    snap = _snapshot(1e9)
    svc.step("ns/m", REF, REQUEST, PROFILE, snap, metrics_fresh=True)
    svc.step("ns/m", REF, REQUEST, PROFILE, snap, metrics_fresh=True)
    plan = svc.models["ns/m"].serving
    assert plan is not None
    node = plan.stages[0].shards[0].node
    # The server reports four times the predicted compute: the node is slower than profiled.
    observed = {(0, node): plan.stages[0].compute_s * 4}
    svc.step("ns/m", REF, REQUEST, PROFILE, snap, metrics_fresh=True, observed_compute=observed)
    assert svc.models["ns/m"].speed_factors[node] < 1.0


def test_a_serving_model_gives_way_to_a_higher_priority_one() -> None:
    cluster, clock = FakeCluster(ready=True), [0.0]
    svc = _service(cluster, clock)
    snap = _snapshot(1e9)
    low = replace(REQUEST, name="low", priority=1, pools=("edge",), cpu=3.0)
    high = replace(REQUEST, name="high", priority=9, pools=("edge",), cpu=3.0)
    low_ref, high_ref = replace(REF, name="low"), replace(REF, name="high")
    for _ in range(2):
        svc.step("ns/low", low_ref, low, PROFILE, snap, metrics_fresh=True)
    assert svc.models["ns/low"].serving is not None
    # One edge node of 4 cores, 3 per model: the newcomer with the higher priority is placed...
    r = svc.step("ns/high", high_ref, high, PROFILE, snap, metrics_fresh=True)
    assert r.phase == "Deploying"
    # ...and the serving low-priority model is refused, its objects deleted.
    r = svc.step("ns/low", low_ref, low, PROFILE, snap, metrics_fresh=True)
    assert r.phase == "Unschedulable" and "higher-priority" in r.message
    assert cluster.deleted_keeping[-1] == set()
    assert svc.models["ns/low"].serving is None


def test_a_revision_whose_node_is_lost_while_deploying_is_given_up() -> None:
    cluster, clock = FakeCluster(ready=False), [0.0]
    svc = _service(cluster, clock)
    slow_link = _snapshot(1e6)  # the edge node is chosen
    svc.step("ns/m", REF, REQUEST, PROFILE, slow_link, metrics_fresh=True)
    pending = svc.models["ns/m"].pending
    assert pending is not None and pending.stages[0].pool == "edge"
    r = svc.step(
        "ns/m", REF, REQUEST, PROFILE, _snapshot(1e6, edge_ready=False), metrics_fresh=True
    )
    assert ("Warning", "DeployFailed") in {(e[0], e[1]) for e in r.events}
    assert cluster.deleted_keeping[-1] == set()  # nothing served yet, nothing to keep
    assert cluster.applied[-1] == 2  # planned again without the lost node
    assert all(s.pool != "edge" for s in svc.models["ns/m"].pending.stages)


def test_a_relay_stage_teaches_nothing_about_node_speed() -> None:
    from partita.kube.placement import ModelState
    from partita.planner import Compression, ShardPlacement, Stage

    def stage(i: int, start: int, end: int, node: str, pool: str) -> Stage:
        return Stage(
            index=i,
            pool=pool,
            start=start,
            end=end,
            shards=(ShardPlacement(node, 1.0, 0.0, MiB),),
            inputs=("x",),
            outputs=("y",),
            input_compression=Compression.NONE,
        )

    # Stage 0 relays one operator of four (25% of the FLOPs would count); make it 0 of 4.
    plan = Plan(
        request=REQUEST,
        stages=(stage(0, 0, 0, "edge-1", "edge"), stage(1, 0, 4, "cloud-1", "cloud")),
        revision=1,
        output_transfer_s=0.0,
        latency_s=0.2,
        throughput_rps=5.0,
        energy_j=1.0,
        cost=0.2,
    )
    svc = _service(FakeCluster(ready=True), [0.0])
    st = ModelState(REF, REQUEST, PROFILE, serving=plan)
    svc._learn(st, PROFILE, _snapshot(1e9), {(0, "edge-1"): 0.002, (1, "cloud-1"): 10.0})
    assert "edge-1" not in st.speed_factors  # nothing to learn from a relay
    assert 0.25 <= st.speed_factors["cloud-1"] < 1.0  # much slower than predicted, bounded
