"""Exact search for one model: shortest path over (cut position, pool, stages so far).

A plan visits pools in a fixed order (the data source's pool, then edge pools, then
cloud pools, by name), each pool hosting at most one stage, so data only ever moves
outward. Within a pool a stage runs on one node or is split into shards over k nodes
in proportion to their speed. For every stage candidate [a, b) the best placement in
the pool is found by evaluating all its placement options at once (numpy, one column
per b); the dynamic programme over b is exact for that search space: it returns the
same cost as enumerating every cut sequence × pool sequence × node choice, which the
property tests check. Throughput is a bottleneck objective: a bisection on the
largest allowed stage/link time, each step a latency DP restricted to it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from partita.model.types import ModelProfile, OpClass

from .cost import (
    FLOAT_DTYPES,
    INT8_OP_CLASSES,
    boundary_tensors,
    node_blockers,
    predict,
)
from .errors import PlannerError
from .plan import (
    Alternative,
    Exclusion,
    ExclusionKind,
    Plan,
    PlanResult,
    ShardPlacement,
    Stage,
    Unschedulable,
)
from .request import (
    COMPRESSION_ORDER,
    Compression,
    ModelRequest,
    Objective,
    PartitioningMode,
)
from .snapshot import ClusterSnapshot, NodeState, Tier

Array = npt.NDArray[np.float64]
OP_CLASSES = tuple(OpClass)
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


@dataclass
class _Option:
    pool: int
    members: tuple[int, ...]  # indexes into _Instance.nodes
    int8: bool


@dataclass
class _Path:
    cost: float
    stages: list[tuple[int, int, _Option, Compression]]  # (a, b, option, input compression)


@dataclass
class _Instance:
    """Everything about (profile, request, snapshot) the DP reads, precomputed."""

    profile: ModelProfile
    request: ModelRequest
    snapshot: ClusterSnapshot
    pools: list[str]  # canonical order, usable pools only
    nodes: list[NodeState]  # usable nodes
    pos: npt.NDArray[np.int64]
    wire: dict[Compression, Array]  # bytes at each boundary index
    raw: npt.NDArray[np.bool_]
    par_s: Array
    par_u: Array
    block_live: Array
    exclusions: list[Exclusion] = field(default_factory=list)
    _times: dict[tuple[object, ...], tuple[Array, Array]] = field(default_factory=dict)
    _ops: tuple[npt.NDArray[np.int64], Array, npt.NDArray[np.bool_]] | None = None

    def times(self, node_index: int, int8: bool) -> tuple[Array, Array]:
        """Prefix sums of (shardable, replicated) seconds at each cut position.

        Cached per device kind (speeds and per-op overhead), not per node: a pool of a
        thousand identical nodes costs one computation.
        """
        node = self.nodes[node_index]
        speedup = self.request.quantization.speedup if int8 else 1.0
        speeds = tuple(
            node.speed_of(c) * (speedup if c in INT8_OP_CLASSES else 1.0) for c in OP_CLASSES
        )
        key = (*speeds, node.op_overhead_s)
        if key not in self._times:
            if self._ops is None:
                ops = self.profile.nodes
                self._ops = (
                    np.fromiter((OP_CLASSES.index(op.op_class) for op in ops), np.int64, len(ops)),
                    np.fromiter((op.flops for op in ops), np.float64, len(ops)),
                    np.fromiter((op.shardable for op in ops), np.bool_, len(ops)),
                )
            cls, flops, shardable = self._ops
            t = flops / np.array(speeds)[cls]
            sh = np.concatenate([[0.0], np.cumsum(np.where(shardable, t, 0.0))])
            un = np.concatenate(
                [[0.0], np.cumsum(np.where(shardable, 0.0, t) + node.op_overhead_s)]
            )
            self._times[key] = (sh[self.pos], un[self.pos])
        return self._times[key]


def _instance(profile: ModelProfile, request: ModelRequest, snapshot: ClusterSnapshot) -> _Instance:
    n = len(profile.nodes)
    positions = [0, *(c.position for c in profile.cut_points if 0 < c.position < n), n]
    pos = np.array(sorted(set(positions)), dtype=np.int64)
    by_position = {c.position: c for c in profile.cut_points}

    def crossing(p: int) -> list[tuple[str, str, int]]:
        if p == 0:
            return [(t.name, t.dtype, t.nbytes) for t in profile.inputs]
        if p == n:
            return [(t.name, t.dtype, t.nbytes) for t in profile.outputs]
        return [(t.name, t.dtype, t.nbytes) for t in by_position[p].tensors]

    tensors_at = [crossing(int(p)) for p in pos]
    wire: dict[Compression, Array] = {}
    for comp in COMPRESSION_ORDER:
        vals = []
        for crossing_p in tensors_at:
            total = 0.0
            for _name, dtype, nbytes in crossing_p:
                if comp is Compression.NONE or dtype not in FLOAT_DTYPES:
                    total += nbytes
                else:
                    size = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype]
                    total += nbytes * min(1.0, (2 if comp is Compression.FP16 else 1) / size)
            vals.append(total)
        wire[comp] = np.array(vals)
    input_names = {t.name for t in profile.inputs}
    raw = np.array([any(t[0] in input_names for t in tensors_at[j]) for j in range(len(pos))])
    raw[0] = True
    params = np.array([op.param_bytes for op in profile.nodes], dtype=np.float64)
    shard_mask = np.array([op.shardable for op in profile.nodes], dtype=np.bool_)
    par_s = np.concatenate([[0.0], np.cumsum(np.where(shard_mask, params, 0.0))])[pos]
    par_u = np.concatenate([[0.0], np.cumsum(np.where(shard_mask, 0.0, params))])[pos]
    live = np.array([op.live_bytes for op in profile.nodes], dtype=np.float64)
    block_live = np.array([live[pos[j] : pos[j + 1]].max(initial=0.0) for j in range(len(pos) - 1)])
    inst = _Instance(profile, request, snapshot, [], [], pos, wire, raw, par_s, par_u, block_live)
    _select_pools_and_nodes(inst)
    return inst


def _select_pools_and_nodes(inst: _Instance) -> None:
    request, snapshot = inst.request, inst.snapshot
    for pool in snapshot.pools:
        if request.pools and pool.name not in request.pools:
            inst.exclusions.append(
                Exclusion(ExclusionKind.POOL, pool.name, "not in the model's allowed pools")
            )
    for node in snapshot.nodes:
        if not snapshot.has_pool(node.pool):
            inst.exclusions.append(
                Exclusion(ExclusionKind.NODE, node.name, f"pool {node.pool} is not declared")
            )
            continue
        if request.pools and node.pool not in request.pools:
            continue  # the pool's exclusion says it
        blockers = node_blockers(node, request)
        if blockers:
            inst.exclusions.append(Exclusion(ExclusionKind.NODE, node.name, "; ".join(blockers)))
            continue
        for c in OP_CLASSES:
            if node.speed_of(c) <= 0:
                raise PlannerError(
                    f"node {node.name}: speed for op class {c} must be > 0 FLOP/s "
                    "(set it in the DevicePool's device throughput or profile the pool)"
                )
        inst.nodes.append(node)
    used_pools = {n.pool for n in inst.nodes}
    for pool in snapshot.pools:
        if pool.name not in used_pools and not (request.pools and pool.name not in request.pools):
            inst.exclusions.append(
                Exclusion(ExclusionKind.POOL, pool.name, "no Ready, schedulable node with capacity")
            )

    def order(name: str) -> tuple[int, int, str]:
        tier = snapshot.pool(name).tier
        return (0 if name == request.data_source else 1, 0 if tier is Tier.EDGE else 1, name)

    inst.pools = sorted(used_pools, key=order)


def _options(inst: _Instance, space: SearchSpace) -> list[_Option]:
    request = inst.request
    mode = request.partitioning.mode
    shards_ok = space.shards and mode in (PartitioningMode.AUTO, PartitioningMode.HORIZONTAL)
    max_shards = request.partitioning.max_shards if shards_ok else 1
    options: list[_Option] = []
    flags = (False, True) if space.int8 else (False,)
    for q, pool in enumerate(inst.pools):
        if space.pools is not None and pool not in space.pools:
            continue
        members = [i for i, n in enumerate(inst.nodes) if n.pool == pool]
        if space.single_node is not None:
            members = [i for i in members if inst.nodes[i].name == space.single_node]
        for int8 in flags:
            for i in _frontier(inst, members):
                options.append(_Option(q, (i,), int8))
            if len(members) <= ALL_SUBSETS_UP_TO:
                groups = [
                    g
                    for k in range(2, min(max_shards, len(members)) + 1)
                    for g in itertools.combinations(members, k)
                ]
            else:
                # Fastest first (whole-model time per device kind), roomiest on ties.
                kind_time: dict[tuple[float, ...], float] = {}
                order = []
                for i in members:
                    node = inst.nodes[i]
                    kind = (*(node.speed_of(c) for c in OP_CLASSES), node.op_overhead_s)
                    if kind not in kind_time:
                        sh, un = inst.times(i, int8)
                        kind_time[kind] = float(sh[-1] + un[-1])
                    order.append((kind_time[kind], -node.memory_free, node.name, i))
                ranked = [i for *_key, i in sorted(order)]
                groups = [tuple(ranked[:k]) for k in range(2, min(max_shards, len(members)) + 1)]
            options.extend(_Option(q, g, int8) for g in groups)
    return options


def _frontier(inst: _Instance, members: list[int]) -> list[int]:
    """Nodes not dominated by another node of the pool (as fast everywhere, as much memory)."""
    # Nodes of one device kind differ only in free memory: keep the roomiest of each kind.
    kinds: dict[tuple[float, ...], int] = {}
    for i in sorted(members, key=lambda i: inst.nodes[i].name):
        n = inst.nodes[i]
        kind = (*(n.speed_of(c) for c in OP_CLASSES), -n.op_overhead_s)
        if kind not in kinds or n.memory_free > inst.nodes[kinds[kind]].memory_free:
            kinds[kind] = i

    def key(i: int) -> tuple[float, ...]:
        n = inst.nodes[i]
        return (*(n.speed_of(c) for c in OP_CLASSES), -n.op_overhead_s, float(n.memory_free))

    reps = list(kinds.values())
    keys = {i: key(i) for i in reps}
    kept = []
    for i in reps:
        if not any(
            j != i
            and all(x >= y for x, y in zip(keys[j], keys[i], strict=True))
            and keys[j] != keys[i]
            for j in reps
        ):
            kept.append(i)
    return sorted(kept, key=lambda i: inst.nodes[i].name)


@dataclass
class _Weights:
    latency: float
    energy: float


def _run(
    inst: _Instance,
    options: list[_Option],
    space: SearchSpace,
    weights: _Weights,
    cap: float,
) -> _Path | None:
    """Shortest path; elements (stage busy time, link sending time) above `cap` are barred."""
    request, snapshot = inst.request, inst.snapshot
    if not options:
        return None
    npos = len(inst.pos)
    pools = inst.pools
    nq = len(pools)
    mode = request.partitioning.mode
    max_stages = request.partitioning.max_stages
    if mode in (PartitioningMode.NONE, PartitioningMode.HORIZONTAL):
        max_stages = 1
    if space.max_stages is not None:
        max_stages = min(max_stages, space.max_stages)
    max_stages = max(1, max_stages)
    counting = max_stages < nq
    ns = max_stages + 1 if counting else 1
    rate = request.cascade.offload_rate if request.cascade else 1.0
    overhead = float(request.runtime_overhead_bytes)
    comps = [
        c
        for c in COMPRESSION_ORDER
        if space.compression
        and COMPRESSION_ORDER.index(c)
        <= COMPRESSION_ORDER.index(request.partitioning.cut_compression)
    ] or [Compression.NONE]

    pool_state = [snapshot.pool(p) for p in pools]
    tiers = [p.tier for p in pool_state]
    power = np.array([p.power_active_watts for p in pool_state])
    radio_src = snapshot.pool(request.data_source).radio_watts

    # Entry costs: E[q, s, a] = best scalar cost of arriving at boundary a ready to run
    # stage s+1 in pool q. D[q, s, b] = best cost of having finished boundary b in pool q.
    inf = math.inf
    entry = np.full((nq, ns, npos), inf)
    entry_from = np.full((nq, ns, npos), -1, dtype=np.int64)
    entry_comp = np.zeros((nq, ns, npos), dtype=np.int64)
    done = np.full((nq, ns, npos), inf)
    done_by = np.full((nq, ns, npos, 2), -1, dtype=np.int64)  # (option, a)
    in_bytes = inst.wire[Compression.NONE][0]
    for q, pool in enumerate(pools):
        if request.privacy is not None and tiers[q] != request.privacy:
            continue
        link = snapshot.link(request.data_source, pool)
        if link is None:
            continue
        send = in_bytes * 8.0 / link.bandwidth_bps
        if send > cap:
            continue
        energy = radio_src * send if pool != request.data_source else 0.0
        entry[q, 0, 0] = weights.latency * (send + link.rtt_s) + weights.energy * energy
    out_cost = np.full(nq, inf)
    out_send = np.full(nq, inf)
    out_bytes = inst.wire[Compression.NONE][-1]
    for q, pool in enumerate(pools):
        link = snapshot.link(pool, request.data_source)
        if link is None:
            continue
        send = out_bytes * 8.0 / link.bandwidth_bps
        energy = pool_state[q].radio_watts * send if pool != request.data_source else 0.0
        out_send[q] = send
        # The answer travels back through the hops (their round trips are counted on the
        # way in), so only its bytes cost time here.
        out_cost[q] = weights.latency * send + weights.energy * energy

    singles = [o for o in options if len(o.members) == 1]
    by_k: dict[int, list[_Option]] = {}
    for o in options:
        if len(o.members) > 1:
            by_k.setdefault(len(o.members), []).append(o)
    ordered = singles + [o for k in sorted(by_k) for o in by_k[k]]
    opt_pool = np.array([o.pool for o in ordered], dtype=np.int64)
    pf_all = np.array([0.25 if o.int8 else 1.0 for o in ordered])

    t_single = (
        np.stack([sum(inst.times(o.members[0], o.int8)) for o in singles])
        if singles
        else np.zeros((0, npos))
    )
    free_single = np.array([float(inst.nodes[o.members[0]].memory_free) for o in singles])
    groups = []
    for k in sorted(by_k):
        opts = by_k[k]
        sh = np.stack([np.stack([inst.times(i, o.int8)[0] for i in o.members]) for o in opts])
        un = np.stack([np.stack([inst.times(i, o.int8)[1] for i in o.members]) for o in opts])
        free = np.array([[float(inst.nodes[i].memory_free) for i in o.members] for o in opts])
        lan = [snapshot.link(pools[o.pool], pools[o.pool]) for o in opts]
        bw = np.array([link.bandwidth_bps for link in lan if link is not None])
        rtt = np.array([link.rtt_s for link in lan if link is not None])
        groups.append((k, opts, sh, un, free, bw, rtt))

    pool_rows = [(q, np.nonzero(opt_pool == q)[0]) for q in range(nq)]
    pool_rows = [(q, sel) for q, sel in pool_rows if sel.size]
    # Memory checks are skipped when even the whole model fits every candidate node.
    whole_need = (
        float(inst.par_s[-1] + inst.par_u[-1] + inst.block_live.max(initial=0.0)) + overhead
    )
    roomy_single = bool(free_single.size == 0 or free_single.min() >= whole_need)
    # With one stage only the whole-model column matters.
    columns = range(1, npos) if max_stages > 1 else range(npos - 1, npos)
    for b in columns:
        a_idx = np.arange(b)
        w = np.where(a_idx == 0, 1.0, rate)
        peak = np.maximum.accumulate(inst.block_live[:b][::-1])[::-1]
        par_s = inst.par_s[b] - inst.par_s[:b]
        par_u = inst.par_u[b] - inst.par_u[:b]
        rows: list[Array] = []
        # Single-node options.
        if singles:
            t = t_single[:, b : b + 1] - t_single[:, :b]
            ok = w * t <= cap if math.isfinite(cap) else np.ones(t.shape, dtype=np.bool_)
            if not roomy_single:
                mem = (par_s + par_u)[None, :] * pf_all[: len(singles), None] + peak + overhead
                ok &= mem <= free_single[:, None]
            scalar = weights.latency * t
            if weights.energy:
                scalar = scalar + weights.energy * power[opt_pool[: len(singles)], None] * t
            rows.append(np.where(ok, w * scalar, inf))
        start = len(singles)
        for k, opts, sh_p, un_p, free, bw, rtt in groups:
            s_t = sh_p[:, :, b : b + 1] - sh_p[:, :, :b]  # G×k×b
            u_t = un_p[:, :, b : b + 1] - un_p[:, :, :b]
            splittable = s_t[:, 0, :] > 0
            inv = 1.0 / np.where(s_t > 0, s_t, 1.0)
            inv_sum = inv.sum(axis=1)
            h = np.where(splittable, 1.0 / inv_sum, 0.0)
            prop = inv / inv_sum[:, None, :]
            pf = pf_all[start : start + len(opts)]
            ok = splittable
            if free.min() < whole_need:
                mem = (
                    prop * (par_s * pf[:, None])[:, None, :]
                    + (par_u * pf[:, None])[:, None, :]
                    + peak
                    + overhead
                )
                ok = ok & (mem <= free[:, :, None]).all(axis=1)
            compute = h + u_t.max(axis=1)
            scatter = ((k - 1) * inst.wire[Compression.NONE][:b] * 8.0)[None, :] / bw[
                :, None
            ] + rtt[:, None]
            gather = ((k - 1) / k * inst.wire[Compression.NONE][b] * 8.0) / bw + rtt
            busy = compute + scatter + gather[:, None]
            if math.isfinite(cap):
                ok = ok & (w * busy <= cap)
            scalar = weights.latency * busy
            if weights.energy:
                energy = power[opt_pool[start : start + len(opts)], None] * (
                    k * h + u_t.sum(axis=1)
                )
                scalar = scalar + weights.energy * energy
            scalar = w * scalar
            rows.append(np.where(ok, scalar, inf))
            start += len(opts)
        stage_cost = np.concatenate(rows, axis=0)  # options × a
        if b == npos - 1:
            out_w = np.where(a_idx == 0, 1.0, rate)
            stage_cost = stage_cost + out_w[None, :] * out_cost[opt_pool][:, None]
            stage_cost = np.where(
                out_w[None, :] * out_send[opt_pool][:, None] <= cap, stage_cost, inf
            )
        for s in range(ns):
            s_next = s + 1 if counting else 0
            if s_next >= ns:
                continue
            total = entry[opt_pool, s, :b] + stage_cost  # options × a
            for q, sel in pool_rows:
                block = total[sel]
                flat = int(np.argmin(block))
                val = float(block.flat[flat])
                if val < done[q, s_next, b]:
                    done[q, s_next, b] = val
                    done_by[q, s_next, b] = (sel[flat // b], flat % b)
        if b == npos - 1:
            break
        # Leave pool q at boundary b for a later pool q2.
        for q2 in range(1, nq):
            for q in range(q2):
                link = snapshot.link(pools[q], pools[q2])
                if link is None:
                    continue
                if request.privacy is not None and inst.raw[b] and tiers[q] != tiers[q2]:
                    continue
                best, best_c = inf, 0
                for comp in comps:
                    send = inst.wire[comp][b] * 8.0 / link.bandwidth_bps
                    if rate * send > cap:
                        continue
                    c = rate * (
                        weights.latency * (send + link.rtt_s)
                        + weights.energy * pool_state[q].radio_watts * send
                    )
                    if c < best:
                        best, best_c = c, COMPRESSION_ORDER.index(comp)
                if best == inf:
                    continue
                cand = done[q, :, b] + best
                better = cand < entry[q2, :, b]
                entry[q2, better, b] = cand[better]
                entry_from[q2, better, b] = q
                entry_comp[q2, better, b] = best_c

    final = done[:, :, npos - 1]
    if not np.isfinite(final).any():
        return None
    q_arr, s_arr = np.unravel_index(int(np.argmin(final)), final.shape)
    q, s = int(q_arr), int(s_arr)
    cost = float(final[q, s])
    stages: list[tuple[int, int, _Option, Compression]] = []
    b = npos - 1
    while True:
        o_idx, a = (int(x) for x in done_by[q, s, b])
        s_prev = s - 1 if counting else 0
        if a == 0:
            stages.append((0, b, ordered[o_idx], Compression.NONE))
            break
        comp = COMPRESSION_ORDER[int(entry_comp[q, s_prev, a])]
        stages.append((a, b, ordered[o_idx], comp))
        q, s, b = int(entry_from[q, s_prev, a]), s_prev, a
    stages.reverse()
    return _Path(cost, stages)


def _build(inst: _Instance, path: _Path, revision: int) -> Plan:
    request, profile = inst.request, inst.profile
    pos = inst.pos
    stages = []
    for index, (a, b, opt, comp) in enumerate(path.stages):
        start, end = int(pos[a]), int(pos[b])
        members = [inst.nodes[i] for i in opt.members]
        if len(members) == 1:
            props = [1.0]
        else:
            s_t = [
                float(inst.times(i, opt.int8)[0][b] - inst.times(i, opt.int8)[0][a])
                for i in opt.members
            ]
            inv = [1.0 / s for s in s_t]
            props = [x / sum(inv) for x in inv]
        shards = tuple(
            ShardPlacement(n.name, p, 0.0, 0) for n, p in zip(members, props, strict=True)
        )
        stages.append(
            Stage(
                index=index,
                pool=inst.pools[opt.pool],
                start=start,
                end=end,
                shards=shards,
                inputs=tuple(t[0] for t in boundary_tensors(profile, start)),
                outputs=tuple(t[0] for t in boundary_tensors(profile, end)),
                input_compression=comp,
                int8=opt.int8,
            )
        )
    draft = Plan(request, tuple(stages), revision, 0.0, 0.0, 0.0, 0.0, 0.0)
    return with_prediction(draft, profile, inst.snapshot)


def with_prediction(plan: Plan, profile: ModelProfile, snapshot: ClusterSnapshot) -> Plan:
    """Fill a plan's predicted figures from `predict` (the reference cost model)."""
    from dataclasses import replace

    from .cost import range_memory, range_times

    pred = predict(plan, profile, snapshot)
    request = plan.request
    speedup = request.quantization.speedup
    stages = []
    for stage, sp in zip(plan.stages, pred.stages, strict=True):
        shards = []
        for shard in stage.shards:
            node = snapshot.node(shard.node)
            compute = math.inf
            if node is not None:
                sh, rep = range_times(
                    profile, node, stage.start, stage.end, speedup if stage.int8 else 1.0
                )
                compute = shard.proportion * sh + rep
            mem = range_memory(
                profile,
                stage.start,
                stage.end,
                shard.proportion,
                stage.int8,
                request.runtime_overhead_bytes,
            )
            shards.append(replace(shard, compute_s=compute, memory_bytes=math.ceil(mem)))
        stages.append(
            replace(
                stage,
                shards=tuple(shards),
                compute_s=sp.compute_s,
                transfer_in_s=sp.transfer_in_s,
                scatter_gather_s=sp.scatter_gather_s,
            )
        )
    slo = request.slo
    meets = (
        pred.feasible
        and (slo.p95_latency_s is None or pred.latency_s <= slo.p95_latency_s * (1 + 1e-9))
        and (
            slo.min_throughput_rps is None
            or pred.throughput_rps >= slo.min_throughput_rps * (1 - 1e-9)
        )
    )
    return replace(
        plan,
        stages=tuple(stages),
        output_transfer_s=pred.output_transfer_s,
        latency_s=pred.latency_s,
        throughput_rps=pred.throughput_rps,
        energy_j=pred.energy_j,
        cost=pred.cost,
        meets_slo=meets,
    )


