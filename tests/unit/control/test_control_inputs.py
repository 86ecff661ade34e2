"""The planner's inputs from DevicePools, Nodes and an Observation, typed all the way: the
cluster file of `partita plan --cluster` and the operator's indexes take the same path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from partita.api.devicepool import DevicePool
from partita.api.edgemodel import EdgeModel
from partita.control.inputs import (
    InputError,
    apply_observation,
    cluster_from_documents,
    model_request,
    node_info,
    snapshot_from_pools,
)
from partita.metrics.observation import LinkObservation, NodeUsage, Observation
from partita.planner import Tier

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
GiB = 2**30


def load(name: str) -> Any:
    pools, nodes, obs = cluster_from_documents(
        yaml.safe_load_all((EXAMPLES / "cluster" / name).read_text())
    )
    return apply_observation(snapshot_from_pools(pools, nodes, reference_gflops=20.0), obs)


def pool(name: str, **spec: Any) -> DevicePool:
    body = {"tier": "edge", "nodeSelector": {"partita.dev/pool": name}, **spec}
    return DevicePool.parse({"kind": "DevicePool", "metadata": {"name": name}, "spec": body})


def node(name: str, pool_name: str, cpu: str = "4", memory: str = "4Gi", **extra: Any) -> Any:
    return node_info(
        {
            "metadata": {"name": name, "labels": {"partita.dev/pool": pool_name}},
            "spec": extra.get("spec", {}),
            "status": {
                "allocatable": {"cpu": cpu, "memory": memory},
                "conditions": [{"type": "Ready", "status": extra.get("ready", "True")}],
            },
        }
    )


def test_example_cluster_maps_pools_nodes_links_and_usage() -> None:
    snap = load("edge-cloud.yaml")
    assert [p.name for p in snap.pools] == ["cameras", "cloud", "gateway"]
    cams = snap.nodes_in("cameras")
    assert len(cams) == 4 and all(n.tier is Tier.EDGE for n in cams)
    assert cams[0].memory_allocatable == 512 * 2**20  # capped by device.memory
    assert cams[0].speed_of(next(iter(cams[0].speed))) == 2.5e9  # declared throughput
    assert snap.node("cloud-2").ready is False
    assert snap.node("cloud-1").taints[0].key == "dedicated"
    assert snap.node("gw-0").memory_used == GiB  # 8Gi allocatable, 7Gi available
    link = snap.link("cloud", "cameras")  # measured one way, stands for both
    assert link is not None and link.bandwidth_bps == 8e6 and link.rtt_s == 0.04
    weak = load("weak-edge.yaml")
    # No LinkEstimate: the smaller uplink and the larger RTT of the two pools.
    default = weak.link("sensors", "cloud")
    assert default is not None and default.bandwidth_bps == 5e6 and default.rtt_s == 0.04


def test_speed_is_declared_or_the_reference_times_the_speed_factor() -> None:
    pools = [pool("a", device={"speedFactor": 0.25}), pool("b", device={"throughputGflops": 7})]
    snap = snapshot_from_pools(pools, [node("a-1", "a"), node("b-1", "b")], reference_gflops=20)
    assert set(snap.node("a-1").speed.values()) == {5e9}  # type: ignore[union-attr]
    assert set(snap.node("b-1").speed.values()) == {7e9}  # type: ignore[union-attr]


def test_a_node_in_two_pools_belongs_to_the_first_by_name_and_cordoned_is_tainted() -> None:
    both = node_info(
        {
            "metadata": {"name": "n", "labels": {"x": "1", "y": "1"}},
            "spec": {"unschedulable": True},
        }
    )
    pools = [
        DevicePool.parse({"metadata": {"name": n}, "spec": {"tier": "edge", "nodeSelector": sel}})
        for n, sel in (("zeta", {"x": "1"}), ("alpha", {"y": "1"}))
    ]
    snap = snapshot_from_pools(pools, [both], reference_gflops=1.0)
    assert [n.pool for n in snap.nodes] == ["alpha"]
    assert snap.nodes[0].taints[0].key == "node.kubernetes.io/unschedulable"


def test_an_observation_sets_usage_and_measured_links_only() -> None:
    pools = [pool("edge"), pool("cloud", tier="cloud")]
    snap = snapshot_from_pools(pools, [node("e-1", "edge"), node("c-1", "cloud", cpu="32")],
                               reference_gflops=10)  # fmt: skip
    default = snap.link("edge", "cloud")
    assert default is not None and default.bandwidth_bps == 100e6  # the API's default
    obs = Observation(
        taken_at=12.0,
        nodes={
            "e-1": NodeUsage(cpu_utilisation=0.5, memory_available=3 * GiB, memory_total=4 * GiB),
            "ghost": NodeUsage(cpu_utilisation=1.0),
        },
        links={
            ("cloud", "edge"): LinkObservation(5e6, 0.04),
            ("edge", "nowhere"): LinkObservation(1e9, 0.001),
            ("edge", "cloud"): LinkObservation(None, 0.02),
        },
    )
    seen = apply_observation(snap, obs)
    e1 = seen.node("e-1")
    assert e1 is not None and e1.cpu_used == 2.0 and e1.memory_used == GiB
    assert seen.node("c-1") == snap.node("c-1")
    link = seen.link("edge", "cloud")
    assert link is not None and (link.bandwidth_bps, link.rtt_s) == (5e6, 0.04)
    assert seen.taken_at == 12.0
    assert apply_observation(snap, None) is snap


def test_bad_cluster_documents_name_the_field() -> None:
    tier = r"document 0 \(DevicePool\): .*spec\.tier: Input should be .edge. or .cloud."
    with pytest.raises(InputError, match=tier):
        cluster_from_documents([{"kind": "DevicePool", "metadata": {"name": "x"},
                                 "spec": {"tier": "fog", "nodeSelector": {"p": "x"}}}])  # fmt: skip
    good = {"kind": "DevicePool", "metadata": {"name": "a"},
            "spec": {"tier": "edge", "nodeSelector": {"p": "a"}}}  # fmt: skip
    link = {"kind": "LinkEstimate", "spec": {"from": "a", "to": "b", "bandwidthMbps": 1,
                                             "rttMs": 1}}  # fmt: skip
    with pytest.raises(InputError, match="pool 'b' is not declared"):
        cluster_from_documents([good, link])
    with pytest.raises(InputError, match=r"Node n\.status\.allocatable\.memory: '4 GB'"):
        cluster_from_documents([good, {"kind": "Node", "metadata": {"name": "n"},
                                       "status": {"allocatable": {"memory": "4 GB"}}}])  # fmt: skip
    with pytest.raises(InputError, match="no DevicePool"):
        cluster_from_documents([])


def test_model_request_follows_the_spec() -> None:
    body = yaml.safe_load((EXAMPLES / "edgemodels.yaml").read_text().split("---")[0])
    model = EdgeModel.parse(body)
    request = model_request(model)
    assert request.name == model.metadata.name
    assert request.data_source == model.spec.data_source
    assert request.partitioning.max_stages == model.spec.partitioning.max_stages
    assert request.rescheduling.cooldown_s == model.spec.rescheduling.cooldown_seconds


def test_a_device_memory_cap_counts_only_the_use_that_reaches_below_it() -> None:
    capped = pool("a", device={"memory": "64Mi"})
    snap = snapshot_from_pools([capped], [node("a-1", "a")], reference_gflops=1.0)
    # The node holds 1 GiB of its 4: a stage may still use its whole 64 MiB.
    idle = NodeUsage(0.1, float(3 * GiB), float(4 * GiB))
    seen = apply_observation(snap, Observation(taken_at=1.0, nodes={"a-1": idle}))
    a1 = seen.node("a-1")
    assert a1 is not None and a1.memory_free == 64 * 2**20
    # With 4 GiB - 40 MiB held, only 40 MiB of the cap is left.
    full = NodeUsage(0.1, float(40 * 2**20), float(4 * GiB))
    seen = apply_observation(snap, Observation(taken_at=1.0, nodes={"a-1": full}))
    a1 = seen.node("a-1")
    assert a1 is not None and a1.memory_free == 40 * 2**20
