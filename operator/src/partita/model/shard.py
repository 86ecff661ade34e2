"""Horizontal sharding: split one stage across k devices of a tier.

Two strategies, the cheaper (smallest slowest-shard FLOPs) wins when both apply:

* width: from an anchor on, every Conv/MatMul/Gemm with constant weights and a whole
  input is split by output channels/columns; the split travels through ops that act
  per channel (elementwise, normalisation over other axes, pooling, depthwise conv,
  reshapes at head granularity...). A second weight op reading a split tensor becomes
  row-parallel and yields partial sums (Megatron's column-then-row pair), so an MLP or
  an attention block needs one gather. Nodes before the anchor run in every shard.
* branch: independent branches of a multi-branch stage run on different shards.

Each shard is a standalone ONNX model producing `GatherSpec.part_name(output, i)`;
`gather` rebuilds the stage outputs with numpy. Anything the rules do not cover raises
`ShardingError` naming the node, never a silently wrong shard.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from partita.model.cost import is_shardable, node_cost
from partita.model.errors import ShardingError
from partita.model.graph import GraphView, node_inputs, subgraphs
from partita.model.types import GatherMode, GatherSpec, ShardLayout

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


@dataclass(frozen=True)
class Split:
    """Shard i holds the slice [offsets[i], offsets[i] + sizes[i]) along `axis`."""

    axis: int
    sizes: tuple[int, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.sizes)[:-1]]))


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
    identity_off_zero: bool = False  # shards != 0 pass input 0 through
    local_group: bool = False  # depthwise conv: group = local channels
    reshape: Split | None = None  # Reshape: local target shape along this split


class _NeedGranularity(Exception):
    def __init__(self, granularity: int) -> None:
        self.granularity = granularity


class _Refuse(Exception):
    def __init__(self, node: onnx.NodeProto, reason: str) -> None:
        super().__init__(f"{node.op_type} node {node.name or node.output[0]!r}: {reason}")


def allocate(total: int, proportions: Sequence[float], granularity: int = 1) -> tuple[int, ...]:
    """Split `total` units into parts proportional to `proportions` (largest remainder),
    each a positive multiple of `granularity`."""
    k = len(proportions)
    units = total // granularity
    if total % granularity or units < k:
        raise ValueError(f"{total} cannot be split in {k} parts of multiples of {granularity}")
    p = np.asarray(proportions, dtype=np.float64)
    p = p / p.sum()
    raw = p * (units - k)
    base = np.floor(raw).astype(np.int64)
    rest = int(units - k - base.sum())
    order = np.argsort(-(raw - base), kind="stable")
    base[order[:rest]] += 1
    return tuple(int((b + 1) * granularity) for b in base)


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Planner:
    """Propagates split states through a stage for one anchor choice."""

    def __init__(
        self, view: GraphView, proportions: Sequence[float], start: int, granularity: int
    ) -> None:
        self.view = view
        self.proportions = proportions
        self.start = start
        self.granularity = granularity
        self.states: dict[str, State] = {}
        self.rewrites: dict[int, _Rewrite] = {}
        self.split_flops = 0
        self.full_flops = 0

    def state(self, name: str) -> State:
        return self.states.get(name)

    def run(self) -> None:
        for i, node in enumerate(self.view.nodes):
            flops = node_cost(node, self._shape)[0]
            ins = [n for n in node_inputs(node)]
            states = [self.state(n) for n in ins]
            if all(s is None for s in states):
                out, rw = self._maybe_anchor(i, node)
            else:
                if any(True for _ in subgraphs(node)):
                    raise _Refuse(node, "control flow cannot run on a split tensor")
                out, rw = self._propagate(node)
            if out is None:
                self.full_flops += flops
            else:
                self.split_flops += flops
            if rw is not None:
                self.rewrites[i] = rw
            for o in node.output:
                if o:
                    self.states[o] = out

    def _shape(self, name: str) -> tuple[int, ...] | None:
        try:
            return self.view.shape(name)
        except Exception:
            return None

    def _split(self, node: onnx.NodeProto, axis: int, total: int) -> Split:
        try:
            return Split(axis, allocate(total, self.proportions, self.granularity))
        except ValueError as exc:
            raise _Refuse(node, f"its {total} output channels are too few: {exc}") from exc

    def _maybe_anchor(self, i: int, node: onnx.NodeProto) -> tuple[State, _Rewrite | None]:
        if i < self.start or not is_shardable(node, self.view.is_constant):
            return None, None
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
                return PARTIAL, _Rewrite(identity_off_zero=True)
            if op == "Add" and which[1] and self.view.shape(node.input[1]) == out_shape:
                return PARTIAL, _Rewrite(identity_off_zero=True)
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


@dataclass(frozen=True)
class _WidthPlan:
    planner: _Planner
    makespan: float
    strategy: str


def _plan_width(view: GraphView, proportions: Sequence[float]) -> _WidthPlan:
    anchors = [i for i, n in enumerate(view.nodes) if is_shardable(n, view.is_constant)]
    if not anchors:
        raise ShardingError(
            "the stage has no Conv/MatMul/Gemm with constant weights to split by width"
        )
    if len(anchors) > 48:
        anchors = [anchors[int(j)] for j in np.linspace(0, len(anchors) - 1, 48)]
    share = max(proportions) / sum(proportions)
    best: _WidthPlan | None = None
    first_error = ""
    for start in anchors:
        granularity = 1
        for _ in range(4):
            planner = _Planner(view, proportions, start, granularity)
            try:
                planner.run()
            except _NeedGranularity as need:
                granularity = (
                    granularity * need.granularity // math.gcd(granularity, need.granularity)
                )
                continue
            except _Refuse as refusal:
                first_error = first_error or str(refusal)
                break
            makespan = planner.full_flops + planner.split_flops * share
            partial = any(s is PARTIAL for s in planner.states.values())
            conv = any(n.op_type == "Conv" for n in view.nodes)
            strategy = "megatron" if partial else ("conv-channel" if conv else "column")
            if best is None or makespan < best.makespan:
                best = _WidthPlan(planner, makespan, strategy)
            break
    if best is None:
        raise ShardingError(f"cannot split the stage by width: {first_error}")
    return best


def _sliced_const(arr: np.ndarray, split: Split, shard: int, name: str) -> onnx.TensorProto:
    off, size = split.offsets[shard], split.sizes[shard]
    index = [slice(None)] * arr.ndim
    index[split.axis] = slice(off, off + size)
    return numpy_helper.from_array(np.ascontiguousarray(arr[tuple(index)]), name)


def _build_width_shard(
    view: GraphView, plan: _Planner, shard: int, outputs: Sequence[str]
) -> tuple[onnx.ModelProto, list[GatherSpec]]:
    model = view.model
    opset = plan._opset()
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, onnx.TensorProto] = {}
    const_cache: dict[str, np.ndarray] = {}
    for i, node in enumerate(model.graph.node):
        rw = plan.rewrites.get(i)
        if rw is None or (
            not rw.slice_inputs
            and not rw.identity_off_zero
            and not rw.local_group
            and rw.reshape is None
            and not rw.drop_inputs_off_zero
        ):
            nodes.append(node)
            continue
        if rw.identity_off_zero and shard != 0:
            src = next(n for n in node.input if plan.state(n) is PARTIAL)
            nodes.append(helper.make_node("Identity", [src], [node.output[0]], name=node.name))
            continue
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for j, split in rw.slice_inputs.items():
            name = node.input[j]
            local = f"{name}__s{shard}_{split.axis}"
            if view.is_constant(name):
                if local not in inits:
                    if name not in const_cache:
                        const_cache[name] = numpy_helper.to_array(view.initializers[name])
                    inits[local] = _sliced_const(const_cache[name], split, shard, local)
            elif local not in {o for n in nodes for o in n.output}:
                nodes.extend(_slice_nodes(name, local, split, shard, opset, inits))
            new.input[j] = local
        if shard != 0:
            for j in rw.drop_inputs_off_zero:
                if j < len(new.input):
                    new.input[j] = ""
            while new.input and not new.input[-1]:
                new.input.pop()
        if rw.local_group:
            for a in new.attribute:
                if a.name == "group":
                    a.i = plan.states[node.output[0]].sizes[shard]  # type: ignore[union-attr]
        if rw.reshape is not None:
            shape = list(view.shape(node.output[0]))
            shape[rw.reshape.axis] = rw.reshape.sizes[shard]
            local = f"{node.output[0]}__shape_s{shard}"
            inits[local] = numpy_helper.from_array(np.array(shape, dtype=np.int64), local)
            new.input[1] = local
        nodes.append(new)
    gathers: list[GatherSpec] = []
    outs: list[onnx.ValueInfoProto] = []
    for name in outputs:
        state = plan.state(name)
        shape = list(view.shape(name))
        elem = helper.np_dtype_to_tensor_dtype(view.dtype(name))
        part = GatherSpec.part_name(name, shard)
        if isinstance(state, Split):
            gathers.append(GatherSpec(name, GatherMode.CONCAT, axis=state.axis))
            shape[state.axis] = state.sizes[shard]
        elif state is PARTIAL:
            gathers.append(GatherSpec(name, GatherMode.SUM))
        else:
            gathers.append(GatherSpec(name, GatherMode.TAKE, shard=0))
            if shard != 0:
                continue
        nodes.append(helper.make_node("Identity", [name], [part], name=f"{part}__out"))
        outs.append(helper.make_tensor_value_info(part, elem, shape))
    shard_model = _assemble(model, nodes, inits, outs, f"shard{shard}")
    return shard_model, gathers


def _slice_nodes(
    name: str,
    local: str,
    split: Split,
    shard: int,
    opset: int,
    inits: dict[str, onnx.TensorProto],
) -> list[onnx.NodeProto]:
    off, size = split.offsets[shard], split.sizes[shard]
    if opset < 10:
        return [
            helper.make_node(
                "Slice", [name], [local], axes=[split.axis], starts=[off], ends=[off + size]
            )
        ]
    names = [f"{local}__{k}" for k in ("starts", "ends", "axes")]
    for n, v in zip(names, (off, off + size, split.axis), strict=True):
        inits[n] = numpy_helper.from_array(np.array([v], dtype=np.int64), n)
    return [helper.make_node("Slice", [name, *names], [local])]


def _assemble(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    new_inits: Mapping[str, onnx.TensorProto],
    outputs: list[onnx.ValueInfoProto],
    suffix: str,
) -> onnx.ModelProto:
    """Keep only what the outputs need, then wrap as a standalone model."""
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    needed: set[int] = set()
    stack = [o.name for o in outputs]
    seen = set(stack)
    while stack:
        k = producer.get(stack.pop())
        if k is None or k in needed:
            continue
        needed.add(k)
        for src in node_inputs(nodes[k]):
            if src not in seen:
                seen.add(src)
                stack.append(src)
    kept = [nodes[k] for k in sorted(needed)]
    used = {n for node in kept for n in node_inputs(node)}
    inits = [t for t in model.graph.initializer if t.name in used]
    inits += [t for name, t in new_inits.items() if name in used]
    inputs = [i for i in model.graph.input if i.name in used]
    graph = helper.make_graph(kept, f"{model.graph.name}_{suffix}", inputs, outputs, inits)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="partita")
    out.ir_version = model.ir_version
    out.functions.extend(model.functions)
    return out


def _branches(view: GraphView) -> list[list[int]]:
    """Connected groups of nodes, linked by the tensors they exchange (stage inputs and
    weights do not link: every shard can read them)."""
    n = len(view.model.graph.node)
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, node in enumerate(view.nodes):
        for src in node_inputs(node):
            j = view.producer.get(src)
            if j is not None:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _shard_branches(
    view: GraphView, proportions: Sequence[float]
) -> tuple[list[onnx.ModelProto], ShardLayout, float]:
    k = len(proportions)
    groups = _branches(view)
    if len(groups) < k:
        raise ShardingError(
            f"the stage has {len(groups)} independent branch(es), fewer than {k} shards"
        )
    shape_of = view.shape
    cost = [sum(node_cost(view.model.graph.node[i], shape_of)[0] for i in g) for g in groups]
    order = sorted(range(len(groups)), key=lambda g: -cost[g])
    load = [0.0] * k
    assign: list[list[int]] = [[] for _ in range(k)]
    for g in order:  # longest processing time first, weighted by device speed
        s = min(range(k), key=lambda s: (load[s] + cost[g]) / proportions[s])
        load[s] += cost[g]
        assign[s].append(g)
    if any(not a for a in assign):
        raise ShardingError("branch assignment left a shard without work; use fewer shards")
    produced_by: dict[str, int] = {}
    for s, gs in enumerate(assign):
        for g in gs:
            for i in groups[g]:
                for o in view.model.graph.node[i].output:
                    produced_by[o] = s
    shards: list[onnx.ModelProto] = []
    gathers: list[GatherSpec] = []
    for name in view.output_names:
        gathers.append(GatherSpec(name, GatherMode.TAKE, shard=produced_by.get(name, 0)))
    for s in range(k):
        nodes = list(view.model.graph.node)
        outs = []
        for spec in gathers:
            if spec.shard != s:
                continue
            part = GatherSpec.part_name(spec.output, s)
            nodes.append(helper.make_node("Identity", [spec.output], [part]))
            elem = helper.np_dtype_to_tensor_dtype(view.dtype(spec.output))
            outs.append(helper.make_tensor_value_info(part, elem, view.shape(spec.output)))
        shards.append(_assemble(view.model, nodes, {}, outs, f"shard{s}"))
    makespan = max(load[s] / proportions[s] * sum(proportions) / k for s in range(k))
    layout = ShardLayout(tuple(proportions), tuple(gathers), "branch", tuple(int(x) for x in load))
    return shards, layout, makespan


def shard_stage(
    stage: onnx.ModelProto, proportions: Sequence[float], strategy: str | None = None
) -> tuple[list[onnx.ModelProto], ShardLayout]:
    """Split `stage` (static shapes) into len(proportions) standalone shard models.

    `strategy` is "width", "branch" or None (the one with the smaller slowest shard).
    """
    props = tuple(float(p) for p in proportions)
    if len(props) < 2 or any(not p > 0 for p in props):
        raise ShardingError(f"proportions {list(proportions)} must be >= 2 positive numbers")
    view = GraphView.of(stage)
    for node in view.nodes:
        for o in node.output:
            if o:
                view.shape(o)  # a clear ShapeError before any work
    errors: list[str] = []
    width: tuple[list[onnx.ModelProto], ShardLayout, float] | None = None
    branch: tuple[list[onnx.ModelProto], ShardLayout, float] | None = None
    if strategy in (None, "width"):
        try:
            plan = _plan_width(view, props)
            built = [
                _build_width_shard(view, plan.planner, s, view.output_names)
                for s in range(len(props))
            ]
            share = np.asarray(props) / sum(props)
            flops = tuple(
                int(plan.planner.full_flops + plan.planner.split_flops * x) for x in share
            )
            layout = ShardLayout(props, tuple(built[0][1]), plan.strategy, flops)
            width = ([m for m, _ in built], layout, plan.makespan)
        except ShardingError as exc:
            errors.append(str(exc))
    if strategy in (None, "branch"):
        try:
            branch = _shard_branches(view, props)
        except ShardingError as exc:
            errors.append(str(exc))
    candidates = [c for c in (width, branch) if c is not None]
    if not candidates:
        raise ShardingError("; ".join(errors))
    shards, layout, _ = min(candidates, key=lambda c: c[2])
    return shards, layout


def gather(layout: ShardLayout, parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rebuild the stage outputs from each shard's part tensors (pure numpy)."""
    if len(parts) != layout.shards:
        raise ShardingError(f"expected parts from {layout.shards} shards, got {len(parts)}")
    out: dict[str, np.ndarray] = {}
    for spec in layout.gathers:
        if spec.mode is GatherMode.TAKE:
            pieces = [parts[spec.shard].get(GatherSpec.part_name(spec.output, spec.shard))]
        else:
            pieces = [p.get(GatherSpec.part_name(spec.output, i)) for i, p in enumerate(parts)]
        if any(x is None for x in pieces):
            raise ShardingError(f"a shard did not return its part of {spec.output!r}")
        arrays = [np.asarray(x) for x in pieces]
        if spec.mode is GatherMode.CONCAT:
            out[spec.output] = np.concatenate(arrays, axis=spec.axis)
        elif spec.mode is GatherMode.SUM:
            total = arrays[0].copy()
            for x in arrays[1:]:
                total += x
            out[spec.output] = total
        else:
            out[spec.output] = arrays[0]
    return out
