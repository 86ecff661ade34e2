"""The search space of one model: usable pools and nodes, their exclusions, the shard groups.

This is the planner's filter phase, as the scheduler framework's Filter plugins: every
pool or node left out is an `Exclusion` with its reason, never an exception. What stays
is a `Problem`: the pools in the order a plan may visit them (the data source's pool,
then edge pools, then cloud pools, by name; data only ever moves outward), the usable
nodes, and the range costs at every cut point. `options` lists, per pool, the nodes and
node groups a stage may run on.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from partita.model.types import ModelProfile

from .cascade import small_compute_s, small_memory, small_table
from .cost import node_blockers
from .errors import PlannerError
from .plan import CascadePlacement, Exclusion, ExclusionKind
from .ranges import OP_CLASSES, RangeTable
from .request import ModelRequest, PartitioningMode
from .snapshot import ClusterSnapshot, NodeState, Tier

# Pools with at most this many usable nodes get every node subset as a shard group.
ALL_SUBSETS_UP_TO = 6


@dataclass(frozen=True)
class SearchSpace:
    """Knobs that narrow the search, for baselines and runner-up plans."""

    pools: tuple[str, ...] | None = None  # restrict to these pools
    max_stages: int | None = None
    shards: bool = True
    compression: bool = True
    int8: bool = False
    single_node: str | None = None  # force this one node (network-unaware baseline)


@dataclass(frozen=True)
class Option:
    """Where one stage may run: one node, or a group of nodes of one pool as shards."""

    pool: int  # index into Problem.pools
    members: tuple[int, ...]  # indexes into Problem.nodes
    int8: bool


@dataclass
class Problem:
    """Everything about (profile, request, snapshot) the search reads, computed once."""

    profile: ModelProfile
    request: ModelRequest
    snapshot: ClusterSnapshot
    table: RangeTable  # over 0, every cut point and the end
    pools: list[str] = field(default_factory=list)  # visiting order, usable pools only
    nodes: list[NodeState] = field(default_factory=list)  # usable nodes
    exclusions: list[Exclusion] = field(default_factory=list)
    # With a cascade: where its small model runs, and the snapshot plans are priced on
    # (`snapshot` is then what the small model leaves, which the search places stages on).
    cascade: CascadePlacement | None = None
    priced_on: ClusterSnapshot | None = None

    def speedup(self, int8: bool) -> float:
        """How much faster int8 conv/matmul run than float32 (1 for a float32 stage)."""
        return self.request.quantization.speedup if int8 else 1.0


def problem(
    profile: ModelProfile,
    request: ModelRequest,
    snapshot: ClusterSnapshot,
    table: RangeTable | None = None,
    *,
    cascade: CascadePlacement | None = None,
) -> Problem:
    """The search space; `table`: the profile's range table over its cut points, when
    the caller plans the same model many times. With `cascade` (where the small model
    runs), the stages are searched on what it leaves and priced with it on `snapshot`."""
    if table is None:
        table = cut_table(profile)
    priced_on = None
    if cascade is not None:
        priced_on, snapshot = snapshot, reserve(snapshot, request, cascade)
    out = Problem(profile, request, snapshot, table, cascade=cascade, priced_on=priced_on)
    for pool in snapshot.pools:
        if request.pools and pool.name not in request.pools:
            out.exclusions.append(
                Exclusion(ExclusionKind.POOL, pool.name, "not in the model's allowed pools")
            )
        elif request.tiers and pool.tier not in request.tiers:
            out.exclusions.append(
                Exclusion(ExclusionKind.POOL, pool.name, f"tier {pool.tier} is not in spec.tiers")
            )
    declared = {pool.name for pool in snapshot.pools}
    checked: set[int] = set()  # speed mappings already checked
    for node in snapshot.nodes:
        if node.pool not in declared:
            out.exclusions.append(
                Exclusion(ExclusionKind.NODE, node.name, f"pool {node.pool} is not declared")
            )
            continue
        if request.pools and node.pool not in request.pools:
            continue  # the pool's exclusion says it
        if request.tiers and snapshot.pool(node.pool).tier not in request.tiers:
            continue
        blockers = node_blockers(node, request)
        if blockers:
            out.exclusions.append(Exclusion(ExclusionKind.NODE, node.name, "; ".join(blockers)))
            continue
        if id(node.speed) not in checked:
            speeds = table.kind(node)[:-1]
            if min(speeds) <= 0:
                slow = OP_CLASSES[speeds.index(min(speeds))]
                raise PlannerError(
                    f"node {node.name}: speed for op class {slow} must be > 0 FLOP/s "
                    "(set it in the DevicePool's device throughput or profile the pool)"
                )
            checked.add(id(node.speed))
        out.nodes.append(node)
    used_pools = {n.pool for n in out.nodes}
    for pool in snapshot.pools:
        left_out = (request.pools and pool.name not in request.pools) or (
            request.tiers and pool.tier not in request.tiers
        )
        if pool.name not in used_pools and not left_out:
            out.exclusions.append(
                Exclusion(ExclusionKind.POOL, pool.name, "no Ready, schedulable node with capacity")
            )

    def order(name: str) -> tuple[int, int, str]:
        tier = snapshot.pool(name).tier
        return (0 if name == request.data_source else 1, 0 if tier is Tier.EDGE else 1, name)

    out.pools = sorted(used_pools, key=order)
    return out


def cut_table(profile: ModelProfile) -> RangeTable:
    """The range table over 0, every cut point and the end."""
    n = len(profile.nodes)
    return RangeTable.build(
        profile, [0, *(c.position for c in profile.cut_points if 0 < c.position < n), n]
    )


def options(prob: Problem, space: SearchSpace) -> list[Option]:
    """Per pool: every node not dominated by another, and the shard groups worth trying."""
    request = prob.request
    mode = request.partitioning.mode
    shards_ok = space.shards and mode in (PartitioningMode.AUTO, PartitioningMode.HORIZONTAL)
    max_shards = request.partitioning.max_shards if shards_ok else 1
    out: list[Option] = []
    flags = (False, True) if space.int8 else (False,)
    for q, pool in enumerate(prob.pools):
        if space.pools is not None and pool not in space.pools:
            continue
        members = [i for i, n in enumerate(prob.nodes) if n.pool == pool]
        if space.single_node is not None:
            members = [i for i in members if prob.nodes[i].name == space.single_node]
        for int8 in flags:
            out.extend(Option(q, (i,), int8) for i in _frontier(prob, members))
            if int8:
                continue  # an int8 stage runs its own int8 file whole, on one node
            if len(members) <= ALL_SUBSETS_UP_TO:
                groups = [
                    g
                    for k in range(2, min(max_shards, len(members)) + 1)
                    for g in itertools.combinations(members, k)
                ]
            else:
                ranked = _fastest_first(prob, members, int8)
                groups = [tuple(ranked[:k]) for k in range(2, min(max_shards, len(members)) + 1)]
            out.extend(Option(q, g, int8) for g in groups)
    return out


def _fastest_first(prob: Problem, members: list[int], int8: bool) -> list[int]:
    """Members by whole-model time on their device kind, roomiest first on ties."""
    seconds: dict[tuple[float, ...], float] = {}
    key = []
    for i in members:
        node = prob.nodes[i]
        kind = prob.table.kind(node, prob.speedup(int8))
        if kind not in seconds:
            seconds[kind] = float(prob.table.times(node, prob.speedup(int8))[-1])
        key.append((seconds[kind], -node.memory_free, node.name, i))
    return [i for *_key, i in sorted(key)]


def _frontier(prob: Problem, members: list[int]) -> list[int]:
    """Nodes not dominated by another node of the pool (as fast everywhere, as much memory)."""
    # Nodes of one device kind differ only in free memory: keep the roomiest of each kind.
    kinds: dict[tuple[float, ...], int] = {}
    for i in sorted(members, key=lambda i: prob.nodes[i].name):
        kind = prob.table.kind(prob.nodes[i])
        if kind not in kinds or prob.nodes[i].memory_free > prob.nodes[kinds[kind]].memory_free:
            kinds[kind] = i

    def key(i: int) -> tuple[float, ...]:
        n = prob.nodes[i]
        *speeds, overhead = prob.table.kind(n)
        return (*speeds, -overhead, float(n.memory_free))

    keys = {i: key(i) for i in kinds.values()}
    kept = [
        i
        for i in keys
        if not any(
            j != i
            and keys[j] != keys[i]
            and all(x >= y for x, y in zip(keys[j], keys[i], strict=True))
            for j in keys
        )
    ]
    return sorted(kept, key=lambda i: prob.nodes[i].name)


def place_cascade(
    request: ModelRequest, snapshot: ClusterSnapshot
) -> CascadePlacement | tuple[str, ...]:
    """The node of the data source's pool that runs the small model quickest, or why none can."""
    pool = request.data_source
    if request.tiers and snapshot.pool(pool).tier not in request.tiers:
        return (
            f"cascade: the small model runs in the data source pool {pool}, whose tier "
            f"{snapshot.pool(pool).tier} is not in spec.tiers",
        )
    if request.pools and pool not in request.pools:
        return (
            f"cascade: the small model runs in the data source pool {pool}, which is not "
            "in spec.pools; add it, or drop spec.cascade",
        )
    if request.privacy is not None and snapshot.pool(pool).tier != request.privacy:
        return (
            f"cascade: the small model takes the raw input in the data source pool {pool} "
            f"(tier {snapshot.pool(pool).tier}), outside privacy.rawInputTier "
            f"{request.privacy}",
        )
    table = small_table(request)
    need = small_memory(table, request)
    fits, reasons = [], []
    for node in snapshot.nodes_in(pool):
        blockers = node_blockers(node, request)
        if not blockers and node.memory_free < need:
            blockers = [
                f"needs {need / 2**20:.1f} MiB, has {node.memory_free / 2**20:.1f} MiB free"
            ]
        if blockers:
            reasons.append(f"{node.name}: {'; '.join(blockers)}")
        else:
            fits.append((small_compute_s(table, node, request), -node.memory_free, node.name))
    if not fits:
        return (
            f"cascade: no node of the data source pool {pool} can run the small model ("
            + ("; ".join(reasons) or "the pool has no nodes")
            + ")",
        )
    return CascadePlacement(pool, min(fits)[2])


def reserve(
    snapshot: ClusterSnapshot, request: ModelRequest, placement: CascadePlacement
) -> ClusterSnapshot:
    """The snapshot with the small model's cpu and memory taken on its node."""
    need = small_memory(small_table(request), request)
    nodes = tuple(
        replace(n, cpu_used=n.cpu_used + request.cpu, memory_used=n.memory_used + need)
        if n.name == placement.node
        else n
        for n in snapshot.nodes
    )
    return replace(snapshot, nodes=nodes)


def cascade_busy_s(
    request: ModelRequest,
    snapshot: ClusterSnapshot,
    placement: CascadePlacement,
    input_bytes: float,
) -> float:
    """What bounds throughput at the small model: its compute, or sending it the raw input
    (`input_bytes`, the main model's inputs)."""
    node = snapshot.node(placement.node)
    assert node is not None
    compute = small_compute_s(small_table(request), node, request)
    link = snapshot.link(request.data_source, placement.pool)
    wire = 0.0
    if link is not None:
        wire = input_bytes * 8.0 / link.bandwidth_bps
    return max(compute, wire)
