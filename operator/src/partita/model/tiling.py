"""Row tiles: every shard runs the range on its rows of the data (DeepThings' fused tiles).

The rows are those of one axis of the activations: an image's height (or width) in a
convolution stack, the tokens of a sequence in a transformer. Each shard owns a share of
the rows of every tiled tensor (its proportion) and computes, for the nodes of a fused
stretch, the rows its owned output needs plus the overlap (halo) its windows need. Regions
are found backward from the range's end, so the halo is exact.

The shards exchange a tensor when computing it whole would cost more than swapping it:
* a reduction over the tiled axis (global pooling, a mean over tokens) runs on each shard's
  own rows and the partial results are summed (or maxed) before the first use;
* a heavy node's output needed whole by a later node (the keys and values of attention, a
  node with no row rule) is all-gathered instead of every shard computing it whole;
* where the halo of a fused stretch has grown past `HALO_LIMIT` of the owned rows, the
  tensors crossing that point are exchanged so each shard receives only the rows of its
  neighbours it needs (halo exchange), and the stretch before it starts afresh.
`halo_points` found on the whole model are kept for every range of it, so a range's layout
is the whole model's restricted to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from partita.model.cost import node_cost, op_class
from partita.model.graph import GraphView, node_inputs, subgraphs
from partita.model.placement import (
    REFERENCE,
    SUMMAND,
    WHOLE,
    NodeShard,
    Piece,
    RangePlacement,
    ReferenceCosts,
    TensorShards,
    bounds,
    hull,
    partition,
    rows,
)
from partita.model.types import GatherMode

# A fused stretch ends where a tensor crossing it is needed by some shard over more than
# (1 + HALO_LIMIT) times the rows it owns.
HALO_LIMIT = 0.5

_WINDOWS = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})
_ELEMENTWISE = frozenset(
    {
        "Relu", "LeakyRelu", "Clip", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Erf",
        "Tanh", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Elu", "Selu", "Softplus",
        "Mish", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Cast", "Identity", "Dropout",
        "Not", "IsNaN", "IsInf", "ThresholdedRelu", "PRelu", "Add", "Sub", "Mul", "Div", "Pow",
        "Max", "Min", "Sum", "Mean", "Where", "Equal", "Greater", "Less", "GreaterOrEqual",
        "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "QuantizeLinear",
        "DequantizeLinear",
    }
)  # fmt: skip
_PER_CHANNEL = frozenset({"BatchNormalization", "LRN"})  # row-local, channel-mixing on axis 1
_RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
_REDUCE_MODE = {
    "ReduceMean": GatherMode.SUM,
    "ReduceSum": GatherMode.SUM,
    "ReduceMax": GatherMode.MAX,
    "GlobalAveragePool": GatherMode.SUM,
    "GlobalMaxPool": GatherMode.MAX,
    "AveragePool": GatherMode.SUM,
    "MaxPool": GatherMode.MAX,
}
_MEANS = frozenset({"ReduceMean", "GlobalAveragePool", "AveragePool"})


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _int(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    value = _attr(node, name, default)
    return int(value) if isinstance(value, (int, float, np.integer)) else default


def _ints(value: object) -> list[int]:
    return [int(x) for x in np.asarray(value).reshape(-1)] if value is not None else []


def _opset(view: GraphView) -> int:
    return next((o.version for o in view.model.opset_import if o.domain in ("", "ai.onnx")), 1)


@dataclass(frozen=True)
class _Window:
    """A sliding window along one spatial axis: kernel, stride, dilation and pads."""

    dim: int  # spatial dim index (axis = 2 + dim)
    kernel: int
    stride: int
    dilation: int
    pad_begin: int
    pad_end: int
    pads: tuple[int, ...]  # resolved explicit pads of every spatial dim


def _window(
    shape: Callable[[str], tuple[int, ...]], node: onnx.NodeProto, dim: int
) -> _Window | None:
    x_shape = shape(node.input[0])
    y_shape = shape(node.output[0])
    nd = len(x_shape) - 2
    if dim >= nd:
        return None
    if node.op_type == "Conv":
        kernel = list(shape(node.input[1])[2:])
    else:
        kernel = _ints(_attr(node, "kernel_shape"))
    if len(kernel) != nd:
        return None
    strides = _ints(_attr(node, "strides")) or [1] * nd
    dilations = _ints(_attr(node, "dilations")) or [1] * nd
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for d in range(nd):
            total = max(
                0,
                (y_shape[2 + d] - 1) * strides[d]
                + (kernel[d] - 1) * dilations[d]
                + 1
                - x_shape[2 + d],
            )
            small, big = total // 2, total - total // 2
            pads[d], pads[nd + d] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    else:
        pads = _ints(_attr(node, "pads")) or [0] * (2 * nd)
    if (
        node.op_type == "AveragePool"
        and _int(node, "ceil_mode", 0)
        and _int(node, "count_include_pad", 0)
    ):
        return None  # ceil-mode overhang would be counted as padding on a tile
    return _Window(dim, kernel[dim], strides[dim], dilations[dim], pads[dim], pads[nd + dim],
                   tuple(pads))  # fmt: skip


def _reduced_axes(view: GraphView, node: onnx.NodeProto) -> list[int] | None:
    rank = len(view.values[node.input[0]].type.tensor_type.shape.dim)
    if node.op_type.startswith("Global"):
        return list(range(2, rank))
    axes: object = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        init = view.initializers.get(node.input[1])
        if init is None:
            return None
        axes = numpy_helper.to_array(init)
    if axes is None or len(_ints(axes)) == 0:
        if _int(node, "noop_with_empty_axes", 0):
            return []
        return list(range(rank))
    return sorted(a % rank for a in _ints(axes))


def _keepdims(node: onnx.NodeProto) -> bool:
    return node.op_type.startswith("Global") or bool(_int(node, "keepdims", 1))


@dataclass(frozen=True)
class RowMap:
    """How rows of one output axis map onto each input slot of a node."""

    slots: tuple[tuple[int, int | None] | None, ...]  # per slot: (input axis or None=whole)
    node: NodeShard | None = None  # fixed rewrite (none needed for most ops)


class TileAnalysis:
    """Per model, shard count and tiled spatial dim: along which axis each tensor is tiled
    when the range reaches it from an anchor, and which nodes reduce over the tiles."""

    def __init__(
        self,
        view: GraphView,
        shards: int,
        dim: int = 0,
        costs: ReferenceCosts = REFERENCE,
        shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        self.view = view
        self.k = shards
        self.dim = dim
        self.costs = costs
        self.opset = _opset(view)
        self.axis: dict[str, int] = {}
        self.reduce: dict[int, tuple[int, GatherMode]] = {}  # node -> (input axis, mode)
        self.heavy: dict[int, bool] = {}
        self._shape_cache = {} if shapes is None else shapes
        self._windows: dict[tuple[str, int], _Window | None] = {}
        self._maps: dict[tuple[str, int], RowMap | None] = {}
        # Names a node's subgraphs read from outside (control flow runs whole).
        self.captures: dict[int, list[str]] = {}
        for q, node in enumerate(view.nodes):
            if any(True for _ in subgraphs(node)):
                self.captures[q] = sorted(set(node_inputs(node)) - set(node.input))
        for q, node in enumerate(view.nodes):
            self._forward(q, node)

    # -- shapes ------------------------------------------------------------------------

    def shape(self, name: str) -> tuple[int, ...]:
        s = self._shape_cache.get(name)
        if s is None:
            s = self._shape_cache[name] = self.view.shape(name)
        return s

    def window(self, node: onnx.NodeProto, dim: int) -> _Window | None:
        key = (node.output[0], dim)
        if key not in self._windows:
            self._windows[key] = _window(self.shape, node, dim)
        return self._windows[key]

    def _size_ok(self, name: str, axis: int) -> bool:
        s = self.shape(name)
        return 0 <= axis < len(s) and s[axis] >= self.k

    # -- forward: tiled axes -------------------------------------------------------------

    def _forward(self, q: int, node: onnx.NodeProto) -> None:
        outs = [o for o in node.output if o]
        if not outs or q in self.captures:
            return
        op = node.op_type
        first = node.input[0] if node.input else ""
        in_axis = self.axis.get(first)
        if op in _REDUCE_MODE and in_axis is not None:
            reduced = self._reduction_axes(node)
            if reduced is not None and in_axis in reduced:
                self.reduce[q] = (in_axis, _REDUCE_MODE[op])
                return
        out = outs[0]
        if op in _WINDOWS and len(self.shape(first)) >= 3:
            axis = 2 + self.dim
            if self._size_ok(out, axis) and self.window(node, self.dim) is not None:
                self._set(q, node, axis)
            return
        if op == "Gather" and self.view.is_constant(node.input[0]) and in_axis is None:
            idx = node.input[1]
            if idx in self.axis:
                pass  # mapped below
            elif not self.view.is_constant(idx):
                shape = self.shape(idx)
                big = [a for a, d in enumerate(shape) if d >= self.k]
                if big:
                    g = _int(node, "axis", 0) % len(self.shape(first))
                    self._set(q, node, g + max(big, key=lambda a: (shape[a], a)))
                    return
        tiled = [(n, self.axis[n]) for n in node.input if n and n in self.axis]
        if not tiled:
            return
        tiled.sort(key=lambda t: -math.prod(self.shape(t[0])))
        name, axis_in = tiled[0]
        for x in range(len(self.shape(out))):
            m = self.map_rows(node, x)
            if m is None:
                continue
            slot = list(node.input).index(name)
            if m.slots[slot] is not None and m.slots[slot][1] == axis_in:  # type: ignore[index]
                if self._size_ok(out, x):
                    self._set(q, node, x)
                return

    def _set(self, q: int, node: onnx.NodeProto, axis: int) -> None:
        for o in node.output:
            if o and self._size_ok(o, axis):
                self.axis[o] = axis
        flops = node_cost(node, lambda n: self.shape(n) if n else None)[0]
        share = 1.0 - 1.0 / self.k
        out = node.output[0]
        nbytes = math.prod(self.shape(out)) * self.view.dtype(out).itemsize * share
        compute = flops * share / self.costs.speed(op_class(node.op_type).value)
        self.heavy[q] = compute > self.costs.transfer_s(nbytes)

    def _reduction_axes(self, node: onnx.NodeProto) -> list[int] | None:
        op = node.op_type
        if op in ("AveragePool", "MaxPool"):
            # A pool whose window is the whole axis is a reduction over it.
            x_shape, y_shape = self.shape(node.input[0]), self.shape(node.output[0])
            kernel = _ints(_attr(node, "kernel_shape"))
            pads = _ints(_attr(node, "pads")) or [0] * (2 * len(kernel))
            found = []
            for d, k in enumerate(kernel):
                if y_shape[2 + d] == 1 and k == x_shape[2 + d] and not any(pads):
                    found.append(2 + d)
            return found
        return _reduced_axes(self.view, node)

    # -- backward: which rows of each input a node's output rows need --------------------

    def map_rows(self, node: onnx.NodeProto, x: int) -> RowMap | None:
        """Rows of output axis `x` read rows of these input axes (None: the whole input).
        None when the node cannot run on rows of that axis."""
        key = (node.output[0], x)
        if key not in self._maps:
            self._maps[key] = self._map_rows(node, x)
        return self._maps[key]

    def _map_rows(self, node: onnx.NodeProto, x: int) -> RowMap | None:
        op = node.op_type
        view = self.view
        ins = list(node.input)
        out_shape = self.shape(node.output[0])
        r = len(out_shape)
        if not 0 <= x < r:
            return None

        def aligned(name: str) -> tuple[int, int | None] | None:
            if not name:
                return None
            shape = self.shape(name)
            a = x - (r - len(shape))
            if a >= 0 and shape[a] == out_shape[x]:
                return (0, a)
            if a < 0 or shape[a] == 1:
                return (0, None)
            return (-1, None)  # inconsistent broadcast

        def same(slots: Iterable[int]) -> RowMap | None:
            out: list[tuple[int, int | None] | None] = [None] * len(ins)
            for j in slots:
                if j >= len(ins) or not ins[j]:
                    continue
                m = aligned(ins[j])
                if m is not None and m[0] < 0:
                    return None
                out[j] = m
            return RowMap(tuple(out))

        if op in _ELEMENTWISE:
            return same(range(len(ins)))
        if op in _PER_CHANNEL:
            return same([0]) if x != 1 else None
        if op in ("Softmax", "LogSoftmax", "LayerNormalization"):
            default = 1 if op != "LayerNormalization" and self.opset < 13 else -1
            axis = _int(node, "axis", default) % r
            old = op != "LayerNormalization" and self.opset < 13
            if x == axis or ((old or op == "LayerNormalization") and x >= axis):
                return None
            return same([0])
        if op == "Transpose":
            perm = _ints(_attr(node, "perm")) or list(range(r))[::-1]
            return RowMap(((0, perm[x]),) + (None,) * (len(ins) - 1))
        if op in _RESHAPES:
            in_shape = self.shape(ins[0])
            before = math.prod(out_shape[:x])
            for a, d in enumerate(in_shape):
                if math.prod(in_shape[:a]) == before and d == out_shape[x]:
                    return RowMap(((0, a),) + (None,) * (len(ins) - 1))
            return None
        if op in ("Concat", "Split"):
            axis = _int(node, "axis", 0) % r
            if x == axis:
                return None
            return same(range(len(ins)) if op == "Concat" else [0])
        if op == "Slice":
            in_shape = self.shape(ins[0])
            if len(in_shape) != r or in_shape[x] != out_shape[x]:
                return None
            steps = view.initializers.get(ins[4]) if len(ins) > 4 and ins[4] else None
            axes_init = view.initializers.get(ins[3]) if len(ins) > 3 and ins[3] else None
            if steps is not None:
                axes = (
                    _ints(numpy_helper.to_array(axes_init))
                    if axes_init is not None
                    else list(range(len(_ints(numpy_helper.to_array(steps)))))
                )
                for a, s in zip(axes, _ints(numpy_helper.to_array(steps)), strict=False):
                    if a % r == x and s != 1:
                        return None
            return RowMap(((0, x),) + (None,) * (len(ins) - 1))
        if op == "Pad":
            return self._pad_map(node, x)
        if op.startswith("Reduce") or op in ("ArgMax", "ArgMin"):
            reduced = _reduced_axes(view, node)
            if reduced is None:
                return None
            in_rank = len(self.shape(ins[0]))
            kept = (
                list(range(in_rank))
                if _keepdims(node)
                else [a for a in range(in_rank) if a not in reduced]
            )
            if op in ("ArgMax", "ArgMin"):
                axis = _int(node, "axis", 0) % in_rank
                reduced = [axis]
                kept = (
                    list(range(in_rank))
                    if _keepdims(node)
                    else [a for a in range(in_rank) if a != axis]
                )
            a = kept[x]
            if a in reduced:
                return None
            return RowMap(((0, a),) + (None,) * (len(ins) - 1))
        if op in _WINDOWS or op in ("GlobalAveragePool", "GlobalMaxPool"):
            if op.startswith("Global"):
                return same([0]) if x < 2 and x != 1 else None
            if x < 2:
                return None
            w = self.window(node, x - 2)
            if w is None:
                return None
            return RowMap(((0, x),) + (None,) * (len(ins) - 1))
        if op in ("Resize", "ConvTranspose"):
            if x < 2 or self._upsampling(node, x) is None:
                return None
            return RowMap(((0, x),) + (None,) * (len(ins) - 1))
        if op == "MatMul":
            ra, rb = len(self.shape(ins[0])), len(self.shape(ins[1]))
            if ra < 2 or rb < 2:
                return None
            if x == r - 1:
                return RowMap((None, (0, rb - 1)))
            a_axis = x - (r - ra)
            b_axis = x - (r - rb)
            a_slot: tuple[int, int | None] = (
                (0, a_axis)
                if a_axis >= 0 and self.shape(ins[0])[a_axis] == out_shape[x]
                else (0, None)
            )
            if x == r - 2:
                return RowMap((a_slot, None))
            b_slot: tuple[int, int | None] = (
                (0, b_axis)
                if b_axis >= 0 and self.shape(ins[1])[b_axis] == out_shape[x]
                else (0, None)
            )
            return RowMap((a_slot, b_slot))
        if op == "Gemm":
            trans_a = _int(node, "transA", 0)
            trans_b = _int(node, "transB", 0)
            c: tuple[int, int | None] | None = None
            if len(ins) > 2 and ins[2]:
                c = aligned(ins[2])
                if c is not None and c[0] < 0:
                    return None
            if x == 0:
                return RowMap(((0, 1 if trans_a else 0), None, c)[: len(ins)])
            return RowMap((None, (0, 0 if trans_b else 1), c)[: len(ins)])
        if op == "Gather":
            g = _int(node, "axis", 0) % len(self.shape(ins[0]))
            ri = len(self.shape(ins[1]))
            if g <= x < g + ri:
                return RowMap((None, (0, x - g)))
            return RowMap(((0, x if x < g else x - ri + 1), None))
        return None

    def _pad_map(self, node: onnx.NodeProto, x: int) -> RowMap | None:
        mode = _attr(node, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        ins = list(node.input)
        if len(ins) > 3 and ins[3]:
            return None  # explicit axes input: keep such pads whole
        pads = self._pads(node)
        if pads is None:
            return None
        r = len(pads) // 2
        if mode not in ("constant", "edge") and (pads[x] or pads[r + x]):
            return None
        return RowMap(((0, x),) + (None,) * (len(ins) - 1))

    def _pads(self, node: onnx.NodeProto) -> list[int] | None:
        if self.opset < 11:
            return _ints(_attr(node, "pads"))
        init = self.view.initializers.get(node.input[1]) if len(node.input) > 1 else None
        return _ints(numpy_helper.to_array(init)) if init is not None else None

    def input_pieces(
        self, q: int, node: onnx.NodeProto, out: Piece
    ) -> tuple[list[Piece | None], NodeShard] | None:
        """The piece of each input slot a shard computing rows `out` needs, and how it
        runs the node; None when the node cannot run on those rows."""
        assert out.axis is not None
        x, lo, hi = out.axis, out.start, out.stop
        m = self.map_rows(node, x)
        if m is None:
            return None
        op = node.op_type
        ins = list(node.input)
        pieces: list[Piece | None] = [None] * len(ins)
        shard = NodeShard()
        for j, slot in enumerate(m.slots):
            if j >= len(ins) or not ins[j]:
                continue
            constant = self.view.is_constant(ins[j])
            if slot is None:
                pieces[j] = None if constant else WHOLE
                continue
            _, axis = slot
            if axis is None:
                pieces[j] = None if constant else WHOLE
                continue
            size = self.shape(ins[j])[axis]
            piece = rows(axis, lo, hi, size)
            if constant:
                if not piece.whole:
                    shard.reads[j] = piece
            else:
                pieces[j] = piece
        if op in _WINDOWS and x >= 2:
            w = self.window(node, x - 2)
            assert w is not None
            size = self.shape(ins[0])[x]
            begin = lo * w.stride - w.pad_begin
            end = (hi - 1) * w.stride - w.pad_begin + w.dilation * (w.kernel - 1) + 1
            pieces[0] = rows(x, begin, end, size)
            pads = list(w.pads)
            nd = len(pads) // 2
            pads[w.dim] = max(0, -begin)
            pads[nd + w.dim] = max(0, end - size)
            shard.attrs["pads"] = pads
            if _attr(node, "auto_pad") is not None:
                shard.attrs["auto_pad"] = "NOTSET"
            if op != "Conv" and _int(node, "ceil_mode", 0):
                shard.attrs["ceil_mode"] = 0
        elif op == "Pad":
            given = self._pads(node)
            assert given is not None
            r = len(given) // 2
            size = self.shape(ins[0])[x]
            begin, end = lo - given[x], hi - given[x]
            pieces[0] = rows(x, begin, end, size)
            new = list(given)
            new[x], new[r + x] = max(0, -begin), max(0, end - size)
            if self.opset < 11:
                shard.attrs["pads"] = new
            else:
                shard.consts[1] = np.asarray(new, dtype=np.int64)
        elif op == "Reshape":
            shape = list(self.shape(node.output[0]))
            shape[x] = hi - lo
            shard.consts[1] = np.asarray(shape, dtype=np.int64)
        elif op in ("Resize", "ConvTranspose"):
            up = self._upsampling(node, x)
            assert up is not None
            stride, reach, pad = up
            size = self.shape(ins[0])[x]
            first = max(0, -((-(lo + pad - reach)) // stride))  # ceil
            last = min(size, (hi - 1 + pad) // stride + 1)
            pieces[0] = rows(x, first, last, size)
            # The node runs on those input rows whole (no padding on this axis); the rows
            # it computes start at first * stride - pad, and the shard keeps [lo, hi).
            computed = (last - first - 1) * stride + reach + 1
            shard.computed = Piece(x, first * stride - pad, first * stride - pad + computed)
            if op == "ConvTranspose":
                given = _ints(_attr(node, "pads")) or [0] * (2 * (len(self.shape(ins[0])) - 2))
                nd = len(given) // 2
                given[x - 2], given[nd + x - 2] = 0, 0
                shard.attrs["pads"] = given
            elif len(ins) > 3 and ins[3]:
                sizes = list(self.shape(node.output[0]))
                sizes[x] = computed
                shard.consts[3] = np.asarray(sizes, dtype=np.int64)
        return pieces, shard

    def _upsampling(self, node: onnx.NodeProto, x: int) -> tuple[int, int, int] | None:
        """(stride, reach, pad) of a Resize (nearest, asymmetric, integer scale) or a
        ConvTranspose along axis x: input row i feeds output rows
        [i * stride - pad, i * stride - pad + reach]."""
        in_size, out_size = self.shape(node.input[0])[x], self.shape(node.output[0])[x]
        if node.op_type == "Resize":
            mode = _attr(node, "mode", b"nearest")
            transform = _attr(node, "coordinate_transformation_mode", b"half_pixel")
            nearest = _attr(node, "nearest_mode", b"round_prefer_floor")
            if (mode, transform, nearest) != (b"nearest", b"asymmetric", b"floor"):
                return None
            if out_size % in_size:
                return None
            return out_size // in_size, out_size // in_size - 1, 0
        if _attr(node, "output_shape") is not None or _attr(node, "auto_pad", b"NOTSET") not in (
            b"NOTSET",
            "NOTSET",
        ):
            return None
        d = x - 2
        kernel = self.shape(node.input[1])[2 + d]
        strides = _ints(_attr(node, "strides")) or [1] * (len(self.shape(node.input[0])) - 2)
        dilations = _ints(_attr(node, "dilations")) or [1] * len(strides)
        extra = _ints(_attr(node, "output_padding")) or [0] * len(strides)
        pads = _ints(_attr(node, "pads")) or [0] * (2 * len(strides))
        if extra[d]:
            return None
        return strides[d], dilations[d] * (kernel - 1), pads[d]

    def reduce_pieces(
        self, q: int, node: onnx.NodeProto, owned: tuple[int, int]
    ) -> tuple[Piece, NodeShard]:
        """A reduction over the tiled axis run on one shard's own rows: a summand (or
        partial maximum) of the output."""
        axis, _mode = self.reduce[q]
        size = self.shape(node.input[0])[axis]
        piece = rows(axis, owned[0], owned[1], size)
        shard = NodeShard()
        if node.op_type in ("AveragePool", "MaxPool"):
            kernel = _ints(_attr(node, "kernel_shape"))
            kernel[axis - 2] = owned[1] - owned[0]
            shard.attrs["kernel_shape"] = kernel
        if node.op_type in _MEANS and owned[1] - owned[0] != size:
            shard.scale = (owned[1] - owned[0]) / size
        return piece, shard


def owned_rows(
    ana: TileAnalysis, name: str, proportions: Sequence[float]
) -> tuple[tuple[int, int], ...]:
    axis = ana.axis[name]
    return bounds(partition(ana.shape(name)[axis], proportions))


def _in_rows(pieces: Sequence[Piece | None] | None) -> bool:
    return pieces is not None and any(
        p is not None and p.axis is not None and not p.partial for p in pieces
    )


def tile_range(
    ana: TileAnalysis,
    start: int,
    end: int,
    proportions: Sequence[float],
    *,
    halo_points: Sequence[int] | None = None,
    single_segment: bool = False,
    crossing: Callable[[int], Sequence[str]],
    outputs_held: Mapping[str, Sequence[Piece | None]] | None = None,
) -> tuple[RangePlacement, tuple[int, ...]]:
    """Place nodes [start, end) on row tiles; returns the placement and the halo points
    used (found here when `halo_points` is None). `outputs_held`: what each shard must hold
    of the range's outputs beyond the rows it owns (the whole model's placement keeps the
    halo its later nodes need), so the range is that placement restricted."""
    view = ana.view
    k = len(proportions)
    nodes = list(view.nodes)
    greedy = halo_points is None and not single_segment
    fixed = set(halo_points or ())
    need: dict[str, list[Piece | None]] = {}
    xchg: dict[str, tuple[int, list[Piece | None]]] = {}
    producer = view.producer
    partial_of: dict[str, GatherMode] = {}
    if not single_segment:
        for q, (_axis, mode) in ana.reduce.items():
            if start <= q < end:
                partial_of[nodes[q].output[0]] = mode
    owned_cache: dict[str, tuple[tuple[int, int], ...]] = {}

    def owned(name: str) -> tuple[tuple[int, int], ...]:
        if name not in owned_cache:
            owned_cache[name] = owned_rows(ana, name, proportions)
        return owned_cache[name]

    def in_range(name: str) -> bool:
        p = producer.get(name)
        return p is not None and start <= p < end

    def add(name: str, shard: int, piece: Piece | None) -> None:
        slot = need.setdefault(name, [None] * k)
        slot[shard] = hull(slot[shard], piece)

    def register(name: str, point: int, extra: Sequence[Piece | None]) -> None:
        moved = need.pop(name, [None] * k)
        old = xchg.get(name)
        needs: list[Piece | None] = list(old[1]) if old else [None] * k
        for j in range(k):
            needs[j] = hull(hull(needs[j], moved[j]), extra[j])
        xchg[name] = (point if old is None else min(point, old[0]), needs)

    outputs = tuple(crossing(end))
    gathers: dict[str, GatherMode] = {}
    for name in outputs:
        if name in partial_of:
            gathers[name] = partial_of[name]
        elif name in ana.axis and (in_range(name) or _in_rows((outputs_held or {}).get(name))):
            # (a tensor passing the range by travels in rows too where the whole model's
            # placement keeps it so)
            gathers[name] = GatherMode.CONCAT
            for j, (lo, hi) in enumerate(owned(name)):
                add(name, j, rows(ana.axis[name], lo, hi, ana.shape(name)[ana.axis[name]]))
        else:
            gathers[name] = GatherMode.TAKE
            add(name, 0, WHOLE)
        held_after = (outputs_held or {}).get(name)
        if held_after is not None and name not in partial_of and name in gathers:
            for j, piece in enumerate(held_after):
                add(name, j, piece)

    placed: dict[int, list[NodeShard | None]] = {}
    held: dict[str, list[Piece | None]] = {}
    points: list[int] = []
    for q in range(end - 1, start - 1, -1):
        boundary = q + 1
        if boundary < end and (boundary in fixed or greedy):
            live = [
                n
                for n, pieces in need.items()
                if n in ana.axis
                and in_range(n)
                and producer[n] < boundary
                and n not in partial_of
                and any(p is not None for p in pieces)
            ]
            cut = boundary in fixed
            if greedy and live:
                cut = any(
                    p is not None
                    and p.axis == ana.axis[n]
                    and (p.stop - p.start) > (1 + HALO_LIMIT) * (own[1] - own[0])
                    for n in live
                    for p, own in zip(need[n], owned(n), strict=True)
                )
            if cut and live:
                points.append(boundary)
                for n in live:
                    register(n, boundary, [None] * k)
        node = nodes[q]
        outs = [o for o in node.output if o]
        # What each shard must hold of the outputs (exchanges contribute the owned rows).
        out_pieces: list[Piece | None] = [None] * k
        contributes = [False] * k
        for o in outs:
            pieces = need.pop(o, [None] * k)
            if o in partial_of:
                if o in xchg or o in gathers:
                    contributes = [True] * k
                held[o] = [SUMMAND if contributes[j] else None for j in range(k)]
                continue
            if o in xchg:
                axis, size = ana.axis[o], ana.shape(o)[ana.axis[o]]
                for j, (lo, hi) in enumerate(owned(o)):
                    pieces[j] = hull(pieces[j], rows(axis, lo, hi, size))
            held[o] = pieces
            for j in range(k):
                out_pieces[j] = hull(out_pieces[j], pieces[j])
        shards: list[NodeShard | None] = [None] * k
        reads: list[list[Piece | None]] = [[] for _ in range(k)]
        if outs and outs[0] in partial_of:
            own = owned(node.input[0])
            for j in range(k):
                if contributes[j]:
                    piece, shard = ana.reduce_pieces(q, node, own[j])
                    shards[j] = shard
                    reads[j] = [piece] + [None] * (len(node.input) - 1)
        else:
            for j in range(k):
                out = out_pieces[j]
                if out is None:
                    continue
                found = None
                if out.axis is not None and q not in ana.captures:
                    found = ana.input_pieces(q, node, out)
                if found is None:  # no row rule: this shard computes the whole output
                    out = WHOLE
                    pieces_j: list[Piece | None] = [
                        None if not n or view.is_constant(n) else WHOLE for n in node.input
                    ]
                    shards[j] = NodeShard()
                else:
                    pieces_j, shards[j] = found
                reads[j] = pieces_j
                for o in outs:
                    held[o][j] = out
        for j, placed_j in enumerate(shards):
            if placed_j is not None:
                for slot, wanted in enumerate(reads[j]):
                    if wanted is not None:
                        placed_j.reads[slot] = wanted
        placed[q] = shards
        # Needs on the inputs: exchange what is cheaper to swap than to compute whole.
        extra_x: dict[str, list[Piece | None]] = {}
        for j in range(k):
            if shards[j] is None:
                continue
            for slot, name in enumerate(node.input):
                read = reads[j][slot] if slot < len(reads[j]) else None
                if not name or view.is_constant(name) or read is None:
                    continue
                if name in partial_of or (
                    read.whole
                    and name in ana.axis
                    and in_range(name)
                    and ana.heavy.get(producer[name], False)
                    and not single_segment
                ):
                    extra_x.setdefault(name, [None] * k)[j] = WHOLE
                else:
                    add(name, j, read)
            for name in ana.captures.get(q, ()):
                if not view.is_constant(name):
                    add(name, j, WHOLE)
        for name, extra in extra_x.items():
            register(name, q, extra)

    placement = RangePlacement(
        start=start,
        end=end,
        proportions=tuple(proportions),
        strategy="tile",
        nodes=placed,
        tensors={},
        inputs=tuple(n for n in crossing(start) if n in need),
        outputs=outputs,
    )
    for name in placement.inputs:
        ts = TensorShards(held=need[name])
        if gathers.get(name) is GatherMode.CONCAT:  # passes the range by, in rows
            ts.mode, ts.axis, ts.owned = GatherMode.CONCAT, ana.axis[name], owned(name)
        placement.tensors[name] = ts
    for name, pieces in held.items():
        mode = (
            partial_of.get(name)
            or gathers.get(name)
            or (GatherMode.CONCAT if name in ana.axis else GatherMode.TAKE)
        )
        ts = TensorShards(held=pieces, mode=mode, axis=ana.axis.get(name, 0))
        if name in ana.axis and name not in partial_of:
            ts.owned = owned(name)
        if name in xchg:
            ts.exchange_at, ts.after = xchg[name][0], xchg[name][1]
        placement.tensors[name] = ts
    return placement, tuple(sorted(set(points)))
