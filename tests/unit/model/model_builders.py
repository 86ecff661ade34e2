"""Tiny graphs for unit tests, built in code so each test states what it checks."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def f32(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def weight(name: str, shape, seed: int = 0) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def diamond() -> onnx.ModelProto:
    """x -> conv a -> relu -> conv b -> add(a_relu, b) -> out: a residual block."""
    return make(
        [
            helper.make_node(
                "Conv", ["x", "wa"], ["a"], kernel_shape=[3, 3], pads=[1] * 4, name="conv_a"
            ),
            helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
            helper.make_node("Conv", ["ar", "wb"], ["b"], kernel_shape=[1, 1], name="conv_b"),
            helper.make_node("Add", ["ar", "b"], ["out"], name="add"),
        ],
        [f32("x", ["batch", 3, 8, 8])],
        [f32("out", ["batch", 4, 8, 8])],
        [weight("wa", (4, 3, 3, 3)), weight("wb", (4, 4, 1, 1), 1)],
    )


def mlp() -> onnx.ModelProto:
    """MatMul -> Add -> Relu -> MatMul -> Add: a Megatron column-then-row pair."""
    return make(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
            helper.make_node("Relu", ["hb"], ["hr"], name="act"),
            helper.make_node("MatMul", ["hr", "w2"], ["o"], name="fc2"),
            helper.make_node("Add", ["o", "b2"], ["y"], name="bias2"),
        ],
        [f32("x", [2, 8])],
        [f32("y", [2, 6])],
        [
            weight("w1", (8, 16)),
            weight("b1", (16,), 1),
            weight("w2", (16, 6), 2),
            weight("b2", (6,), 3),
        ],
    )
