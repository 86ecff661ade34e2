"""What a user's cluster does to Partita, on the chart's operator pod: each kind of model
source served, a tainted edge node, the operator SIGKILLed again and again during rollouts,
the apiserver restarted under traffic, and every API call the operator made checked against
the RBAC the chart grants."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import signal
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from e2e_loop import (
    E2E_LINK,
    NAMESPACE,
    STORE,
    Clients,
    edge_model,
    entry_url,
    ocr_model,
    set_links,
    store_models,
)

from cluster_helpers import eventually, get_json

pytestmark = pytest.mark.cluster

STEADY = "steady"
KILLS = 20
OPERATOR_SA = "system:serviceaccount:partita-system:partita"


def _status(cluster: Any, name: str) -> dict[str, Any]:
    return get_json(cluster, "edgemodel", name, "-n", NAMESPACE).get("status") or {}


def _infer(url: str, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
    try:
        sent = []
        for name, array in inputs.items():
            inp = httpclient.InferInput(name, list(array.shape), "FP32")
            inp.set_data_from_numpy(array, binary_data=True)
            sent.append(inp)
        result = client.infer(model, sent)
        names = [o["name"] for o in result.get_response()["outputs"]]
        return {n: np.asarray(result.as_numpy(n)) for n in names}
    finally:
        client.close()


def _answers_like_the_model(cluster: Any, name: str, model: Path) -> None:
    from partita.runtime import Session

    x = np.random.default_rng(3).random((1, 3, 48, 192), dtype=np.float32)
    got = _infer(entry_url(cluster, name), name, {"x": x})
    want = Session(model).run({"x": x})
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5)


def _own_copy(directory: Path, kind: str) -> Path:
    """The OCR classifier with its doc_string naming `kind`: the same computation under a
    digest of its own, so the operator fetches it from this source instead of finding it in
    its cache (which is keyed by digest)."""
    import onnx

    model = onnx.load(str(store_models()["ocr_cls.onnx"]))
    model.doc_string = f"served from a {kind} source"
    path = directory / f"ocr_cls_{kind}.onnx"
    onnx.save(model, str(path))
    return path


def _ready(cluster: Any, name: str, timeout: float = 180) -> dict[str, Any]:
    return dict(
        eventually(
            lambda: (s := _status(cluster, name)).get("phase") == "Ready" and s,
            timeout,
            f"EdgeModel {name} Ready",
            interval=1,
        )
    )


def _delete(cluster: Any, name: str) -> None:
    cluster.kubectl("delete", "edgemodel", name, "-n", NAMESPACE, "--wait=false", check=False)


@pytest.fixture(scope="module")
def model_store_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The suite's model store plus the store-source test's own copy of the classifier."""
    own = _own_copy(tmp_path_factory.mktemp("own"), "store")
    return {**store_models(), own.name: own}