def _optimize(inst: _Instance, space: SearchSpace) -> Plan | None:
    """The best plan of `space` for the request's objective under its SLO.

    When no plan meets the SLO, the best plan without it, marked `meets_slo=False`.
    """
    request = inst.request
    options = _options(inst, space)
    slo = request.slo
    cap0 = 1.0 / slo.min_throughput_rps if slo.min_throughput_rps else math.inf
    p95 = slo.p95_latency_s

    def run(weights: _Weights, cap: float) -> Plan | None:
        path = _run(inst, options, space, weights, cap)
        return None if path is None else _build(inst, path, 1)

    def latency_ok(plan: Plan | None) -> bool:
        return plan is not None and (p95 is None or plan.latency_s <= p95 * (1 + 1e-9))

    if request.objective is Objective.THROUGHPUT:
        fastest = run(_Weights(1.0, 0.0), math.inf)
        if fastest is None:
            return None
        if not latency_ok(fastest):
            p95 = None  # unreachable: maximise throughput alone
        # Lower the cap on any stage/link time until no plan fits: a few steps just
        # under the best bottleneck found (usually enough), then bisection.
        best = fastest
        lo = 0.0
        steps = 0
        while True:
            hi = 1.0 / best.throughput_rps if best.throughput_rps > 0 else math.inf
            if not math.isfinite(hi) or hi - lo <= 1e-9 * hi or steps > 80:
                break
            mid = hi * (1 - 1e-9) if steps < 3 else lo + (hi - lo) / 2
            steps += 1
            cand = run(_Weights(1.0, 0.0), mid)
            if cand is not None and latency_ok(cand):
                best = cand
            else:
                lo = mid
        return best

    if request.objective is Objective.LATENCY:
        plan = run(_Weights(1.0, 0.0), cap0)
        if plan is None and math.isfinite(cap0):
            plan = run(_Weights(1.0, 0.0), math.inf)
        return plan

    # Energy: Lagrangian on latency when the p95 SLO binds (not exact, see module doc).
    cap = cap0
    plan = run(_Weights(0.0, 1.0), cap)
    if plan is None and math.isfinite(cap0):
        cap = math.inf
        plan = run(_Weights(0.0, 1.0), cap)
    if plan is None or latency_ok(plan):
        return plan
    quickest = run(_Weights(1.0, 0.0), cap)
    if quickest is None or not latency_ok(quickest):
        return plan
    lam_lo, lam_hi = 0.0, max(plan.energy_j / max(plan.latency_s, 1e-12), 1e-12)
    best = quickest
    for _ in range(40):
        cand = run(_Weights(lam_hi, 1.0), cap)
        if latency_ok(cand):
            assert cand is not None
            best = cand
            break
        lam_lo, lam_hi = lam_hi, lam_hi * 4
    for _ in range(30):
        mid = (lam_lo + lam_hi) / 2
        cand = run(_Weights(mid, 1.0), cap)
        if latency_ok(cand):
            assert cand is not None
            lam_hi = mid
            if cand.energy_j < best.energy_j:
                best = cand
        else:
            lam_lo = mid
    return best


