"""The whole product on the local cluster: real apiserver, Prometheus, stage processes,
shaped links. Applying an EdgeModel brings it to Ready with stages that answer like the
whole model, over v2 REST and gRPC; the plan follows the network and node health without
failing requests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from e2e_loop import (
    E2E_LINK,
    NAMESPACE,
    Clients,
    edge_model,
    entry_url,
    grpc_target,
    ocr_model,
    open_nsfw,
    set_links,
)

from cluster_helpers import eventually, get_json, holds_for, settles

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
    # One Deployment per stage server (and the gateway in front of a sharded first stage),
    # pinned to the planned node, owned by the EdgeModel.
    deps = get_json(
        served,
        "deployments",
        "-n",
        NAMESPACE,
        "-l",
        f"partita.dev/model={MODEL},partita.dev/revision={plan['revision']}",
    )
    gateway = len(plan["stages"][0]["shards"]) > 1
    assert len(deps["items"]) == sum(len(s["shards"]) for s in plan["stages"]) + gateway
    for d in deps["items"]:
        assert d["metadata"]["ownerReferences"][0]["kind"] == "EdgeModel"


def test_tritonclient_grpc_works_unchanged_against_the_models_service(served: Any) -> None:
    """What a Triton or KServe user does: the standard gRPC client on the Service's gRPC port."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    client = grpc.InferenceServerClient(grpc_target(served, MODEL))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL)
        meta = client.get_model_metadata(MODEL, as_json=True)
        assert meta["name"] == MODEL
        assert [(t["name"], t["shape"][1:]) for t in meta["inputs"]] == [
            ("input_0", ["224", "224", "3"])  # the batch dimension as the model has it
        ]
        assert OUTPUT in [t["name"] for t in meta["outputs"]]
        image = np.random.default_rng(11).random((1, 224, 224, 3), dtype=np.float32)
        inp = grpc.InferInput("input_0", list(image.shape), "FP32")
        inp.set_data_from_numpy(image)
        got = client.infer(MODEL, [inp], client_timeout=60).as_numpy(OUTPUT)
        assert np.allclose(got, _infer(entry_url(served, MODEL), image))
        wrong_shape = grpc.InferInput("input_0", [1, 3, 224, 224], "FP32")
        wrong_shape.set_data_from_numpy(image.reshape(1, 3, 224, 224))
        unknown = grpc.InferInput("pixels", list(image.shape), "FP32")
        unknown.set_data_from_numpy(image)
        for bad, tensor in ((wrong_shape, "input_0"), (unknown, "pixels")):
            with pytest.raises(InferenceServerException) as err:
                client.infer(MODEL, [bad], client_timeout=60)
            assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert f"'{tensor}'" in str(err.value.message())
    finally:
        client.close()


def _only_revision(cluster: Any, revision: int) -> bool:
    """Whether every stage Deployment of the model belongs to `revision` (the others deleted)."""
    selector = f"partita.dev/model={MODEL},partita.dev/revision"
    deps = get_json(cluster, "deployments", "-n", NAMESPACE, "-l", selector)
    return all(
        d["metadata"]["labels"]["partita.dev/revision"] == str(revision) for d in deps["items"]
    )


def _serving_after(
    cluster: Any, before: dict[str, Any], what: str, off: str = ""
) -> dict[str, Any]:
    def moved() -> dict[str, Any] | None:
        s = _status(cluster)
        plan = s.get("plan") or {}
        if s.get("phase") != "Ready" or plan.get("revision", 0) <= before["revision"]:
            return None
        return plan if all(off not in st["nodes"] for st in plan["stages"]) else None

    # A plan sharded across quarter-core edge boards comes up slowest: a gateway and two
    # shard servers there each fetch the model and cut it (about 110 s from Rescheduling to
    # serving once, after the link dropped to 2 Mbit/s; the cut alone takes about 5 s).
    return dict(eventually(moved, 180, what, interval=0.5))


def _report(what: str, seconds: float, clients: Clients) -> None:
    print(
        f"{what}: new plan serving after {seconds:.1f} s; {clients.ok} requests answered, "
        f"{len(clients.failed)} failed, 4 clients at one request per 2 s each"
    )


def _settled_plan(cluster: Any) -> dict[str, Any]:
    """The plan once it has held Ready for a few polls (an earlier test's change may still
    move it, and a revision on a slow edge node may deploy for longer than those polls)."""

    def plan() -> tuple[str, int]:
        return _status(cluster).get("phase", ""), _revision(cluster)

    deadline = time.monotonic() + 180
    phase, _ = settles(plan, 8, 120, "the plan before the change")
    while phase != "Ready" and time.monotonic() < deadline:
        phase, _ = settles(plan, 8, 120, "the plan before the change")
    assert phase == "Ready"
    return dict(_status(cluster)["plan"])


def _settled_after(cluster: Any, moved: dict[str, Any]) -> int:
    """The revision serving once the plan has stopped moving after `moved` served, with every
    other revision's Deployments deleted."""
    revision = settles(lambda: _revision(cluster), 8, 120, "the plan after the move")
    assert revision >= moved["revision"]
    eventually(lambda: _only_revision(cluster, revision), 90, "old revisions deleted")
    return int(revision)


