"""Several models on one cluster: priority first, total cost near the joint optimum."""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from planner_instances import (
    MiB,
    competing_models,
    exhaustive_joint,
    random_profile,
    random_request,
    random_snapshot,
    seeds,
)

from partita.planner import Objective, Plan, Unschedulable, plan_many, predict


# Derandomized: the same instances on every run (a regression set drawn by hypothesis).
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(seeds, st.integers(2, 8))
def test_joint_plan_admits_what_exhaustive_search_admits_within_five_percent(seed, count):
    models, snapshot = competing_models(seed, count)
    results = plan_many(models, snapshot)
    plans = [r for r in results.values() if isinstance(r, Plan)]
    admitted = tuple(sorted((p.request.priority for p in plans), reverse=True))
    best_admitted, best_cost = exhaustive_joint(models, snapshot)
    assert admitted == best_admitted, [
        r.reasons for r in results.values() if isinstance(r, Unschedulable)
    ]
    total = sum(p.prediction.cost for p in plans)
    assert total <= -best_cost * 1.05 + 1e-12, (total, -best_cost)
    for request, profile in models:
        if isinstance(results[request.key], Plan):
            assert predict(results[request.key], profile, snapshot).feasible
    for node in snapshot.nodes:  # together they fit every node
        used = sum(p.prediction.memory_per_node.get(node.name, 0) for p in plans)
        assert used <= node.memory_free
        cpu = sum(p.request.cpu for p in plans if node.name in p.prediction.memory_per_node)
        assert cpu <= node.cpu_free + 1e-9


def test_capacity_short_drops_the_lowest_priority_with_a_reason():
    rng = random.Random(7)
    snapshot = random_snapshot(rng, max_nodes=1)
    node = replace(
        snapshot.nodes[0],
        ready=True,
        taints=(),
        cpu_used=0.0,
        memory_allocatable=600 * MiB,
        memory_used=0,
    )
    snapshot = replace(snapshot, nodes=(node,))
    profile = random_profile(random.Random(3), max_ops=4, max_cuts=0)
    profile = replace(
        profile,
        nodes=tuple(
            replace(n, param_bytes=400 * MiB // len(profile.nodes), live_bytes=MiB)
            for n in profile.nodes
        ),
    )
    base = random_request(rng, snapshot, objectives=(Objective.LATENCY,))
    base = replace(
        base,
        pools=(),
        privacy=None,
        cpu=1.0,
        runtime_overhead_bytes=0,
        partitioning=replace(base.partitioning, mode="none"),
    )
    high = replace(base, name="high", priority=10)
    low = replace(base, name="low", priority=1)
    results = plan_many([(low, profile), (high, profile)], snapshot)
    assert isinstance(results[high.key], Plan)
    dropped = results[low.key]
    assert isinstance(dropped, Unschedulable)
    assert "capacity is short" in dropped.reasons[0]
    assert "default/high" in dropped.reasons[0]
