"""The whole product on the local cluster: real apiserver, Prometheus, stage processes,
shaped links. Applying an EdgeModel brings it to Ready with stages that answer like the
whole model; the plan follows the network and node health without failing requests."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from e2e_loop import NAMESPACE, edge_model, entry_url, open_nsfw

from cluster_helpers import eventually, get_json

pytestmark = pytest.mark.cluster

MODEL = "nsfw"
OUTPUT = "4195"  # open_nsfw's softmax output


def _status(cluster: Any, name: str = MODEL) -> dict[str, Any]:
    return get_json(cluster, "edgemodel", name, "-n", NAMESPACE).get("status") or {}


def _condition(status: dict[str, Any], type_: str) -> str | None:
    return next((c["status"] for c in status.get("conditions", []) if c["type"] == type_), None)


def _infer(url: str, image: np.ndarray) -> np.ndarray:
    import tritonclient.http as http

    client = http.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
    try:
        inp = http.InferInput("input_0", list(image.shape), "FP32")
        inp.set_data_from_numpy(image, binary_data=True)
        result = client.infer(MODEL, [inp])
        return np.asarray(result.as_numpy(OUTPUT))
    finally:
        client.close()


@pytest.fixture(scope="module")
def served(loop: Any) -> Any:
    loop.kubectl("apply", "-f", "-", input=edge_model(MODEL))
    eventually(lambda: _status(loop).get("phase") == "Ready", 180, "EdgeModel Ready", interval=1)
    return loop


def _revision(cluster: Any) -> int:
    return int((_status(cluster).get("plan") or {}).get("revision", 0))


def test_ready_with_a_plan_and_answers_like_the_whole_model(served: Any) -> None:
    from partita.runtime import Session

    status = _status(served)
    plan = status["plan"]
    assert plan["stageCount"] >= 1 and plan["predictedP95Ms"] > 0
    assert _condition(status, "Planned") == "True"
    rng = np.random.default_rng(7)
    image = rng.random((1, 224, 224, 3), dtype=np.float32)
    got = _infer(entry_url(served, MODEL), image)
    path, _ = open_nsfw()
    want = Session(path).run({"input_0": image})[OUTPUT]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    # One Deployment per stage server, pinned to the planned node, owned by the EdgeModel.
    deps = get_json(
        served,
        "deployments",
        "-n",
        NAMESPACE,
        "-l",
        f"partita.dev/model={MODEL},partita.dev/revision={plan['revision']}",
    )
    assert len(deps["items"]) == sum(len(s["shards"]) for s in plan["stages"])
    for d in deps["items"]:
        assert d["metadata"]["ownerReferences"][0]["kind"] == "EdgeModel"


class SteadyClient:
    """Sends requests back to back from the data source until stopped; counts failures."""

    def __init__(self, url: str) -> None:
        self.url, self.ok, self.failed = url, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        image = np.random.default_rng(1).random((1, 224, 224, 3), dtype=np.float32)
        while not self._stop.is_set():
            try:
                _infer(self.url, image)
                self.ok += 1
            except Exception as exc:  # every failure is what the test counts
                self.failed.append(repr(exc)[:200])

    def __enter__(self) -> SteadyClient:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(120)


def test_bandwidth_collapse_moves_the_plan_without_failed_requests(served: Any) -> None:
    before = _status(served)["plan"]
    with SteadyClient(entry_url(served, MODEL)) as client:
        time.sleep(2)
        for link in ("link=edge-a:cloud", "link=cloud:edge-a"):
            served.partita("testbed", "set", link, "bandwidth=2Mbit", "rtt=40ms")
        moved = eventually(
            lambda: (
                (s := _status(served)).get("phase") == "Ready"
                and s["plan"]["revision"] > before["revision"]
                and s["plan"]
            ),
            60,
            "a new plan serving after the bandwidth drop",
            interval=1,
        )
        time.sleep(3)
    assert client.ok > 0
    assert client.failed == [], client.failed[:3]
    assert moved["pools"] != before["pools"] or moved["stages"] != before["stages"]
    assert moved["predictedP95Ms"] > 0


def test_node_loss_moves_its_stages(served: Any) -> None:
    plan = _status(served)["plan"]
    node = plan["stages"][0]["nodes"][0]
    served.partita("testbed", "node", node, "--down")
    try:
        moved = eventually(
            lambda: (
                (s := _status(served)).get("phase") == "Ready"
                and s["plan"]["revision"] > plan["revision"]
                and all(node not in st["nodes"] for st in s["plan"]["stages"])
                and s["plan"]
            ),
            60,
            f"stages moved off {node}",
            interval=1,
        )
        assert moved["revision"] > plan["revision"]
    finally:
        served.partita("testbed", "node", node, "--up")


def test_prometheus_down_keeps_the_plan_and_says_metrics_are_stale(served: Any) -> None:
    before = _status(served)["plan"]["revision"]
    served.partita("testbed", "prometheus", "--stop")
    try:
        eventually(
            lambda: _condition(_status(served), "MetricsFresh") == "False", 40, "MetricsFresh=False"
        )
        # The network recovers meanwhile, but nothing measured says so: no churn.
        for link in ("link=edge-a:cloud", "link=cloud:edge-a"):
            served.partita("testbed", "set", link, "bandwidth=100Mbit", "rtt=20ms")
        time.sleep(8)
        status = _status(served)
        assert status["plan"]["revision"] == before
        assert status["phase"] == "Ready"
    finally:
        served.partita("testbed", "prometheus", "--start")
    eventually(
        lambda: _condition(_status(served), "MetricsFresh") == "True", 90, "MetricsFresh=True again"
    )


def _small_model(name: str, priority: int) -> str:
    import json

    from e2e_loop import stored

    uri, digest = stored("ocr_cls.onnx")
    return json.dumps(
        {
            "apiVersion": "partita.dev/v1alpha1",
            "kind": "EdgeModel",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "source": {"uri": uri, "sha256": digest},
                "inputShapes": {"x": [1, 3, 48, 192]},
                "dataSource": "edge-b",
                "pools": ["edge-b"],
                "partitioning": {"mode": "none"},
                "priority": priority,
                "resources": {"cpu": 3},
            },
        }
    )


def test_capacity_short_refuses_the_lowest_priority(served: Any) -> None:
    # Each model wants 3 of an edge-b node's 4 cores; edge-b has two nodes: two fit.
    names = {"ocr-high": 30, "ocr-mid": 20, "ocr-low": 10}
    for name, priority in names.items():
        served.kubectl("apply", "-f", "-", input=_small_model(name, priority))

    def placed() -> dict[str, str] | None:
        p = {n: _status(served, n).get("phase", "") for n in names}
        ok = ("Deploying", "Ready")
        if p["ocr-low"] == "Unschedulable" and p["ocr-high"] in ok and p["ocr-mid"] in ok:
            return p
        return None

    phases = eventually(placed, 120, "two models placed and the lowest refused", interval=1)
    assert phases["ocr-low"] == "Unschedulable"
    low = _status(served, "ocr-low")
    assert "cpu" in low["message"], low["message"]
    events = get_json(
        served,
        "events",
        "-n",
        NAMESPACE,
        "--field-selector",
        "involvedObject.name=ocr-low,reason=Unschedulable",
    )
    assert events["items"], "an Unschedulable Event names the reason"
    for name in names:
        served.kubectl("delete", "edgemodel", name, "-n", NAMESPACE, "--wait=false")


def test_jittering_metrics_move_the_plan_at_most_once(served: Any) -> None:
    # The default minImprovement (0.4) with a short cooldown instead of 120 s, for 60 s
    # instead of 3 minutes: every poll sees every link and node load moved by up to +-20%.
    served.kubectl(
        "patch",
        "edgemodel",
        MODEL,
        "-n",
        NAMESPACE,
        "--type=merge",
        "-p",
        '{"spec": {"rescheduling": {"minImprovement": 0.4, "cooldownSeconds": 5}}}',
    )
    eventually(lambda: _status(served).get("phase") == "Ready", 60, "Ready after the patch")
    time.sleep(6)
    start = _revision(served)
    served.partita("testbed", "set", "sim", "jitter=0.2", "seed=11")
    try:
        revisions = {start}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            revisions.add(_revision(served))
            time.sleep(2)
    finally:
        served.partita("testbed", "set", "sim", "jitter=0")
    assert max(revisions) - start <= 1, sorted(revisions)