def _better(a: Plan, b: Plan | None) -> bool:
    """a before b: meeting the SLO first, then the objective, then latency."""
    if b is None:
        return True
    return (not a.meets_slo, a.cost, a.latency_s) < (not b.meets_slo, b.cost, b.latency_s)


def plan_model(
    profile: ModelProfile,
    request: ModelRequest,
    snapshot: ClusterSnapshot,
    current: Plan | None = None,
    *,
    explain: bool = True,
) -> PlanResult:
    """The best plan for one model, or `Unschedulable` with the reasons.

    `explain=False` skips the runner-up plans (for bulk planning and benchmarks).

    int8 stages are tried only when allowed (measured drop within the limit) and
    needed: when no fp32 plan fits or meets the SLO. With `current`, an equally good
    current placement is kept (same revision), so re-planning does not churn.
    """
    if not snapshot.has_pool(request.data_source):
        return Unschedulable(
            request,
            (
                f"dataSource pool {request.data_source!r} does not exist; create that "
                "DevicePool or fix spec.dataSource",
            ),
        )
    inst = _instance(profile, request, snapshot)
    exclusions = tuple(inst.exclusions)
    if not inst.pools:
        return Unschedulable(
            request,
            ("no allowed pool has a Ready node the model tolerates with enough free cpu",),
            exclusions,
        )
    space = SearchSpace()
    plan = _optimize(inst, space)
    notes: list[str] = []
    if (plan is None or not plan.meets_slo) and request.quantization.usable:
        quantized = _optimize(inst, SearchSpace(int8=True))
        if quantized is not None and _better(quantized, plan):
            if any(s.int8 for s in quantized.stages):
                notes.append("int8 stages used: no fp32 plan fits or meets the SLO")
            plan = quantized
    if plan is None:
        return Unschedulable(request, tuple(_diagnose(inst)), exclusions)
    if not plan.meets_slo:
        notes.append(_slo_note(plan))
    alternatives = _alternatives(inst, plan) if explain else ()
    revision = 1
    if current is not None:
        revision = current.revision + 1
        kept = with_prediction(current, profile, snapshot)
        if kept.placement == plan.placement or (
            not predict(kept, profile, snapshot).violations
            and kept.meets_slo >= plan.meets_slo
            and kept.cost <= plan.cost * (1 + 1e-9)
        ):
            plan, revision = kept, current.revision
    from dataclasses import replace

    return replace(
        plan,
        revision=revision,
        alternatives=alternatives,
        exclusions=exclusions,
        notes=tuple(notes),
    )


