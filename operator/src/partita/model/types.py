"""What the planner knows about a model: the frozen result of profiling it.

This is the contract between `partita.model` (which fills it) and `partita.planner`
(which reads it). Fields may be added; none may be renamed or removed without
changing both sides.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


class OpClass(StrEnum):
    """Operator families whose speed is measured separately per device."""

    CONV = "conv"
    MATMUL = "matmul"
    ELEMENTWISE = "elementwise"
    POOL = "pool"
    NORM = "norm"
    MOVEMENT = "movement"  # reshape, transpose, concat, gather, slice...
    OTHER = "other"


@dataclass(frozen=True)
class TensorInfo:
    """A tensor with a fully resolved shape."""

    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class NodeCost:
    """One graph node in topological order, with its cost."""

    index: int
    name: str
    op_type: str
    op_class: OpClass
    flops: int
    param_bytes: int
    output_bytes: int
    # Activation bytes alive right after this node ran (graph inputs included),
    # so the peak activation memory of a range of nodes is the max over it.
    live_bytes: int
    # True when the node can be split by output columns/channels across devices.
    shardable: bool = False
    # Multiply-accumulates of Conv/ConvTranspose/MatMul/Gemm (flops ~ 2 * macs there).
    macs: int = 0


@dataclass(frozen=True)
class CutPoint:
    """A topological boundary: nodes[:position] run before it, nodes[position:] after.

    `tensors` are all the tensors produced before the boundary (or graph inputs)
    and consumed after it, i.e. what must cross the network if the model is cut here.
    """

    position: int
    tensors: tuple[TensorInfo, ...]
    nbytes: int
    flops_before: int
    param_bytes_before: int


@dataclass(frozen=True)
class ModelProfile:
    """Everything the planner needs about one model with concrete input shapes."""

    digest: str  # sha256 of the model bytes
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    nodes: tuple[NodeCost, ...]
    # The useful frontier of cut points in increasing position, excluding the
    # trivial ones (position 0 = the inputs, position len(nodes) = the outputs).
    cut_points: tuple[CutPoint, ...]
    total_flops: int
    param_bytes: int
    # Why some boundaries are not offered (control flow kept whole, ...).
    notes: tuple[str, ...] = field(default_factory=tuple)
    # How many node-output tensors each loading step resolved the shape of:
    # (("tensors", n), ("inference", a), ("folding", b), ("runtime", c)).
    shape_coverage: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    # Sharded figures of the ranges between cut points, per shard count and strategy.
    shard_tables: tuple[ShardTable, ...] = field(default=(), compare=False, repr=False)

    def shard_table(self, shards: int, strategy: str) -> ShardTable | None:
        return next(
            (t for t in self.shard_tables if t.shards == shards and t.strategy == strategy), None
        )

    @property
    def input_bytes(self) -> int:
        return sum(t.nbytes for t in self.inputs)

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


class GatherMode(StrEnum):
    """How the partial outputs of a stage's shards rebuild one tensor."""

    CONCAT = "concat"  # concatenate the shards' rows along `axis`, in shard order
    SUM = "sum"  # add the shards' summands (row-parallel MatMul, split reductions)
    MAX = "max"  # the largest of the shards' partial maxima (a max pool over tiles)
    TAKE = "take"  # one shard computes the whole tensor (branch parallelism)


@dataclass(frozen=True)
class GatherSpec:
    """Rebuilds stage output `output` from tensor `part_name(output, i)` of each shard i."""

    output: str
    mode: GatherMode
    axis: int = 0
    shard: int = 0  # for TAKE: the shard that produces it

    @staticmethod
    def part_name(output: str, shard: int) -> str:
        return f"{output}__shard{shard}"


Span = tuple[int, int]  # rows [start, stop) along an exchange's axis


