"""The levers in the operator's pure parts: the cascade's small model checked at profiling,
int8 figures turned into planner inputs and status, energy per request from what the servers
measured."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from partita.api import EdgeModel
from partita.api.edgemodel import Quantization as ApiQuantization
from partita.control.models import reconcile_model
from partita.control.quantization import (
    Int8Figures,
    class_speedup,
    int8_model,
    planner_quantization,
    quantization_status,
)
from partita.control.status import plan_observation
from partita.kube.fetch import ModelFetcher
from partita.metrics.observation import HopKey, HopObservation, Observation, StageKey
from partita.metrics.observation import StageObservation as Seen
from partita.model.compress import RELATIVE_ERROR, TOP1, AccuracyDrop
from partita.model.profile import profile_model
from partita.model.samples import Calibration
from partita.model.types import ModelProfile, NodeCost, OpClass, TensorInfo
from partita.planner import (
    CascadePlacement,
    ClusterSnapshot,
    Compression,
    DevicePoolState,
    ModelRequest,
    Plan,
    Prediction,
    ShardPlacement,
    Stage,
    Tier,
)

T0 = "2026-01-01T00:00:00Z"


def _model(uri: str, sha: str, **spec: Any) -> EdgeModel:
    return EdgeModel.parse(
        {
            "apiVersion": "partita.dev/v1alpha1",
            "kind": "EdgeModel",
            "metadata": {"name": "tiny", "namespace": "ns", "generation": 1},
            "spec": {
                "source": {"uri": uri, "sha256": sha},
                "inputShapes": {"x": [1, 8]},
                "dataSource": "edge-a",
                **spec,
            },
        }
    )


def _profiler(path: Path, shapes: Any) -> Any:
    return profile_model(path, shapes)


def _other_outputs(tmp_path: Path) -> tuple[str, str]:
    """A model taking x[batch, 8] and answering `z` (not the main model's `y`)."""
    import hashlib

    w = numpy_helper.from_array(np.ones((8, 2), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"])],
        "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 2])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    path = tmp_path / "other.onnx"
    path.write_bytes(data)
    return path.as_uri(), hashlib.sha256(data).hexdigest()


def test_a_cascade_small_model_must_answer_like_the_main_model(tmp_path: Path, model_file):
    fetcher = ModelFetcher(tmp_path / "cache")
    uri, sha = _other_outputs(tmp_path)
    cascade = {"model": {"uri": uri, "sha256": sha}, "output": "z", "threshold": 0.9}
    out = reconcile_model(
        _model(model_file.uri, model_file.sha256, cascade=cascade), fetcher, _profiler, now=T0
    )
    profiled = next(c for c in out.status["conditions"] if c["type"] == "Profiled")
    assert profiled["status"] == "False" and profiled["reason"] == "InvalidCascade"
    assert "'y'" in profiled["message"] and out.permanent_error is not None
    same = {"model": {"uri": model_file.uri, "sha256": model_file.sha256}, "output": "y",
            "threshold": 0.9}  # fmt: skip
    ok = reconcile_model(
        _model(model_file.uri, model_file.sha256, cascade=same), fetcher, _profiler, now=T0
    )
    assert ok.permanent_error is None
    assert ok.status["model"]["cascade"]["digest"] == model_file.sha256


def test_int8_is_measured_once_and_reported_in_status(tmp_path: Path, model_file):
    fetcher = ModelFetcher(tmp_path / "cache")
    calls = []

    def quantizer(path: Path, digest: str, shapes: Any, mode: Calibration) -> Int8Figures:
        calls.append(mode)
        return int8_model(path, digest, shapes, mode, tmp_path / "operator")

    spec = {"quantization": {"allowed": True, "maxAccuracyDrop": 0.05, "calibration": "seeded"}}
    model = _model(model_file.uri, model_file.sha256, **spec)
    out = reconcile_model(model, fetcher, _profiler, now=T0, quantizer=quantizer)
    q = out.status["model"]["quantization"]
    # The tiny model takes no images: dynamic int8, measured on seeded values; its output
    # y[batch, 2] is no Softmax's, so the drop is the relative error of the outputs.
    assert q["mode"] == "dynamic" and q["accuracy"]["metric"] == RELATIVE_ERROR
    assert q["accuracy"]["source"] == "seeded values" and q["accuracy"]["inputs"] == 32
    assert q["speedup"] > 0 and q["weightBytes"] > 0
    assert calls == [Calibration.SEEDED]
    again = int8_model(model_file.path, model_file.sha256, {"x": [1, 8]}, Calibration.SEEDED,
                       tmp_path / "operator")  # fmt: skip
    assert again.digest == q_digest(tmp_path)  # read back from disk, not quantized again


def q_digest(tmp_path: Path) -> str:
    import hashlib

    (path,) = (tmp_path / "operator" / "int8").glob("*.onnx")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _figures(drop: float, speedup: float = 2.0) -> Int8Figures:
    return Int8Figures(Path("/x.onnx"), "d" * 64, "static", AccuracyDrop(TOP1, drop, 32, "photos"),
                       speedup, 25, 100)  # fmt: skip


def test_above_max_accuracy_drop_int8_is_refused_and_the_planner_cannot_use_it():
    spec = ApiQuantization(allowed=True, max_accuracy_drop=0.02)
    profile = _profile()
    refused = quantization_status(spec, _figures(0.05))
    assert not refused.usable and "refused" in refused.message and "0.0500" in refused.message
    assert not planner_quantization(spec, _figures(0.05), profile).usable
    accepted = planner_quantization(spec, _figures(0.01), profile)
    assert accepted.usable and accepted.weight_factor == 0.25
    assert quantization_status(spec, _figures(0.01)).usable


def _profile() -> ModelProfile:
    nodes = tuple(
        NodeCost(i, f"n{i}", op, cls, flops, 0, 4, 4, False)
        for i, (op, cls, flops) in enumerate(
            [("Conv", OpClass.CONV, 600), ("Relu", OpClass.ELEMENTWISE, 400)]
        )
    )
    t = TensorInfo("x", "float32", (1,), 4)
    return ModelProfile("0" * 64, (t,), (t,), nodes, (), 1000, 0)


def test_the_conv_speedup_is_fitted_to_the_measured_whole_model_speedup():
    profile = _profile()  # 60% of the FLOPs in conv
    s = class_speedup(profile, 1.5)
    assert 0.6 / s + 0.4 == pytest.approx(1 / 1.5)
    assert class_speedup(profile, 1.0) == pytest.approx(1.0)
    assert class_speedup(profile, 100.0) == 8.0  # more than conv alone can explain: capped


def test_observed_energy_weights_the_main_model_by_the_measured_offload():
    pools = (
        DevicePoolState("edge", Tier.EDGE, power_idle_watts=1, power_active_watts=5,
                        radio_watts=2),
        DevicePoolState("cloud", Tier.CLOUD, power_idle_watts=50, power_active_watts=250),
    )  # fmt: skip
    snap = ClusterSnapshot(nodes=(), pools=pools)
    stage = Stage(0, "cloud", 0, 1, (ShardPlacement("c1", 1.0),), ("x",), ("y",),
                  Compression.NONE)  # fmt: skip
    plan = Plan(
        ModelRequest(name="m", data_source="edge", namespace="ns"),
        (stage,),
        4,
        Prediction(0.1, 10, 1, 0.1, (), 0.0),
        cascade=CascadePlacement("edge", "e1"),
    )
    obs = Observation(
        taken_at=0,
        stages={
            StageKey("ns", "m", "cascade", "4", "", "e1"): Seen(compute_s=0.02),
            StageKey("ns", "m", "0", "4", "", "c1"): Seen(compute_s=0.01),
        },
        hops={HopKey("ns", "m", "cascade", "0", "4", "e1"): HopObservation(1e5, 0.05)},
        offload={("ns", "m"): 0.25},
    )
    seen = plan_observation(plan, obs, snap)
    assert seen.offload_rate == 0.25
    # small model 4 W x 20 ms for every request; the cloud stage 200 W x 10 ms and the
    # radio 2 W x 50 ms for the quarter that goes on.
    assert seen.energy_j == pytest.approx(4 * 0.02 + 0.25 * (200 * 0.01 + 2 * 0.05))
    silent = replace(obs, stages={k: v for k, v in obs.stages.items() if k.stage == "0"})
    assert plan_observation(plan, silent, snap).energy_j is None
