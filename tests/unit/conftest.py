"""Fixtures shared by the unit tests: a tiny real ONNX model for fetch and reconcile tests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class ModelFile:
    path: Path
    sha256: str
    size: int

    @property
    def uri(self) -> str:
        return self.path.as_uri()


def tiny_model() -> bytes:
    """x[batch, 8] -> MatMul -> Relu -> MatMul -> y[batch, 2]."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 2)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture
def model_file(tmp_path: Path) -> ModelFile:
    data = tiny_model()
    onnx.checker.check_model(onnx.load_from_string(data))
    path = tmp_path / "src" / "tiny.onnx"
    path.parent.mkdir()
    path.write_bytes(data)
    return ModelFile(path, hashlib.sha256(data).hexdigest(), len(data))
