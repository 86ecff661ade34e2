"""Small models built in code with onnx.helper, for what no installed wheel ships.

* `control_flow_model`: an audio-frame classifier with an If (energy gate) and a Loop
  (recurrent refinement), standing in for silero-vad, whose wheel pulls torch.
* `recurrent_model`: a Conv front end, an LSTM and a Gemm head (an RNN/audio model).
* `chain_model`: a long residual MLP chain to time profiling at 10,000 nodes.
Weights come from a seeded generator, so every build is byte-identical.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(
    rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float
) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model.producer_name = "partita.synthetic"
    return model


def control_flow_model(seed: int = 0, frames: int = 64, features: int = 16) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    hidden = 32
    f32 = TensorProto.FLOAT
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["h", "gain"], ["gated"])],
        "loud",
        [],
        [helper.make_tensor_value_info("gated", f32, [1, hidden, frames])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["quiet"])],
        "quiet",
        [],
        [helper.make_tensor_value_info("quiet", f32, [1, hidden, frames])],
    )
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["state_in", "w_loop"], ["mm"]),
            helper.make_node("Tanh", ["mm"], ["state_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "refine",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", f32, [1, hidden]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", f32, [1, hidden]),
        ],
    )
    nodes = [
        helper.make_node("Conv", ["x", "w_conv", "b_conv"], ["c"], kernel_shape=[3], pads=[1, 1]),
        helper.make_node("Relu", ["c"], ["h"]),
        helper.make_node("ReduceMean", ["x"], ["energy"], keepdims=0),
        helper.make_node("Greater", ["energy", "zero"], ["loud"]),
        helper.make_node("If", ["loud"], ["g"], then_branch=then_g, else_branch=else_g),
        helper.make_node("ReduceMean", ["g"], ["pooled"], axes=[2], keepdims=0),
        helper.make_node("Loop", ["trips", "true"], ["refined"], body=body),
        helper.make_node("Add", ["refined", "pooled"], ["summed"]),
        helper.make_node("Gemm", ["summed", "w_head", "b_head"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=-1),
    ]
    # The Loop's initial state is `pooled`; wire it as the third Loop input.
    nodes[6].input.append("pooled")
    inits = [
        _init(rng, "w_conv", (hidden, features, 3), (2.0 / (features * 3)) ** 0.5),
        _init(rng, "b_conv", (hidden,), 0.01),
        numpy_helper.from_array(np.array(1.5, dtype=np.float32), "gain"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array(3, dtype=np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "true"),
        _init(rng, "w_loop", (hidden, hidden), hidden**-0.5),
        _init(rng, "w_head", (2, hidden), hidden**-0.5),
        _init(rng, "b_head", (2,), 0.01),
    ]
    graph = helper.make_graph(
        nodes,
        "control_flow_vad",
        [helper.make_tensor_value_info("x", f32, [1, features, frames])],
        [helper.make_tensor_value_info("prob", f32, [1, 2])],
        inits,
    )
    return _model(graph)


def recurrent_model(seed: int = 0, frames: int = 32, features: int = 40) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    hidden, conv_out = 48, 64
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("Conv", ["x", "w_conv", "b_conv"], ["c"], kernel_shape=[3], pads=[1, 1]),
        helper.make_node("Relu", ["c"], ["h"]),
        helper.make_node("Transpose", ["h"], ["seq"], perm=[2, 0, 1]),  # (T, 1, C)
        helper.make_node(
            "LSTM", ["seq", "w_lstm", "r_lstm", "b_lstm"], ["y", "y_h"], hidden_size=hidden
        ),
        helper.make_node("Squeeze", ["y_h", "axis0"], ["last"]),
        helper.make_node("Gemm", ["last", "w_head", "b_head"], ["logit"], transB=1),
        helper.make_node("Sigmoid", ["logit"], ["speech"]),
    ]  # fmt: skip
    inits = [
        _init(rng, "w_conv", (conv_out, features, 3), (2.0 / (features * 3)) ** 0.5),
        _init(rng, "b_conv", (conv_out,), 0.01),
        _init(rng, "w_lstm", (1, 4 * hidden, conv_out), conv_out**-0.5),
        _init(rng, "r_lstm", (1, 4 * hidden, hidden), hidden**-0.5),
        _init(rng, "b_lstm", (1, 8 * hidden), 0.01),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
        _init(rng, "w_head", (1, hidden), hidden**-0.5),
        _init(rng, "b_head", (1,), 0.01),
    ]
    graph = helper.make_graph(
        nodes,
        "recurrent_vad",
        [helper.make_tensor_value_info("x", f32, [1, features, frames])],
        [helper.make_tensor_value_info("speech", f32, [1, 1])],
        inits,
    )
    return _model(graph)


def chain_model(nodes: int = 10_000, width: int = 16, seed: int = 0) -> onnx.ModelProto:
    """About `nodes` nodes: blocks of MatMul, Add (bias), Relu, Add (residual)."""
    rng = np.random.default_rng(seed)
    f32 = TensorProto.FLOAT
    graph_nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "x"
    for b in range(max(nodes // 4, 1)):
        w, bias = f"w{b}", f"b{b}"
        # Small residual branches keep activations bounded over thousands of blocks.
        inits += [_init(rng, w, (width, width), 1e-3), _init(rng, bias, (width,), 1e-3)]
        graph_nodes += [
            helper.make_node("MatMul", [x, w], [f"m{b}"]),
            helper.make_node("Add", [f"m{b}", bias], [f"a{b}"]),
            helper.make_node("Relu", [f"a{b}"], [f"r{b}"]),
            helper.make_node("Add", [f"r{b}", x], [f"h{b}"]),
        ]
        x = f"h{b}"
    graph = helper.make_graph(
        graph_nodes,
        "chain",
        [helper.make_tensor_value_info("x", f32, [1, width])],
        [helper.make_tensor_value_info(x, f32, [1, width])],
        inits,
    )
    return _model(graph)
