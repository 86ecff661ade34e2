"""What a range of graph nodes costs, run whole or split k ways: the one place that says so.

Run whole, a range costs the sum of its ops. Split k ways, it costs what model analysis
says the shards it would cut cost: the profile's shard tables (`ShardTable`, one per
shard count and strategy, computed by the same placement that cuts the shard models)
give each shard's FLOPs per op class, weights, peak activations, the stage inputs it
reads, the bytes it receives at each exchange between segments and the output parts it
sends. At equal proportions these are the cut shards' figures; a shard given proportion
p instead of 1/k runs (p - 1/k) of the split work more. A range the tables do not allow
(it starts inside a split, or its busiest shard saves too little) is never priced as
shards, and a profile without tables is never sharded. The cost model (`cost.predict`)
and the search (`shortest_path`) both read ranges through `RangeTable` only.

A table is built over boundary positions (0, cut points, the end); its methods take
boundary *indexes* into those positions and broadcast over numpy arrays of them.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from partita.model.types import PROPOSE_SHARE, CutPoint, ModelProfile, OpClass, ShardTable

from .errors import PlannerError
from .request import COMPRESSION_ORDER, Compression
from .snapshot import LinkEstimate, NodeState

Array = npt.NDArray[np.float64]
IndexLike = int | npt.NDArray[np.int64]
OP_CLASSES = tuple(OpClass)
CLASS_COLUMN = {c: i for i, c in enumerate(OP_CLASSES)}
FLOAT_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
COMPRESSED_BYTES = {Compression.FP16: 2, Compression.INT8: 1}  # per float element on the wire
INT8_OP_CLASSES = frozenset({OpClass.CONV, OpClass.MATMUL})
INT8_WEIGHT_FACTOR = 0.25  # int8 weights take a quarter of float32's bytes


def device_kind(node: NodeState, int8_speedup: float = 1.0) -> tuple[float, ...]:
    """What a node's compute times depend on: per-class speed (int8 applied) and per-op cost."""
    speeds = (
        node.speed_of(c) * (int8_speedup if c in INT8_OP_CLASSES else 1.0) for c in OP_CLASSES
    )
    return (*speeds, node.op_overhead_s)


