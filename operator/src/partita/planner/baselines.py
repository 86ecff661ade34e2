"""The placements Partita must beat, under the same cost model as its own plans.

- edge-only: the whole model on the best single edge node;
- cloud-only: the whole model on the best single cloud node;
- neurosurgeon: the best single float32 cut between the data source's pool and one
  cloud pool (no shards, no cut compression), the endpoints included;
- network-unaware: the unsplit model on the least-allocated node that fits, as
  kube-scheduler's default NodeResourcesFit (LeastAllocated) scoring would pick.

None of them runs a confidence cascade: the request's cascade is left out.
"""

from __future__ import annotations

from dataclasses import replace

from partita.model.types import ModelProfile

from .cost import node_blockers
from .objective import better, optimize
from .plan import PlanResult, Unschedulable
from .request import ModelRequest
from .snapshot import ClusterSnapshot, Tier
from .space import Problem, SearchSpace, problem

BASELINES = ("edge-only", "cloud-only", "neurosurgeon", "network-unaware")


def baselines(
    profile: ModelProfile, request: ModelRequest, snapshot: ClusterSnapshot
) -> dict[str, PlanResult]:
    request = replace(request, cascade=None)
    prob = problem(profile, request, snapshot)
    out: dict[str, PlanResult] = {}
    for name, tier in (("edge-only", Tier.EDGE), ("cloud-only", Tier.CLOUD)):
        pools = tuple(p for p in prob.pools if snapshot.pool(p).tier is tier)
        space = SearchSpace(pools=pools, max_stages=1, shards=False, compression=False)
        plan = optimize(prob, space) if pools else None
        out[name] = plan or Unschedulable(request, (f"no {tier} node can hold the whole model",))
    best = None
    clouds = [p for p in prob.pools if snapshot.pool(p).tier is Tier.CLOUD]
    for cloud in clouds:
        space = SearchSpace(
            pools=(request.data_source, cloud), max_stages=2, shards=False, compression=False
        )
        plan = optimize(prob, space)
        if plan is not None and better(plan, best):
            best = plan
    out["neurosurgeon"] = best or Unschedulable(
        request, ("no single cut between the data source's pool and a cloud pool fits",)
    )
    out["network-unaware"] = _network_unaware(prob)
    return out


def _network_unaware(prob: Problem) -> PlanResult:
    request, snapshot, table = prob.request, prob.snapshot, prob.table
    need = float(table.memory(0, table.size - 1, False, request.runtime_overhead_bytes))
    scored = []
    for node in snapshot.nodes:
        if node.pool not in prob.pools or node_blockers(node, request) or node.memory_free < need:
            continue
        if request.privacy is not None and node.tier is not request.privacy:
            continue
        cpu = (node.cpu_free - request.cpu) / node.cpu_allocatable
        mem = (node.memory_free - need) / node.memory_allocatable
        scored.append((-(cpu + mem) / 2, node.name))
    if not scored:
        return Unschedulable(request, ("no single node can hold the whole model",))
    chosen = min(scored)[1]
    plan = optimize(
        prob,
        SearchSpace(max_stages=1, shards=False, compression=False, single_node=chosen),
    )
    return plan or Unschedulable(request, (f"node {chosen} has no link to the data source",))
