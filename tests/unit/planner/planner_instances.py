"""Random small planning instances (hypothesis) and the exhaustive search they are checked by."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

import numpy as np
from hypothesis import strategies as st

from partita.model.types import CutPoint, ModelProfile, NodeCost, OpClass, ShardTable, TensorInfo
from partita.planner import (
    Cascade,
    ClusterSnapshot,
    Compression,
    DevicePoolState,
    LinkEstimate,
    ModelRequest,
    NodeState,
    Objective,
    Partitioning,
    PartitioningMode,
    ShardPlacement,
    Slo,
    Stage,
    Taint,
    Tier,
    Toleration,
    plan_for,
)
from partita.planner.cost import boundary_tensors
from partita.planner.plan import CascadePlacement
from partita.planner.request import COMPRESSION_ORDER
from partita.planner.space import place_cascade, reserve

MiB = 2**20


def tensor(name: str, nbytes: int) -> TensorInfo:
    return TensorInfo(name, "float32", (nbytes // 4,), (nbytes // 4) * 4)


def _log(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def random_profile(rng: random.Random, max_ops: int = 24, max_cuts: int = 20) -> ModelProfile:
    n = rng.randint(2, max_ops)
    inp = tensor("input", int(_log(rng, 4096, 4e6)))
    out = tensor("output", rng.randint(1, 64) * 64)
    nodes = [
        NodeCost(
            index=i,
            name=f"n{i}",
            op_type="Op",
            op_class=rng.choice(list(OpClass)),
            flops=0 if rng.random() < 0.1 else int(_log(rng, 1e6, 5e9)),
            param_bytes=rng.randint(0, 80) * MiB // 4,
            output_bytes=4096,
            live_bytes=rng.randint(1, 64) * MiB // 8,
            shardable=rng.random() < 0.6,
        )
        for i in range(n)
    ]
    k = rng.randint(0, min(max_cuts, n - 1))
    positions = sorted(rng.sample(range(1, n), k))
    cuts = []
    for p in positions:
        tensors = [tensor(f"t{p}", int(_log(rng, 1024, 2e6)))]
        if rng.random() < 0.1:
            tensors.append(inp)  # a skip connection from the raw input
        cuts.append(
            CutPoint(
                position=p,
                tensors=tuple(tensors),
                nbytes=sum(t.nbytes for t in tensors),
                flops_before=sum(x.flops for x in nodes[:p]),
                param_bytes_before=sum(x.param_bytes for x in nodes[:p]),
            )
        )
    return with_ideal_shards(
        ModelProfile(
            digest="0" * 64,
            inputs=(inp,),
            outputs=(out,),
            nodes=tuple(nodes),
            cut_points=tuple(cuts),
            total_flops=sum(x.flops for x in nodes),
            param_bytes=sum(x.param_bytes for x in nodes),
        )
    )


def with_ideal_shards(profile: ModelProfile, counts: tuple[int, ...] = (2, 3, 4)) -> ModelProfile:
    """`profile` with the shard tables of an idealised model whose `shardable` ops split
    exactly k ways (FLOPs and weights), every other op running whole in every shard, each
    shard reading the stage inputs whole and sending 1/k of its outputs: the search's test
    instances, where model analysis of a real graph would give the tables."""
    n = len(profile.nodes)
    pos = np.array(sorted({0, n, *(c.position for c in profile.cut_points)}), dtype=np.int64)
    classes = list(OpClass)
    split = np.zeros((n + 1, len(classes)))
    shared = np.zeros((n + 1, len(classes)))
    for op in profile.nodes:
        (split if op.shardable else shared)[op.index + 1, classes.index(op.op_class)] = op.flops
    split, shared = np.cumsum(split, 0)[pos], np.cumsum(shared, 0)[pos]
    sp = np.cumsum([0, *(op.param_bytes * op.shardable for op in profile.nodes)])[pos]
    wp = np.cumsum([0, *(op.param_bytes * (not op.shardable) for op in profile.nodes)])[pos]
    live = [op.live_bytes for op in profile.nodes]
    wire = np.array([sum(t[2] for t in boundary_tensors(profile, int(p))) for p in pos])
    heaviest = []
    for lo, hi in itertools.pairwise(pos):
        whole = [op for op in profile.nodes[lo:hi] if not op.shardable and op.flops]
        top = max(whole, key=lambda op: op.flops, default=None)
        heaviest.append((top.index, top.flops) if top else (-1, 0))
    tables = []
    for k in counts:
        ones = np.ones((len(pos), k))
        tables.append(
            ShardTable(
                shards=k,
                strategy="width",
                positions=pos,
                total_flops=(split + shared).sum(-1),
                split_flops=split,
                shared_flops=shared,
                split_params=sp,
                shared_params=wp,
                op_counts=pos[:, None] * ones,
                class_flops=(split / k + shared)[:, None, :] * np.ones((1, k, 1)),
                param_bytes=(sp / k + wp)[:, None] * ones,
                peak_bytes=np.array(
                    [[max(live[lo:hi], default=0)] * k for lo, hi in itertools.pairwise(pos)]
                ).reshape(-1, k),
                points_before=np.zeros(len(pos)),
                points_upto=np.zeros(len(pos)),
                bytes_before=0 * ones,
                bytes_upto=0 * ones,
                scatter_bytes=wire[:, None] * ones,
                gather_bytes=wire[:, None] * ones / k,
                starts=np.ones(len(pos), dtype=np.bool_),
                ends=np.ones(len(pos), dtype=np.bool_),
                crop_params=0 * ones,
                whole_node=np.array([h[0] for h in heaviest], dtype=np.int64),
                whole_flops=np.array([h[1] for h in heaviest]),
            )
        )
    return replace(profile, shard_tables=tuple(tables))


def random_snapshot(rng: random.Random, max_nodes: int = 6) -> ClusterSnapshot:
    n_pools = rng.randint(1, 3)
    pools = []
    for i in range(n_pools):
        tier = Tier.EDGE if i == 0 else rng.choice([Tier.EDGE, Tier.CLOUD, Tier.CLOUD])
        pools.append(
            DevicePoolState(
                name=f"p{i}",
                tier=tier,
                power_active_watts=rng.uniform(1, 300),
                radio_watts=rng.uniform(0, 5),
                lan_bandwidth_bps=rng.choice([1e8, 1e9, 1e10]),
                lan_rtt_s=rng.choice([0.0001, 0.001]),
            )
        )
    nodes = []
    for j in range(rng.randint(1, max_nodes)):
        pool = pools[0] if j == 0 else rng.choice(pools)
        base = _log(rng, 1e8, 2e9) if pool.tier is Tier.EDGE else _log(rng, 5e9, 1e11)
        nodes.append(
            NodeState(
                name=f"node{j}",
                pool=pool.name,
                tier=pool.tier,
                cpu_allocatable=4.0,
                cpu_used=rng.choice([0.0, 0.0, 0.0, 1.0, 3.5]),
                memory_allocatable=int(_log(rng, 64, 4096)) * MiB,
                memory_used=rng.randint(0, 32) * MiB,
                speed={c: base * rng.uniform(0.3, 3.0) for c in OpClass},
                ready=rng.random() < 0.9,
                taints=(Taint("gpu", "yes"),) if rng.random() < 0.12 else (),
                op_overhead_s=rng.choice([0.0, 1e-5]),
            )
        )
    links = [
        LinkEstimate(a.name, b.name, _log(rng, 1e6, 1e9), rng.choice([0.002, 0.02, 0.08]))
        for a, b in itertools.combinations(pools, 2)
        if rng.random() < 0.9
    ]
    return ClusterSnapshot(nodes=tuple(nodes), pools=tuple(pools), links=tuple(links))


def random_request(
    rng: random.Random,
    snapshot: ClusterSnapshot,
    objectives: tuple[Objective, ...] = tuple(Objective),
    name: str = "m",
) -> ModelRequest:
    pool_names = [p.name for p in snapshot.pools]
    objective = rng.choice(objectives)
    p95 = None
    if objective is Objective.THROUGHPUT and rng.random() < 0.5:
        p95 = _log(rng, 0.01, 5.0)
    allowed = ()
    if rng.random() < 0.2:
        allowed = tuple(sorted(rng.sample(pool_names, rng.randint(1, len(pool_names)))))
    return ModelRequest(
        name=name,
        data_source="p0",
        priority=rng.randint(0, 3),
        pools=allowed,
        partitioning=Partitioning(
            mode=rng.choice([*PartitioningMode, PartitioningMode.AUTO, PartitioningMode.AUTO]),
            max_stages=rng.randint(1, 3),
            max_shards=rng.randint(1, 3),
            cut_compression=rng.choice(list(Compression)),
        ),
        objective=objective,
        slo=Slo(p95_latency_s=p95, min_throughput_rps=rng.choice([None, None, 1.0, 10.0])),
        privacy=rng.choice([None, None, Tier.EDGE]),
        cascade=(
            Cascade(0.8, rng.uniform(0.05, 1.0), random_profile(rng, 3, 0), rng.uniform(0.5, 4))
            if rng.random() < 0.2
            else None
        ),
        tolerations=(Toleration("gpu"),) if rng.random() < 0.5 else (),
        cpu=rng.choice([0.5, 1.0]),
        runtime_overhead_bytes=rng.choice([0, 16 * MiB]),
    )


seeds = st.integers(0, 2**32 - 1)


def canonical_pools(snapshot: ClusterSnapshot, request: ModelRequest) -> list[str]:
    """The pool order plans follow (data source first, then edge, then cloud, by name)."""

    def order(name: str) -> tuple[int, int, str]:
        tier = snapshot.pool(name).tier
        return (0 if name == request.data_source else 1, 0 if tier is Tier.EDGE else 1, name)

    return sorted((p.name for p in snapshot.pools), key=order)


def all_plans(profile: ModelProfile, request: ModelRequest, snapshot: ClusterSnapshot):
    """Every plan of the search space, built directly, no dynamic programming.

    Each is priced by the reference cost model (`plan_for` → `predict`), the same one the
    planner's search is checked against: what this enumeration checks is the search. With a
    cascade, the small model's node is the planner's own choice (`space.place_cascade`, a
    greedy pick by design, not part of the search checked here) and the main model's stages
    are enumerated on what it leaves.
    """
    cascade = None
    priced = snapshot
    if request.cascade is not None:
        cascade = place_cascade(request, snapshot)
        if not isinstance(cascade, CascadePlacement):
            return
        snapshot = reserve(snapshot, request, cascade)
    n = len(profile.nodes)
    cut_positions = [c.position for c in profile.cut_points]
    mode = request.partitioning.mode
    max_stages = request.partitioning.max_stages
    if mode in (PartitioningMode.NONE, PartitioningMode.HORIZONTAL):
        max_stages = 1
    max_shards = (
        request.partitioning.max_shards
        if mode in (PartitioningMode.AUTO, PartitioningMode.HORIZONTAL)
        else 1
    )
    comps = COMPRESSION_ORDER[: COMPRESSION_ORDER.index(request.partitioning.cut_compression) + 1]
    pools = canonical_pools(snapshot, request)
    for m in range(1, max_stages + 1):
        for cuts in itertools.combinations(cut_positions, m - 1):
            bounds = [0, *cuts, n]
            for pool_seq in itertools.combinations(pools, m):
                per_stage = []
                for i, pool in enumerate(pool_seq):
                    members = [x for x in snapshot.nodes if x.pool == pool]
                    groups = [
                        g
                        for k in range(1, min(max_shards, len(members)) + 1)
                        for g in itertools.combinations(members, k)
                    ]
                    per_stage.append([(g, bounds[i], bounds[i + 1]) for g in groups])
                for choice in itertools.product(*per_stage):
                    for comp_seq in itertools.product(comps, repeat=m - 1):
                        stages = _stages(profile, pool_seq, choice, comp_seq)
                        if stages is not None:
                            yield plan_for(request, stages, profile, priced, cascade=cascade)


def split_seconds(profile: ModelProfile, node: NodeState, start: int, end: int) -> float:
    """Seconds `node` needs for the shardable ops of [start, end), op by op."""
    ops = profile.nodes[start:end]
    return sum(op.flops / node.speed_of(op.op_class) for op in ops if op.shardable)


def _stages(profile, pool_seq, choice, comp_seq):
    stages = []
    for i, (group, start, end) in enumerate(choice):
        if len(group) == 1:
            props = [1.0]
        else:
            s = [split_seconds(profile, node, start, end) for node in group]
            if not all(x > 0 for x in s):
                return None
            inv = [1 / x for x in s]
            props = [x / sum(inv) for x in inv]
        stages.append(
            Stage(
                index=i,
                pool=pool_seq[i],
                start=start,
                end=end,
                shards=tuple(ShardPlacement(x.name, p) for x, p in zip(group, props, strict=True)),
                inputs=tuple(t[0] for t in boundary_tensors(profile, start)),
                outputs=tuple(t[0] for t in boundary_tensors(profile, end)),
                input_compression=Compression.NONE if i == 0 else comp_seq[i - 1],
            )
        )
    return stages


def exhaustive_best(profile, request, snapshot):
    """(objective cost, prediction) of the best plan by brute force, or None."""
    feasible = [
        plan.prediction
        for plan in all_plans(profile, request, snapshot)
        if plan.prediction.feasible
    ]
    if not feasible:
        return None
    slo = request.slo
    if request.objective is Objective.THROUGHPUT:
        if slo.p95_latency_s is not None:
            meet = [p for p in feasible if p.latency_s <= slo.p95_latency_s * (1 + 1e-9)]
            feasible = meet or feasible
        return min(feasible, key=lambda p: p.cost)
    if slo.min_throughput_rps is not None:
        meet = [p for p in feasible if p.throughput_rps >= slo.min_throughput_rps * (1 - 1e-9)]
        feasible = meet or feasible
    return min(feasible, key=lambda p: p.cost)


def close(a: float, b: float, rel: float = 1e-7) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def without(snapshot: ClusterSnapshot, **changes) -> ClusterSnapshot:
    return replace(snapshot, **changes)


def chain_profile(
    flops: list[int],
    params: list[int],
    cut_bytes: dict[int, int],
    input_bytes: int = 602_112,
    output_bytes: int = 4_000,
    op_class: OpClass = OpClass.CONV,
    shardable: bool = True,
    raw_input_at: tuple[int, ...] = (),
) -> ModelProfile:
    """A chain model with the given per-op FLOPs/params and cut sizes (position -> bytes)."""
    inp = tensor("input", input_bytes)
    nodes = tuple(
        NodeCost(i, f"n{i}", "Conv", op_class, f, p, 4096, MiB, shardable)
        for i, (f, p) in enumerate(zip(flops, params, strict=True))
    )
    cuts = tuple(
        CutPoint(
            position=pos,
            tensors=(tensor(f"t{pos}", nbytes), *((inp,) if pos in raw_input_at else ())),
            nbytes=nbytes + (inp.nbytes if pos in raw_input_at else 0),
            flops_before=sum(flops[:pos]),
            param_bytes_before=sum(params[:pos]),
        )
        for pos, nbytes in sorted(cut_bytes.items())
    )
    return with_ideal_shards(
        ModelProfile(
            digest="1" * 64,
            inputs=(inp,),
            outputs=(tensor("output", output_bytes),),
            nodes=nodes,
            cut_points=cuts,
            total_flops=sum(flops),
            param_bytes=sum(params),
        )
    )


def edge_cloud(
    edge_nodes: int = 1,
    edge_speed: float = 1e9,
    cloud_speed: float = 8e10,
    bandwidth_bps: float = 1e7,
    rtt_s: float = 0.02,
    edge_memory: int = 4096 * MiB,
) -> ClusterSnapshot:
    pools = (
        DevicePoolState("edge", Tier.EDGE, power_active_watts=5, radio_watts=1),
        DevicePoolState("cloud", Tier.CLOUD, power_active_watts=200),
    )
    edge = {c: edge_speed for c in OpClass}
    nodes = [
        NodeState(f"edge-{i}", "edge", Tier.EDGE, 4.0, edge_memory, edge) for i in range(edge_nodes)
    ]
    cloud = {c: cloud_speed for c in OpClass}
    nodes.append(NodeState("cloud-0", "cloud", Tier.CLOUD, 32.0, 64 * 1024 * MiB, cloud))
    return ClusterSnapshot(
        nodes=tuple(nodes),
        pools=pools,
        links=(LinkEstimate("edge", "cloud", bandwidth_bps, rtt_s),),
    )


def _usage(plan, names):
    """(cpu, memory) the plan's containers take on each node, in `names` order."""
    use = dict.fromkeys(names, (0.0, 0))
    for stage in plan.prediction.stages:
        for shard in stage.shards:
            cpu, mem = use[shard.node]
            use[shard.node] = (cpu + plan.request.cpu, mem + shard.memory_bytes)
    return tuple(x for name in names for x in use[name])