@dataclass
class RangeTable:
    """Prefix sums of a profile's per-op figures at `positions` (sorted graph-node indexes)."""

    positions: npt.NDArray[np.int64]
    flops: Array  # (positions, classes): FLOPs of the ops before each position
    graph_nodes: Array  # ops before each position (each has a fixed cost)
    params: Array  # bytes
    block_live: Array  # peak live bytes between consecutive positions
    wire: dict[Compression, Array]  # bytes crossing each position, per cut encoding
    raw: npt.NDArray[np.bool_]  # the raw model input crosses this position
    shard_tables: tuple[ShardTable, ...] = ()  # the profile's
    _times: dict[tuple[float, ...], Array] = field(default_factory=dict)
    _peak: Array | None = None
    _index: dict[int, int] | None = None
    _kinds: dict[tuple[int, float, float], tuple[object, tuple[float, ...]]] = field(
        default_factory=dict
    )
    _sharded: dict[int, tuple[ShardedRanges, ...]] | None = None

    @classmethod
    def build(cls, profile: ModelProfile, positions: Sequence[int]) -> RangeTable:
        pos = np.array(sorted(set(positions)), dtype=np.int64)
        c = len(OP_CLASSES)
        ops = profile.nodes
        n = len(ops)
        # One row per op: [FLOPs by class | 1 | params], summed once.
        column = [CLASS_COLUMN[op.op_class] for op in ops]
        figures = np.array(
            [(op.flops, op.param_bytes, op.live_bytes) for op in ops], dtype=np.float64
        ).reshape(n, 3)
        flops, params, live = figures.T
        rows = np.zeros((n + 1, c + 2))
        rows[np.arange(1, n + 1), column] = flops
        rows[1:, c] = 1.0
        rows[1:, c + 1] = params
        prefix = np.cumsum(rows, axis=0)[pos]
        cuts = {cut.position: cut for cut in profile.cut_points}
        crossing = [_crossing(profile, int(p), cuts) for p in pos]
        wire = {
            comp: np.array([_wire_bytes(tensors, comp) for tensors in crossing])
            for comp in COMPRESSION_ORDER
        }
        input_names = {t.name for t in profile.inputs}
        raw = np.array([any(t[0] in input_names for t in tensors) for tensors in crossing])
        raw[pos == 0] = True
        block_live = np.maximum.reduceat(live, pos[:-1]) if n and len(pos) > 1 else np.zeros(0)
        return cls(
            positions=pos,
            flops=prefix[:, :c],
            graph_nodes=prefix[:, c],
            params=prefix[:, c + 1],
            block_live=block_live,
            wire=wire,
            raw=raw,
            shard_tables=profile.shard_tables,
        )

    @property
    def sharded(self) -> dict[int, tuple[ShardedRanges, ...]]:
        """Per shard count, the strategies whose shard tables cover these positions
        (restricted on first use: most plans priced have no sharded stage)."""
        if self._sharded is None:
            found: dict[int, list[ShardedRanges]] = {}
            for t in self.shard_tables:
                ranges = ShardedRanges.restrict(t, self.positions)
                if ranges is not None:
                    found.setdefault(t.shards, []).append(ranges)
            self._sharded = {k: tuple(v) for k, v in sorted(found.items())}
        return self._sharded

    @property
    def size(self) -> int:
        return len(self.positions)

    def index(self, position: int) -> int:
        if self._index is None:
            self._index = {int(p): j for j, p in enumerate(self.positions)}
        if position not in self._index:
            raise PlannerError(f"position {position} is not a boundary of this range table")
        return self._index[position]

    def kind(self, node: NodeState, int8_speedup: float = 1.0) -> tuple[float, ...]:
        """`device_kind`, remembered per speed table (snapshots derived from one another
        share their nodes' speed mappings); the mapping is kept so its id stays unique."""
        key = (id(node.speed), node.op_overhead_s, int8_speedup)
        if key not in self._kinds:
            self._kinds[key] = (node.speed, device_kind(node, int8_speedup))
        return self._kinds[key][1]

    def times(self, node: NodeState, int8_speedup: float = 1.0) -> Array:
        """Prefix compute seconds on `node` at each boundary, the ranges run whole.

        Cached per device kind, not per node: a pool of identical nodes costs one product.
        """
        kind = self.kind(node, int8_speedup)
        if kind not in self._times:
            inverse = 1.0 / np.array(kind[:-1])
            self._times[kind] = self.flops @ inverse + self.graph_nodes * kind[-1]
        return self._times[kind]

    def range_flops(self, a: int, b: int) -> float:
        """FLOPs of [a, b) run whole."""
        return float((self.flops[b] - self.flops[a]).sum())

    def peak_live(self) -> Array:
        """(a, b) → peak live bytes of [a, b) for a < b (-inf elsewhere); computed once."""
        if self._peak is None:
            m = self.size
            blocks = np.where(
                np.arange(m - 1)[None, :] >= np.arange(m)[:, None],
                self.block_live[None, :],
                -np.inf,
            )
            peak = np.full((m, m), -np.inf)
            peak[:, 1:] = np.maximum.accumulate(blocks, axis=1)
            self._peak = peak
        return self._peak

    def memory(
        self,
        a: IndexLike,
        b: IndexLike,
        int8: bool,
        overhead: float,
        int8_weight_factor: float = INT8_WEIGHT_FACTOR,
    ) -> Array:
        """Bytes one node running [a, b) whole needs (`int8_weight_factor`: int8 weight
        bytes over float32's, as measured)."""
        weights = (self.params[b] - self.params[a]) * (int8_weight_factor if int8 else 1.0)
        if isinstance(a, int) and isinstance(b, int):
            peak = self.block_live[a:b].max(initial=0.0)
        else:
            peak = np.maximum(self.peak_live()[a, b], 0.0)
        return np.asarray(weights + peak + overhead)


