"""What a range of graph nodes costs, run whole or split k ways: the one place that says so.

Today's rule: an op flagged `shardable` divides its FLOPs and parameters among the shards
in proportion, every other op runs (and is held) in full by every shard; each shard keeps
the range's peak live activations; a split scatters k-1 copies of the stage input and
gathers (k-1)/k of its output over the pool's LAN. The cost model (`cost.predict`) and the
search (`shortest_path`) both read ranges through `RangeTable` only, so replacing the rule
by exact per-range shard layouts changes this module and nothing that prices a plan.

A table is built over boundary positions (0, cut points, the end); its methods take
boundary *indexes* into those positions and broadcast over numpy arrays of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from partita.model.types import CutPoint, ModelProfile, OpClass

from .errors import PlannerError
from .request import COMPRESSION_ORDER, Compression
from .snapshot import NodeState

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
    split_flops: Array  # (positions, classes): FLOPs of shardable ops before each position
    whole_flops: Array  # the same for ops every shard runs in full
    graph_nodes: Array  # ops before each position (each has a fixed cost on every shard)
    split_params: Array  # bytes
    whole_params: Array
    block_live: Array  # peak live bytes between consecutive positions
    wire: dict[Compression, Array]  # bytes crossing each position, per cut encoding
    raw: npt.NDArray[np.bool_]  # the raw model input crosses this position
    _times: dict[tuple[float, ...], tuple[Array, Array]] = field(default_factory=dict)
    _peak: Array | None = None
    _index: dict[int, int] | None = None
    _kinds: dict[tuple[int, float, float], tuple[object, tuple[float, ...]]] = field(
        default_factory=dict
    )

    @classmethod
    def build(cls, profile: ModelProfile, positions: Sequence[int]) -> RangeTable:
        pos = np.array(sorted(set(positions)), dtype=np.int64)
        c = len(OP_CLASSES)
        ops = profile.nodes
        n = len(ops)
        # One row per op: [split FLOPs by class | whole FLOPs by class | 1 | split params |
        # whole params], summed once.
        column = [CLASS_COLUMN[op.op_class] + (0 if op.shardable else c) for op in ops]
        figures = np.array(
            [(op.flops, op.param_bytes, op.live_bytes, op.shardable) for op in ops],
            dtype=np.float64,
        ).reshape(n, 4)
        flops, params, live, shardable = figures.T
        rows = np.zeros((n + 1, 2 * c + 3))
        rows[np.arange(1, n + 1), column] = flops
        rows[1:, 2 * c] = 1.0
        rows[1:, 2 * c + 1] = params * shardable
        rows[1:, 2 * c + 2] = params * (1.0 - shardable)
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
            split_flops=prefix[:, :c],
            whole_flops=prefix[:, c : 2 * c],
            graph_nodes=prefix[:, 2 * c],
            split_params=prefix[:, 2 * c + 1],
            whole_params=prefix[:, 2 * c + 2],
            block_live=block_live,
            wire=wire,
            raw=raw,
        )

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

    def times(self, node: NodeState, int8_speedup: float = 1.0) -> tuple[Array, Array]:
        """Prefix (split, whole) compute seconds on `node` at each boundary.

        A shard holding proportion p of [a, b) is busy p·(S[b] − S[a]) + W[b] − W[a].
        Cached per device kind, not per node: a pool of identical nodes costs one product.
        """
        kind = self.kind(node, int8_speedup)
        if kind not in self._times:
            inverse = 1.0 / np.array(kind[:-1])
            self._times[kind] = (
                self.split_flops @ inverse,
                self.whole_flops @ inverse + self.graph_nodes * kind[-1],
            )
        return self._times[kind]

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
        proportion: Array | float,
        int8: bool,
        overhead: float,
        int8_weight_factor: float = INT8_WEIGHT_FACTOR,
    ) -> Array:
        """Bytes one shard holding `proportion` of [a, b)'s split parameters needs
        (`int8_weight_factor`: int8 weight bytes over float32's, as measured)."""
        factor = int8_weight_factor if int8 else 1.0
        split = (self.split_params[b] - self.split_params[a]) * factor
        whole = (self.whole_params[b] - self.whole_params[a]) * factor
        if isinstance(a, int) and isinstance(b, int):
            peak = self.block_live[a:b].max(initial=0.0)
        else:
            peak = np.maximum(self.peak_live()[a, b], 0.0)
        return np.asarray(proportion * split + whole + peak + overhead)

    def exchange_bytes(self, a: IndexLike, b: IndexLike, k: int) -> tuple[Array, Array]:
        """(scatter, gather) bytes on the LAN when [a, b) runs as k > 1 shards."""
        scatter = (k - 1) * self.wire[Compression.NONE][a]
        gather = (k - 1) / k * self.wire[Compression.NONE][b]
        return np.asarray(scatter), np.asarray(gather)


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
