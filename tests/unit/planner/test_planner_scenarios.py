"""Behaviour users notice: where stages go, and why, on hand-built clusters."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from planner_instances import (
    MiB,
    chain_profile,
    edge_cloud,
    random_profile,
    random_request,
    random_snapshot,
    seeds,
)

from partita.planner import (
    Cascade,
    Compression,
    ModelRequest,
    Partitioning,
    Plan,
    Quantization,
    Taint,
    Tier,
    Unschedulable,
    baselines,
    plan_model,
    predict,
)

# A CNN-like chain: heavy early layers, a cut after them 12x smaller than the input.
CNN = chain_profile(
    flops=[2_000_000_000, 2_000_000_000, 500_000_000, 100_000_000],
    params=[MiB, 2 * MiB, 8 * MiB, 16 * MiB],
    cut_bytes={1: 800_000, 2: 50_000, 3: 20_000},
)


def request(**kw) -> ModelRequest:
    return ModelRequest(name="m", data_source="edge", **kw)


def test_slow_link_keeps_the_model_at_the_edge_and_fast_link_sends_it_to_the_cloud():
    slow = plan_model(CNN, request(), edge_cloud(bandwidth_bps=1e6, edge_speed=1e10))
    fast = plan_model(CNN, request(), edge_cloud(bandwidth_bps=1e9, edge_speed=1e10))
    assert isinstance(slow, Plan) and isinstance(fast, Plan)
    assert [s.pool for s in slow.stages] == ["edge"]
    assert fast.stages[-1].pool == "cloud"


def test_weak_edge_and_slow_link_cut_after_the_shrinking_layers():
    plan = plan_model(CNN, request(), edge_cloud(edge_speed=2e9, bandwidth_bps=2e6))
    assert isinstance(plan, Plan)
    assert [s.pool for s in plan.stages] == ["edge", "cloud"]
    assert plan.stages[0].end == 2  # the 50 kB cut
    for name, base in baselines(
        CNN, request(), edge_cloud(edge_speed=2e9, bandwidth_bps=2e6)
    ).items():
        assert isinstance(base, Plan), name
        assert plan.prediction.latency_s <= base.prediction.latency_s * (1 + 1e-9), name
    assert plan.alternatives, "runner-up plans explain the choice"
    assert all(alt.prediction.cost >= plan.prediction.cost for alt in plan.alternatives)


def test_cut_compression_is_used_only_when_allowed():
    snap = edge_cloud(edge_speed=2e9, bandwidth_bps=2e6)
    plain = plan_model(CNN, request(), snap)
    squeezed = plan_model(
        CNN, request(partitioning=Partitioning(cut_compression=Compression.INT8)), snap
    )
    assert isinstance(plain, Plan) and isinstance(squeezed, Plan)
    assert all(s.input_compression is Compression.NONE for s in plain.stages)
    assert squeezed.stages[-1].input_compression is Compression.INT8
    assert squeezed.prediction.latency_s < plain.prediction.latency_s


def test_model_too_big_for_one_edge_device_is_sharded_over_several():
    big = chain_profile(
        flops=[4_000_000_000] * 4,
        params=[60 * MiB] * 4,
        cut_bytes={2: 400_000},
    )
    snap = edge_cloud(edge_nodes=4, edge_memory=160 * MiB, bandwidth_bps=1e6)
    req = request(privacy=Tier.EDGE, pools=("edge",))
    plan = plan_model(big, req, snap)
    assert isinstance(plan, Plan), plan.reasons
    assert all(s.pool == "edge" for s in plan.stages)
    assert max(len(s.shards) for s in plan.stages) >= 2
    for node, used in plan.prediction.memory_per_node.items():
        assert used <= snap.node(node).memory_free
    none = plan_model(big, replace(req, partitioning=Partitioning(mode="none")), snap)
    assert isinstance(none, Unschedulable)
    assert "MiB" in none.reasons[0] and "int8" in none.reasons[0]


def test_the_calls_a_sharded_stage_makes_are_priced_and_can_keep_it_whole():
    """Every segment of a sharded stage is a call to each shard's server: the planner adds
    its cost on the slowest member, and shards only where the compute saved pays for it."""
    prof = chain_profile(flops=[1_000_000_000] * 4, params=[MiB] * 4, cut_bytes={2: 40_000})
    snap = edge_cloud(edge_nodes=2, edge_speed=1e10)
    req = request(pools=("edge",))
    free = plan_model(prof, req, snap)
    assert isinstance(free, Plan) and [len(s.shards) for s in free.stages] == [2]
    # The whole model takes 0.4 s on one node; in two shards, 0.2 s and the exchanges.
    [stage] = free.prediction.stages
    slow = {n.name: n for n in snap.nodes}["edge-1"]
    calls = replace(snap, nodes=tuple(replace(n, call_s=0.05) if n is slow else n
                                      for n in snap.nodes))  # fmt: skip
    priced = plan_model(prof, req, calls)
    assert isinstance(priced, Plan) and [len(s.shards) for s in priced.stages] == [2]
    [paid] = priced.prediction.stages
    assert paid.scatter_gather_s == pytest.approx(stage.scatter_gather_s + 0.05)
    dear = replace(snap, nodes=tuple(replace(n, call_s=0.25) if n is slow else n
                                     for n in snap.nodes))  # fmt: skip
    whole = plan_model(prof, req, dear)
    assert isinstance(whole, Plan) and [len(s.shards) for s in whole.stages] == [1]


def test_privacy_keeps_raw_input_in_the_edge_tier():
    # The cut at 1 carries the raw input along (a skip connection): it may not leave the edge.
    prof = chain_profile(
        flops=[10_000_000, 4_000_000_000, 4_000_000_000],
        params=[MiB] * 3,
        cut_bytes={1: 10_000, 2: 10_000},
        raw_input_at=(1,),
    )
    snap = edge_cloud(edge_speed=1e9, bandwidth_bps=1e8)
    free = plan_model(prof, request(), snap)
    private = plan_model(prof, request(privacy=Tier.EDGE), snap)
    assert isinstance(free, Plan) and isinstance(private, Plan)
    assert free.stages[0].pool == "cloud"
    assert private.stages[0].pool == "edge"
    for stage in private.stages:
        if stage.pool == "cloud":
            assert "input" not in stage.inputs


def test_untolerated_taint_excludes_a_node_and_says_why():
    snap = edge_cloud(bandwidth_bps=1e9)
    cloud = replace(snap.nodes[-1], taints=(Taint("dedicated", "batch"),))
    snap = replace(snap, nodes=(*snap.nodes[:-1], cloud))
    plan = plan_model(CNN, request(), snap)
    assert isinstance(plan, Plan)
    assert "cloud-0" not in plan.prediction.memory_per_node
    reasons = {e.name: e.reason for e in plan.exclusions}
    assert "dedicated=batch:NoSchedule" in reasons["cloud-0"]


def test_int8_only_when_needed_to_fit():
    prof = chain_profile(flops=[1_000_000_000] * 2, params=[100 * MiB] * 2, cut_bytes={})
    snap = edge_cloud(edge_memory=120 * MiB)
    req = request(
        pools=("edge",),
        partitioning=Partitioning(mode="none"),
        quantization=Quantization(
            allowed=True, max_accuracy_drop=0.01, measured_accuracy_drop=0.004
        ),
    )
    plan = plan_model(prof, req, snap)
    assert isinstance(plan, Plan) and plan.stages[0].int8
    roomy = plan_model(prof, req, edge_cloud(edge_memory=1024 * MiB))
    assert isinstance(roomy, Plan) and not roomy.stages[0].int8
    too_lossy = replace(req, quantization=replace(req.quantization, measured_accuracy_drop=0.05))
    assert isinstance(plan_model(prof, too_lossy, snap), Unschedulable)


SMALL = chain_profile(flops=[100_000_000], params=[1 * MiB], cut_bytes={})


def test_cascade_runs_the_small_model_at_the_data_source_and_weights_the_main_model():
    snap = edge_cloud(edge_speed=2e9, bandwidth_bps=2e6)
    plain = plan_model(CNN, request(), snap)
    low = plan_model(CNN, request(cascade=Cascade(0.9, 0.1, SMALL)), snap)
    high = plan_model(CNN, request(cascade=Cascade(0.9, 1.0, SMALL)), snap)
    assert isinstance(plain, Plan) and isinstance(low, Plan) and isinstance(high, Plan)
    assert low.cascade is not None and low.cascade.pool == "edge"
    small_s = low.prediction.cascade.compute_s
    assert small_s == pytest.approx(100_000_000 / 2e9)
    # Every request pays the small model; only the offloaded share pays the main model.
    assert low.prediction.latency_s < plain.prediction.latency_s
    assert high.prediction.latency_s > plain.prediction.latency_s
    assert high.prediction.latency_s == pytest.approx(
        plain.prediction.latency_s + small_s + low.prediction.cascade_transfer_s
    )
    # The small model's memory counts on its node.
    assert low.prediction.memory_per_node[low.cascade.node] >= low.prediction.cascade.memory_bytes


def test_cascade_without_room_at_the_data_source_is_unschedulable():
    big = chain_profile(flops=[100_000_000], params=[900 * MiB], cut_bytes={})
    result = plan_model(
        CNN, request(cascade=Cascade(0.9, 0.2, big)), edge_cloud(edge_memory=512 * MiB)
    )
    assert isinstance(result, Unschedulable)
    assert "cascade" in result.reasons[0] and "edge" in result.reasons[0]


def test_tiers_leave_out_the_pools_of_other_tiers():
    snap = edge_cloud(edge_speed=2e9, bandwidth_bps=1e9)
    anywhere = plan_model(CNN, request(), snap)
    assert isinstance(anywhere, Plan) and any(s.pool == "cloud" for s in anywhere.stages)
    edge_only = plan_model(CNN, request(tiers=(Tier.EDGE,)), snap)
    assert isinstance(edge_only, Plan) and {s.pool for s in edge_only.stages} == {"edge"}
    assert any(e.name == "cloud" and "spec.tiers" in e.reason for e in edge_only.exclusions), (
        edge_only.exclusions
    )


def test_energy_counts_what_compute_adds_to_the_idle_draw():
    snap = edge_cloud(edge_speed=2e9, bandwidth_bps=1e9)
    pools = tuple(replace(p, power_active_watts=10.0, power_idle_watts=0.0) for p in snap.pools)
    idle = tuple(replace(p, power_idle_watts=4.0) for p in pools)
    req = request(pools=("edge",), partitioning=Partitioning(mode="none"))
    busy = plan_model(CNN, req, replace(snap, pools=pools))
    marginal = plan_model(CNN, req, replace(snap, pools=idle))
    assert isinstance(busy, Plan) and isinstance(marginal, Plan)
    assert marginal.prediction.energy_j == pytest.approx(busy.prediction.energy_j * 0.6)


def test_replanning_an_unchanged_cluster_keeps_the_revision():
    snap = edge_cloud(edge_speed=2e9, bandwidth_bps=2e6)
    first = plan_model(CNN, request(), snap)
    assert isinstance(first, Plan)
    again = plan_model(CNN, request(), snap, current=first)
    assert isinstance(again, Plan)
    assert again.placement == first.placement and again.revision == first.revision
    moved = plan_model(CNN, request(), edge_cloud(edge_speed=2e9, bandwidth_bps=1e9), current=first)
    assert isinstance(moved, Plan) and moved.revision == first.revision + 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seeds)
def test_plan_never_loses_to_a_baseline(seed):
    rng = random.Random(seed)
    snapshot = random_snapshot(rng)
    req = random_request(rng, snapshot)
    # Baselines run no cascade: compare like with like.
    req = replace(
        req, cascade=None, slo=replace(req.slo, p95_latency_s=None, min_throughput_rps=None)
    )
    profile = random_profile(rng)
    plan = plan_model(profile, req, snapshot)
    for name, base in baselines(profile, req, snapshot).items():
        if isinstance(base, Plan):
            assert predict(base, profile, snapshot).feasible, name
            assert isinstance(plan, Plan), name
            assert plan.prediction.cost <= base.prediction.cost * (1 + 1e-9), (
                name,
                plan.describe(),
                base.describe(),
            )