# Which ranges each shard table allows, per set of positions: a profile is planned again
# and again (every reconcile), its tables live as long as it does.
_ALLOWED: weakref.WeakKeyDictionary[ShardTable, dict[bytes, npt.NDArray[np.bool_]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass
class ShardedRanges:
    """One shard table restricted to a range table's positions (prefix sums over them)."""

    shards: int
    strategy: str
    class_flops: Array  # (P, shards, classes)
    flops: Array  # (P, shards)
    total_flops: Array  # (P,) unsharded
    split_flops: Array  # (P, classes): the split nodes' own FLOPs, all shards together
    params: Array  # (P, shards)
    split_params: Array  # (P,)
    ops: Array  # (P, shards)
    block_peak: Array  # (P - 1, shards)
    points_before: Array  # (P,)
    points_upto: Array
    bytes_before: Array  # (P, shards)
    bytes_upto: Array
    scatter: Array  # (P,) stage-input bytes sent to all shards, range from here
    gather: Array  # (P,) output-part bytes all shards send, range to here
    starts: npt.NDArray[np.bool_]  # (P,)
    ends: npt.NDArray[np.bool_]  # (P,)
    crops: Array  # (P, shards) weight bytes of the crops a range ending here adds
    table: ShardTable
    index: npt.NDArray[np.int64]  # positions in `table`
    _times: dict[tuple[float, ...], tuple[Array, Array]] = field(default_factory=dict)
    _peaks: dict[int, Array] = field(default_factory=dict)
    _allowed: npt.NDArray[np.bool_] | None = None

    @classmethod
    def restrict(cls, t: ShardTable, pos: npt.NDArray[np.int64]) -> ShardedRanges | None:
        idx = np.searchsorted(t.positions, pos)
        if np.any(idx >= len(t.positions)) or np.any(
            t.positions[np.minimum(idx, len(t.positions) - 1)] != pos
        ):
            return None  # a profile made before these cut points: no sharding
        f = np.asarray
        peak = f(t.peak_bytes, dtype=np.float64)
        block_peak = (
            np.maximum.reduceat(peak, idx[:-1], axis=0)
            if len(idx) > 1 and len(peak)
            else np.zeros((max(len(idx) - 1, 0), t.shards))
        )
        class_flops = f(t.class_flops, dtype=np.float64)[idx]
        return cls(
            shards=t.shards,
            strategy=t.strategy,
            class_flops=class_flops,
            flops=class_flops.sum(axis=-1),
            total_flops=f(t.total_flops, dtype=np.float64)[idx],
            split_flops=f(t.split_flops, dtype=np.float64)[idx],
            params=f(t.param_bytes, dtype=np.float64)[idx],
            split_params=f(t.split_params, dtype=np.float64)[idx],
            ops=f(t.op_counts, dtype=np.float64)[idx],
            block_peak=block_peak,
            points_before=f(t.points_before, dtype=np.float64)[idx],
            points_upto=f(t.points_upto, dtype=np.float64)[idx],
            bytes_before=f(t.bytes_before, dtype=np.float64)[idx],
            bytes_upto=f(t.bytes_upto, dtype=np.float64)[idx],
            scatter=f(t.scatter_bytes, dtype=np.float64)[idx].sum(axis=-1),
            gather=f(t.gather_bytes, dtype=np.float64)[idx].sum(axis=-1),
            starts=f(t.starts, dtype=np.bool_)[idx],
            ends=f(t.ends, dtype=np.bool_)[idx],
            crops=f(t.crop_params, dtype=np.float64)[idx],
            table=t,
            index=idx.astype(np.int64),
        )

    def allowed(self, a: IndexLike, b: IndexLike) -> npt.NDArray[np.bool_]:
        """[a, b) may be proposed as these shards: it starts where nothing is split, ends where
        its outputs can be gathered, and its
        busiest shard runs less than `PROPOSE_SHARE` of its FLOPs (every pair computed once)."""
        if self._allowed is None:
            by_positions = _ALLOWED.setdefault(self.table, {})
            key = self.index.tobytes()
            if key not in by_positions:
                busiest = (self.flops[None, :, :] - self.flops[:, None, :]).max(axis=-1)
                total = self.total_flops[None, :] - self.total_flops[:, None]
                m = len(self.starts)
                by_positions[key] = (
                    (np.arange(m)[:, None] < np.arange(m)[None, :])
                    & self.starts[:, None]
                    & self.ends[None, :]
                    & (total > 0)
                    & (busiest < PROPOSE_SHARE * total)
                )
            self._allowed = by_positions[key]
        return np.asarray(self._allowed[a, b])

    def times(self, kind: tuple[float, ...]) -> tuple[Array, Array]:
        """Prefix (per-shard, split) seconds on a device of `kind` (`device_kind`): each
        shard's work at equal proportions (fixed cost per op included), and the split work."""
        if kind not in self._times:
            inverse = 1.0 / np.array(kind[:-1])
            self._times[kind] = (
                self.class_flops @ inverse + self.ops * kind[-1],
                self.split_flops @ inverse,
            )
        return self._times[kind]

    def memory(
        self,
        a: IndexLike,
        b: IndexLike,
        shard: int,
        proportion: Array | float,
        int8: bool,
        overhead: float,
        int8_weight_factor: float = INT8_WEIGHT_FACTOR,
    ) -> Array:
        """Bytes shard `shard` holding `proportion` of [a, b)'s split weights needs
        (`int8_weight_factor` as in `RangeTable.memory`)."""
        factor = int8_weight_factor if int8 else 1.0
        own = self.params[b, shard] - self.params[a, shard] + self.crops[b, shard]
        split = self.split_params[b] - self.split_params[a]
        weights = np.maximum(own + (proportion - 1.0 / self.shards) * split, 0.0) * factor
        if isinstance(a, int) and isinstance(b, int):
            peak = self.block_peak[a:b, shard].max(initial=0.0)
        else:
            peak = self._peak_matrix(shard)[a, b]
        return np.asarray(weights + peak + overhead)

    def _peak_matrix(self, shard: int) -> Array:
        """(a, b) -> shard's peak activation bytes over [a, b); computed once per shard."""
        if shard not in self._peaks:
            m = len(self.starts)
            blocks = np.where(
                np.arange(m - 1)[None, :] >= np.arange(m)[:, None],
                self.block_peak[None, :, shard],
                0.0,
            )
            peak = np.zeros((m, m))
            peak[:, 1:] = np.maximum.accumulate(blocks, axis=1)
            self._peaks[shard] = peak
        return self._peaks[shard]

    def relayed(self, a: IndexLike, b: IndexLike) -> Array:
        """Bytes the server driving [a, b) as shards relays at its exchange points: every
        row a shard sends a peer goes up to it and down to the peer."""
        return np.asarray(2.0 * (self.bytes_before[b] - self.bytes_upto[a]).sum(axis=-1))

    def exchange(self, a: IndexLike, b: IndexLike) -> tuple[Array, Array]:
        """(bytes on the LAN that the stage waits for, round trips) of [a, b) as shards, all
        through the server that drives them: the stage inputs sent to the shards, the rows
        it relays at each exchange point, the output parts."""
        count = self.points_before[b] - self.points_upto[a]
        relayed = self.relayed(a, b)
        return np.asarray(self.scatter[a] + relayed + self.gather[b]), np.asarray(2.0 + count)

    def exchange_s(self, a: IndexLike, b: IndexLike, lan: LinkEstimate, call_s: float) -> Array:
        """Seconds [a, b) as shards spends beyond its busiest shard's compute: its bytes
        and round trips on the pool's LAN, and a call per segment on the slowest member
        (`call_s`, `NodeState.call_s`)."""
        nbytes, trips = self.exchange(a, b)
        segments = trips - 1.0  # the trips: the scatter, one per exchange point, the gather
        return np.asarray(nbytes * 8.0 / lan.bandwidth_bps + trips * lan.rtt_s + segments * call_s)

    def refusal(self, profile: ModelProfile, a: int, b: int) -> str:
        """Why [a, b) is not proposed as these shards, naming the node that keeps it whole."""
        if not self.starts[a]:
            return f"{self.strategy}: the range starts inside a split"
        if not self.ends[b]:
            return f"{self.strategy}: an output is held in rows no gather joins"
        q = self.table.heaviest_whole(int(self.index[a]), int(self.index[b]))
        if q < 0:
            return f"{self.strategy}: no shard saves work"
        node = profile.nodes[q]
        return f"{self.strategy}: {node.op_type} node {node.name!r} runs whole"


def boundary_tensors(profile: ModelProfile, position: int) -> tuple[tuple[str, str, int], ...]:
    """(name, dtype, bytes) of what crosses `position`: inputs at 0, outputs at the end."""
    return _crossing(profile, position, {c.position: c for c in profile.cut_points})


def boundary_bytes(profile: ModelProfile, position: int, compression: Compression) -> float:
    """Bytes on the wire at `position` under `compression`."""
    return _wire_bytes(boundary_tensors(profile, position), compression)


def _crossing(
    profile: ModelProfile, position: int, cuts: Mapping[int, CutPoint]
) -> tuple[tuple[str, str, int], ...]:
    if position == 0:
        tensors = profile.inputs
    elif position == len(profile.nodes):
        tensors = profile.outputs
    elif position in cuts:
        tensors = cuts[position].tensors
    else:
        raise PlannerError(
            f"position {position} is not a cut point of model {profile.digest[:12]}; "
            "re-plan against the current profile"
        )
    return tuple((t.name, t.dtype, t.nbytes) for t in tensors)


def _wire_bytes(tensors: Sequence[tuple[str, str, int]], compression: Compression) -> float:
    """Bytes on the wire: fp16 halves and int8 quarters 32-bit float tensors."""
    total = 0.0
    for _name, dtype, nbytes in tensors:
        if dtype in FLOAT_BYTES and compression in COMPRESSED_BYTES:
            total += nbytes * min(1.0, COMPRESSED_BYTES[compression] / FLOAT_BYTES[dtype])
        else:
            total += nbytes
    return total
