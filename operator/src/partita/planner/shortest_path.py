"""The search: an exact shortest path over (boundary, pool, stages so far).

A plan is a path from the data source through at most one stage per pool, pools in the
`Problem`'s order, back to the data source. Its cost is a weighted sum of latency and
energy, and every stage and link time may be capped (the throughput objective bisects
on that cap). The dynamic programme is exact for the search space: it returns the cost
of the best of every cut sequence × pool sequence × node choice, which the property
tests check against brute force.

Because pools are visited in a fixed order, the costs of arriving at pool q are final
once the pools before it are done; so the programme runs pool by pool, and each pool's
stage candidates [a, b) over every option are priced at once as a numpy (start × end)
matrix, not boundary by boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .ranges import Array
from .request import COMPRESSION_ORDER, Compression, ModelRequest, PartitioningMode
from .space import Option, Problem, SearchSpace

Index = npt.NDArray[np.int64]
# Upper bound on (shard × start × end) elements priced at once, to bound memory.
CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Weights:
    """What a path costs: latency and energy weighted and summed, or (`bottleneck`) its
    largest element, a stage's busy time or a link's sending time (1 / throughput)."""

    latency: float = 0.0
    energy: float = 0.0
    bottleneck: bool = False

    def combine(self, x: Array, y: Array) -> Array:
        return np.maximum(x, y) if self.bottleneck else x + y


@dataclass(frozen=True)
class Path:
    cost: float
    stages: tuple[tuple[int, int, Option, Compression], ...]  # (a, b, option, input encoding)


def max_stages(request: ModelRequest, space: SearchSpace) -> int:
    limit = request.partitioning.max_stages
    if request.partitioning.mode in (PartitioningMode.NONE, PartitioningMode.HORIZONTAL):
        limit = 1
    if space.max_stages is not None:
        limit = min(limit, space.max_stages)
    return max(1, limit)


def shortest_path(
    prob: Problem,
    options: list[Option],
    space: SearchSpace,
    weights: Weights,
    cap: float,
) -> Path | None:
    """The cheapest path; elements (stage busy time, link sending time) above `cap` are barred."""
    if not options:
        return None
    request, snapshot, table = prob.request, prob.snapshot, prob.table
    npos, nq = table.size, len(prob.pools)
    stages_max = max_stages(request, space)
    counting = stages_max < nq  # else the pool order alone bounds the stage count
    ns = stages_max + 1 if counting else 1
    rate = request.cascade.offload_rate if request.cascade else 1.0
    allowed = COMPRESSION_ORDER.index(request.partitioning.cut_compression)
    comps = [c for c in COMPRESSION_ORDER if COMPRESSION_ORDER.index(c) <= allowed]
    if not space.compression:
        comps = [Compression.NONE]
    pools = [snapshot.pool(p) for p in prob.pools]
    inf = math.inf

    # entry[q, s, a]: best cost of arriving at boundary a ready to run stage s+1 in pool q.
    # done[q, s, b]: best cost of having finished boundary b in pool q after s stages.
    entry = np.full((nq, ns, npos), inf)
    entry_from = np.full((nq, ns, npos), -1, dtype=np.int64)
    entry_comp = np.zeros((nq, ns, npos), dtype=np.int64)
    done = np.full((nq, ns, npos), inf)
    done_option = np.full((nq, ns, npos), -1, dtype=np.int64)  # index into `options`
    done_start = np.full((nq, ns, npos), -1, dtype=np.int64)
    radio_src = snapshot.pool(request.data_source).radio_watts
    for q, pool in enumerate(pools):
        if request.privacy is not None and pool.tier != request.privacy:
            continue
        link = snapshot.link(request.data_source, pool.name)
        if link is None:
            continue
        send = float(table.wire[Compression.NONE][0]) * 8.0 / link.bandwidth_bps
        if send > cap:
            continue
        energy = radio_src * send if pool.name != request.data_source else 0.0
        entry[q, 0, 0] = (
            send
            if weights.bottleneck
            else weights.latency * (send + link.rtt_s) + weights.energy * energy
        )
    # The answer travels back through the hops (their round trips are counted on the way
    # in), so only its bytes cost time.
    answer_cost, answer_send = np.full(nq, inf), np.full(nq, inf)
    for q, pool in enumerate(pools):
        link = snapshot.link(pool.name, request.data_source)
        if link is None:
            continue
        send = float(table.wire[Compression.NONE][-1]) * 8.0 / link.bandwidth_bps
        energy = pool.radio_watts * send if pool.name != request.data_source else 0.0
        answer_send[q] = send
        answer_cost[q] = (
            send if weights.bottleneck else weights.latency * send + weights.energy * energy
        )

    if stages_max == 1:
        rows, cols = np.array([0]), np.array([npos - 1])
    else:
        rows, cols = np.arange(npos - 1), np.arange(1, npos)
    for q in range(nq):
        # Single nodes first, then groups by size: on equal cost the fewer shards win.
        index = sorted(
            (j for j, o in enumerate(options) if o.pool == q),
            key=lambda j: len(options[j].members),
        )
        mine = [options[j] for j in index]
        if mine and np.isfinite(entry[q]).any():
            width = max(1, CHUNK_ELEMENTS // (sum(len(o.members) for o in mine) * len(rows)))
            for lo in range(0, len(cols), width):
                chunk = cols[lo : lo + width]
                starts = rows[rows < chunk[-1]]
                priced = _stage_costs(prob, mine, starts, chunk, weights, cap, rate)
                if chunk[-1] == npos - 1:
                    out_w = np.where(starts == 0, 1.0, rate)
                    fits = out_w * answer_send[q] <= cap
                    last = weights.combine(priced[:, :, -1], (out_w * answer_cost[q])[None, :])
                    priced[:, :, -1] = np.where(fits[None, :], last, inf)
                flat = priced.reshape(len(mine) * len(starts), len(chunk))
                for s in range(ns):
                    s_next = s + 1 if counting else 0
                    if s_next >= ns or not np.isfinite(entry[q, s, starts]).any():
                        continue
                    total = weights.combine(np.tile(entry[q, s, starts], len(mine))[:, None], flat)
                    pick = np.argmin(total, axis=0)
                    val = total[pick, np.arange(len(chunk))]
                    better = val < done[q, s_next, chunk]
                    where = chunk[better]
                    done[q, s_next, where] = val[better]
                    done_option[q, s_next, where] = np.array(index)[pick[better] // len(starts)]
                    done_start[q, s_next, where] = starts[pick[better] % len(starts)]
        if stages_max == 1:
            continue
        # Leave pool q at boundary b for a later pool q2.
        for q2 in range(q + 1, nq):
            link = snapshot.link(pools[q].name, pools[q2].name)
            if link is None:
                continue
            hop = np.full(npos, inf)
            hop_comp = np.zeros(npos, dtype=np.int64)
            for comp in comps:
                sends = table.wire[comp] * 8.0 / link.bandwidth_bps
                c = rate * (
                    sends
                    if weights.bottleneck
                    else weights.latency * (sends + link.rtt_s)
                    + weights.energy * pools[q].radio_watts * sends
                )
                c = np.where(rate * sends <= cap, c, inf)
                better = c < hop
                hop[better] = c[better]
                hop_comp[better] = COMPRESSION_ORDER.index(comp)
            if request.privacy is not None and pools[q2].tier != request.privacy:
                hop[table.raw] = inf
            hop[0] = hop[-1] = inf
            cand = weights.combine(done[q], hop[None, :])
            better = cand < entry[q2]
            entry[q2][better] = cand[better]
            entry_from[q2][better] = q
            entry_comp[q2][better] = np.broadcast_to(hop_comp, cand.shape)[better]

    final = done[:, :, npos - 1]
    if not np.isfinite(final).any():
        return None
    q_arr, s_arr = np.unravel_index(int(np.argmin(final)), final.shape)
    q, s, b = int(q_arr), int(s_arr), npos - 1
    cost = float(final[q, s])
    path: list[tuple[int, int, Option, Compression]] = []
    while True:
        option, a = options[int(done_option[q, s, b])], int(done_start[q, s, b])
        s_prev = s - 1 if counting else 0
        if a == 0:
            path.append((0, b, option, Compression.NONE))
            break
        path.append((a, b, option, COMPRESSION_ORDER[int(entry_comp[q, s_prev, a])]))
        q, s, b = int(entry_from[q, s_prev, a]), s_prev, a
    path.reverse()
    return Path(cost, tuple(path))


def _stage_costs(
    prob: Problem,
    opts: list[Option],
    starts: Index,
    ends: Index,
    weights: Weights,
    cap: float,
    rate: float,
) -> Array:
    """(option, start, end) → weighted cost of running [start, end) on the option; inf if barred.

    Members of a shard group that share a device kind have the same times, so the
    (start × end) matrices are computed once per device kind of the pool, and a group
    combines its kinds: k shards of one kind are busy s/k + w.
    """
    request, table = prob.request, prob.table
    pool = prob.snapshot.pool(prob.pools[opts[0].pool])
    overhead = float(request.runtime_overhead_bytes)
    a, b = starts[:, None], ends[None, :]
    valid = a < b
    w = np.where(starts == 0, 1.0, rate)[:, None]  # stages after the first see `rate`
    whole_need = float(table.memory(0, table.size - 1, 1.0, False, overhead))
    kinds: dict[tuple[float, ...], tuple[Array, Array]] = {}

    def times(member: int, int8: bool) -> tuple[Array, Array]:
        node = prob.nodes[member]
        key = (*table.kind(node, prob.speedup(int8)), float(int8))
        if key not in kinds:
            split, whole = table.times(node, prob.speedup(int8))
            kinds[key] = (split[b] - split[a], whole[b] - whole[a])
        return kinds[key]

    lan = prob.snapshot.link(pool.name, pool.name)
    out = np.empty((len(opts), len(starts), len(ends)))
    for row, option in enumerate(opts):
        k = len(option.members)
        by_kind: dict[int, tuple[int, float]] = {}  # id of the kind's times → (count, min free)
        parts: dict[int, tuple[Array, Array]] = {}
        for m in option.members:
            split_t, whole_t = times(m, option.int8)
            count, free = by_kind.get(id(split_t), (0, math.inf))
            by_kind[id(split_t)] = (count + 1, min(free, float(prob.nodes[m].memory_free)))
            parts[id(split_t)] = (split_t, whole_t)
        needs_memory = any(free < whole_need for _count, free in by_kind.values())
        shares: dict[int, Array | float] = {}  # each kind's proportion of the split work
        if k == 1:
            split_t, whole_t = next(iter(parts.values()))
            busy = split_t + whole_t
            energy = busy
            ok = valid
            shares = dict.fromkeys(parts, 1.0)
        else:
            assert lan is not None
            scatter, gather = table.exchange_bytes(a, b, k)
            exchange = (scatter + gather) * 8.0 / lan.bandwidth_bps + 2 * lan.rtt_s
            if len(parts) == 1:  # k shards of one device kind: s/k + w each
                split_t, whole_t = next(iter(parts.values()))
                share = split_t / k
                busy = share + whole_t + exchange
                energy = split_t + k * whole_t
                ok = valid & (split_t > 0)
                shares = dict.fromkeys(parts, 1.0 / k)
            else:
                splittable = next(iter(parts.values()))[0] > 0
                inverse = {key: 1.0 / np.where(s > 0, s, 1.0) for key, (s, _w) in parts.items()}
                inv_sum = sum(count * inverse[key] for key, (count, _f) in by_kind.items())
                share = np.where(splittable, 1.0 / inv_sum, 0.0)  # each shard's split time
                whole_max = np.max([w_t for _s, w_t in parts.values()], axis=0)
                busy = share + whole_max + exchange
                energy = k * share + sum(
                    count * parts[key][1] for key, (count, _f) in by_kind.items()
                )
                ok = valid & splittable
                if needs_memory:
                    shares = {key: share * inverse[key] for key in parts}
        if math.isfinite(cap):
            ok = ok & (w * busy <= cap)
        if needs_memory:
            for key, (_count, free) in by_kind.items():
                if free < whole_need:  # else even the whole model fits every such member
                    ok = ok & (table.memory(a, b, shares[key], option.int8, overhead) <= free)
        scalar = busy if weights.bottleneck else weights.latency * busy
        if weights.energy and not weights.bottleneck:
            scalar = scalar + weights.energy * pool.power_active_watts * energy
        out[row] = np.where(ok, w * scalar, math.inf)
    return out
