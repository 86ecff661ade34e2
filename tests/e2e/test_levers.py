"""Every lever of the API through the operator on the local cluster: int8 within a measured
budget, the confidence cascade with its measured offload ratio, a compressed cut with its
bytes and measured drop, privacy with a cascade, energy, and priority admission."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from e2e_loop import (
    NAMESPACE,
    STORE,
    edge_model,
    entry_url,
    ocr_model,
    open_nsfw,
    store_models,
)

from cluster_helpers import eventually, get_json

pytestmark = pytest.mark.cluster

OUTPUT = "4195"  # open_nsfw's softmax output: [P(sfw), P(nsfw)]
SHAPES = {"input_0": [1, 224, 224, 3]}


def _status(cluster: Any, name: str) -> dict[str, Any]:
    return get_json(cluster, "edgemodel", name, "-n", NAMESPACE).get("status") or {}


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def _infer(url: str, model: str, image: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    import tritonclient.http as http

    client = http.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
    try:
        inp = http.InferInput("input_0", list(image.shape), "FP32")
        inp.set_data_from_numpy(image, binary_data=True)
        result = client.infer(model, [inp])
        return np.asarray(result.as_numpy(OUTPUT)), result.get_response().get("parameters", {})
    finally:
        client.close()


def _pool_memory(cluster: Any, pool: str, memory: str) -> None:
    patch = json.dumps({"spec": {"device": {"memory": memory}}})
    cluster.kubectl("patch", "devicepool", pool, "--type=merge", "-p", patch)


def _photographs(count: int) -> list[np.ndarray]:
    """Real images (scikit-image's photographs, both halves), as open_nsfw takes them."""
    from partita.model.load import load_model
    from partita.model.samples import Calibration, Split, sample_set

    model = load_model(open_nsfw()[0], SHAPES)
    half = count // 2
    feeds = [
        *sample_set(model, Calibration.CAFFE, Split.CALIBRATION, half, seed=5).feeds,
        *sample_set(model, Calibration.CAFFE, Split.EVALUATION, count - half, seed=5).feeds,
    ]
    return [f["input_0"] for f in feeds]


def _prometheus(cluster: Any, query: str) -> list[dict[str, Any]]:
    import httpx

    reply = httpx.get(f"{cluster.prometheus_url}/api/v1/query", params={"query": query})
    return list(reply.json()["data"]["result"])


def test_only_the_int8_stage_fits_and_serves_with_its_measured_drop(loop: Any) -> None:
    name = "nsfw-int8"
    _pool_memory(loop, "edge-b", "48Mi")  # float32 needs 58 MiB, int8 41 MiB
    try:
        spec = {
            "dataSource": "edge-b",
            "pools": ["edge-b"],
            "partitioning": {"mode": "none"},
            "quantization": {"allowed": True, "maxAccuracyDrop": 0.05},
        }
        loop.kubectl("apply", "-f", "-", input=edge_model(name, **spec))
        status = eventually(
            lambda: (s := _status(loop, name)).get("phase") == "Ready" and s,
            300,
            "the int8 model Ready",
            interval=2,
        )
        quantization = status["model"]["quantization"]
        assert quantization["mode"] == "static" and quantization["usable"]
        accuracy = quantization["accuracy"]
        assert accuracy["metric"] == "top1-disagreement" and accuracy["inputs"] == 32
        assert "scikit-image photographs" in accuracy["source"]
        assert 0 <= accuracy["drop"] <= 0.05 and quantization["speedup"] > 0
        assert quantization["weightBytes"] < status["model"]["paramBytes"] / 3
        (stage,) = status["plan"]["stages"]
        assert stage["int8"] and stage["pool"] == "edge-b"
        # The server runs the operator's int8 file, with its own digest, which it fetched
        # from the operator's distribution endpoint.
        (config,) = get_json(
            loop, "configmaps", "-n", NAMESPACE, "-l",
            f"partita.dev/model={name},partita.dev/component=stage-server",
        )["items"]  # fmt: skip
        served = json.loads(config["data"]["stage.json"])["source"]
        assert served["sha256"] != status["model"]["digest"] and served["distributed"]
        assert served["uri"].endswith(f"/v1/models/{served['sha256']}")
        # It answers like the float32 model, within int8's error.
        from partita.runtime import Session

        image = _photographs(2)[0]
        got, _ = _infer(entry_url(loop, name), name, image)
        want = Session(open_nsfw()[0]).run({"input_0": image})[OUTPUT]
        assert np.argmax(got) == np.argmax(want) and np.abs(got - want).max() < 0.1
    finally:
        loop.kubectl("delete", "edgemodel", name, "-n", NAMESPACE, "--wait=false", check=False)
        _pool_memory(loop, "edge-b", "2Gi")


SMALL = "open_nsfw_int8.onnx"  # the cascade's small model, in the model store


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """open_nsfw quantized to int8 (static, on photographs): the cascade's small model."""
    import hashlib

    from partita.model.compress import quantize_model
    from partita.model.load import load_model
    from partita.model.samples import Calibration

    quantized = quantize_model(load_model(open_nsfw()[0], SHAPES), Calibration.CAFFE)
    data = quantized.model.SerializeToString()
    path = tmp_path_factory.mktemp("small") / SMALL
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def model_store_files(small_model: tuple[Path, str]) -> dict[str, Path]:
    """The e2e suite's store, with the cascade's small model next to the main one."""
    return {**store_models(), SMALL: small_model[0]}


def test_cascade_answers_at_the_edge_and_offloads_only_unconfident_inputs(
    loop: Any, small_model: tuple[Path, str]
) -> None:
    from partita.runtime import Session

    name = "nsfw-cascade"
    images = _photographs(32)
    small = Session(small_model[0])
    confidence = [float(small.run({"input_0": x})[OUTPUT].max()) for x in images]
    # A threshold between two of the small model's confidences, near their median.
    ranked = sorted(set(confidence))
    threshold = ranked[len(ranked) // 2]
    expected = ["forwarded" if c < threshold else "local" for c in confidence]
    assert 0 < expected.count("forwarded") < len(images)
    try:
        spec = {
            "pools": ["edge-a", "cloud"],
            "privacy": {"rawInputTier": "edge"},
            "partitioning": {"mode": "vertical", "maxStages": 2, "cutCompression": "fp16"},
            "cascade": {
                "model": {"uri": f"file://{STORE}/{SMALL}", "sha256": small_model[1]},
                "output": OUTPUT,
                "threshold": threshold,
                "expectedOffloadRate": 0.9,
            },
        }
        loop.kubectl("apply", "-f", "-", input=edge_model(name, **spec))
        status = eventually(
            lambda: (s := _status(loop, name)).get("phase") == "Ready" and s,
            300,
            "the cascade Ready",
            interval=2,
        )
        plan = status["plan"]
        assert plan["cascade"]["pool"] == "edge-a"
        assert status["model"]["cascade"]["digest"] == small_model[1]
        # Raw input may not leave the edge, and the cloud computes faster: the main model is
        # cut, its first stage at the edge, and only what it computes goes on.
        first, *rest = plan["stages"]
        assert first["pool"] == "edge-a" and "input_0" in first["inputs"]
        assert rest, "the main model is cut"
        for stage in rest:  # only features cross to the cloud
            assert "input_0" not in stage["inputs"]
        cloud = next(s for s in rest if s["pool"] == "cloud")
        assert cloud["compression"] == "fp16"
        assert 0 < cloud["wireBytes"] < 3 * 2**20
        main = Session(open_nsfw()[0])
        url = entry_url(loop, name)
        for image, want in zip(images, expected, strict=True):
            got, params = _infer(url, name, image)
            assert params.get("partita_cascade") == want
            source = small if want == "local" else main
            reference = source.run({"input_0": image})[OUTPUT]
            np.testing.assert_allclose(got, reference, atol=0.02 if want == "local" else 0.05)
        # Prometheus counted the decisions exactly as the inputs fell under the threshold.
        forwarded = expected.count("forwarded") / len(images)
        where = f'namespace="{NAMESPACE}", model="{name}"'

        def counted() -> float | None:
            # One query, so both counts come from the same scrape (two queries may straddle one).
            rows = _prometheus(
                loop, f"sum by (decision) (partita_cascade_requests_total{{{where}}})"
            )
            counts = {r["metric"]["decision"]: float(r["value"][1]) for r in rows}
            every = sum(counts.values())
            if every < len(images):
                return None
            return counts.get("forward", 0.0) / every

        assert eventually(counted, 60, "the decisions in Prometheus") == pytest.approx(forwarded)
        # The planner now plans with the measured ratio, not the declared 0.9.
        measured = eventually(
            lambda: (
                (c := _status(loop, name)["plan"].get("cascade") or {}).get("observedOffloadRate")
                is not None
                and abs(c["offloadRate"] - forwarded) < 0.15
                and c
            ),
            120,
            "the measured offload rate in the plan",
            interval=2,
        )
        assert abs(measured["observedOffloadRate"] - forwarded) < 0.15
        final = _status(loop, name)["plan"]
        assert final["predictedP95Ms"] < plan["predictedP95Ms"]  # fewer go on than declared
        # The compressed cut's measured drop, and the energy per request, predicted and seen.
        assert final["cutAccuracy"]["metric"] == "top1-disagreement"
        assert final["cutAccuracy"]["drop"] <= 0.05
        assert final["predictedEnergyJ"] > 0
        eventually(
            lambda: (_status(loop, name)["plan"].get("observedEnergyJ") or 0) > 0,
            60,
            "the observed energy per request",
        )
    finally:
        loop.kubectl("delete", "edgemodel", name, "-n", NAMESPACE, "--wait=false", check=False)


def _ocr(name: str, priority: int) -> str:
    """An OCR classifier of 3 cores: one fits an edge-b node of 4, two do not."""
    return ocr_model(name, priority=priority, resources={"cpu": 3})


def _deployments(cluster: Any, model: str) -> list[dict[str, Any]]:
    """The model's stage servers (its entry routers stay while it is preempted)."""
    selector = f"partita.dev/model={model},partita.dev/component=stage-server"
    return list(get_json(cluster, "deployments", "-n", NAMESPACE, "-l", selector)["items"])


def test_a_higher_priority_model_preempts_a_serving_one_which_comes_back(loop: Any) -> None:
    # One edge-b node of 4 cores takes one model of 3: the other node is held back.
    nodes = sorted(n.name for n in loop.nodes if n.pool == "edge-b")
    held = nodes[1]
    loop.kubectl("taint", "nodes", held, "partita.dev/held=test:NoSchedule")
    try:
        loop.kubectl("apply", "-f", "-", input=_ocr("ocr-low", 10))
        eventually(lambda: _status(loop, "ocr-low").get("phase") == "Ready", 180, "low Ready")
        loop.kubectl("apply", "-f", "-", input=_ocr("ocr-high", 30))
        seen: dict[str, Any] = {}

        def preempted() -> bool:
            low = _status(loop, "ocr-low")
            high_objects = _deployments(loop, "ocr-high")
            if not _deployments(loop, "ocr-low") and "gone" not in seen:
                # The lower one's servers go only once the higher one's plan is deployed.
                seen["gone"] = bool(high_objects)
            return (
                low.get("phase") == "Unschedulable"
                and _status(loop, "ocr-high").get("phase") == "Ready"
            )

        eventually(preempted, 180, "low preempted and high Ready", interval=1)
        assert seen.get("gone") is True, "the lower model's servers went before the higher's plan"
        low = _status(loop, "ocr-low")
        ready = _condition(low, "Ready")
        assert ready["status"] == "False" and ready["reason"] == "Preempted"
        assert "capacity is short" in ready["message"] and "ocr-high" in ready["message"]
        events = get_json(
            loop,
            "events",
            "-n",
            NAMESPACE,
            "--field-selector",
            "involvedObject.name=ocr-low,reason=Preempted",
        )
        assert events["items"], "a Preempted Event names the reason"
        # Capacity returns: the lower one is placed again.
        loop.kubectl("taint", "nodes", held, "partita.dev/held-")
        held = ""
        back = eventually(
            lambda: (s := _status(loop, "ocr-low")).get("phase") == "Ready" and s,
            180,
            "low Ready again",
            interval=1,
        )
        assert back["plan"]["stages"][0]["nodes"] == [nodes[1]]
        assert _status(loop, "ocr-high").get("phase") == "Ready"
    finally:
        if held:
            loop.kubectl("taint", "nodes", held, "partita.dev/held-", check=False)
        for name in ("ocr-low", "ocr-high"):
            loop.kubectl("delete", "edgemodel", name, "-n", NAMESPACE, "--wait=false", check=False)
