"""Horizontal sharding: split one range of a model across k devices of a tier.

Two steps share one placement (`partita.model.placement`), so their figures never differ:

* `ShardAnalysis.layout` plans: it picks the strategy, decides the split of every node and
  the exchanges between segments, and returns a `ShardLayout` with each shard's FLOPs,
  parameter and activation bytes and every exchange's bytes, building no weights;
* `ShardAnalysis.build` cuts exactly that layout into one standalone ONNX model per
  segment and shard.

Strategies, chosen per range by their cost on `ReferenceCosts` (or asked for by name):
* "tile": row tiles with halos (`partita.model.tiling`): convolution stacks by image rows,
  transformers by tokens;
* "width": output channels/columns, attention heads, Megatron pairs (`partita.model.width`);
* "branch": independent branches of a multi-branch range on different shards.
A range none of them can split is refused (`ShardingError`) naming the node that keeps the
work whole, never answered with a silently wrong shard.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from partita.model.cost import is_shardable, node_cost, node_flops, op_class
from partita.model.errors import CutError, ShardingError
from partita.model.exchange import gather
from partita.model.graph import CONTROL_FLOW_OPS, GraphView, live_bytes, node_inputs, subgraphs
from partita.model.placement import (
    REFERENCE,
    SUMMAND,
    WHOLE,
    NodeShard,
    Piece,
    RangePlacement,
    ReferenceCosts,
    TensorShards,
    rows,
)
from partita.model.tiling import TileAnalysis, tile_range
from partita.model.types import (
    Exchange,
    GatherMode,
    GatherSpec,
    OpClass,
    Scatter,
    Segment,
    ShardLayout,
    ShardTable,
    TensorInfo,
)
from partita.model.width import WidthRefusal, width_range

__all__ = ["STRATEGIES", "ShardAnalysis", "gather", "shard_stage", "stage_layout"]

STRATEGIES = ("tile", "width", "branch")
OP_CLASSES = tuple(OpClass)


class _ClassIndex(dict[str, int]):
    """Op type -> index of its op class in OP_CLASSES, filled on first use."""

    def __missing__(self, op_type: str) -> int:
        self[op_type] = OP_CLASSES.index(op_class(op_type))
        return self[op_type]


_CLASS_INDEX = _ClassIndex()
# A layout whose busiest shard still runs this share of the range's FLOPs splits nothing
# worth a device: the range is refused, naming the node that kept the work whole.
USELESS_SHARE = 0.9
PLACEMENTS_KEPT = 64


@dataclass
class _SegmentModel:
    """One shard's model for one segment, as node protos and constant descriptions."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # original node index, -1 when added
    consts: dict[str, tuple[str, Piece] | np.ndarray] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, np.dtype] = field(default_factory=dict)
    produced: set[str] = field(default_factory=set)

    def add(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shapes[name] = shape
        self.dtypes[name] = dtype


@dataclass(frozen=True)
class _Figures:
    flops: int
    class_flops: tuple[int, ...]
    param_bytes: int
    peak_bytes: int


class ShardAnalysis:
    """Sharding of one loaded model (static shapes): the layout of any node range for any
    proportions, and the shard models of a layout."""

    def __init__(self, model: onnx.ModelProto, costs: ReferenceCosts = REFERENCE) -> None:
        self.model = model
        self.costs = costs
        self.view = GraphView.of(model)
        self.nodes = list(model.graph.node)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._captures: dict[int, list[str]] = {
            q: sorted(set(node_inputs(n)) - set(n.input))
            for q, n in enumerate(self.nodes)
            if any(True for _ in subgraphs(n))
        }
        self._crossing = _crossing_lists(self.view)
        self._tiles: dict[tuple[int, int], TileAnalysis] = {}
        self._structure: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._arrays: dict[str, np.ndarray] = {}
        # The placements of the last layouts planned, for `build` (bounded: a server or the
        # control loop keeps one analysis per model for its whole life).
        self._placements: OrderedDict[ShardLayout, RangePlacement] = OrderedDict()
        self._global: dict[tuple[str, int], RangePlacement] = {}
        self._opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1
        )

    # -- public ----------------------------------------------------------------------

    def dtype(self, name: str) -> np.dtype:
        d = self._dtypes.get(name)
        if d is None:
            d = self._dtypes[name] = self.view.dtype(name)
        return d

    def shape(self, name: str) -> tuple[int, ...]:
        s = self._shapes.get(name)
        if s is None:
            s = self._shapes[name] = self.view.shape(name)
        return s

    def crossing(self, position: int) -> list[str]:
        """Tensors crossing boundary `position` (produced before it, read at or after it)."""
        return self._crossing[position]

    def range_of(self, inputs: Sequence[str], outputs: Sequence[str]) -> tuple[int, int]:
        """The node range [start, end) of the stage reading `inputs` and producing `outputs`."""
        from partita.model.slice import extract_stage

        stage = extract_stage(self.model, list(inputs), list(outputs))
        found = sorted(self.view.producer[n.output[0]] for n in stage.graph.node)
        if not found:
            raise CutError(f"the stage {list(inputs)} -> {list(outputs)} has no nodes")
        start, end = found[0], found[-1] + 1
        if len(found) != end - start:
            inside = set(found)
            node = self.nodes[next(q for q in range(start, end) if q not in inside)]
            raise CutError(
                f"the stage {list(inputs)} -> {list(outputs)} is not one node range: node "
                f"{node.name or node.output[0]!r} lies inside it but is not part of it"
            )
        return start, end

    def layout(
        self,
        start: int,
        end: int,
        proportions: Sequence[float],
        strategy: str | None = None,
        *,
        single_segment: bool = False,
    ) -> ShardLayout:
        """The layout of nodes [start, end) over len(proportions) shards.

        `strategy` is one of STRATEGIES or None (the cheapest on the reference costs).
        `single_segment` keeps every shard's work in one model with no exchange, the
        stage inputs sent whole to every shard.
        """
        layout, placement = self._best(start, end, proportions, strategy, single_segment)
        self._placements[layout] = placement
        while len(self._placements) > PLACEMENTS_KEPT:
            self._placements.popitem(last=False)
        return layout

    def build(
        self, layout: ShardLayout, shard: int | None = None
    ) -> list[list[onnx.ModelProto | None]]:
        """The segment models of `layout`: result[segment][shard] (None: the shard is idle
        in that segment). With `shard`, only that shard's models are cut (a shard server
        needs no other); the other entries are None."""
        placement = self._placements.get(layout) or self._placement_of(layout)
        programs = self._programs(placement)
        return [
            [
                self._model(seg, f"s{j}_shard{i}")
                if seg.nodes and (shard is None or shard == i)
                else None
                for i, seg in enumerate(per_shard)
            ]
            for j, per_shard in enumerate(programs)
        ]

    # -- strategies ------------------------------------------------------------------

    def _best(
        self,
        start: int,
        end: int,
        proportions: Sequence[float],
        strategy: str | None,
        single_segment: bool,
    ) -> tuple[ShardLayout, RangePlacement]:
        props = tuple(float(p) for p in proportions)
        if len(props) < 2 or any(not p > 0 for p in props):
            raise ShardingError(f"proportions {list(proportions)} must be >= 2 positive numbers")
        if not 0 <= start < end <= len(self.nodes):
            raise ShardingError(
                f"node range [{start}, {end}) is not inside the model's {len(self.nodes)} nodes"
            )
        if strategy is not None and strategy not in STRATEGIES:
            raise ShardingError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        for q in range(start, end):
            for o in self.nodes[q].output:
                if o:
                    self.shape(o)  # a clear ShapeError before any work
        wanted = (strategy,) if strategy else STRATEGIES
        reasons: list[str] = []
        found: list[tuple[float, ShardLayout, RangePlacement]] = []
        for name in wanted:
            try:
                placement = self._place(name, start, end, props, single_segment)
                layout = self._layout(placement, single_segment)
                self._check_useful(layout, placement)
            except ShardingError as exc:
                reasons.append(f"{name}: {exc}")
                continue
            found.append((self._makespan(layout), layout, placement))
        if not found:
            raise ShardingError(
                f"nodes [{start}, {end}) cannot be split in {len(props)} shards: "
                + "; ".join(reasons)
            )
        _, layout, placement = min(found, key=lambda f: f[0])
        return layout, placement

    def _place(
        self,
        strategy: str,
        start: int,
        end: int,
        props: tuple[float, ...],
        single_segment: bool,
    ) -> RangePlacement:
        k = len(props)
        if strategy == "tile":
            dim, points = self.tile_structure(k)
            ana = self._tile_analysis(k, dim)
            try:
                placement, _ = tile_range(
                    ana,
                    start,
                    end,
                    props,
                    halo_points=() if single_segment else points,
                    single_segment=single_segment,
                    crossing=self.crossing,
                    outputs_held=None if single_segment else self._held_at(end, props),
                )
            except ValueError as exc:
                raise ShardingError(str(exc)) from exc
        elif strategy == "width":
            placement = self._width(start, end, props, single_segment)
        else:
            placement = self._branches(start, end, props)
        if single_segment:
            for name in placement.inputs:
                ts = placement.tensors[name]
                ts.held = [WHOLE if h is not None else None for h in ts.held]
        return placement

    def _width(
        self, start: int, end: int, props: tuple[float, ...], single_segment: bool
    ) -> RangePlacement:
        if not single_segment:
            try:
                return width_range(
                    self.view, start, end, props, crossing=self.crossing, costs=self.costs
                )
            except WidthRefusal as exc:
                raise ShardingError(str(exc)) from exc
        # One segment: everything before the first split node runs whole in every shard;
        # try the first split at each candidate anchor and keep the cheapest.
        anchors = [
            q for q in range(start, end) if is_shardable(self.nodes[q], self.view.is_constant)
        ]
        if len(anchors) > 48:
            anchors = [anchors[int(j)] for j in np.linspace(0, len(anchors) - 1, 48)]
        best: tuple[float, RangePlacement] | None = None
        first_error = ""
        for anchor in anchors:
            try:
                placement = width_range(
                    self.view,
                    start,
                    end,
                    props,
                    crossing=self.crossing,
                    costs=self.costs,
                    anchor_from=anchor,
                    single_segment=True,
                )
            except WidthRefusal as exc:
                first_error = first_error or str(exc)
                continue
            cost = max(self._figures_of(placement))
            if best is None or cost < best[0]:
                best = (cost, placement)
        if best is None:
            raise ShardingError(
                first_error or "no Conv/MatMul/Gemm with constant weights to split by width"
            )
        return best[1]

    def _figures_of(self, placement: RangePlacement) -> list[float]:
        programs = self._programs(placement)
        return [
            sum(self._figures(per_shard[i]).flops for per_shard in programs)
            for i in range(placement.shards)
        ]

    def _branches(self, start: int, end: int, props: tuple[float, ...]) -> RangePlacement:
        k = len(props)
        view = self.view
        parent = list(range(start, end))

        def find(x: int) -> int:
            while parent[x - start] != x:
                parent[x - start] = parent[parent[x - start] - start]
                x = parent[x - start]
            return x

        for q in range(start, end):
            for src in node_inputs(self.nodes[q]):
                p = view.producer.get(src)
                if p is not None and start <= p < end:
                    parent[find(q) - start] = find(p)
        groups: dict[int, list[int]] = {}
        for q in range(start, end):
            groups.setdefault(find(q), []).append(q)
        branches = list(groups.values())
        if len(branches) < k:
            raise ShardingError(
                f"the range has {len(branches)} independent branch(es), fewer than {k} shards"
            )
        flops = [sum(self._node_flops(q) for q in g) for g in branches]
        load = [0.0] * k
        assign = [0] * len(branches)
        for g in sorted(range(len(branches)), key=lambda g: -flops[g]):
            s = min(range(k), key=lambda s: (load[s] + flops[g]) / props[s])
            load[s] += flops[g]
            assign[g] = s
        if len(set(assign)) < k:
            raise ShardingError("branch assignment left a shard without work; use fewer shards")
        shard_of = {q: assign[g] for g, nodes in enumerate(branches) for q in nodes}
        placement = RangePlacement(
            start=start,
            end=end,
            proportions=props,
            strategy="branch",
            nodes={},
            tensors={},
            inputs=(),
            outputs=tuple(self.crossing(end)),
        )
        need: dict[str, set[int]] = {}
        gathers: dict[str, int] = {}
        for name in placement.outputs:
            p = view.producer.get(name)
            shard = shard_of[p] if p is not None and start <= p < end else 0
            gathers[name] = shard
            need.setdefault(name, set()).add(shard)
        for q in range(end - 1, start - 1, -1):
            node = self.nodes[q]
            who = set().union(*(need.get(o, set()) for o in node.output if o))
            placement.nodes[q] = [NodeShard() if j in who else None for j in range(k)]
            for name in node_inputs(node):
                if not view.is_constant(name):
                    need.setdefault(name, set()).update(who)
        placement.inputs = tuple(n for n in self.crossing(start) if n in need)
        for name, who in need.items():
            placement.tensors[name] = TensorShards(
                held=[WHOLE if j in who else None for j in range(k)],
                take_from=gathers.get(name, 0),
            )
        return placement

    def tile_structure(self, shards: int) -> tuple[int, tuple[int, ...]]:
        """(tiled spatial dim, halo exchange points) of the whole model at `shards` equal
        shards, kept for every range so a range's layout is the whole model's restricted."""
        if shards not in self._structure:
            best: tuple[float, int, tuple[int, ...], RangePlacement] | None = None
            props = (1.0,) * shards
            for dim in self._tile_dims():
                ana = self._tile_analysis(shards, dim)
                if not ana.axis:
                    continue
                try:
                    placement, points = tile_range(
                        ana, 0, len(self.nodes), props, crossing=self.crossing
                    )
                    layout = self._layout(placement, False)
                    self._check_useful(layout, placement)
                    cost = self._makespan(layout)
                except (ValueError, ShardingError):
                    continue
                if best is None or cost < best[0]:
                    best = (cost, dim, points, placement)
            self._structure[shards] = (best[1], best[2]) if best else (0, ())
            if best is not None:
                self._global[("tile", shards)] = best[3]
        return self._structure[shards]

    def _held_at(self, end: int, props: tuple[float, ...]) -> dict[str, list[Piece | None]] | None:
        """At equal proportions, what the whole model's tile placement has each shard hold
        of the tensors crossing `end` (their owned rows and the halo later nodes need): a
        range ending there keeps it, so its figures are those of the shard tables."""
        k = len(props)
        if len(set(props)) != 1 or end == len(self.nodes):
            return None
        whole = self._global.get(("tile", k))
        if whole is None:
            return None
        out = {}
        for name in self.crossing(end):
            ts = whole.tensors.get(name)
            if ts is not None and ts.mode is not GatherMode.TAKE:
                # before an exchange at `end` itself: the next stage's, not this range's
                at = end - 1 if ts.exchange_at == end else end
                out[name] = [ts.version(i, at) for i in range(k)]
        return out

    def _tile_dims(self) -> tuple[int, ...]:
        """The spatial dims worth trying: the height, and the width of 2-D windows when it
        is larger (text lines, spectrograms)."""
        for n in self.nodes:
            if n.op_type in ("Conv", "MaxPool", "AveragePool") and len(self.shape(n.input[0])) == 4:
                shape = self.shape(n.output[0])
                return (0, 1) if shape[3] > shape[2] else (0,)
        return (0,)

    def _global_placement(self, strategy: str, shards: int) -> RangePlacement:
        key = (strategy, shards)
        if key not in self._global:
            props = (1.0,) * shards
            if strategy == "tile":
                self.tile_structure(shards)
                if key not in self._global:
                    raise ShardingError("no node of the model can run on row tiles")
            else:
                self._global[key] = self._place(strategy, 0, len(self.nodes), props, False)
        return self._global[key]

    def table(self, shards: int, strategy: str, positions: Sequence[int]) -> ShardTable:
        """The figures of every range between `positions` for the planner's search."""
        placement = self._global_placement(strategy, shards)
        n, k, c = len(self.nodes), shards, len(OP_CLASSES)
        node_flops = np.zeros((n, k, c), dtype=np.int64)
        node_params = np.zeros((n, k), dtype=np.int64)
        node_live = np.zeros((n, k), dtype=np.int64)
        node_ops = np.zeros((n, k), dtype=np.int64)
        programs = self._programs(placement)
        for per_shard in programs:
            for i, seg in enumerate(per_shard):
                if not seg.nodes:
                    continue
                flops, params, live = self._op_figures(seg)
                owners = list(seg.owners)
                nxt = next((o for o in reversed(owners) if o >= 0), 0)
                for t in range(len(owners) - 1, -1, -1):  # added ops count with the next node
                    if owners[t] < 0:
                        owners[t] = nxt
                    nxt = owners[t]
                idx = np.asarray(owners, dtype=np.int64)
                np.add.at(node_flops[:, i, :], idx, flops)
                np.add.at(node_params[:, i], idx, params)
                np.maximum.at(node_live[:, i], idx, live)
                np.add.at(node_ops[:, i], idx, 1)
        pos = np.asarray(positions, dtype=np.int64)
        # The planner's proportional rule, read off this placement: a split node's own
        # FLOPs divide by proportion and what a shard runs beyond its share (halo, masks,
        # the bias shard 0 adds) is work every shard may have; a node no shard splits runs
        # in full. Sliced weights divide by proportion too.
        split = np.array([self._split_anywhere(placement, q) for q in range(n)], dtype=np.bool_)
        own = np.zeros((n, c), dtype=np.int64)
        for q in range(n):
            if split[q]:
                own[q, self._class_of(q)] = self._node_flops(q)
        extra = np.clip(node_flops - own[:, None, :] // k, 0, None).max(axis=1)
        shared_flops = np.where(split[:, None], extra, node_flops.max(axis=1))
        sliced = split & (node_params.max(axis=1) < node_params.sum(axis=1) / k * 1.5)
        split_params = np.where(sliced, node_params.sum(axis=1), 0)
        shared_params = np.where(sliced, 0, node_params.max(axis=1))
        zero = np.zeros((1, k), dtype=np.int64)
        whole = np.concatenate(
            [[0], np.cumsum([self._node_flops(q) for q in range(n)], dtype=np.int64)]
        )
        cum_flops = np.concatenate([np.zeros((1, k, c), np.int64), np.cumsum(node_flops, 0)])
        cum_params = np.concatenate([zero, np.cumsum(node_params, 0)])
        peak = (
            np.stack(
                [node_live[pos[j] : pos[j + 1]].max(axis=0, initial=0) for j in range(len(pos) - 1)]
            )
            if len(pos) > 1
            else np.zeros((0, k), np.int64)
        )
        whole_node = np.full(max(len(pos) - 1, 0), -1, dtype=np.int64)
        whole_flops = np.zeros(max(len(pos) - 1, 0), dtype=np.int64)
        for j in range(len(pos) - 1):
            for q in range(int(pos[j]), int(pos[j + 1])):
                if not self._split_anywhere(placement, q):
                    f = self._node_flops(q)
                    if f > whole_flops[j]:
                        whole_node[j], whole_flops[j] = q, f
        points: dict[int, np.ndarray] = {}
        for name, ts in placement.tensors.items():
            if ts.exchange_at is not None:
                got = np.asarray(self._exchange(name, ts, k).received_bytes, dtype=np.int64)
                points[ts.exchange_at] = points.get(ts.exchange_at, 0) + got
        at = np.asarray(sorted(points), dtype=np.int64)
        recv = np.stack([points[p] for p in sorted(points)]) if points else np.zeros((0, k))
        cum_recv = np.concatenate([zero, np.cumsum(recv, 0)]).astype(np.int64)
        before = np.searchsorted(at, pos, side="left")
        upto = np.searchsorted(at, pos, side="right")
        scatter = np.zeros((len(pos), k), dtype=np.int64)
        gather_b = np.zeros((len(pos), k), dtype=np.int64)
        starts = np.ones(len(pos), dtype=np.bool_)
        ends = np.ones(len(pos), dtype=np.bool_)
        crops = np.zeros((len(pos), k), dtype=np.int64)
        for j, p in enumerate(pos):
            for name in self.crossing(int(p)):
                crossing = placement.tensors.get(name)
                if crossing is None:
                    continue
                shape, size = self.shape(name), self.dtype(name).itemsize
                for i in range(k):
                    piece = crossing.version(i, int(p))
                    if piece is None:
                        continue
                    scatter[j, i] += piece.nbytes(shape, size)
                    if not piece.whole and strategy == "width":
                        # A width range starts and ends where nothing is split: there its
                        # own walk makes the whole model's decisions.
                        starts[j] = False
                        ends[j] = p == n
                    if not piece.whole and not piece.partial and crossing.mode is GatherMode.TAKE:
                        ends[j] = False  # held in rows no gather can join: needed whole here
                    if crossing.mode is GatherMode.CONCAT and crossing.owned is not None:
                        lo, hi = crossing.owned[i]
                        gather_b[j, i] += Piece(crossing.axis, lo, hi).nbytes(shape, size)
                        owns = rows(crossing.axis, lo, hi, shape[crossing.axis])
                        if piece != owns and self._opset >= 10:
                            crops[j, i] += 3 * 8  # the int64 starts, ends, axes of the crop
                    elif crossing.mode is not GatherMode.TAKE or i == crossing.take_from:
                        gather_b[j, i] += math.prod(shape) * size

        def prefix(values: np.ndarray) -> np.ndarray:
            first = np.zeros((1, *values.shape[1:]), dtype=np.int64)
            return np.concatenate([first, np.cumsum(values, 0)])[pos]

        return ShardTable(
            shards=k,
            strategy=strategy,
            positions=pos,
            total_flops=whole[pos],
            split_flops=prefix(own),
            shared_flops=prefix(shared_flops),
            split_params=prefix(split_params),
            shared_params=prefix(shared_params),
            op_counts=prefix(node_ops),
            class_flops=cum_flops[pos],
            param_bytes=cum_params[pos],
            peak_bytes=peak,
            points_before=before.astype(np.int64),
            points_upto=upto.astype(np.int64),
            bytes_before=cum_recv[before],
            bytes_upto=cum_recv[upto],
            scatter_bytes=scatter,
            gather_bytes=gather_b,
            starts=starts,
            ends=ends,
            crop_params=crops,
            whole_node=whole_node,
            whole_flops=whole_flops,
        )

    def _class_of(self, q: int) -> int:
        node = self.nodes[q]
        if q in self._captures or node.op_type in CONTROL_FLOW_OPS:
            return OP_CLASSES.index(OpClass.OTHER)
        return _CLASS_INDEX[node.op_type]

    def _split_anywhere(self, placement: RangePlacement, q: int) -> bool:
        """Some shard runs node q on a part of its output (rows, channels, a summand)."""
        for o in self.nodes[q].output:
            ts = placement.tensors.get(o)
            if ts is not None and any(p is not None and not p.whole for p in ts.held):
                return True
        return False

    def _tile_analysis(self, shards: int, dim: int) -> TileAnalysis:
        key = (shards, dim)
        if key not in self._tiles:
            self._tiles[key] = TileAnalysis(self.view, shards, dim, self.costs, self._shapes)
        return self._tiles[key]

    def _node_flops(self, q: int) -> int:
        node = self.nodes[q]
        shapes = {n: self.shape(n) for n in (*node_inputs(node), *node.output) if n}
        return node_flops(node, shapes, self.view.initializers)[0]

    def _makespan(self, layout: ShardLayout) -> float:
        speeds = np.array([self.costs.speed(c.value) for c in OP_CLASSES])
        compute = max(
            float(np.dot(np.asarray(f, dtype=np.float64), 1.0 / speeds))
            for f in layout.shard_class_flops
        )
        exchanges = sum(self.costs.transfer_s(max(x.received_bytes)) for x in layout.exchanges)
        ends = self.costs.transfer_s(max(layout.scatter_bytes, default=0)) + self.costs.transfer_s(
            sum(layout.gather_bytes)
        )
        return compute + exchanges + ends

    def _check_useful(self, layout: ShardLayout, placement: RangePlacement) -> None:
        total = sum(self._node_flops(q) for q in range(layout.start, layout.end))
        if not total or max(layout.shard_flops) < USELESS_SHARE * total:
            return
        busiest = int(np.argmax(layout.shard_flops))
        whole = [
            q
            for q in range(layout.start, layout.end)
            if placement.nodes[q][busiest] is not None
            and all(
                (t := placement.tensors.get(o)) is None or t.held[busiest] in (WHOLE, None)
                for o in self.nodes[q].output
                if o
            )
        ]
        heaviest = max(whole, key=self._node_flops, default=None)
        if heaviest is None:
            raise ShardingError("no shard saves work")
        node = self.nodes[heaviest]
        share = self._node_flops(heaviest) / total
        raise ShardingError(
            f"{node.op_type} node {node.name or node.output[0]!r} ({share:.0%} of the range's "
            f"FLOPs) runs whole ({self._why_whole(placement, heaviest)}): shard {busiest} "
            f"would still run {max(layout.shard_flops) / total:.0%} of the work"
        )

    def _why_whole(self, placement: RangePlacement, q: int) -> str:
        node = self.nodes[q]
        if q in self._captures:
            return "control flow is never split"
        k = placement.shards
        if placement.strategy == "tile":
            ana = next((a for (shards, _), a in self._tiles.items() if shards == k), None)
            out = self.shape(node.output[0])
            if ana is not None and all(
                ana.map_rows(node, x) is None for x in range(len(out)) if out[x] >= k
            ):
                return f"{node.op_type} has no rule to run on a part of its rows"
            return (
                "its output is needed whole, and swapping it costs more than computing it on "
                "the reference device and LAN"
            )
        if is_shardable(node, self.view.is_constant):
            return "splitting it saves less than one exchange costs on the reference device and LAN"
        return f"{node.op_type} has no rule for a split input, and nothing before it is split"

    # -- from a placement to segment programs ----------------------------------------

    def _placement_of(self, layout: ShardLayout) -> RangePlacement:
        """Plan `layout` again (a layout made by another process from the same model)."""
        family = {"megatron": "width", "column": "width", "conv-channel": "width"}.get(
            layout.strategy, layout.strategy
        )
        placement = self._place(
            family, layout.start, layout.end, layout.proportions, layout.whole_inputs
        )
        if self._layout(placement, layout.whole_inputs) != layout:
            raise ShardingError(
                "the layout was not made from this model; plan it again with "
                "ShardAnalysis.layout on the loaded model"
            )
        return placement

    def _programs(self, placement: RangePlacement) -> list[list[_SegmentModel]]:
        points = placement.exchange_points()
        cuts = [placement.start, *points, placement.end]
        k = placement.shards
        programs: list[list[_SegmentModel]] = []
        for j in range(len(cuts) - 1):
            programs.append([self._segment(placement, i, cuts[j], cuts[j + 1]) for i in range(k)])
        # Outputs: parts for the exchange after the segment and the stage's output parts at
        # the end, then the tensors a later segment reads from the same shard.
        for j, per_shard in enumerate(programs):
            end = cuts[j + 1]
            for i, seg in enumerate(per_shard):
                if end < placement.end:
                    for name, ts in placement.tensors.items():
                        if ts.exchange_at == end and ts.held[i] is not None:
                            self._part(seg, placement, name, ts, i, end - 1)
                    continue
                for name in placement.outputs:
                    ts = placement.tensors[name]
                    if ts.mode is GatherMode.TAKE and i != ts.take_from:
                        continue
                    if ts.version(i, end) is not None:
                        self._part(seg, placement, name, ts, i, end)
        for j, per_shard in enumerate(programs[:-1]):
            end = cuts[j + 1]
            for i, seg in enumerate(per_shard):
                later = {n for s in programs[j + 1 :] for n in s[i].inputs}
                for name in sorted(seg.produced & later):
                    ts = placement.tensors[name]
                    if ts.exchange_at is None or ts.exchange_at > end:
                        seg.outputs.append(name)
        return programs

    def _read(self, seg: _SegmentModel, placement: RangePlacement, name: str, shard: int,
              position: int) -> Piece:  # fmt: skip
        ts = placement.tensors.get(name)
        version = ts.version(shard, position) if ts is not None else None
        if version is None:
            raise ShardingError(
                f"internal: shard {shard} reads {name!r} at node {position} but holds none of it"
            )
        if name not in seg.produced and name not in seg.inputs:
            seg.inputs.append(name)
            seg.add(name, version.shape(self.shape(name)), self.dtype(name))
        return version

    def _slice(self, seg: _SegmentModel, name: str, have: Piece, want: Piece) -> str:
        """A tensor holding piece `want` of `name`, cut from the held piece `have`."""
        if want == have or (want.whole and have.whole):
            return name
        assert want.axis is not None and (have.whole or have.axis == want.axis), (want, have)
        offset = 0 if have.axis is None else have.start
        alias = f"{name}__rows{want.axis}_{want.start}_{want.stop}"
        if alias in seg.produced:
            return alias
        lo, hi = want.start - offset, want.stop - offset
        if self._opset < 10:
            seg.nodes.append(
                helper.make_node(
                    "Slice",
                    [name],
                    [alias],
                    axes=[want.axis],
                    starts=[lo],
                    ends=[hi],
                    name=alias,
                )
            )
        else:
            names = [f"{alias}__{k}" for k in ("starts", "ends", "axes")]
            for n, v in zip(names, (lo, hi, want.axis), strict=True):
                seg.consts[n] = np.array([v], dtype=np.int64)
            seg.nodes.append(helper.make_node("Slice", [name, *names], [alias], name=alias))
        seg.owners.append(-1)
        seg.produced.add(alias)
        seg.add(alias, want.shape(self.shape(name)), self.dtype(name))
        return alias

    def _part(
        self,
        seg: _SegmentModel,
        placement: RangePlacement,
        name: str,
        ts: TensorShards,
        shard: int,
        position: int,
    ) -> None:
        """Add shard `shard`'s part of `name` (rows it owns, its summand, or the whole) as
        it holds the tensor when node `position` has run."""
        have = self._read(seg, placement, name, shard, position)
        if ts.mode is GatherMode.CONCAT:
            assert ts.owned is not None
            lo, hi = ts.owned[shard]
            size = self.shape(name)[ts.axis]
            want = WHOLE if (lo, hi) == (0, size) else Piece(ts.axis, lo, hi)
            src = self._slice(seg, name, have, want)
        else:
            src = name
        part = GatherSpec.part_name(name, shard)
        seg.nodes.append(helper.make_node("Identity", [src], [part], name=part))
        seg.owners.append(-1)
        seg.produced.add(part)
        seg.add(part, seg.shapes[src], seg.dtypes[src])
        seg.outputs.append(part)

    def _segment(
        self, placement: RangePlacement, shard: int, start: int, end: int
    ) -> _SegmentModel:
        seg = _SegmentModel()
        view = self.view
        for q in range(start, end):
            plan = placement.nodes[q][shard]
            if plan is None:
                continue
            node = self.nodes[q]
            if plan.vocab is not None:
                self._embedding(seg, placement, shard, q, plan.vocab)
                continue
            inputs = list(node.input)
            for slot, name in enumerate(node.input):
                if not name or (plan.identity_of is not None and slot != plan.identity_of):
                    continue
                if slot in plan.drop:
                    inputs[slot] = ""
                elif slot in plan.consts:
                    const = f"{node.output[0]}__in{slot}_s{shard}"
                    seg.consts[const] = plan.consts[slot]
                    inputs[slot] = const
                elif view.is_constant(name):
                    piece = plan.reads.get(slot)
                    if piece is not None and not piece.whole:
                        const = f"{name}__rows{piece.axis}_{piece.start}_{piece.stop}"
                        seg.consts[const] = (name, piece)
                        inputs[slot] = const
                    else:
                        seg.consts[name] = (name, WHOLE)
                else:
                    have = self._read(seg, placement, name, shard, q)
                    want = plan.reads.get(slot, have)
                    inputs[slot] = self._slice(seg, name, have, want)
            for name in self._captures.get(q, ()):
                if view.is_constant(name):
                    seg.consts[name] = (name, WHOLE)
                else:
                    have = self._read(seg, placement, name, shard, q)
                    if not have.whole:
                        raise ShardingError(
                            f"internal: the subgraph of node {node.name!r} reads a piece "
                            f"of {name!r}"
                        )
            while inputs and not inputs[-1]:
                inputs.pop()
            outs = list(node.output)
            if plan.identity_of is not None:
                new = helper.make_node(
                    "Identity", [inputs[plan.identity_of]], [outs[0]], name=node.name
                )
            elif (
                not plan.attrs
                and plan.scale is None
                and plan.computed is None
                and inputs == list(node.input)
            ):
                new = node
            else:
                new = onnx.NodeProto()
                new.CopyFrom(node)
                del new.input[:]
                new.input.extend(inputs)
                for key, value in plan.attrs.items():
                    for a in list(new.attribute):
                        if a.name == key:
                            new.attribute.remove(a)
                    new.attribute.append(helper.make_attribute(key, value))
            if plan.scale is not None:
                unscaled = f"{outs[0]}__shard_mean"
                new.output[0] = unscaled
            if plan.computed is not None:
                new.output[0] = f"{outs[0]}__computed"
            seg.nodes.append(new)
            seg.owners.append(q)
            for o, real in zip(new.output, outs, strict=True):
                if not o:
                    continue
                ts = placement.tensors.get(real)
                piece = ts.held[shard] if ts is not None else WHOLE
                if plan.computed is not None and real == outs[0]:
                    piece = plan.computed
                seg.add(o, (piece or WHOLE).shape(self.shape(real)), self.dtype(real))
                seg.produced.add(o)
            if plan.computed is not None:
                self._crop(seg, placement, shard, q, plan.computed)
            if plan.scale is not None:
                factor = f"{outs[0]}__share_s{shard}"
                seg.consts[factor] = np.asarray(plan.scale, dtype=self.dtype(outs[0]))
                seg.nodes.append(
                    helper.make_node("Mul", [new.output[0], factor], [outs[0]], name=factor)
                )
                seg.owners.append(q)
                seg.add(outs[0], seg.shapes[new.output[0]], self.dtype(outs[0]))
                seg.produced.add(outs[0])
        return seg

    def _crop(
        self, seg: _SegmentModel, placement: RangePlacement, shard: int, q: int, computed: Piece
    ) -> None:
        """Keep of the rows a node computed those the shard holds of its output."""
        out = self.nodes[q].output[0]
        want = placement.tensors[out].held[shard]
        assert want is not None and computed.axis is not None
        whole = self.shape(out)
        lo, hi = (0, whole[computed.axis]) if want.axis is None else (want.start, want.stop)
        lo, hi = lo - computed.start, hi - computed.start
        src = f"{out}__computed"
        if self._opset < 10:
            node = helper.make_node(
                "Slice", [src], [out], axes=[computed.axis], starts=[lo], ends=[hi], name=out
            )
        else:
            names = [f"{out}__crop_{k}" for k in ("starts", "ends", "axes")]
            for n, v in zip(names, (lo, hi, computed.axis), strict=True):
                seg.consts[n] = np.array([v], dtype=np.int64)
            node = helper.make_node("Slice", [src, *names], [out], name=f"{out}__crop")
        seg.nodes.append(node)
        seg.owners.append(q)
        seg.add(out, want.shape(whole), self.dtype(out))
        seg.produced.add(out)

    def _embedding(
        self,
        seg: _SegmentModel,
        placement: RangePlacement,
        shard: int,
        q: int,
        rows: tuple[int, int],
    ) -> None:
        """Look up only the table rows [lo, hi) this shard holds: ids outside give zeros."""
        node = self.nodes[q]
        table, ids = node.input[0], node.input[1]
        out = node.output[0]
        self._read(seg, placement, ids, shard, q)
        lo, hi = rows
        part = f"{table}__rows0_{lo}_{hi}"
        seg.consts[part] = (table, Piece(0, lo, hi))
        id_type, value_type = self.dtype(ids), self.dtype(out)
        for name, value in (("lo", lo), ("hi", hi), ("zero", 0)):
            seg.consts[f"{out}__{name}"] = np.asarray(value, dtype=id_type)
        id_shape = self.shape(ids)
        mask_shape = (*id_shape, 1)
        boolean = np.dtype(np.bool_)

        def emit(op: str, ins: list[str], name: str, shape: tuple[int, ...], dtype: np.dtype,
                 **attrs: object) -> None:  # fmt: skip
            seg.nodes.append(helper.make_node(op, ins, [name], name=name, **attrs))  # type: ignore[arg-type]
            seg.owners.append(q)
            seg.add(name, shape, dtype)
            seg.produced.add(name)

        emit("GreaterOrEqual", [ids, f"{out}__lo"], f"{out}__ge", id_shape, boolean)
        emit("Less", [ids, f"{out}__hi"], f"{out}__lt", id_shape, boolean)
        emit("And", [f"{out}__ge", f"{out}__lt"], f"{out}__held", id_shape, boolean)
        emit("Sub", [ids, f"{out}__lo"], f"{out}__local", id_shape, id_type)
        emit("Where", [f"{out}__held", f"{out}__local", f"{out}__zero"], f"{out}__safe",
             id_shape, id_type)  # fmt: skip
        emit("Gather", [part, f"{out}__safe"], f"{out}__rows", self.shape(out), value_type)
        if self._opset >= 13:
            seg.consts[f"{out}__axes"] = np.asarray([len(id_shape)], dtype=np.int64)
            emit("Unsqueeze", [f"{out}__held", f"{out}__axes"], f"{out}__mask", mask_shape,
                 boolean)  # fmt: skip
        else:
            emit("Unsqueeze", [f"{out}__held"], f"{out}__mask", mask_shape, boolean,
                 axes=[len(id_shape)])  # fmt: skip
        elem = helper.np_dtype_to_tensor_dtype(value_type)
        emit("Cast", [f"{out}__mask"], f"{out}__maskf", mask_shape, value_type, to=elem)
        emit("Mul", [f"{out}__rows", f"{out}__maskf"], out, self.shape(out), value_type)

    # -- figures -----------------------------------------------------------------------

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.view.initializers[name])
        return self._arrays[name]

    def _const_shape(self, value: tuple[str, Piece] | np.ndarray) -> tuple[tuple[int, ...], int]:
        if isinstance(value, np.ndarray):
            return tuple(value.shape), value.dtype.itemsize
        name, piece = value
        return piece.shape(self.shape(name)), self.dtype(name).itemsize

    def _figures(self, seg: _SegmentModel) -> _Figures:
        flops, params, live = self._op_figures(seg)
        return _Figures(
            int(flops.sum()),
            tuple(int(x) for x in flops.sum(axis=0)),
            int(params.sum()),
            int(live.max(initial=0)),
        )

    def _op_figures(self, seg: _SegmentModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per node of a segment model: FLOPs per op class, parameter bytes first read there,
        activation bytes alive after it (what `profile_loaded` finds in the built model)."""
        shapes = dict(seg.shapes)
        const_sizes: dict[str, int] = {}
        for name, value in seg.consts.items():
            shape, itemsize = self._const_shape(value)
            shapes[name] = shape
            const_sizes[name] = math.prod(shape) * itemsize
        flops = np.zeros((len(seg.nodes), len(OP_CLASSES)), dtype=np.int64)
        params = np.zeros(len(seg.nodes), dtype=np.int64)
        used: set[str] = set()
        loops = (
            self._trip_counts(seg) if any(n.op_type in CONTROL_FLOW_OPS for n in seg.nodes) else {}
        )
        for t, (node, owner) in enumerate(zip(seg.nodes, seg.owners, strict=True)):
            if owner in self._captures or node.op_type in CONTROL_FLOW_OPS:
                flops[t, OP_CLASSES.index(OpClass.OTHER)] = node_flops(node, shapes, loops)[0]
            else:
                flops[t, _CLASS_INDEX[node.op_type]] = node_cost(node, shapes.get)[0]
            for name in (*node.input, *self._captures.get(owner, ())):
                if name in const_sizes and name not in used:
                    used.add(name)
                    params[t] += const_sizes[name]
        sizes = {
            name: math.prod(shape) * seg.dtypes[name].itemsize for name, shape in seg.shapes.items()
        }
        live = live_bytes(seg.nodes, sizes, seg.inputs, seg.outputs, const_sizes)
        return flops, params, live

    def _trip_counts(self, seg: _SegmentModel) -> dict[str, onnx.TensorProto]:
        out = {}
        for name, value in seg.consts.items():
            if isinstance(value, np.ndarray):
                out[name] = numpy_helper.from_array(value, name)
            elif value[1].whole:
                out[name] = self.view.initializers[value[0]]
        return out

    def _layout(self, placement: RangePlacement, single_segment: bool) -> ShardLayout:
        programs = self._programs(placement)
        if single_segment and len(programs) != 1:
            raise ShardingError("the layout needs exchanges between segments")
        k = placement.shards
        points = placement.exchange_points()
        cuts = [placement.start, *points, placement.end]
        segments: list[Segment] = []
        totals = np.zeros((k, len(OP_CLASSES)), dtype=np.int64)
        params = [0] * k
        peaks = [0] * k
        for j, per_shard in enumerate(programs):
            figs = [self._figures(seg) for seg in per_shard]
            for i, f in enumerate(figs):
                totals[i] += f.class_flops
                params[i] += f.param_bytes
                peaks[i] = max(peaks[i], f.peak_bytes)
            exchanges = tuple(
                self._exchange(name, ts, k)
                for name, ts in sorted(placement.tensors.items())
                if ts.exchange_at == cuts[j + 1] and cuts[j + 1] < placement.end
            )
            segments.append(
                Segment(
                    start=cuts[j],
                    end=cuts[j + 1],
                    active=tuple(bool(seg.nodes) for seg in per_shard),
                    inputs=tuple(tuple(seg.inputs) for seg in per_shard),
                    exchanges=exchanges,
                    shard_flops=tuple(f.flops for f in figs),
                    shard_param_bytes=tuple(f.param_bytes for f in figs),
                    shard_peak_bytes=tuple(f.peak_bytes for f in figs),
                )
            )
        gathers = []
        gather_bytes = [0] * k
        for name in placement.outputs:
            ts = placement.tensors[name]
            if ts.mode is GatherMode.TAKE:
                gathers.append(GatherSpec(name, GatherMode.TAKE, shard=ts.take_from))
            else:
                gathers.append(GatherSpec(name, ts.mode, axis=ts.axis))
        last = programs[-1]
        for i, seg in enumerate(last):
            for out in seg.outputs:
                gather_bytes[i] += math.prod(seg.shapes[out]) * seg.dtypes[out].itemsize
        scatter = []
        for name in placement.inputs:
            ts = placement.tensors[name]
            shape = self.shape(name)
            axis = next((p.axis for p in ts.held if p is not None and p.axis is not None), 0)
            size = shape[axis] if shape else 1
            spans = tuple(
                None if p is None else ((0, size) if p.axis is None else (p.start, p.stop))
                for p in ts.held
            )
            scatter.append(Scatter(name, axis, shape, self.dtype(name).name, spans))
        strategy = placement.strategy
        return ShardLayout(
            whole_inputs=single_segment,
            proportions=placement.proportions,
            gathers=tuple(gathers),
            strategy=strategy,
            shard_flops=tuple(int(x) for x in totals.sum(axis=1)),
            start=placement.start,
            end=placement.end,
            segments=tuple(segments),
            scatter=tuple(scatter),
            shard_param_bytes=tuple(params),
            shard_peak_bytes=tuple(peaks),
            shard_class_flops=tuple(tuple(int(x) for x in row) for row in totals),
            gather_bytes=tuple(gather_bytes),
            relayed_bytes=sum(2 * sum(x.received_bytes) for s in segments for x in s.exchanges),
            outputs=tuple(self._info(name) for name in placement.outputs),
        )

    def _info(self, name: str) -> TensorInfo:
        shape, dtype = self.shape(name), self.dtype(name)
        return TensorInfo(name, dtype.name, shape, math.prod(shape) * dtype.itemsize)

    def _exchange(self, name: str, ts: TensorShards, k: int) -> Exchange:
        shape = self.shape(name)
        assert ts.after is not None
        if ts.mode is GatherMode.CONCAT:
            assert ts.owned is not None
            size = shape[ts.axis]
            parts = tuple(ts.owned[i] if ts.held[i] is not None else None for i in range(k))
            needs = tuple(
                None if p is None else ((0, size) if p.axis is None else (p.start, p.stop))
                for p in ts.after
            )
            return Exchange(name, GatherMode.CONCAT, ts.axis, shape, self.dtype(name).name,
                            parts, needs)  # fmt: skip
        size = shape[0] if shape else 1
        parts = tuple((0, size) if ts.held[i] is SUMMAND else None for i in range(k))
        needs = tuple(None if p is None else (0, size) for p in ts.after)
        return Exchange(name, ts.mode, 0, shape, self.dtype(name).name, parts, needs)

    # -- build -------------------------------------------------------------------------

    def _model(self, seg: _SegmentModel, suffix: str) -> onnx.ModelProto:
        inits = []
        for name, value in seg.consts.items():
            if isinstance(value, np.ndarray):
                inits.append(numpy_helper.from_array(value, name))
                continue
            source, piece = value
            if piece.whole:
                inits.append(self.view.initializers[source])
                continue
            array = self._array(source)
            index = [slice(None)] * array.ndim
            assert piece.axis is not None
            index[piece.axis] = slice(piece.start, piece.stop)
            inits.append(numpy_helper.from_array(np.ascontiguousarray(array[tuple(index)]), name))

        def info(name: str) -> onnx.ValueInfoProto:
            elem = helper.np_dtype_to_tensor_dtype(seg.dtypes[name])
            return helper.make_tensor_value_info(name, elem, list(seg.shapes[name]))

        graph = helper.make_graph(
            seg.nodes,
            f"{self.model.graph.name or 'model'}_{suffix}",
            [info(n) for n in seg.inputs],
            [info(n) for n in seg.outputs],
            inits,
        )
        out = helper.make_model(
            graph, opset_imports=list(self.model.opset_import), producer_name="partita"
        )
        out.ir_version = self.model.ir_version
        out.functions.extend(self.model.functions)
        return out


def _crossing_lists(view: GraphView) -> list[list[str]]:
    from partita.model.slice import boundaries

    return boundaries(view.model)


def shard_stage(
    stage: onnx.ModelProto,
    proportions: Sequence[float],
    strategy: str | None = None,
    *,
    costs: ReferenceCosts = REFERENCE,
) -> tuple[list[onnx.ModelProto], ShardLayout]:
    """Split a stage model (static shapes) into one standalone model per shard that reads
    the stage inputs whole and needs no exchange: what a fan-out of the whole stage input
    followed by one gather can serve. `strategy` is "tile", "width", "branch" or None.
    """
    analysis = ShardAnalysis(stage, costs)
    layout = analysis.layout(0, len(analysis.nodes), proportions, strategy, single_segment=True)
    models = [m for m in analysis.build(layout)[0] if m is not None]
    if len(models) != layout.shards:
        raise ShardingError("a shard would have nothing to do; use fewer shards")
    return models, layout


def stage_layout(
    model: onnx.ModelProto,
    inputs: Sequence[str] | None,
    outputs: Sequence[str] | None,
    proportions: Sequence[float],
    strategy: str | None = None,
    *,
    costs: ReferenceCosts = REFERENCE,
) -> tuple[ShardAnalysis, ShardLayout]:
    """The layout of the stage `inputs -> outputs` of a loaded model (None: the whole model)
    over len(proportions) shards, on the node range the planner priced: several segments
    with exchanges between them where the strategy needs them. `strategy` is the plan's
    (None or "": the cheapest on the reference costs). Shard servers cut their models
    from this layout and the operator checks a plan with it, so the two cannot differ.
    """
    analysis = ShardAnalysis(model, costs)
    if inputs is None or outputs is None:
        start, end = 0, len(analysis.nodes)
    else:
        start, end = analysis.range_of(inputs, outputs)
    return analysis, analysis.layout(start, end, proportions, strategy or None)
