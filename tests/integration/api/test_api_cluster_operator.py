"""The operator, run in-process, on the local cluster: DevicePools count their nodes,
EdgeModels go through their phases with a real ONNX model, a wrong digest fails clearly."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import onnx
import pytest
from api_cluster import OPEN_NSFW_SHA256, edge_model, open_nsfw_path, tiny_model

from cluster_helpers import eventually, get_json

pytestmark = pytest.mark.cluster


def conditions(cluster: Any, name: str, namespace: str) -> dict[str, tuple[str, str]]:
    status = get_json(cluster, "em", name, "-n", namespace).get("status") or {}
    return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions", [])}


@pytest.fixture
def http_models(tmp_path: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving tmp_path."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_devicepools_report_ready_nodes(operator: Any, pools: Any) -> None:
    def ready() -> dict[str, str] | None:
        items = get_json(operator, "devicepools")["items"]
        got = {i["metadata"]["name"]: (i.get("status") or {}).get("ready") for i in items}
        return got if all(got.get(p) for p in ("edge-a", "edge-b", "cloud")) else None

    got = eventually(ready, 60, "DevicePool status")
    assert got["edge-a"] == "2/2" and got["cloud"] == "2/2"
    table = operator.kubectl("get", "devicepools").stdout
    edge_b = next(line.split() for line in table.splitlines() if line.startswith("edge-b"))
    assert edge_b[:4] == ["edge-b", "edge", "2/2", "20"]


def test_node_going_down_is_counted(operator: Any, pools: Any) -> None:
    def edge_a() -> str | None:
        return (get_json(operator, "devicepool", "edge-a").get("status") or {}).get("ready")

    eventually(lambda: edge_a() == "2/2", 60, "edge-a 2/2")
    operator.partita("testbed", "node", "edge-a-1", "--down", "--dir", str(operator.run_dir))
    try:
        eventually(lambda: edge_a() == "1/2", 60, "edge-a 1/2 after edge-a-1 went down")
        pool = get_json(operator, "devicepool", "edge-a")["status"]
        assert pool["readyNodes"] == 1 and pool["totalNodes"] == 2
    finally:
        operator.partita("testbed", "node", "edge-a-1", "--up", "--dir", str(operator.run_dir))
    eventually(lambda: edge_a() == "2/2", 60, "edge-a back to 2/2")


def test_real_model_goes_through_its_phases(operator: Any, api_namespace: str) -> None:
    uri = open_nsfw_path().as_uri()
    manifest = edge_model(
        "nsfw", api_namespace, uri, OPEN_NSFW_SHA256, inputShapes={"input_0": [1, 224, 224, 3]}
    )
    operator.kubectl("apply", "-f", "-", input=manifest)
    got = eventually(
        lambda: (
            (c := conditions(operator, "nsfw", api_namespace)).get("Profiled", ("",))[0] == "True"
            and c
        ),
        180,
        "Profiled=True",
    )
    assert got["ModelFetched"] == ("True", "DigestVerified")
    # Once profiled, the control loop takes the phase on from Pending (it plans next).
    status = eventually(
        lambda: (
            (st := get_json(operator, "em", "nsfw", "-n", api_namespace)["status"])["phase"]
            != "Pending"
            and st
        ),
        60,
        "the control loop taking the model on",
    )
    assert status["phase"] in ("Planning", "Deploying", "Ready", "Unschedulable")
    assert {c["type"] for c in status["conditions"]} >= {"Planned", "Ready"}
    assert status["model"]["inputs"] == [
        {"name": "input_0", "dtype": "float32", "shape": [1, 224, 224, 3]}
    ]
    assert status["model"]["outputs"][0]["shape"] == [1, 2]
    assert status["model"]["sizeBytes"] == open_nsfw_path().stat().st_size
    assert status["model"]["cutPoints"] > 0
    events = get_json(
        operator, "events", "-n", api_namespace, "--field-selector", "involvedObject.name=nsfw"
    )["items"]
    assert {"DigestVerified", "Profiled"} <= {e["reason"] for e in events}
    table = operator.kubectl("get", "em", "nsfw", "-n", api_namespace).stdout.splitlines()
    assert table[0].split()[:2] == ["NAME", "PHASE"] and table[1].split()[1] != "Pending"


def test_wrong_digest_fails_model_fetched(operator: Any, api_namespace: str) -> None:
    wrong = hashlib.sha256(b"not the model").hexdigest()
    manifest = edge_model("wrong", api_namespace, open_nsfw_path().as_uri(), wrong)
    operator.kubectl("apply", "-f", "-", input=manifest)
    got = eventually(
        lambda: conditions(operator, "wrong", api_namespace).get("ModelFetched"),
        60,
        "ModelFetched condition",
    )
    assert got == ("False", "DigestMismatch")
    status = get_json(operator, "em", "wrong", "-n", api_namespace)["status"]
    assert status["phase"] == "Failed"
    assert OPEN_NSFW_SHA256 in status["message"] and "source.sha256" in status["message"]
    events = get_json(
        operator, "events", "-n", api_namespace, "--field-selector", "involvedObject.name=wrong"
    )["items"]
    assert [e["type"] for e in events if e["reason"] == "DigestMismatch"] == ["Warning"]


def test_configmap_and_http_sources(
    operator: Any, api_namespace: str, tmp_path: Path, http_models: str
) -> None:
    # Different weights, so no source is served from another one's cache entry.
    in_configmap, over_http = tiny_model(1), tiny_model(2)
    onnx.checker.check_model(onnx.load_from_string(in_configmap))
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "tiny-model", "namespace": api_namespace},
        "binaryData": {"tiny.onnx": base64.b64encode(in_configmap).decode()},
    }
    operator.kubectl("apply", "-f", "-", input=json.dumps(configmap))
    (tmp_path / "tiny.onnx").write_bytes(over_http)
    sources = {
        "from-cm": (
            f"configmap://{api_namespace}/tiny-model/tiny.onnx",
            hashlib.sha256(in_configmap).hexdigest(),
        ),
        "from-http": (f"{http_models}/tiny.onnx", hashlib.sha256(over_http).hexdigest()),
        "http-404": (f"{http_models}/missing.onnx", hashlib.sha256(b"missing").hexdigest()),
        "other-ns-cm": (
            "configmap://default/tiny-model/tiny.onnx",
            hashlib.sha256(b"elsewhere").hexdigest(),
        ),
    }
    for name, (uri, digest) in sources.items():
        operator.kubectl("apply", "-f", "-", input=edge_model(name, api_namespace, uri, digest))

    def fetched(name: str) -> tuple[str, str] | None:
        return conditions(operator, name, api_namespace).get("ModelFetched")

    for name in sources:
        eventually(lambda n=name: fetched(n), 90, f"{name} ModelFetched")
    assert fetched("from-cm") == ("True", "DigestVerified")
    assert fetched("from-http") == ("True", "DigestVerified")
    assert fetched("http-404") == ("False", "NotFound")
    assert fetched("other-ns-cm") == ("False", "Forbidden")
    profiled = eventually(
        lambda: (
            conditions(operator, "from-http", api_namespace).get("Profiled", ("",))[0] == "True"
        ),
        60,
        "http model profiled",
    )
    assert profiled
