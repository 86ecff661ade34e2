"""Several models on one cluster: priority first, total cost near the joint optimum."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from planner_instances import (
    MiB,
    all_plans,
    random_profile,
    random_request,
    random_snapshot,
    seeds,
)

from partita.planner import Objective, Plan, Unschedulable, plan_many, predict


def _usage(plan):
    use = {}
    for stage in plan.prediction.stages:
        for shard in stage.shards:
            cpu, mem = use.get(shard.node, (0.0, 0.0))
            use[shard.node] = (cpu + plan.request.cpu, mem + shard.memory_bytes)
    return use


def _joint_best(models, snapshot):
    """Exhaustive: the cheapest combination of per-model plans that fits every node together."""
    options = []
    for request, profile in models:
        feasible = []
        for plan in all_plans(profile, request, snapshot):
            if plan.prediction.feasible:
                feasible.append((plan.prediction.cost, _usage(plan)))
        feasible.sort(key=lambda x: x[0])
        options.append(feasible[:60])
    if not all(options):
        return None
    best = None
    for combo in itertools.product(*options):
        total = sum(c for c, _ in combo)
        if best is not None and total >= best:
            continue
        ok = True
        for node in snapshot.nodes:
            cpu = sum(u.get(node.name, (0, 0))[0] for _, u in combo)
            mem = sum(u.get(node.name, (0, 0))[1] for _, u in combo)
            if cpu > node.cpu_free + 1e-9 or mem > node.memory_free:
                ok = False
                break
        if ok:
            best = total
    return best


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seeds)
def test_total_within_five_percent_of_joint_exhaustive(seed):
    rng = random.Random(seed)
    snapshot = random_snapshot(rng, max_nodes=4)
    # Tight memory, so the two models compete for nodes.
    snapshot = replace(
        snapshot,
        nodes=tuple(
            replace(n, memory_allocatable=rng.choice([96, 160, 256]) * MiB, memory_used=0)
            for n in snapshot.nodes
        ),
    )
    models = []
    for i in range(2):
        request = random_request(rng, snapshot, objectives=(Objective.LATENCY,), name=f"m{i}")
        request = replace(
            request,
            slo=replace(request.slo, min_throughput_rps=None),
            partitioning=replace(
                request.partitioning, max_stages=min(2, request.partitioning.max_stages)
            ),
        )
        models.append((request, random_profile(rng, max_ops=8, max_cuts=4)))
    joint = _joint_best(models, snapshot)
    results = plan_many(models, snapshot)
    if joint is None:
        return  # not every model can be admitted; priority order is tested below
    assert all(isinstance(r, Plan) for r in results.values()), [
        r.reasons for r in results.values() if isinstance(r, Unschedulable)
    ]
    total = sum(r.prediction.cost for r in results.values())
    assert total <= joint * 1.05 + 1e-12, (total, joint)
    for request, profile in models:
        assert predict(results[request.key], profile, snapshot).feasible
    # Together they fit every node.
    for node in snapshot.nodes:
        used = sum(r.prediction.memory_per_node.get(node.name, 0) for r in results.values())
        assert used <= node.memory_free


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