def _http_server(directory: Path) -> http.server.ThreadingHTTPServer:
    """An http server on loopback serving `directory` (the operator pod's network is this
    machine's)."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("kind", ["configmap", "http", "store"])
def test_each_source_kind_serves(loop: Any, kind: str, tmp_path: Path) -> None:
    """The stage server gets the verified bytes from the operator whatever the source."""
    name = f"ocr-{kind}"
    model = _own_copy(tmp_path, kind)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    server = None
    if kind == "configmap":
        loop.kubectl("delete", "configmap", name, "-n", NAMESPACE, check=False)
        loop.kubectl(
            "create", "configmap", name, "-n", NAMESPACE, f"--from-file={model.name}={model}"
        )
        uri = f"configmap://{NAMESPACE}/{name}/{model.name}"
    elif kind == "http":
        server = _http_server(tmp_path)
        uri = f"http://127.0.0.1:{server.server_address[1]}/{model.name}"
    else:  # the module's store holds the same copy (model_store_files)
        uri = f"file://{STORE}/{model.name}"
    loop.kubectl("apply", "-f", "-", input=ocr_model(name, (uri, digest)))
    try:
        status = _ready(loop, name)
        fetched = next(c for c in status["conditions"] if c["type"] == "ModelFetched")
        assert "found in the cache" not in fetched["message"], fetched["message"]
        _answers_like_the_model(loop, name, model)
    finally:
        _delete(loop, name)
        if server is not None:
            server.shutdown()
            server.server_close()


def _edge_b_nodes(cluster: Any) -> list[str]:
    nodes = get_json(cluster, "nodes", "-l", "partita.dev/pool=edge-b")["items"]
    return [n["metadata"]["name"] for n in nodes]


def test_tainted_edge_nodes_take_only_models_that_tolerate_them(loop: Any) -> None:
    taint = "partita.dev/dedicated=cameras:NoSchedule"
    nodes = _edge_b_nodes(loop)
    for node in nodes:
        loop.kubectl("taint", "nodes", node, taint, "--overwrite")
    tolerating = [
        {"key": "partita.dev/dedicated", "operator": "Equal", "value": "cameras",
         "effect": "NoSchedule"}
    ]  # fmt: skip
    try:
        loop.kubectl("apply", "-f", "-", input=ocr_model("ocr-plain"))
        loop.kubectl(
            "apply",
            "-f",
            "-",
            input=ocr_model("ocr-tolerant", tolerations=tolerating),
        )
        _ready(loop, "ocr-tolerant")
        _answers_like_the_model(loop, "ocr-tolerant", store_models()["ocr_cls.onnx"])
        pods = get_json(loop, "pods", "-n", NAMESPACE, "-l", "partita.dev/model=ocr-tolerant")
        assert pods["items"]
        for pod in pods["items"]:  # stage servers and the entry router alike
            assert pod["spec"]["nodeName"] in nodes
            assert {"key": "partita.dev/dedicated", "operator": "Equal", "value": "cameras",
                    "effect": "NoSchedule"} in pod["spec"]["tolerations"]  # fmt: skip
        plain = eventually(
            lambda: (s := _status(loop, "ocr-plain")).get("phase") == "Unschedulable" and s,
            60,
            "ocr-plain Unschedulable on the tainted pool",
        )
        assert "tolerates" in plain["message"], plain["message"]
    finally:
        for name in ("ocr-plain", "ocr-tolerant"):
            _delete(loop, name)
        for node in nodes:
            loop.kubectl("taint", "nodes", node, "partita.dev/dedicated-", check=False)


@pytest.fixture(scope="module")
def steady(loop: Any) -> Any:
    loop.kubectl("apply", "-f", "-", input=edge_model(STEADY))
    _ready(loop, STEADY)
    return loop


def _operator_process(release: Any, not_pid: int | None) -> int | None:
    """The pid of the operator pod's running process once it is another than `not_pid`."""
    from partita.testbed.errors import TestbedError
    from partita.testbed.release import container_pid

    selector = f"app.kubernetes.io/instance={release.name}"
    listed = json.loads(
        release.kubectl("get", "pods", "-n", release.namespace, "-l", selector, "-o", "json")
    )
    for pod in listed["items"]:
        try:
            pid = container_pid(pod)
        except TestbedError:
            continue
        if pid != not_pid and _alive(pid):
            return pid
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _orphans(cluster: Any, name: str, live: set[int]) -> list[str]:
    """Objects Partita made for the model that are not owned by it or belong to no live
    revision (stage objects carry their revision; the entry router and Services none)."""
    model = get_json(cluster, "edgemodel", name, "-n", NAMESPACE)
    found = []
    for kind in ("deployments", "services", "configmaps", "secrets"):
        items = get_json(cluster, kind, "-n", NAMESPACE, "-l", f"partita.dev/model={name}")
        for item in items["items"]:
            meta = item["metadata"]
            owners = [o["uid"] for o in meta.get("ownerReferences", [])]
            revision = meta.get("labels", {}).get("partita.dev/revision")
            if owners != [model["metadata"]["uid"]] or (
                revision is not None and int(revision) not in live
            ):
                found.append(f"{kind}/{meta['name']} (revision {revision}, owners {owners})")
    return found


def _converged(cluster: Any, release: Any) -> dict[str, Any] | None:
    """The model's status once the operator is back, the model Ready on the current spec and
    every object it owns belongs to a live revision (the serving one, or one rolling out)."""
    if release.operator_pod() is None:
        return None
    model = get_json(cluster, "edgemodel", STEADY, "-n", NAMESPACE)
    status = model.get("status") or {}
    if (
        status.get("phase") != "Ready"
        or status.get("observedGeneration") != model["metadata"]["generation"]
    ):
        return None
    live = {p["revision"] for p in (status.get("plan"), status.get("rollout")) if p}
    return status if not _orphans(cluster, STEADY, live) else None


def test_operator_sigkilled_during_rollouts_loses_nothing(steady: Any, release: Any) -> None:
    rng = random.Random(20)
    placements: dict[int, set[str]] = {}  # revision -> the placements seen under that number

    def note_plan() -> None:
        plan = _status(steady, STEADY).get("plan") or {}
        if plan.get("revision"):
            where = json.dumps([s["nodes"] for s in plan["stages"]])
            placements.setdefault(plan["revision"], set()).add(where)

    pid: int | None = None
    try:
        with Clients(entry_url(steady, STEADY), STEADY) as clients:
            eventually(lambda: clients.ok >= 4, 60, "answers before the first kill")
            for kill in range(KILLS):
                if kill % 4 == 0:  # the link flips: the kills fall into replans and rollouts
                    slow = kill % 8 == 0
                    set_links(steady, *(("2Mbit", "40ms") if slow else E2E_LINK))
                pid = eventually(
                    partial(_operator_process, release, pid), 60, "the operator's process again"
                )
                note_plan()
                time.sleep(rng.uniform(0.2, 4.0))  # a random moment of the operator's life
                os.kill(pid, signal.SIGKILL)
            last_kill = time.monotonic()
            eventually(partial(_operator_process, release, pid), 60, "the operator restarted")
            restarted = time.monotonic()
            status = eventually(
                partial(_converged, steady, release), 90, "converged after the kills"
            )
            took, since_restart = time.monotonic() - last_kill, time.monotonic() - restarted
            note_plan()
    finally:
        set_links(steady, *E2E_LINK)  # the next tests start from a healthy link
    print(
        f"{KILLS} SIGKILLs: converged {took:.1f} s after the last ({since_restart:.1f} s after "
        f"the operator's process was started again, {restarted - last_kill:.1f} s of crash-loop "
        f"back-off); {clients.ok} requests answered, {len(clients.failed)} failed; revisions "
        f"{sorted(placements)}"
    )
    assert clients.failed == [], clients.failed[:3]
    assert status["phase"] == "Ready"  # and, converged, no orphan: see _converged
    duplicated = {rev: where for rev, where in placements.items() if len(where) > 1}
    assert duplicated == {}, "one revision number, two placements"