def _slo_note(plan: Plan) -> str:
    slo = plan.request.slo
    parts = []
    if slo.p95_latency_s is not None and plan.latency_s > slo.p95_latency_s:
        parts.append(
            f"p95 latency {slo.p95_latency_s * 1e3:.1f} ms (best {plan.latency_s * 1e3:.1f} ms)"
        )
    if slo.min_throughput_rps is not None and plan.throughput_rps < slo.min_throughput_rps:
        parts.append(f"throughput {slo.min_throughput_rps:g}/s (best {plan.throughput_rps:.3g}/s)")
    return "SLO cannot be met: " + ", ".join(parts) + "; the best plan without it is used"


def _alternatives(inst: _Instance, chosen: Plan) -> tuple[Alternative, ...]:
    candidates: list[tuple[str, Plan | None]] = []
    for pool in inst.pools:
        candidates.append(
            (f"all on {pool}", _optimize(inst, SearchSpace(pools=(pool,), max_stages=1)))
        )
    if any(len(s.shards) > 1 for s in chosen.stages):
        candidates.append(("without shards", _optimize(inst, SearchSpace(shards=False))))
    if any(s.input_compression is not Compression.NONE for s in chosen.stages):
        candidates.append(
            ("without cut compression", _optimize(inst, SearchSpace(compression=False)))
        )
    seen = {chosen.placement}
    out = []
    for label, plan in candidates:
        if plan is None or plan.placement in seen:
            continue
        seen.add(plan.placement)
        out.append(
            Alternative(
                label,
                plan.describe(),
                plan.latency_s,
                plan.throughput_rps,
                plan.energy_j,
                plan.cost,
            )
        )
    out.sort(key=lambda alt: alt.cost)
    return tuple(out[:5])


