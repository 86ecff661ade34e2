"""Width splits: Conv/MatMul/Gemm output channels or columns, attention heads, Megatron
pairs (Galaxy, Megatron-LM).

A forward walk over the range. A Conv/MatMul/Gemm with constant weights and whole inputs
is split by output channels/columns when its saved compute outweighs one exchange; the
split travels through ops that act per channel (elementwise, normalisation over other axes,
pooling, depthwise conv, reshapes at head granularity...). A second weight op reading a
split tensor becomes row-parallel and yields summands (Megatron's column-then-row pair).
Where a node has no rule for its inputs' split, the shards exchange those inputs first
(all-gather of a split, all-reduce of summands) and the walk goes on with whole tensors:
a transformer block becomes two segments, each ending in one all-reduce.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from partita.model.cost import is_shardable, node_cost, op_class
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
    partition,
)
from partita.model.types import GatherMode

_UNARY = frozenset(
    {
        "Relu", "LeakyRelu", "Clip", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Erf",
        "Tanh", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Elu", "Selu", "Softplus",
        "Mish", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Cast", "Identity",
        "Dropout", "Not", "IsNaN", "IsInf", "ThresholdedRelu",
    }
)  # fmt: skip
_BINARY = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal",
        "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "PRelu",
    }
)  # fmt: skip
_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"})
_RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
_LINEAR_ON_PARTIAL = frozenset({"Identity", "Dropout", "Neg", "Transpose", *_RESHAPES})
# Embedding tables at least this large are split by rows (their memory is worth an exchange).
EMBEDDING_SPLIT_BYTES = 4 << 20


@dataclass(frozen=True)
class Split:
    """Shard i holds the slice [offsets[i], offsets[i] + sizes[i]) along `axis`."""

    axis: int
    sizes: tuple[int, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        return (0, *itertools.accumulate(self.sizes[:-1]))

    def piece(self, shard: int) -> Piece:
        off = self.offsets[shard]
        return Piece(self.axis, off, off + self.sizes[shard])


class _Partial:
    """Shard i holds a summand; the stage output is the sum over shards."""

    def __repr__(self) -> str:
        return "PARTIAL"


PARTIAL = _Partial()
State = Split | _Partial | None  # None: the whole tensor, same in every shard


@dataclass
class _Rewrite:
    """How one node changes in shard i (all fields describe every shard at once)."""

    slice_inputs: dict[int, Split] = field(default_factory=dict)  # input index -> slice
    drop_inputs_off_zero: tuple[int, ...] = ()  # bias read by shard 0 only
    identity_off_zero: int | None = None  # shards != 0 pass this (summand) input through
    local_group: bool = False  # depthwise conv: group = local channels
    reshape: Split | None = None  # Reshape: local target shape along this split
    vocab: Split | None = None  # embedding lookup: rows of the table each shard holds


class _NeedGranularity(Exception):
    def __init__(self, granularity: int) -> None:
        self.granularity = granularity


class _Refuse(Exception):
    """A node has no rule for how its inputs are split (the walk exchanges them first)."""

    def __init__(self, node: onnx.NodeProto, reason: str) -> None:
        super().__init__(f"{node.op_type} node {node.name or node.output[0]!r}: {reason}")


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Walk:
    """Propagates split states forward through nodes [start, end)."""

    def __init__(
        self,
        view: GraphView,
        proportions: Sequence[float],
        costs: ReferenceCosts,
        anchor_from: int,
        single_segment: bool = False,
    ) -> None:
        self.view = view
        self.proportions = tuple(proportions)
        self.costs = costs
        self.anchor_from = anchor_from
        self.single_segment = single_segment
        self.granularity = 1
        self.states: dict[str, State] = {}

    def state(self, name: str) -> State:
        return self.states.get(name)

    def _shape(self, name: str) -> tuple[int, ...] | None:
        try:
            return self.view.shape(name)
        except Exception:
            return None

    def _split(self, node: onnx.NodeProto, axis: int, total: int) -> Split:
        try:
            return Split(axis, partition(total, self.proportions, self.granularity))
        except ValueError as exc:
            raise _Refuse(node, f"its {total} output channels are too few: {exc}") from exc

    def worth_splitting(self, node: onnx.NodeProto) -> bool:
        """Splitting saves more compute than the exchange it will cost (with one segment
        there is no exchange to pay for)."""
        if self.single_segment:
            return True
        flops = node_cost(node, self._shape)[0]
        saved = flops * (1 - max(self.proportions) / sum(self.proportions))
        return saved / self.costs.speed(op_class(node.op_type).value) > self.costs.exchange_s

    def anchor(self, i: int, node: onnx.NodeProto) -> tuple[State, _Rewrite | None]:
        if i >= self.anchor_from and self._is_embedding(node):
            # Megatron's vocabulary-parallel embedding: each shard holds a share of the
            # table's rows and looks up only the ids it holds (zeros elsewhere); the sum
            # over shards is the lookup. It saves memory, not time.
            rows = self.view.shape(node.input[0])[0]
            try:
                sizes = partition(rows, self.proportions)
            except ValueError:
                return None, None
            return PARTIAL, _Rewrite(vocab=Split(0, sizes))
        if (
            i < self.anchor_from
            or not is_shardable(node, self.view.is_constant)
            or not self.worth_splitting(node)
        ):
            return None, None
        try:
            return self._anchor(node)
        except _Refuse:
            return None, None  # too few channels to split: run it whole

    def _is_embedding(self, node: onnx.NodeProto) -> bool:
        if node.op_type != "Gather" or not self.view.is_constant(node.input[0]):
            return False
        if self.view.is_constant(node.input[1]) or int(_attr(node, "axis", 0)) != 0:  # type: ignore[call-overload]
            return False
        table = self.view.shape(node.input[0])
        return len(table) == 2 and self.view.nbytes(node.input[0]) >= EMBEDDING_SPLIT_BYTES

    def _anchor(self, node: onnx.NodeProto) -> tuple[State, _Rewrite | None]:
        w = self.view.shape(node.input[1])
        out_rank = len(self.view.shape(node.output[0]))
        if node.op_type == "Conv":
            split = self._split(node, 1, w[0])
            rw = _Rewrite(slice_inputs={1: Split(0, split.sizes)})
            if len(node.input) > 2 and node.input[2]:
                rw.slice_inputs[2] = Split(0, split.sizes)
            return split, rw
        if node.op_type == "MatMul":
            if len(w) != 2:
                return None, None
            split = self._split(node, out_rank - 1, w[1])
            return split, _Rewrite(slice_inputs={1: Split(1, split.sizes)})
        # Gemm
        trans_b = int(_attr(node, "transB", 0))  # type: ignore[call-overload]
        n = w[0] if trans_b else w[1]
        split = self._split(node, 1, n)
        rw = _Rewrite(slice_inputs={1: Split(0 if trans_b else 1, split.sizes)})
        if len(node.input) > 2 and node.input[2]:
            c = self.view.shape(node.input[2])
            if c and c[-1] == n:
                rw.slice_inputs[2] = Split(len(c) - 1, split.sizes)
        return split, rw

    # -- propagation -------------------------------------------------------------

    def _aligned(self, name: str, out_rank: int, split: Split) -> Split | None:
        """The slice a whole (broadcast) input needs to meet `split`, or None."""
        shape = self.view.shape(name)
        axis = split.axis - (out_rank - len(shape))
        if axis < 0 or shape[axis] == 1:
            return None
        return Split(axis, split.sizes)

    def _propagate(self, node: onnx.NodeProto) -> tuple[State, _Rewrite | None]:
        op = node.op_type
        ins = list(node.input)
        states = [self.state(n) if n else None for n in ins]
        partial = [s is PARTIAL for s in states]
        splits = [s for s in states if isinstance(s, Split)]
        if any(partial):
            if splits:
                raise _Refuse(node, "mixes a split tensor with partial sums")
            return self._on_partial(node, states)
        out_shape = self.view.shape(node.output[0])
        rank = len(out_shape)
        if op in _UNARY or op in _BINARY:
            return self._elementwise(node, states, rank)
        first = states[0]
        if not isinstance(first, Split):
            if op == "MatMul":
                return self._matmul(node, states)
            raise _Refuse(node, "only its first input may be split")
        if any(isinstance(s, Split) for s in states[1:]) and op not in ("MatMul", "Concat"):
            raise _Refuse(node, "more than one split input")
        ax = first.axis
        if op in ("BatchNormalization", "InstanceNormalization"):
            if ax != 1:
                raise _Refuse(node, "normalises over the split axis")
            rw = _Rewrite(slice_inputs={j: Split(0, first.sizes) for j in range(1, len(ins))})
            return first, rw
        if op in ("LayerNormalization", "Softmax", "LogSoftmax"):
            old_softmax = op != "LayerNormalization" and self._opset() < 13
            # Before opset 13 Softmax flattens from `axis` (default 1) and normalises it all.
            axis = int(_attr(node, "axis", 1 if old_softmax else -1))  # type: ignore[call-overload]
            axis = axis + rank if axis < 0 else axis
            reduced = range(axis, rank) if op == "LayerNormalization" else (axis,)
            if ax in reduced or (old_softmax and ax >= axis):
                raise _Refuse(node, f"reduces over the split axis {ax}")
            return first, None
        if op in _POOLS:
            if ax > 1:
                raise _Refuse(node, "pools over the split axis")
            return first, None
        if op == "LRN":
            if ax != 0:
                raise _Refuse(node, "LRN mixes channels")
            return first, None
        if op == "Conv":
            return self._conv(node, first)
        if op == "MatMul":
            return self._matmul(node, states)
        if op == "Gemm":
            if ax == 0 and not int(_attr(node, "transA", 0)):  # type: ignore[call-overload]
                return first, None
            if ax == 1 and not int(_attr(node, "transA", 0)) and self.view.is_constant(ins[1]):  # type: ignore[call-overload]
                trans_b = int(_attr(node, "transB", 0))  # type: ignore[call-overload]
                rw = _Rewrite(slice_inputs={1: Split(1 if trans_b else 0, first.sizes)})
                rw.drop_inputs_off_zero = (2,) if len(ins) > 2 and ins[2] else ()
                return PARTIAL, rw
            raise _Refuse(node, "Gemm on a split input needs a constant weight")
        if op == "Transpose":
            perm = list(_attr(node, "perm", list(range(rank))[::-1]))  # type: ignore[call-overload]
            return Split(perm.index(ax), first.sizes), None
        if op in _RESHAPES:
            return self._reshape(node, first)
        if op == "Concat":
            axis = int(_attr(node, "axis", 0))  # type: ignore[call-overload]
            axis = axis + rank if axis < 0 else axis
            if axis == ax:
                raise _Refuse(node, "concatenates along the split axis")
            rw = _Rewrite()
            for j, (name, s) in enumerate(zip(ins, states, strict=True)):
                if isinstance(s, Split):
                    if s != first:
                        raise _Refuse(node, "concatenates tensors split differently")
                elif (a := self._aligned(name, rank, first)) is not None:
                    rw.slice_inputs[j] = a
            return first, rw
        if op == "Pad":
            pads = self._const(ins[1]) if len(ins) > 1 else _attr(node, "pads")
            if pads is None:
                raise _Refuse(node, "pads are not constant")
            pads = [int(x) for x in np.asarray(pads).reshape(-1)]
            axes = self._const(ins[3]) if len(ins) > 3 and ins[3] else None
            axes_l = [int(a) % rank for a in axes] if axes is not None else list(range(rank))
            half = len(pads) // 2
            if ax in axes_l and (pads[axes_l.index(ax)] or pads[half + axes_l.index(ax)]):
                raise _Refuse(node, "pads the split axis")
            return first, None
        if op == "Resize":
            in_shape = self.view.shape(ins[0])
            if out_shape[ax] != in_shape[ax] or (len(ins) > 3 and ins[3]):
                raise _Refuse(node, "resizes the split axis or uses explicit sizes")
            return first, None
        if op == "Slice":
            slice_axes: object = (
                self._const(ins[3]) if len(ins) > 3 and ins[3] else _attr(node, "axes")
            )
            in_rank = len(self.view.shape(ins[0]))
            axes_l = (
                [int(a) % in_rank for a in np.asarray(slice_axes).reshape(-1)]
                if slice_axes is not None
                else list(range(in_rank))
            )
            if ax in axes_l:
                in_shape = self.view.shape(ins[0])
                if out_shape[ax] != in_shape[ax]:
                    raise _Refuse(node, "slices along the split axis")
            return first, None
        if op.startswith("Reduce") or op in ("ArgMax", "ArgMin"):
            in_shape = self.view.shape(ins[0])
            if out_shape[min(ax, len(out_shape) - 1)] != in_shape[ax] or len(out_shape) != len(
                in_shape
            ):
                raise _Refuse(node, "reduces over the split axis or drops axes")
            return first, None
        raise _Refuse(node, f"{op} has no sharding rule for a tensor split along axis {ax}")

    def _const(self, name: str) -> np.ndarray | None:
        init = self.view.initializers.get(name)
        return numpy_helper.to_array(init) if init is not None else None

    def _opset(self) -> int:
        return next(
            (o.version for o in self.view.model.opset_import if o.domain in ("", "ai.onnx")), 1
        )

    def _elementwise(
        self, node: onnx.NodeProto, states: list[State], rank: int
    ) -> tuple[State, _Rewrite | None]:
        split: Split | None = None
        for name, s in zip(node.input, states, strict=True):
            if isinstance(s, Split):
                shift = rank - len(self.view.shape(name))
                here = Split(s.axis + shift, s.sizes)
                if split is not None and here != split:
                    raise _Refuse(node, "its inputs are split along different axes")
                split = here
        assert split is not None
        rw = _Rewrite()
        for j, (name, s) in enumerate(zip(node.input, states, strict=True)):
            if name and s is None and (a := self._aligned(name, rank, split)) is not None:
                rw.slice_inputs[j] = a
        return split, rw

    def _on_partial(
        self, node: onnx.NodeProto, states: list[State]
    ) -> tuple[State, _Rewrite | None]:
        op = node.op_type
        which = [s is PARTIAL for s in states]
        out_shape = self.view.shape(node.output[0])
        if op in _LINEAR_ON_PARTIAL and which[0] and (op == "Reshape" or not any(which[1:])):
            return PARTIAL, None
        if op in ("Add", "Sub", "Sum"):
            if all(which):
                return PARTIAL, None
            if which[0] and self.view.shape(node.input[0]) == out_shape and len(which) == 2:
                return PARTIAL, _Rewrite(identity_off_zero=0)
            if op == "Add" and which[1] and self.view.shape(node.input[1]) == out_shape:
                return PARTIAL, _Rewrite(identity_off_zero=1)
            raise _Refuse(node, "adds a whole tensor that broadcasts a partial sum")
        if op == "Mul" and sum(which) == 1:
            return PARTIAL, None
        if op == "Div" and which == [True, False]:
            return PARTIAL, None
        if op == "MatMul" and which[0] and not which[1]:
            return PARTIAL, None
        raise _Refuse(node, f"{op} is not linear: it needs the sum of the shards first")

    def _conv(self, node: onnx.NodeProto, first: Split) -> tuple[State, _Rewrite | None]:
        if first.axis != 1 or not self.view.is_constant(node.input[1]):
            raise _Refuse(node, "Conv input split on a non-channel axis or non-constant weight")
        w = self.view.shape(node.input[1])
        group = int(_attr(node, "group", 1))  # type: ignore[call-overload]
        c_in = sum(first.sizes)
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if group == c_in == w[0] and w[1] == 1:  # depthwise: channels stay independent
            rw = _Rewrite(slice_inputs={1: Split(0, first.sizes)}, local_group=True)
            if has_bias:
                rw.slice_inputs[2] = Split(0, first.sizes)
            return first, rw
        if group == 1:
            rw = _Rewrite(slice_inputs={1: Split(1, first.sizes)})
            rw.drop_inputs_off_zero = (2,) if has_bias else ()
            return PARTIAL, rw
        raise _Refuse(node, f"grouped Conv (group={group}) on a channel-split input")

    def _matmul(self, node: onnx.NodeProto, states: list[State]) -> tuple[State, _Rewrite | None]:
        a_name, b_name = node.input[0], node.input[1]
        a_s, b_s = states[0], states[1]
        ra, rb = len(self.view.shape(a_name)), len(self.view.shape(b_name))
        out_rank = len(self.view.shape(node.output[0]))
        # Contraction axis split on both sides (or one side with the other sliced): partial sums.
        if isinstance(a_s, Split) and a_s.axis == ra - 1:
            if isinstance(b_s, Split) and (b_s.axis != rb - 2 or b_s.sizes != a_s.sizes):
                raise _Refuse(node, "inputs split inconsistently")
            rw = _Rewrite()
            if b_s is None:
                rw.slice_inputs[1] = Split(rb - 2, a_s.sizes)
            return PARTIAL, rw
        if isinstance(b_s, Split) and b_s.axis == rb - 2 and rb >= 2:
            return PARTIAL, _Rewrite(slice_inputs={0: Split(ra - 1, b_s.sizes)})
        if isinstance(b_s, Split) and b_s.axis == rb - 1:
            if isinstance(a_s, Split):
                raise _Refuse(node, "both inputs split")
            return Split(out_rank - 1, b_s.sizes), None
        # Row or batch axis of A (and the same batch axis of B).
        if isinstance(a_s, Split):
            out = Split(a_s.axis + out_rank - ra, a_s.sizes)
            rw = _Rewrite()
            if isinstance(b_s, Split):
                if b_s.axis + out_rank - rb != out.axis or b_s.sizes != a_s.sizes:
                    raise _Refuse(node, "inputs split along different batch axes")
            elif a_s.axis < ra - 2 and (al := self._aligned(b_name, out_rank, out)) is not None:
                if al.axis >= rb - 2:
                    raise _Refuse(node, "broadcast weight is split along a matrix axis")
                rw.slice_inputs[1] = al
            return out, rw
        if isinstance(b_s, Split):
            out = Split(b_s.axis + out_rank - rb, b_s.sizes)
            rw = _Rewrite()
            if (al := self._aligned(a_name, out_rank, out)) is not None:
                rw.slice_inputs[0] = al
            return out, rw
        raise _Refuse(node, "no split input")

    def _reshape(self, node: onnx.NodeProto, first: Split) -> tuple[State, _Rewrite | None]:
        in_shape = self.view.shape(node.input[0])
        out_shape = self.view.shape(node.output[0])
        a = first.axis
        prefix = math.prod(in_shape[:a])
        inner_in = math.prod(in_shape[a + 1 :])
        acc = 1
        for b, d in enumerate(out_shape):
            if acc == prefix and d != 1:
                unit = math.prod(out_shape[b + 1 :])
                g = unit // math.gcd(unit, inner_in)
                sizes = first.sizes
                if any((s * inner_in) % unit for s in sizes):
                    raise _NeedGranularity(g)
                out = Split(b, tuple(s * inner_in // unit for s in sizes))
                return out, _Rewrite(reshape=out) if node.op_type == "Reshape" else None
            acc *= d
            if acc > prefix:
                break
        raise _Refuse(node, f"reshape {in_shape}->{out_shape} mixes the split axis {a}")


class WidthRefusal(Exception):
    """The walk met a node it could not split and may not exchange before (one segment)."""


def width_range(
    view: GraphView,
    start: int,
    end: int,
    proportions: Sequence[float],
    *,
    crossing: Callable[[int], Sequence[str]],
    costs: ReferenceCosts = REFERENCE,
    anchor_from: int | None = None,
    single_segment: bool = False,
) -> RangePlacement:
    """Split nodes [start, end) by width. With `single_segment`, nothing is exchanged:
    only nodes from `anchor_from` on are split and a node without a rule is refused."""
    k = len(proportions)
    nodes = list(view.nodes)
    walk = _Walk(
        view, proportions, costs, start if anchor_from is None else anchor_from, single_segment
    )
    last_use: dict[str, int] = {}
    for q in range(start, end):
        for name in node_inputs(nodes[q]):
            last_use[name] = q
    outputs = tuple(crossing(end))
    for name in outputs:
        last_use[name] = end
    rewrites: dict[int, _Rewrite] = {}
    produced: dict[str, State] = {}
    exchanged: dict[str, int] = {}
    checkpoint = start  # the last position where nothing was split (a restart point)
    retries = 0
    q = start
    split_live: dict[str, int] = {}  # split or summed tensors still to be read -> last use
    while q < end:
        for name in [n for n, last in split_live.items() if last < q]:
            del split_live[name]
        if not split_live and q > checkpoint:
            checkpoint = q
            walk.granularity = 1
        node = nodes[q]
        try:
            out, rw = _place(walk, q, node)
        except _NeedGranularity as more:
            retries += 1
            if retries > 8:
                raise WidthRefusal(
                    f"{node.op_type} node {node.name or node.output[0]!r}: no split granularity "
                    "fits its reshape"
                ) from None
            g = walk.granularity
            walk.granularity = g * more.granularity // math.gcd(g, more.granularity)
            # Walk again from the restart point: forget what was decided after it.
            q = checkpoint
            rewrites = {i: r for i, r in rewrites.items() if i < q}
            produced = {n: st for n, st in produced.items() if view.producer[n] < q}
            exchanged = {n: at for n, at in exchanged.items() if at < q}
            walk.states = {n: None if n in exchanged else st for n, st in produced.items()}
            split_live = {n: last_use.get(n, -1) for n, st in walk.states.items() if st is not None}
            continue
        except _Refuse as refusal:
            if single_segment:
                raise WidthRefusal(str(refusal)) from None
            for name in node_inputs(node):
                if walk.state(name) is not None:
                    exchanged.setdefault(name, q)
                    walk.states[name] = None
                    split_live.pop(name, None)
            out, rw = _place(walk, q, node)
        if rw is not None:
            rewrites[q] = rw
        for o in node.output:
            if o:
                walk.states[o] = out
                produced[o] = out
                if out is not None:
                    split_live[o] = last_use.get(o, -1)
        q += 1

    # Which shards run each whole node: those that need one of its outputs.
    need: dict[str, set[int]] = {}
    after: dict[str, set[int]] = {}
    everyone = set(range(k))
    for name in outputs:
        if produced.get(name) is None:
            (after if name in exchanged else need).setdefault(name, set()).add(0)
    runs: dict[int, set[int]] = {}
    for q in range(end - 1, start - 1, -1):
        node = nodes[q]
        outs = [o for o in node.output if o]
        if any(produced.get(o) is not None for o in outs):
            who = set(everyone)
        else:
            who = set().union(*(need.get(o, set()) for o in outs)) if outs else set()
        runs[q] = who
        for name in node_inputs(node):
            if view.is_constant(name):
                continue
            if name in exchanged and exchanged[name] <= q:
                after.setdefault(name, set()).update(who)
            elif produced.get(name) is None:
                need.setdefault(name, set()).update(who)

    partial = any(st is PARTIAL for st in produced.values())
    conv = any(nodes[q].op_type == "Conv" and q in rewrites for q in rewrites)
    placement = RangePlacement(
        start=start,
        end=end,
        proportions=tuple(proportions),
        strategy="megatron" if partial else ("conv-channel" if conv else "column"),
        nodes={},
        tensors={},
        inputs=tuple(n for n in crossing(start) if n in need),
        outputs=outputs,
    )
    for name in placement.inputs:
        placement.tensors[name] = TensorShards(
            held=[WHOLE if j in need[name] else None for j in range(k)]
        )
    for name, st in produced.items():
        if isinstance(st, Split):
            ts = TensorShards(
                held=[st.piece(j) for j in range(k)],
                mode=GatherMode.CONCAT,
                axis=st.axis,
                owned=bounds(st.sizes),
            )
        elif st is PARTIAL:
            ts = TensorShards(held=[SUMMAND] * k, mode=GatherMode.SUM)
        else:
            who = need.get(name, set())
            ts = TensorShards(held=[WHOLE if j in who else None for j in range(k)])
        if name in exchanged:
            ts.exchange_at = exchanged[name]
            ts.after = [WHOLE if j in after.get(name, set()) else None for j in range(k)]
        placement.tensors[name] = ts
    for q in range(start, end):
        rw = rewrites.get(q)
        per: list[NodeShard | None] = []
        for j in range(k):
            if j not in runs[q]:
                per.append(None)
                continue
            per.append(_node_shard(view, nodes[q], rw, j))
        placement.nodes[q] = per
    return placement


def _place(walk: _Walk, q: int, node: onnx.NodeProto) -> tuple[State, _Rewrite | None]:
    names = node_inputs(node)
    if all(walk.state(n) is None for n in names):
        return walk.anchor(q, node)
    if any(True for _ in subgraphs(node)):
        raise _Refuse(node, "control flow cannot run on a split tensor")
    return walk._propagate(node)


def _node_shard(view: GraphView, node: onnx.NodeProto, rw: _Rewrite | None, j: int) -> NodeShard:
    shard = NodeShard()
    if rw is None:
        return shard
    if rw.vocab is not None:
        piece = rw.vocab.piece(j)
        shard.vocab = (piece.start, piece.stop)
        return shard
    if rw.identity_off_zero is not None and j != 0:
        shard.identity_of = rw.identity_off_zero
        return shard
    for slot, split in rw.slice_inputs.items():
        shard.reads[slot] = split.piece(j)
    if j != 0 and rw.drop_inputs_off_zero:
        if node.op_type == "Gemm":
            shard.attrs["beta"] = 0.0  # C is not optional before opset 11: scale it out
        else:
            shard.drop = tuple(rw.drop_inputs_off_zero)
    if rw.local_group:
        out = rw.slice_inputs[1]
        shard.attrs["group"] = out.sizes[j]
    if rw.reshape is not None:
        shape = list(view.shape(node.output[0]))
        shape[rw.reshape.axis] = rw.reshape.sizes[j]
        shard.consts[1] = np.asarray(shape, dtype=np.int64)
    return shard
