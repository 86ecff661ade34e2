"""The placements Partita must beat, under the same cost model as its own plans.

- edge-only: the whole model on the best single edge node;
- cloud-only: the whole model on the best single cloud node;
- neurosurgeon: the best single float32 cut between the data source's pool and one
  cloud pool (no shards, no cut compression), the endpoints included;
- network-unaware: the unsplit model on the least-allocated node that fits, as
  kube-scheduler's default NodeResourcesFit (LeastAllocated) scoring would pick.
"""

from __future__ import annotations

from partita.model.types import ModelProfile

from .cost import node_blockers, range_memory
from .plan import PlanResult, Unschedulable
from .request import ModelRequest
from .search import SearchSpace, _better, _instance, _optimize
from .snapshot import ClusterSnapshot, Tier

BASELINES = ("edge-only", "cloud-only", "neurosurgeon", "network-unaware")


def baselines(
    profile: ModelProfile, request: ModelRequest, snapshot: ClusterSnapshot
) -> dict[str, PlanResult]:
    inst = _instance(profile, request, snapshot)
    out: dict[str, PlanResult] = {}
    single = {"max_stages": 1, "shards": False, "compression": False}
    for name, tier in (("edge-only", Tier.EDGE), ("cloud-only", Tier.CLOUD)):
        pools = tuple(p for p in inst.pools if snapshot.pool(p).tier is tier)
        plan = _optimize(inst, SearchSpace(pools=pools, **single)) if pools else None  # type: ignore[arg-type]
        out[name] = plan or Unschedulable(request, (f"no {tier} node can hold the whole model",))
    best = None
    clouds = [p for p in inst.pools if snapshot.pool(p).tier is Tier.CLOUD]
    for cloud in clouds:
        space = SearchSpace(
            pools=(request.data_source, cloud), max_stages=2, shards=False, compression=False
        )
        plan = _optimize(inst, space)
        if plan is not None and _better(plan, best):
            best = plan
    out["neurosurgeon"] = best or Unschedulable(
        request, ("no single cut between the data source's pool and a cloud pool fits",)
    )
    out["network-unaware"] = _network_unaware(profile, request, snapshot, inst.pools)
    return out


def _network_unaware(
    profile: ModelProfile,
    request: ModelRequest,
    snapshot: ClusterSnapshot,
    pools: list[str],
) -> PlanResult:
    need = range_memory(profile, 0, len(profile.nodes), 1.0, False, request.runtime_overhead_bytes)
    scored = []
    for node in snapshot.nodes:
        if node.pool not in pools or node_blockers(node, request) or node.memory_free < need:
            continue
        if request.privacy is not None and node.tier is not request.privacy:
            continue
        cpu = (node.cpu_free - request.cpu) / node.cpu_allocatable
        mem = (node.memory_free - need) / node.memory_allocatable
        scored.append((-(cpu + mem) / 2, node.name))
    if not scored:
        return Unschedulable(request, ("no single node can hold the whole model",))
    chosen = min(scored)[1]
    inst = _instance(profile, request, snapshot)
    plan = _optimize(
        inst,
        SearchSpace(max_stages=1, shards=False, compression=False, single_node=chosen),
    )
    return plan or Unschedulable(request, (f"node {chosen} has no link to the data source",))
