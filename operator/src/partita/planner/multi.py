"""Several models sharing one cluster: by priority, refusing the lowest when short.

Models are placed in priority order, each on what the ones before it left; a model
that no longer fits is refused with an `Unschedulable` reason naming the models that
took the capacity (task dropping), rather than degrading every model. (Re-planning a
model against the others' final placement cannot help: it had at least that much
room when it was placed.) With few models and nodes, every order is tried and a joint
search over a few candidate plans per model recovers what greedy order gives away.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace

from partita.model.types import ModelProfile

from .plan import RELATIVE_TOLERANCE, Plan, PlanResult, Unschedulable
from .request import ModelRequest
from .search import plan_model
from .snapshot import ClusterSnapshot

PERMUTE_UP_TO = 4  # models; beyond that only priority order is tried
# Up to this many models on this many nodes, candidate plans are also combined jointly.
JOINT_MODELS = 3
JOINT_NODES = 8
JOINT_CANDIDATES = 12


def _usage(plans: Sequence[Plan | None]) -> tuple[dict[str, float], dict[str, int]]:
    """(cpu cores, memory bytes) the plans' containers take on each node."""
    cpu: dict[str, float] = {}
    mem: dict[str, int] = {}
    for plan in plans:
        if plan is None:
            continue
        for stage in plan.prediction.stages:
            for shard in stage.shards:
                cpu[shard.node] = cpu.get(shard.node, 0.0) + plan.request.cpu
                mem[shard.node] = mem.get(shard.node, 0) + shard.memory_bytes
    return cpu, mem


def _take(snapshot: ClusterSnapshot, plan: Plan) -> ClusterSnapshot:
    """The snapshot with `plan`'s containers added."""
    cpu, mem = _usage([plan])
    nodes = tuple(
        replace(n, cpu_used=n.cpu_used + cpu[n.name], memory_used=n.memory_used + mem[n.name])
        if n.name in cpu
        else n
        for n in snapshot.nodes
    )
    return replace(snapshot, nodes=nodes)


def plan_many(
    requests_with_profiles: Sequence[tuple[ModelRequest, ModelProfile]],
    snapshot: ClusterSnapshot,
) -> dict[str, PlanResult]:
    """Plans keyed by `namespace/name`: the highest priorities are admitted first.

    With a handful of models every placement order is tried (the order decides who
    gets the best nodes); otherwise priority order only. Of the outcomes, the one
    admitting the most high-priority models wins, then the lowest total cost.
    """
    by_priority = sorted(requests_with_profiles, key=lambda rp: (-rp[0].priority, rp[0].key))
    orders: list[Sequence[tuple[ModelRequest, ModelProfile]]] = [by_priority]
    if len(by_priority) <= PERMUTE_UP_TO:
        orders = [list(p) for p in itertools.permutations(by_priority)]
    best_key: tuple[tuple[int, ...], float] | None = None
    best_results: dict[str, PlanResult] = {}
    for order in orders:
        results = _place(order, snapshot)
        plans = [r for r in results.values() if isinstance(r, Plan)]
        # (5,) beats (3, 3): one higher priority outweighs several lower ones.
        key = (
            tuple(sorted((p.request.priority for p in plans), reverse=True)),
            -sum(p.prediction.cost for p in plans),
        )
        if (
            best_key is None
            or key[0] > best_key[0]
            or (key[0] == best_key[0] and -key[1] < -best_key[1] * (1 - RELATIVE_TOLERANCE))
        ):
            best_key, best_results = key, results
    if len(by_priority) <= JOINT_MODELS and len(snapshot.nodes) <= JOINT_NODES:
        joint = _joint(by_priority, snapshot)
        if joint is not None:
            plans = [r for r in joint.values() if isinstance(r, Plan)]
            key = (
                tuple(sorted((p.request.priority for p in plans), reverse=True)),
                -sum(p.prediction.cost for p in plans),
            )
            if (
                best_key is None
                or key[0] > best_key[0]
                or (key[0] == best_key[0] and -key[1] < -best_key[1] * (1 - RELATIVE_TOLERANCE))
            ):
                best_results = {**best_results, **joint}
    return {rp[0].key: best_results[rp[0].key] for rp in by_priority}


def _without(snapshot: ClusterSnapshot, names: tuple[str, ...]) -> ClusterSnapshot:
    return replace(snapshot, nodes=tuple(n for n in snapshot.nodes if n.name not in names))


def _joint(
    models: Sequence[tuple[ModelRequest, ModelProfile]], snapshot: ClusterSnapshot
) -> dict[str, PlanResult] | None:
    """Small clusters: each model's best plans avoiding up to two nodes, combined jointly.

    The greedy order gives the first model its favourite nodes even when a slightly
    worse choice would let the next model in or save it much more; trying every
    combination of a few diverse candidates per model recovers that.
    """
    names = [n.name for n in snapshot.nodes]
    candidates: list[list[Plan | None]] = []
    for request, profile in models:
        found: dict[object, Plan] = {}
        for r in range(3):
            for excluded in itertools.combinations(names, r):
                plan = plan_model(profile, request, _without(snapshot, excluded), explain=False)
                if isinstance(plan, Plan) and plan.placement not in found:
                    found[plan.placement] = plan
        ranked = sorted(found.values(), key=lambda p: p.prediction.cost)[:JOINT_CANDIDATES]
        candidates.append([*ranked, None])
    best: tuple[tuple[int, ...], float] | None = None
    chosen: tuple[Plan | None, ...] = ()
    for combo in itertools.product(*candidates):
        if not _fits(combo, snapshot):
            continue
        plans = [p for p in combo if p is not None]
        key = (
            tuple(sorted((p.request.priority for p in plans), reverse=True)),
            -sum(p.prediction.cost for p in plans),
        )
        if best is None or key > best:
            best, chosen = key, combo
    if best is None:
        return None
    out: dict[str, PlanResult] = {}
    for (request, _profile), picked in zip(models, chosen, strict=True):
        out[request.key] = picked or Unschedulable(
            request,
            (
                "capacity is short: models of higher priority hold the nodes it could use; "
                "it is dropped rather than degrading them",
            ),
        )
    return out


def _fits(combo: Sequence[Plan | None], snapshot: ClusterSnapshot) -> bool:
    cpu, mem = _usage(combo)
    for node in snapshot.nodes:
        if cpu.get(node.name, 0.0) > node.cpu_free * (1 + RELATIVE_TOLERANCE):
            return False
        if mem.get(node.name, 0) > node.memory_free:
            return False
    return True


def _place(
    order: Sequence[tuple[ModelRequest, ModelProfile]], snapshot: ClusterSnapshot
) -> dict[str, PlanResult]:
    results: dict[str, PlanResult] = {}
    residual = snapshot
    for request, profile in order:
        result = plan_model(profile, request, residual, explain=False)
        if isinstance(result, Plan):
            residual = _take(residual, result)
        else:
            alone = plan_model(profile, request, snapshot, explain=False)
            if isinstance(alone, Plan):
                holders = [k for k, r in results.items() if isinstance(r, Plan)]
                result = Unschedulable(
                    request,
                    (
                        "capacity is short: models placed before it hold it ("
                        + ", ".join(holders)
                        + "); it fits an empty cluster, so it is dropped rather than "
                        "degrading models of higher priority",
                        *result.reasons,
                    ),
                    result.exclusions,
                )
        results[request.key] = result
    return results