def _diagnose(inst: _Instance) -> list[str]:
    """Why no plan exists, in terms a user can act on."""
    request, profile, snapshot = inst.request, inst.profile, inst.snapshot
    reasons = []
    whole = (
        profile.param_bytes
        + max((op.live_bytes for op in profile.nodes), default=0)
        + request.runtime_overhead_bytes
    )
    biggest = max(inst.nodes, key=lambda n: n.memory_free)
    if whole > biggest.memory_free:
        reasons.append(
            f"the whole model needs {whole / 2**20:.1f} MiB on one node; the most free memory "
            f"is {biggest.memory_free / 2**20:.1f} MiB on {biggest.name}: no cut/shard layout "
            "fits either (allow partitioning, more shards, or int8 quantization)"
        )
    if request.privacy is not None and not any(
        snapshot.pool(p).tier == request.privacy for p in inst.pools
    ):
        reasons.append(
            f"privacy keeps raw input in tier {request.privacy}, and no usable pool "
            "of that tier exists"
        )
    if not any(snapshot.link(request.data_source, p) for p in inst.pools):
        reasons.append(f"no link from the data source pool {request.data_source} to a usable pool")
    if not reasons:
        reasons.append(
            "no placement satisfies memory, privacy and link constraints together; "
            "see the excluded pools and nodes"
        )
    return reasons
