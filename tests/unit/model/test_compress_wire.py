"""The operator measures a compressed cut with the stage servers' own encoding: the two agree
bit for bit (the server's codec is the oracle here; the operator's copy must not drift)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from partita.model.compress import classifier_output, wire_roundtrip
from partita_server.protocol import compress, decompress
from partita_server.spec import Compression


@pytest.mark.parametrize("codec", ["fp16", "int8"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wire_roundtrip_is_what_a_server_receives(codec: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, 16, 7, 7)) * (seed + 1) + seed).astype(np.float32)
    if seed == 2:
        x = np.maximum(x, 0)  # ReLU activations: 0 must stay exact
    wire, params = compress(x, Compression(codec))
    received = decompress(wire, params, name="t")
    np.testing.assert_array_equal(wire_roundtrip(x, codec), received)
    if seed == 2 and codec == "int8":
        assert np.all(wire_roundtrip(x, codec)[x == 0] == 0)


def test_non_float_tensors_cross_untouched() -> None:
    ids = np.arange(12, dtype=np.int64).reshape(1, 12)
    assert wire_roundtrip(ids, "int8") is ids


def _head(op: str) -> onnx.ModelProto:
    """x [1, 4] -> MatMul -> `op` -> Identity -> y [1, 3]."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], [0.1] * 12)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"])]
    if op == "Softmax":
        nodes.append(helper.make_node("Softmax", ["z"], ["p"], axis=-1))
    else:
        nodes.append(helper.make_node("Relu", ["z"], ["p"]))
    nodes.append(helper.make_node("Identity", ["p"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [w],
    )
    return helper.make_model(graph)


def test_only_softmax_scores_count_as_a_classifier_output() -> None:
    assert classifier_output(_head("Softmax")) == "y"  # through the Identity
    assert classifier_output(_head("Relu")) is None  # an [N, C] embedding or logits