def test_bandwidth_collapse_moves_the_plan_without_failed_requests(served: Any) -> None:
    before = _settled_plan(served)
    assert "cloud" in str(before["pools"]), f"a plan that crosses the link to collapse: {before}"
    try:
        with Clients(entry_url(served, MODEL), MODEL) as clients:
            eventually(lambda: clients.ok >= 4, 60, "answers before the change")
            changed = time.monotonic()
            set_links(served, "2Mbit", "40ms")
            moved = _serving_after(served, before, "a new plan serving after the bandwidth drop")
            took = time.monotonic() - changed
            # The clients run on through the drain and deletion of the old revision.
            final = _settled_after(served, moved)
    finally:
        set_links(served, *E2E_LINK)
    _report(f"bandwidth {E2E_LINK[0]} -> 2Mbit", took, clients)
    print(f"revisions {before['revision']} -> {moved['revision']} (first move) -> {final}")
    assert clients.ok > 0
    assert clients.failed == [], clients.failed[:3]
    assert moved["pools"] != before["pools"] or moved["stages"] != before["stages"]
    assert moved["predictedP95Ms"] > 0


def _lose_node(
    cluster: Any,
    plan: dict[str, Any],
    node: str,
    check: Callable[[dict[str, Any]], None],
    what: str = "",
) -> None:
    """Down `node` (`what` says more of it in the report) under steady clients until the plan
    has moved off it and `check(moved)` passed, bring it back, and assert that no request
    failed meanwhile."""
    with Clients(entry_url(cluster, MODEL), MODEL) as clients:
        eventually(lambda: clients.ok >= 4, 60, "answers before the node loss")
        try:
            cluster.partita("testbed", "node", node, "--down")
            lost = time.monotonic()
            moved = _serving_after(cluster, plan, f"stages moved off {node}", off=node)
            took = time.monotonic() - lost
            check(moved)
        finally:
            cluster.partita("testbed", "node", node, "--up")
    _report(f"node {node}{what} NotReady", took, clients)
    assert moved["revision"] > plan["revision"]
    assert clients.ok > 0
    assert clients.failed == [], clients.failed[:3]


def test_node_loss_moves_its_stages_without_failed_requests(served: Any) -> None:
    plan = _settled_plan(served)

    def old_revision_deleted(moved: dict[str, Any]) -> None:
        eventually(lambda: _only_revision(served, moved["revision"]), 90, "old revision deleted")

    _lose_node(served, plan, plan["stages"][0]["nodes"][0], old_revision_deleted)


def test_losing_the_operators_node_with_a_stage_moves_the_stage_without_failed_requests(
    served: Any, release: Any
) -> None:
    """The chart's operator and a stage on one cloud node, as the scheduler may place them
    (here the chart's `affinity` value prefers that node), and that node lost: the operator is
    replaced on another node (it tolerates a lost node for 10 s, not Kubernetes' 300) and
    moves the stage while the routers hold the requests."""
    plan = _settled_plan(served)
    node = next(n for st in plan["stages"] for n in st["nodes"] if n.startswith("cloud"))
    prefer = {"weight": 100, "preference": {"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}}  # fmt: skip
    release.upgrade({"affinity": {"nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [prefer]}}})  # fmt: skip
    operator = release.operator_pod()
    assert operator is not None and operator["spec"]["nodeName"] == node, operator
    plan = _settled_plan(served)
    assert node in [n for st in plan["stages"] for n in st["nodes"]], plan

    def operator_replaced(_: dict[str, Any]) -> None:
        operator = release.operator_pod()
        assert operator is not None and operator["spec"]["nodeName"] != node

    _lose_node(served, plan, node, operator_replaced, " with the operator")


def test_prometheus_down_keeps_the_plan_and_says_metrics_are_stale(served: Any) -> None:
    _settled_plan(served)
    served.partita("testbed", "prometheus", "--stop")
    try:
        eventually(
            lambda: _condition(_status(served), "MetricsFresh") == "False", 40, "MetricsFresh=False"
        )
        # The last plan made from fresh metrics.
        before = _revision(served)
        # The network collapses meanwhile, but nothing measured says so: no churn.
        set_links(served, "2Mbit", "40ms")
        # Four polls of the operator: the plan holds.
        holds_for(
            lambda: (s := _status(served))["plan"]["revision"] == before and s["phase"] == "Ready",
            8,
            f"revision {before} serving while Prometheus is down",
        )
    finally:
        set_links(served, *E2E_LINK)
        served.partita("testbed", "prometheus", "--start")
    eventually(
        lambda: _condition(_status(served), "MetricsFresh") == "True", 90, "MetricsFresh=True again"
    )


def _small_model(name: str, priority: int) -> str:
    return ocr_model(name, priority=priority, resources={"cpu": 3})


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

    # The earlier tests' changes (a node back, links restored) may still move the plan once:
    # start from a plan that has held past two cooldowns.
    def plan() -> tuple[str, int]:
        return _status(served).get("phase", ""), _revision(served)

    phase, start = settles(plan, 12, 120, "the plan after the earlier tests")
    assert phase == "Ready"
    served.partita("testbed", "set", "sim", "jitter=0.2", "seed=11")
    revisions = {start}

    def at_most_one_move() -> bool:
        revisions.add(_revision(served))
        return max(revisions) - start <= 1

    try:
        holds_for(at_most_one_move, 60, "at most one plan change under jitter", interval=2)
    finally:
        served.partita("testbed", "set", "sim", "jitter=0")
    assert max(revisions) - start <= 1, sorted(revisions)
