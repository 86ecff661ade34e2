"""Per-operator cost model: FLOPs/MACs and the op class whose speed is measured per device.

Counts follow the usual convention: a multiply-accumulate is 2 FLOPs, elementwise ops
cost one FLOP per output element (transcendentals a few), data movement costs none.
`bench/model.py` measures how well these counts predict onnxruntime time per op class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import helper

from partita.model.graph import CONTROL_FLOW_OPS, subgraphs, value_shape
from partita.model.types import OpClass

ShapeOf = Callable[[str], "tuple[int, ...] | None"]

_ELEMENTWISE_COST = {
    "Add": 1, "Sub": 1, "Mul": 1, "Div": 1, "Relu": 1, "LeakyRelu": 2, "PRelu": 2, "Clip": 1,
    "Max": 1, "Min": 1, "Neg": 1, "Abs": 1, "Sum": 1, "Mean": 1, "Where": 1, "Equal": 1,
    "Greater": 1, "Less": 1, "GreaterOrEqual": 1, "LessOrEqual": 1, "Not": 1, "And": 1,
    "Or": 1, "Xor": 1, "Sqrt": 4, "Reciprocal": 1, "Pow": 4, "Exp": 4, "Log": 4, "Erf": 4,
    "Tanh": 4, "Sigmoid": 4, "HardSigmoid": 3, "HardSwish": 4, "Gelu": 8, "Elu": 4,
    "Selu": 4, "Softplus": 4, "Mish": 8, "Sin": 4, "Cos": 4, "Floor": 1, "Ceil": 1,
    "Round": 1, "Sign": 1, "Mod": 2, "Cast": 1, "BitShift": 1, "IsNaN": 1, "IsInf": 1,
    "QuantizeLinear": 3, "DequantizeLinear": 2, "Dropout": 0, "ThresholdedRelu": 1,
}  # fmt: skip
_MOVEMENT = frozenset(
    {
        "Reshape", "Transpose", "Concat", "Gather", "GatherElements", "GatherND", "Slice",
        "Split", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Tile", "Pad", "Identity",
        "Shape", "Size", "Constant", "ConstantOfShape", "DepthToSpace", "SpaceToDepth",
        "ScatterND", "ScatterElements", "Range", "OneHot", "NonZero", "Trilu",
    }
)  # fmt: skip
_NORM_COST = {
    "BatchNormalization": 2, "LayerNormalization": 8, "InstanceNormalization": 8,
    "GroupNormalization": 8, "LpNormalization": 4, "MeanVarianceNormalization": 8,
    "Softmax": 5, "LogSoftmax": 6,
}  # fmt: skip
_REDUCE = frozenset(
    {
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2",
        "ReduceL1", "ReduceSumSquare", "ReduceLogSumExp", "ArgMax", "ArgMin", "TopK",
    }
)  # fmt: skip
_RNN = ("LSTM", "GRU", "RNN")  # gates: 4, 3, 1
_POOL = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "LRN"})


def op_class(op_type: str) -> OpClass:
    if op_type in ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv"):
        return OpClass.CONV
    if op_type in ("MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "Einsum", *_RNN):
        return OpClass.MATMUL
    if op_type in _POOL:
        return OpClass.POOL
    if op_type in _NORM_COST:
        return OpClass.NORM
    if op_type in _MOVEMENT:
        return OpClass.MOVEMENT
    if op_type in _ELEMENTWISE_COST:
        return OpClass.ELEMENTWISE
    return OpClass.OTHER


def _numel(shape: tuple[int, ...] | None) -> int:
    return math.prod(int(d) for d in shape) if shape is not None else 0


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def node_cost(node: onnx.NodeProto, shape_of: ShapeOf) -> tuple[int, int]:
    """(flops, macs) of one node; subgraph ops are costed by `control_flow_cost`."""
    op = node.op_type
    out = shape_of(node.output[0]) if node.output and node.output[0] else None
    out_n = _numel(out)
    ins = [shape_of(n) if n else None for n in node.input]
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = ins[3] if op == "QLinearConv" else ins[1]
        if w is None or out is None:
            return 0, 0
        macs = out_n * _numel(w[1:])  # C_in/group * prod(kernel) per output element
        return 2 * macs + (out_n if len(node.input) > 2 and op == "Conv" else 0), macs
    if op == "ConvTranspose":
        x, w = ins[0], ins[1]
        if x is None or w is None:
            return 0, 0
        # W is (C_in, C_out/group, k...): each input element feeds C_out/group * k outputs.
        macs = _numel(x) * w[1] * _numel(w[2:])
        return 2 * macs + (out_n if len(node.input) > 2 else 0), macs
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = ins[0]
        if a is None or out is None:
            return 0, 0
        k = a[-1]
        macs = out_n * k
        return 2 * macs, macs
    if op == "Gemm":
        a = ins[0]
        if a is None or out is None:
            return 0, 0
        trans_a = int(_attrs(node).get("transA", 0))  # type: ignore[call-overload]
        k = a[0] if trans_a else a[-1]
        macs = out_n * k
        return 2 * macs + (out_n if len(node.input) > 2 else 0), macs
    if op in _RNN:
        x, w, r = ins[0], ins[1] if len(ins) > 1 else None, ins[2] if len(ins) > 2 else None
        if x is None or w is None or r is None:
            return 0, 0
        layout = int(_attrs(node).get("layout", 0))  # type: ignore[call-overload]
        steps, batch = (x[1], x[0]) if layout else (x[0], x[1])
        # Every step multiplies the input by W and the state by R for each gate.
        macs = steps * batch * w[0] * w[1] * (w[2] + r[2])
        return 2 * macs + 4 * steps * batch * w[0] * w[1], macs
    if op == "Einsum":
        return 2 * _numel(ins[0]) * max(1, _numel(ins[1]) // max(out_n, 1)), 0
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        return _numel(ins[0]), 0
    if op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = _attrs(node).get("kernel_shape", [1])
        return out_n * int(np.prod(kernel)), 0  # type: ignore[call-overload]
    if op == "LRN":
        return out_n * (int(_attrs(node).get("size", 1)) + 3), 0  # type: ignore[call-overload]
    if op in _NORM_COST:
        return _NORM_COST[op] * out_n, 0
    if op in _REDUCE:
        return _numel(ins[0]), 0
    if op == "Resize":
        mode = _attrs(node).get("mode", b"nearest")
        per = {b"nearest": 1, b"linear": 4, b"cubic": 16}.get(mode, 4)  # type: ignore[call-overload]
        return per * out_n, 0
    if op in _MOVEMENT:
        return 0, 0
    return _ELEMENTWISE_COST.get(op, 1) * out_n, 0


def graph_cost(graph: onnx.GraphProto, outer: dict[str, tuple[int, ...]]) -> int:
    """FLOPs of a subgraph, using the shapes shape inference recorded inside it."""
    shapes = dict(outer)
    for t in graph.initializer:
        shapes[t.name] = tuple(t.dims)
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        s = value_shape(vi)
        if s is not None:
            shapes[vi.name] = s
    total = 0
    for node in graph.node:
        if _has_graph(node):
            total += control_flow_cost(node, shapes.get, shapes)
        else:
            total += node_cost(node, shapes.get)[0]
    return total


def _has_graph(node: onnx.NodeProto) -> bool:
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    )


def control_flow_cost(
    node: onnx.NodeProto,
    shape_of: ShapeOf,
    outer: dict[str, tuple[int, ...]],
    trip_count: int | None = None,
) -> int:
    """If: the costlier branch. Loop: body x trip count (1 when unknown). Scan: body x length."""
    attrs = _attrs(node)
    if node.op_type == "If":
        return max(
            graph_cost(attrs["then_branch"], outer),  # type: ignore[arg-type]
            graph_cost(attrs["else_branch"], outer),  # type: ignore[arg-type]
        )
    if node.op_type == "Loop":
        return graph_cost(attrs["body"], outer) * max(trip_count or 1, 1)  # type: ignore[arg-type]
    if node.op_type == "Scan":
        first = shape_of(node.input[0]) if node.input else None
        length = first[0] if first else 1
        return graph_cost(attrs["body"], outer) * length  # type: ignore[arg-type]
    return 0


def is_shardable(node: onnx.NodeProto, is_constant: Callable[[str], bool]) -> bool:
    """Width-splittable: a Conv/MatMul/Gemm whose weight is a constant."""
    if node.op_type == "Conv":
        return (
            len(node.input) > 1
            and is_constant(node.input[1])
            and int(_attrs(node).get("group", 1)) == 1  # type: ignore[call-overload]
        )
    if node.op_type in ("MatMul", "Gemm"):
        return len(node.input) > 1 and is_constant(node.input[1])
    return False


def node_flops(
    node: onnx.NodeProto,
    shapes: Mapping[str, tuple[int, ...]],
    initializers: Mapping[str, onnx.TensorProto],
) -> tuple[int, int]:
    """(FLOPs, MACs) of one node at these tensor shapes (subgraph ops: their bodies)."""
    if node.op_type in CONTROL_FLOW_OPS or any(True for _ in subgraphs(node)):
        trip = trip_count(node, initializers)
        return control_flow_cost(node, shapes.get, dict(shapes), trip), 0
    return node_cost(node, shapes.get)


def trip_count(node: onnx.NodeProto, initializers: Mapping[str, onnx.TensorProto]) -> int | None:
    if node.op_type != "Loop" or not node.input or not node.input[0]:
        return None
    init = initializers.get(node.input[0])
    if init is None:
        return None
    return int(onnx.numpy_helper.to_array(init).reshape(-1)[0])