def _frontier(profile, request, snapshot, names):
    """(cost, use) of every plan of the model alone that no other plan beats on its cost
    and on every node's cpu and memory."""
    best = {}
    for plan in all_plans(profile, request, snapshot):
        if plan.prediction.feasible:
            use = _usage(plan, names)
            best[use] = min(best.get(use, math.inf), plan.prediction.cost)
    kept = []
    for use, cost in sorted(best.items(), key=lambda kv: kv[1]):
        if not any(all(a <= b for a, b in zip(u, use, strict=True)) for _c, u in kept):
            kept.append((cost, use))
    return kept


def exhaustive_joint(models, snapshot):
    """The best (admitted priorities, highest first; total cost) over every combination of
    one plan or none per model that fits every node together.

    Every plan of each model's search space is enumerated by `all_plans` and priced by
    the reference cost model; the combination is a depth-first search with bounds, its
    own code, sharing nothing with `partita.planner.multi`.
    """
    names = [n.name for n in snapshot.nodes]
    capacity = [x for n in snapshot.nodes for x in (n.cpu_free + 1e-9, n.memory_free)]
    models = sorted(models, key=lambda rp: -rp[0].priority)
    options = [_frontier(p, r, snapshot, names) for r, p in models]
    priorities = [r.priority for r, _p in models]
    cheapest = [opts[0][0] if opts else None for opts in options]
    best = [None]

    def key(admitted, cost):
        return (tuple(sorted(admitted, reverse=True)), -cost)

    def search(i, use, admitted, cost):
        if best[0] is not None:
            possible = [priorities[j] for j in range(i, len(models)) if options[j]]
            ceiling = tuple(sorted(admitted + possible, reverse=True))
            least = cost + sum(c for c in cheapest[i:] if c is not None)
            if ceiling < best[0][0] or (ceiling == best[0][0] and -least <= best[0][1]):
                return
        if i == len(models):
            best[0] = key(admitted, cost)
            return
        for option_cost, need in options[i]:
            more = [a + b for a, b in zip(use, need, strict=True)]
            if all(m <= c for m, c in zip(more, capacity, strict=True)):
                search(i + 1, more, [*admitted, priorities[i]], cost + option_cost)
        search(i + 1, use, admitted, cost)

    search(0, [0.0] * len(capacity), [], 0.0)
    return best[0]


def competing_models(seed, count):
    """Up to eight small models on at most four nodes with tight memory, so they compete."""
    rng = random.Random(seed)
    snapshot = random_snapshot(rng, max_nodes=4)
    snapshot = replace(
        snapshot,
        nodes=tuple(
            replace(n, memory_allocatable=rng.choice([96, 160, 256]) * MiB, memory_used=0)
            for n in snapshot.nodes
        ),
    )
    models = []
    for i in range(count):
        request = random_request(rng, snapshot, objectives=(Objective.LATENCY,), name=f"m{i}")
        # No cascades: the small model's node is a greedy pick made on whatever each model
        # is planned against, which an exhaustive combination of plans cannot mirror.
        request = replace(
            request,
            cascade=None,
            slo=replace(request.slo, min_throughput_rps=None, p95_latency_s=None),
            partitioning=replace(
                request.partitioning,
                max_stages=min(2, request.partitioning.max_stages),
                max_shards=min(2, request.partitioning.max_shards),
            ),
        )
        models.append((request, random_profile(rng, max_ops=6, max_cuts=3)))
    return models, snapshot