@dataclass(frozen=True)
class Exchange:
    """One tensor the shards swap between two segments of a sharded stage.

    After the segment, shard i outputs `GatherSpec.part_name(tensor, i)`: rows `parts[i]`
    of the tensor along `axis` (CONCAT), or a summand / partial maximum of the whole tensor
    (SUM / MAX; `parts[i]` is then the whole axis). Before the next segment, shard j must
    hold rows `needs[j]` of the assembled tensor under the tensor's own name (None: shard j
    does not need it). `partita.model.exchange` does the arithmetic.
    """

    tensor: str
    mode: GatherMode
    axis: int
    shape: tuple[int, ...]
    dtype: str
    parts: tuple[Span | None, ...]
    needs: tuple[Span | None, ...]

    @property
    def row_bytes(self) -> int:
        rows = self.shape[self.axis] if self.shape else 1
        total = int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize
        return total // max(rows, 1)

    def sent_rows(self, source: int, target: int) -> int:
        """Rows shard `source` sends shard `target` (peer to peer, only what it needs)."""
        part, need = self.parts[source], self.needs[target]
        if source == target or part is None or need is None:
            return 0
        if self.mode is GatherMode.CONCAT:
            return max(0, min(part[1], need[1]) - max(part[0], need[0]))
        return need[1] - need[0]

    @property
    def received_bytes(self) -> tuple[int, ...]:
        k = len(self.parts)
        return tuple(sum(self.sent_rows(i, j) for i in range(k)) * self.row_bytes for j in range(k))

    @property
    def sent_bytes(self) -> tuple[int, ...]:
        k = len(self.parts)
        return tuple(sum(self.sent_rows(i, j) for j in range(k)) * self.row_bytes for i in range(k))


