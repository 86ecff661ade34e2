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


def conv_stack(height: int = 24, width: int = 20) -> onnx.ModelProto:
    """Three 3x3 convolutions (one strided), a max pool, a global pool and a Gemm head:
    halos that grow through the stack, a stride that shrinks them, a reduction over rows."""
    return make(
        [
            helper.make_node(
                "Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4, name="conv1"
            ),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node(
                "Conv",
                ["r1", "w2"],
                ["c2"],
                kernel_shape=[3, 3],
                pads=[1] * 4,
                strides=[2, 2],
                name="conv2",
            ),
            helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
            helper.make_node(
                "MaxPool",
                ["r2"],
                ["p"],
                kernel_shape=[3, 3],
                pads=[1] * 4,
                strides=[1, 1],
                name="pool",
            ),
            helper.make_node(
                "Conv", ["p", "w3", "b3"], ["c3"], kernel_shape=[3, 3], pads=[1] * 4, name="conv3"
            ),
            helper.make_node("Add", ["c3", "p"], ["res"], name="residual"),
            helper.make_node("GlobalAveragePool", ["res"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "wh", "bh"], ["y"], transB=1, name="head"),
        ],
        [f32("x", [1, 3, height, width])],
        [f32("y", [1, 5])],
        [
            weight("w1", (8, 3, 3, 3)),
            weight("w2", (16, 8, 3, 3), 1),
            weight("w3", (16, 16, 3, 3), 2),
            weight("b3", (16,), 3),
            weight("wh", (5, 16), 4),
            weight("bh", (5,), 5),
        ],
    )


def attention_block(tokens: int = 8, hidden: int = 16, heads: int = 4) -> onnx.ModelProto:
    """One pre-norm transformer block: attention heads, output projection, residual, MLP."""
    d = hidden // heads
    shape4 = np.array([1, tokens, heads, d], dtype=np.int64)
    shape3 = np.array([1, tokens, hidden], dtype=np.int64)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g1", "be1"], ["n1"], axis=-1, name="ln1"),
        *[helper.make_node("MatMul", ["n1", f"w{p}"], [f"{p}m"], name=f"{p}_proj") for p in "qkv"],
        *[
            helper.make_node("Reshape", [f"{p}m", "shape4"], [f"{p}h"], name=f"{p}_heads")
            for p in "qkv"
        ],
        helper.make_node("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3], name="q_t"),
        helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 2, 3, 1], name="k_t"),
        helper.make_node("Transpose", ["vh"], ["vt"], perm=[0, 2, 1, 3], name="v_t"),
        helper.make_node("MatMul", ["qt", "kt"], ["s"], name="scores"),
        helper.make_node("Mul", ["s", "scale"], ["ss"], name="scale"),
        helper.make_node("Softmax", ["ss"], ["a"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["a", "vt"], ["ctx"], name="context"),
        helper.make_node("Transpose", ["ctx"], ["ct"], perm=[0, 2, 1, 3], name="ctx_t"),
        helper.make_node("Reshape", ["ct", "shape3"], ["cm"], name="merge"),
        helper.make_node("MatMul", ["cm", "wo"], ["o"], name="out_proj"),
        helper.make_node("Add", ["o", "x"], ["h1"], name="residual1"),
        helper.make_node("LayerNormalization", ["h1", "g2", "be2"], ["n2"], axis=-1, name="ln2"),
        helper.make_node("MatMul", ["n2", "wu"], ["u"], name="up"),
        helper.make_node("Relu", ["u"], ["ur"], name="act"),
        helper.make_node("MatMul", ["ur", "wd"], ["dn"], name="down"),
        helper.make_node("Add", ["dn", "h1"], ["y"], name="residual2"),
    ]
    inits = [
        weight("g1", (hidden,), 1), weight("be1", (hidden,), 2),
        weight("g2", (hidden,), 3), weight("be2", (hidden,), 4),
        weight("wq", (hidden, hidden), 5), weight("wk", (hidden, hidden), 6),
        weight("wv", (hidden, hidden), 7), weight("wo", (hidden, hidden), 8),
        weight("wu", (hidden, 4 * hidden), 9), weight("wd", (4 * hidden, hidden), 10),
        numpy_helper.from_array(shape4, "shape4"), numpy_helper.from_array(shape3, "shape3"),
        numpy_helper.from_array(np.array(d**-0.5, dtype=np.float32), "scale"),
    ]  # fmt: skip
    return make(nodes, [f32("x", [1, tokens, hidden])], [f32("y", [1, tokens, hidden])], inits)


def embedding_block(vocab: int = 4096, hidden: int = 256, tokens: int = 8) -> onnx.ModelProto:
    """Token ids -> a 4 MiB embedding table + positions -> LayerNorm -> a projection."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, tokens])
    return make(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
            helper.make_node("Add", ["e", "pos"], ["ep"], name="positions"),
            helper.make_node("LayerNormalization", ["ep", "g", "b"], ["n"], axis=-1, name="ln"),
            helper.make_node("MatMul", ["n", "w"], ["y"], name="proj"),
        ],
        [ids],
        [f32("y", [1, tokens, hidden])],
        [
            weight("table", (vocab, hidden)),
            weight("pos", (1, tokens, hidden), 1),
            weight("g", (hidden,), 2),
            weight("b", (hidden,), 3),
            weight("w", (hidden, hidden), 4),
        ],
    )


def upsampler(height: int = 12, width: int = 10) -> onnx.ModelProto:
    """A decoder: conv, nearest x2 resize, a stride-2 transposed conv, a 3x3 conv."""
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales")
    roi = numpy_helper.from_array(np.array([], dtype=np.float32), "roi")
    return make(
        [
            helper.make_node(
                "Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4, name="conv1"
            ),
            helper.make_node(
                "Resize",
                ["c1", "roi", "scales"],
                ["up"],
                mode="nearest",
                coordinate_transformation_mode="asymmetric",
                nearest_mode="floor",
                name="resize",
            ),
            helper.make_node(
                "ConvTranspose",
                ["up", "wt"],
                ["t"],
                kernel_shape=[2, 2],
                strides=[2, 2],
                name="deconv",
            ),
            helper.make_node(
                "Conv", ["t", "w2"], ["y"], kernel_shape=[3, 3], pads=[1] * 4, name="conv2"
            ),
        ],
        [f32("x", [1, 3, height, width])],
        [f32("y", [1, 2, 4 * height, 4 * width])],
        [
            weight("w1", (4, 3, 3, 3)),
            weight("wt", (4, 4, 2, 2), 1),
            weight("w2", (2, 4, 3, 3), 2),
            scales,
            roi,
        ],
    )
