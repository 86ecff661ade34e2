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
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from .ranges import Array
from .request import COMPRESSION_ORDER, Compression, ModelRequest, PartitioningMode
from .space import Option, Problem, SearchSpace

Index = npt.NDArray[np.int64]
Cost = TypeVar("Cost", float, Array)
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
    programme = _Programme(prob, options, space, weights, cap)
    for q in range(len(prob.pools)):
        programme.finish(q)
        if programme.stages_max > 1:
            programme.leave(q)
    return programme.path()


class _Programme:
    """The dynamic programme's tables, filled pool by pool.

    entry[q, s, a]: best cost of arriving at boundary a ready to run stage s+1 in pool q.
    done[q, s, b]: best cost of having finished boundary b in pool q after s stages.
    (s stays 0 when the pool order alone bounds the stage count.)
    """

    def __init__(
        self,
        prob: Problem,
        options: list[Option],
        space: SearchSpace,
        weights: Weights,
        cap: float,
    ) -> None:
        request, snapshot, table = prob.request, prob.snapshot, prob.table
        self.prob, self.options, self.weights, self.cap = prob, options, weights, cap
        self.npos, nq = table.size, len(prob.pools)
        self.stages_max = max_stages(request, space)
        self.counting = self.stages_max < nq
        self.ns = self.stages_max + 1 if self.counting else 1
        self.rate = request.cascade.offload_rate if request.cascade else 1.0
        allowed = COMPRESSION_ORDER.index(request.partitioning.cut_compression)
        self.comps = [c for c in COMPRESSION_ORDER if COMPRESSION_ORDER.index(c) <= allowed]
        if not space.compression:
            self.comps = [Compression.NONE]
        self.pools = [snapshot.pool(p) for p in prob.pools]
        shape = (nq, self.ns, self.npos)
        self.entry = np.full(shape, math.inf)
        self.entry_from = np.full(shape, -1, dtype=np.int64)
        self.entry_comp = np.zeros(shape, dtype=np.int64)
        self.done = np.full(shape, math.inf)
        self.done_option = np.full(shape, -1, dtype=np.int64)  # index into `options`
        self.done_start = np.full(shape, -1, dtype=np.int64)
        if self.stages_max == 1:
            self.rows, self.cols = np.array([0]), np.array([self.npos - 1])
        else:
            self.rows, self.cols = np.arange(self.npos - 1), np.arange(1, self.npos)
        radio = snapshot.pool(request.data_source).radio_watts
        # The answer travels back through the hops (their round trips are counted on the
        # way in), so only its bytes cost time.
        self.answer_cost, self.answer_send = np.full(nq, math.inf), np.full(nq, math.inf)
        for q, pool in enumerate(self.pools):
            link = snapshot.link(request.data_source, pool.name)
            tier_ok = request.privacy is None or pool.tier == request.privacy
            if link is not None and tier_ok:
                send = float(table.wire[Compression.NONE][0]) * 8.0 / link.bandwidth_bps
                energy = radio * send if pool.name != request.data_source else 0.0
                if self.rate * send <= cap:
                    self.entry[q, 0, 0] = self.rate * self._link_cost(send, link.rtt_s, energy)
            back = snapshot.link(pool.name, request.data_source)
            if back is not None:
                send = float(table.wire[Compression.NONE][-1]) * 8.0 / back.bandwidth_bps
                energy = pool.radio_watts * send if pool.name != request.data_source else 0.0
                self.answer_send[q] = send
                self.answer_cost[q] = self._link_cost(send, 0.0, energy)

    def _link_cost(self, send: Cost, rtt: float, energy: Cost) -> Cost:
        w = self.weights
        return send if w.bottleneck else w.latency * (send + rtt) + w.energy * energy

    def finish(self, q: int) -> None:
        """done[q]: every stage candidate of pool q, after every way of arriving there."""
        options, npos, rate = self.options, self.npos, self.rate
        # Single nodes first, then groups by size: on equal cost the fewer shards win.
        index = np.array(
            sorted(
                (j for j, o in enumerate(options) if o.pool == q),
                key=lambda j: len(options[j].members),
            ),
            dtype=np.int64,
        )
        mine = [options[j] for j in index]
        if not mine or not np.isfinite(self.entry[q]).any():
            return
        rows, cols = self.rows, self.cols
        width = max(1, CHUNK_ELEMENTS // (sum(len(o.members) for o in mine) * len(rows)))
        for lo in range(0, len(cols), width):
            chunk = cols[lo : lo + width]
            starts = rows[rows < chunk[-1]]
            priced = _stage_costs(self.prob, mine, starts, chunk, self.weights, self.cap, rate)
            if chunk[-1] == npos - 1:
                fits = rate * self.answer_send[q] <= self.cap
                last = self.weights.combine(priced[:, :, -1], rate * self.answer_cost[q])
                priced[:, :, -1] = np.where(fits, last, math.inf)
            flat = priced.reshape(len(mine) * len(starts), len(chunk))
            for s in range(self.ns):
                s_next = s + 1 if self.counting else 0
                arriving = self.entry[q, s, starts]
                if s_next >= self.ns or not np.isfinite(arriving).any():
                    continue
                total = self.weights.combine(np.tile(arriving, len(mine))[:, None], flat)
                pick = np.argmin(total, axis=0)
                val = total[pick, np.arange(len(chunk))]
                better = val < self.done[q, s_next, chunk]
                where = chunk[better]
                self.done[q, s_next, where] = val[better]
                self.done_option[q, s_next, where] = index[pick[better] // len(starts)]
                self.done_start[q, s_next, where] = starts[pick[better] % len(starts)]

    def leave(self, q: int) -> None:
        """entry[q2] for every later pool q2: leave pool q at a boundary, best encoding."""
        request, snapshot, table = self.prob.request, self.prob.snapshot, self.prob.table
        for q2 in range(q + 1, len(self.pools)):
            link = snapshot.link(self.pools[q].name, self.pools[q2].name)
            if link is None:
                continue
            hop = np.full(self.npos, math.inf)
            hop_comp = np.zeros(self.npos, dtype=np.int64)
            for comp in self.comps:
                sends = table.wire[comp] * 8.0 / link.bandwidth_bps
                energy = self.pools[q].radio_watts * sends
                c = self.rate * self._link_cost(sends, link.rtt_s, energy)
                c = np.where(self.rate * sends <= self.cap, c, math.inf)
                better = c < hop
                hop[better] = c[better]
                hop_comp[better] = COMPRESSION_ORDER.index(comp)
            if request.privacy is not None and self.pools[q2].tier != request.privacy:
                hop[table.raw] = math.inf
            hop[0] = hop[-1] = math.inf
            cand = self.weights.combine(self.done[q], hop[None, :])
            better = cand < self.entry[q2]
            self.entry[q2][better] = cand[better]
            self.entry_from[q2][better] = q
            self.entry_comp[q2][better] = np.broadcast_to(hop_comp, cand.shape)[better]

    def path(self) -> Path | None:
        """The cheapest finished path, read back stage by stage."""
        final = self.done[:, :, self.npos - 1]
        if not np.isfinite(final).any():
            return None
        q_arr, s_arr = np.unravel_index(int(np.argmin(final)), final.shape)
        q, s, b = int(q_arr), int(s_arr), self.npos - 1
        cost = float(final[q, s])
        stages: list[tuple[int, int, Option, Compression]] = []
        while True:
            option = self.options[int(self.done_option[q, s, b])]
            a = int(self.done_start[q, s, b])
            s_prev = s - 1 if self.counting else 0
            if a == 0:
                stages.append((0, b, option, Compression.NONE))
                break
            comp = COMPRESSION_ORDER[int(self.entry_comp[q, s_prev, a])]
            stages.append((a, b, option, comp))
            q, s, b = int(self.entry_from[q, s_prev, a]), s_prev, a
        stages.reverse()
        return Path(cost, tuple(stages))


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

    A single node's (start × end) times are computed once per device kind of the pool. A
    shard group is priced by each strategy model analysis offers for k shards (the
    ranges it does not allow are barred): k shards of one kind each run their cut
    model; of several kinds, proportions follow speed on the split work.
    """
    request, table = prob.request, prob.table
    pool = prob.snapshot.pool(prob.pools[opts[0].pool])
    overhead = float(request.runtime_overhead_bytes)
    a, b = starts[:, None], ends[None, :]
    valid = a < b
    w = rate  # with a cascade every stage sees the offload rate (1 without)
    factor = request.quantization.weight_factor
    whole_need = float(table.memory(0, table.size - 1, False, overhead))
    kinds: dict[tuple[float, ...], Array] = {}

    def times(member: int, int8: bool) -> Array:
        node = prob.nodes[member]
        key = (*table.kind(node, prob.speedup(int8)), float(int8))
        if key not in kinds:
            seconds = table.times(node, prob.speedup(int8))
            kinds[key] = seconds[b] - seconds[a]
        return kinds[key]

    lan = prob.snapshot.link(pool.name, pool.name)
    out = np.empty((len(opts), len(starts), len(ends)))

    def cost(busy: Array, energy: Array) -> Array:
        scalar = busy if weights.bottleneck else weights.latency * busy
        if weights.energy and not weights.bottleneck:
            scalar = scalar + weights.energy * pool.compute_watts * energy
        return np.asarray(w * scalar)

    for row, option in enumerate(opts):
        k = len(option.members)
        if k == 1:
            node = prob.nodes[option.members[0]]
            busy = times(option.members[0], option.int8)
            ok = valid
            if math.isfinite(cap):
                ok = ok & (w * busy <= cap)
            if float(node.memory_free) < whole_need:
                need = table.memory(a, b, option.int8, overhead, factor)
                ok = ok & (need <= float(node.memory_free))
            out[row] = np.where(ok, cost(busy, busy), math.inf)
            continue
        out[row] = math.inf
        if lan is None:
            continue
        speedup = prob.speedup(option.int8)
        members = [prob.nodes[m] for m in option.members]
        member_kinds = [table.kind(n, speedup) for n in members]
        for sr in table.sharded.get(k, ()):
            ok = valid & sr.allowed(a, b)
            if not ok.any():
                continue
            exchange = sr.exchange_s(a, b, lan, max(n.call_s for n in members))
            mine, split = [], []
            for i, kind in enumerate(member_kinds):
                m_t, s_t = sr.times(kind)
                mine.append(m_t[b, i] - m_t[a, i])
                split.append(s_t[b] - s_t[a])
            if len(set(member_kinds)) == 1:  # equal proportions: each shard runs its cut model
                busy = np.max(mine, axis=0) + exchange
                energy = np.sum(mine, axis=0)
                shares: list[Array | float] = [1.0 / k] * k
            else:  # proportions follow speed: every shard spends `share` on the split work
                positive = [np.where(x > 0, x, 1.0) for x in split]
                share = np.where(split[0] > 0, 1.0 / sum(1.0 / x for x in positive), 0.0)
                rest = [m_t - x / k for m_t, x in zip(mine, split, strict=True)]
                busy = np.max(rest, axis=0) + share + exchange
                energy = np.sum(rest, axis=0) + k * share
                shares = [np.where(split[0] > 0, share / x, 1.0 / k) for x in positive]
            if math.isfinite(cap):
                ok = ok & (w * busy <= cap)
            for i, node in enumerate(members):
                free = float(node.memory_free)
                if free < whole_need:  # else even the whole model fits it
                    need = sr.memory(a, b, i, shares[i], option.int8, overhead, factor)
                    ok = ok & (need <= free)
            out[row] = np.minimum(out[row], np.where(ok, cost(busy, energy), math.inf))
    return out