@dataclass(frozen=True)
class Scatter:
    """What each shard reads of one stage input: rows `spans[i]` along `axis`, or None."""

    tensor: str
    axis: int
    shape: tuple[int, ...]
    dtype: str
    spans: tuple[Span | None, ...]

    @property
    def shard_bytes(self) -> tuple[int, ...]:
        rows = self.shape[self.axis] if self.shape else 1
        total = int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize
        return tuple(0 if s is None else (s[1] - s[0]) * total // max(rows, 1) for s in self.spans)


@dataclass(frozen=True)
class Segment:
    """Nodes [start, end) of the model that every shard runs before the next exchange.

    `inputs[i]` are the tensors shard i's segment model reads (stage inputs, tensors it
    received in an exchange, tensors it kept from an earlier segment); the figures are
    those of shard i's segment model. A shard with nothing to do in a segment (`active`
    False) has no model for it.
    """

    start: int
    end: int
    active: tuple[bool, ...]
    inputs: tuple[tuple[str, ...], ...]
    exchanges: tuple[Exchange, ...]  # swapped after this segment (none after the last)
    shard_flops: tuple[int, ...]
    shard_param_bytes: tuple[int, ...]
    shard_peak_bytes: tuple[int, ...]


@dataclass(frozen=True)
class ShardLayout:
    """How one stage is split horizontally: the single source of truth the planner's
    figures, the shard models and the data plane's exchanges are all read from.

    Each shard runs `segments` in order; between two segments the shards swap the
    segment's `exchanges`; at the end `gathers` rebuild the stage outputs from the
    shards' part tensors. `partita.model.shard.build_shards` cuts exactly this layout.
    """

    proportions: tuple[float, ...]
    gathers: tuple[GatherSpec, ...]
    strategy: str  # "tile", "megatron", "column", "conv-channel", "branch"
    # FLOPs each shard runs (replicated and halo work included), in shard order.
    shard_flops: tuple[int, ...] = ()
    start: int = 0  # the node range [start, end) of the loaded model it splits
    end: int = 0
    segments: tuple[Segment, ...] = ()
    scatter: tuple[Scatter, ...] = ()
    shard_param_bytes: tuple[int, ...] = ()
    # Peak activation bytes of the shard's largest segment model.
    shard_peak_bytes: tuple[int, ...] = ()
    # FLOPs per shard per op class, in `OpClass` order (the planner times them per class).
    shard_class_flops: tuple[tuple[int, ...], ...] = ()
    # Bytes of the part tensors each shard sends to whoever gathers the stage outputs.
    gather_bytes: tuple[int, ...] = ()
    # The shard models read the stage inputs whole (one segment, served by a plain fan-out).
    whole_inputs: bool = False
    # Bytes the server driving the shards relays between segments: the rows each shard
    # sends its peers, up to it and down to them (each shard keeps the rest of its tensors).
    relayed_bytes: int = 0
    # The stage outputs the gathers rebuild, typed and shaped as the whole model has them
    # (what a server in front of the shards tells clients it answers).
    outputs: tuple[TensorInfo, ...] = ()

    @property
    def shards(self) -> int:
        return len(self.proportions)

    @property
    def exchanges(self) -> tuple[Exchange, ...]:
        return tuple(x for s in self.segments for x in s.exchanges)

    @property
    def scatter_bytes(self) -> tuple[int, ...]:
        """Bytes of the stage inputs each shard must be sent."""
        return tuple(sum(x.shard_bytes[i] for x in self.scatter) for i in range(self.shards))


def _span(raw: object) -> Span | None:
    if raw is None:
        return None
    if not isinstance(raw, list | tuple) or len(raw) != 2:
        raise ValueError(f"a span is [start, stop] or null, got {raw!r}")
    return (int(raw[0]), int(raw[1]))


def _ints(raw: object) -> tuple[int, ...]:
    if not isinstance(raw, list | tuple):
        raise TypeError(f"expected a list of integers, got {raw!r}")
    return tuple(int(x) for x in raw)


def _obj(raw: object, what: str) -> dict[str, object]:
    if not isinstance(raw, dict):
        raise TypeError(f"{what} must be an object, got {type(raw).__name__}")
    return raw


def _items(raw: object, what: str) -> list[object]:
    if not isinstance(raw, list | tuple):
        raise TypeError(f"{what} must be a list, got {type(raw).__name__}")
    return list(raw)


def layout_to_json(layout: ShardLayout) -> dict[str, object]:
    """All of `layout` as plain JSON values (`layout_from_json` reads it back equal)."""

    def spans(values: tuple[Span | None, ...]) -> list[list[int] | None]:
        return [None if s is None else [s[0], s[1]] for s in values]

    return {
        "proportions": list(layout.proportions),
        "strategy": layout.strategy,
        "start": layout.start,
        "end": layout.end,
        "whole_inputs": layout.whole_inputs,
        "gathers": [
            {"output": g.output, "mode": g.mode.value, "axis": g.axis, "shard": g.shard}
            for g in layout.gathers
        ],
        "scatter": [
            {
                "tensor": x.tensor,
                "axis": x.axis,
                "shape": list(x.shape),
                "dtype": x.dtype,
                "spans": spans(x.spans),
            }
            for x in layout.scatter
        ],
        "segments": [
            {
                "start": s.start,
                "end": s.end,
                "active": list(s.active),
                "inputs": [list(names) for names in s.inputs],
                "exchanges": [
                    {
                        "tensor": x.tensor,
                        "mode": x.mode.value,
                        "axis": x.axis,
                        "shape": list(x.shape),
                        "dtype": x.dtype,
                        "parts": spans(x.parts),
                        "needs": spans(x.needs),
                    }
                    for x in s.exchanges
                ],
                "shard_flops": list(s.shard_flops),
                "shard_param_bytes": list(s.shard_param_bytes),
                "shard_peak_bytes": list(s.shard_peak_bytes),
            }
            for s in layout.segments
        ],
        "shard_flops": list(layout.shard_flops),
        "shard_param_bytes": list(layout.shard_param_bytes),
        "shard_peak_bytes": list(layout.shard_peak_bytes),
        "shard_class_flops": [list(c) for c in layout.shard_class_flops],
        "gather_bytes": list(layout.gather_bytes),
        "relayed_bytes": layout.relayed_bytes,
        "outputs": [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in layout.outputs
        ],
    }


def layout_from_json(raw: object) -> ShardLayout:
    """The layout `layout_to_json` wrote; raises ValueError, KeyError or TypeError if `raw`
    is not one."""
    doc = _obj(raw, "layout")

    def spans(value: object) -> tuple[Span | None, ...]:
        return tuple(_span(s) for s in _items(value, "spans"))

    def exchange(value: object) -> Exchange:
        x = _obj(value, "exchange")
        return Exchange(
            str(x["tensor"]), GatherMode(str(x["mode"])), int(str(x["axis"])), _ints(x["shape"]),
            str(x["dtype"]), spans(x["parts"]), spans(x["needs"]),
        )  # fmt: skip

    def segment(value: object) -> Segment:
        s = _obj(value, "segment")
        return Segment(
            start=int(str(s["start"])),
            end=int(str(s["end"])),
            active=tuple(bool(a) for a in _items(s["active"], "active")),
            inputs=tuple(
                tuple(str(n) for n in _items(names, "inputs"))
                for names in _items(s["inputs"], "inputs")
            ),
            exchanges=tuple(exchange(x) for x in _items(s["exchanges"], "exchanges")),
            shard_flops=_ints(s["shard_flops"]),
            shard_param_bytes=_ints(s["shard_param_bytes"]),
            shard_peak_bytes=_ints(s["shard_peak_bytes"]),
        )

    def gather(value: object) -> GatherSpec:
        g = _obj(value, "gather")
        return GatherSpec(
            str(g["output"]), GatherMode(str(g["mode"])), int(str(g["axis"])), int(str(g["shard"]))
        )

    def output(value: object) -> TensorInfo:
        t = _obj(value, "output")
        dtype, shape = str(t["dtype"]), _ints(t["shape"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return TensorInfo(str(t["name"]), dtype, shape, nbytes)

    def scatter(value: object) -> Scatter:
        x = _obj(value, "scatter")
        return Scatter(
            str(x["tensor"]), int(str(x["axis"])), _ints(x["shape"]), str(x["dtype"]),
            spans(x["spans"]),
        )  # fmt: skip

    return ShardLayout(
        proportions=tuple(float(str(p)) for p in _items(doc["proportions"], "proportions")),
        gathers=tuple(gather(g) for g in _items(doc["gathers"], "gathers")),
        strategy=str(doc["strategy"]),
        shard_flops=_ints(doc.get("shard_flops", [])),
        start=int(str(doc.get("start", 0))),
        end=int(str(doc.get("end", 0))),
        segments=tuple(segment(s) for s in _items(doc.get("segments", []), "segments")),
        scatter=tuple(scatter(x) for x in _items(doc.get("scatter", []), "scatter")),
        shard_param_bytes=_ints(doc.get("shard_param_bytes", [])),
        shard_peak_bytes=_ints(doc.get("shard_peak_bytes", [])),
        shard_class_flops=tuple(
            _ints(c) for c in _items(doc.get("shard_class_flops", []), "shard_class_flops")
        ),
        gather_bytes=_ints(doc.get("gather_bytes", [])),
        whole_inputs=bool(doc.get("whole_inputs", False)),
        relayed_bytes=int(str(doc.get("relayed_bytes", 0))),
        outputs=tuple(output(t) for t in _items(doc.get("outputs", []), "outputs")),
    )


def layout_id(layout: ShardLayout) -> str:
    """A short name of `layout`'s content: servers that agree on it cut the same shards."""
    text = json.dumps(layout_to_json(layout), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# The planner proposes a sharded range only when its busiest shard runs less than this
# share of the range's FLOPs (stricter than the layout's refusal, so what it proposes cuts).
PROPOSE_SHARE = 0.85


@dataclass(frozen=True, eq=False)
class ShardTable:
    """Figures of every range between `positions` sharded `shards` ways with one strategy at
    equal proportions, for the planner's search; `ShardAnalysis.layout` gives the exact
    layout of the range and proportions finally chosen.

    They come from the strategy placed over the whole model (the halo points, splits and
    exchanges a range's own layout keeps), restricted to the range. `column(b)` gives the
    figures of every range ending at positions[b] at once. For a range that starts where
    `starts` and ends where `ends` is true, at equal proportions, the FLOPs and exchanges
    are those of the shards `ShardAnalysis.layout` cuts (a tile range keeps the whole
    model's halo at its end and crops it off, `crop_params`); the peak activations are the
    whole model's segments' (a tensor passing the range by stays live there).
    """

    shards: int
    strategy: str  # "tile" or "width"
    positions: np.ndarray  # (P,) node positions: 0, the profile's cut points, len(nodes)
    total_flops: np.ndarray  # (P,) prefix sums of the unsharded FLOPs
    # The planner's proportional rule (a shard holding proportion p of [a, b) runs
    # p * split + shared), prefix sums per op class: the split nodes' own FLOPs, and what
    # a shard runs beyond its share (halo, replicated nodes; the largest over shards).
    split_flops: np.ndarray  # (P, classes)
    shared_flops: np.ndarray  # (P, classes)
    split_params: np.ndarray  # (P,) bytes of sliced weights, all shards together
    shared_params: np.ndarray  # (P,) bytes of weights every shard holds whole
    op_counts: np.ndarray  # (P, shards) nodes of each shard's segment models (fixed costs)
    class_flops: np.ndarray  # (P, shards, classes) prefix sums, classes in `OpClass` order
    param_bytes: np.ndarray  # (P, shards) prefix sums
    peak_bytes: np.ndarray  # (P - 1, shards): largest activation bytes in each block
    points_before: np.ndarray  # (P,) exchange points strictly before each position
    points_upto: np.ndarray  # (P,) exchange points at or before each position
    bytes_before: np.ndarray  # (P, shards) bytes received at those points, prefix sums
    bytes_upto: np.ndarray  # (P, shards)
    scatter_bytes: np.ndarray  # (P, shards): stage inputs each shard reads, range from here
    gather_bytes: np.ndarray  # (P, shards): output parts each shard sends, range to here
    starts: np.ndarray  # (P,) bool
    # (P,) bool: a range may end here: no tensor crossing it is held in rows no gather can
    # join (tile), nothing crossing it is split (width), or it is the model's end.
    ends: np.ndarray
    # (P, shards): weight bytes a range ending here adds to crop the rows each shard owns
    # out of what it holds (the halo later nodes would need).
    crop_params: np.ndarray
    # (P - 1,) per block: the heaviest node no shard splits (-1: none) and its FLOPs, to
    # name what keeps a range from splitting.
    whole_node: np.ndarray
    whole_flops: np.ndarray

    FIELDS = (
        "positions", "total_flops", "split_flops", "shared_flops", "split_params",
        "shared_params", "op_counts", "class_flops", "param_bytes", "peak_bytes",
        "points_before", "points_upto", "bytes_before", "bytes_upto", "scatter_bytes",
        "gather_bytes", "starts", "ends", "crop_params", "whole_node", "whole_flops",
    )  # fmt: skip

    def heaviest_whole(self, a: int, b: int) -> int:
        """Index of the heaviest node of positions[a]..positions[b] no shard splits, or -1."""
        if b <= a:
            return -1
        j = a + int(np.argmax(self.whole_flops[a:b]))
        return int(self.whole_node[j]) if self.whole_flops[j] > 0 else -1

    def flops(self, a: int, b: int) -> np.ndarray:
        """(shards,) FLOPs of positions[a]..positions[b] per shard."""
        return (self.class_flops[b] - self.class_flops[a]).sum(axis=-1)

    def column(self, b: int) -> ShardColumn:
        """Every range [positions[a], positions[b]) with a < b."""
        flops = self.class_flops[b][None] - self.class_flops[:b]
        total = self.total_flops[b] - self.total_flops[:b]
        busiest = flops.sum(axis=-1).max(axis=-1)
        peak = np.maximum.accumulate(self.peak_bytes[:b][::-1], axis=0)[::-1]
        return ShardColumn(
            class_flops=flops,
            param_bytes=self.param_bytes[b][None] - self.param_bytes[:b],
            peak_bytes=peak,
            exchanges=self.points_before[b] - self.points_upto[:b],
            exchange_bytes=self.bytes_before[b][None] - self.bytes_upto[:b],
            scatter_bytes=self.scatter_bytes[:b],
            gather_bytes=self.gather_bytes[b],
            allowed=self.starts[:b]
            & self.ends[b]
            & (busiest < PROPOSE_SHARE * np.maximum(total, 1)),
        )


@dataclass(frozen=True, eq=False)
class ShardColumn:
    """The figures of every sharded range ending at one position, indexed by its start."""

    class_flops: np.ndarray  # (b, shards, classes)
    param_bytes: np.ndarray  # (b, shards)
    peak_bytes: np.ndarray  # (b, shards)
    exchanges: np.ndarray  # (b,) exchange points inside the range
    exchange_bytes: np.ndarray  # (b, shards) bytes each shard receives in them
    scatter_bytes: np.ndarray  # (b, shards)
    gather_bytes: np.ndarray  # (shards,)
    allowed: np.ndarray  # (b,) bool: may be proposed