# Grants the chart makes that the suite's calls do not show, and why they stay.
UNUSED_BY_DESIGN = {
    **{
        ("kopf.dev", "clusterkopfpeerings", verb): "peering while watching every namespace"
        for verb in ("list", "watch", "patch")
    },
    **{
        (group, kind, "create"): "server-side apply that creates an object is authorized as "
        "create (the audit log records the request as a patch)"
        for group, kind in (("", "configmaps"), ("", "services"), ("apps", "deployments"))
    },
}


@pytest.fixture(scope="module", autouse=True)
def audit_from(loop: Any) -> int:
    """Where this module's part of the apiserver's audit log begins (an earlier module's
    uninstall removes its RBAC while its operator still runs: those refusals are not ours)."""
    from partita.testbed.cluster import audit_log

    path = audit_log(loop.run_dir)
    return path.stat().st_size if path.exists() else 0


def _granted(release: Any) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every rule of the chart's ClusterRoles as helm renders
    them for this release."""
    from partita.testbed.release import CHART

    rendered = release._run(
        "helm", "template", release.name, str(CHART), "-n", release.namespace,
        "--set", "operator.watchNamespaces={" + NAMESPACE + "}",
    ).stdout  # fmt: skip
    granted = set()
    for doc in yaml.safe_load_all(rendered):
        if doc and doc.get("kind") in ("ClusterRole", "Role"):
            for rule in doc["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        granted |= {(group, resource, verb) for verb in rule["verbs"]}
    return granted


def test_every_api_call_is_granted_and_every_grant_used(
    loop: Any, release: Any, audit_from: int
) -> None:
    """Run late in the module (and the suite): the calls of every e2e module so far."""
    from partita.testbed.cluster import audit_log

    used: set[tuple[str, str, str]] = set()
    refused = []
    with audit_log(loop.run_dir).open("rb") as log:
        for line in log:
            event = json.loads(line)
            ref = event.get("objectRef")
            if event["user"]["username"] != OPERATOR_SA or not ref or not ref.get("resource"):
                continue
            resource = ref["resource"] + (
                f"/{ref['subresource']}" if ref.get("subresource") else ""
            )
            call = (ref.get("apiGroup", ""), resource, event["verb"])
            used.add(call)
            if log.tell() > audit_from and event.get("responseStatus", {}).get("code") == 403:
                refused.append((*call, ref.get("namespace")))
    granted = _granted(release)
    assert refused == []
    assert used <= granted, sorted(used - granted)
    unused = granted - used - set(UNUSED_BY_DESIGN)
    assert unused == set(), f"granted but never used: {sorted(unused)}"


# Last: once restarted, the apiserver answers 403 ("clusterrole ... not found") until its RBAC
# caches fill, which says nothing of the chart's RBAC checked above.
def test_apiserver_restart_keeps_serving_and_the_operator_resumes(steady: Any) -> None:
    with Clients(entry_url(steady, STEADY), STEADY) as clients:
        eventually(lambda: clients.ok >= 4, 60, "answers before the restart")
        steady.partita("testbed", "apiserver", "--restart")
        answered = clients.ok
        eventually(lambda: clients.ok > answered + 4, 60, "answers after the restart")
        # The operator's watches came back: it sees a change made after the restart and
        # writes the status that follows from it.
        steady.kubectl(
            "patch", "edgemodel", STEADY, "-n", NAMESPACE, "--type=merge",
            "-p", '{"spec": {"rescheduling": {"cooldownSeconds": 7}}}',
        )  # fmt: skip

        def followed() -> bool:
            model = get_json(steady, "edgemodel", STEADY, "-n", NAMESPACE)
            status = model.get("status") or {}
            return bool(
                status.get("observedGeneration") == model["metadata"]["generation"]
                and status.get("phase") == "Ready"
            )

        eventually(followed, 60, "the status following the spec after the apiserver restart")
    assert clients.failed == [], clients.failed[:3]
