"""The chart's operator pod on the test bed, as a user installs it: `helm install` runs it as a
local process with in-cluster credentials of the chart's ServiceAccount (a token bound to the
pod, at the standard path in its own mount namespace), its model store claim and Prometheus
reachable by name; deleting the pod stops the process. An image the test bed cannot run says so
in the pod's status."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from cluster_helpers import eventually, get_json
from partita.testbed import binaries, processes, prometheus

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts/partita"
RELEASE = "partita"
NAMESPACE = "partita-tb"
MODELS = "partita-tb-models"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def helm(cluster: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """The helm this checkout builds (the shared bin/ link may point at another build)."""
    return subprocess.run(
        [str(binaries.locate().helm), *args],
        env=cluster.env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )


def _model() -> bytes:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "store",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _store(cluster: Any, directory: Path) -> None:
    """A claim in the release namespace bound to a hostPath volume: the chart's model store."""
    docs = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"{NAMESPACE}-models"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "hostPath": {"path": str(directory), "type": "Directory"},
                "claimRef": {"namespace": NAMESPACE, "name": "models"},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "models", "namespace": NAMESPACE},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": f"{NAMESPACE}-models",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    ]
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))


@pytest.fixture(scope="module")
def release(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The chart installed as the README says, watching one namespace, with a model store."""
    store = tmp_path_factory.mktemp("model-store")
    (store / "tiny.onnx").write_bytes(_model())
    for ns in (NAMESPACE, MODELS):
        cluster.kubectl("create", "namespace", ns)
    cluster.kubectl(
        "label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted"
    )
    _store(cluster, store)
    try:
        helm(
            cluster, "install", RELEASE, str(CHART), "-n", NAMESPACE,
            "--set", f"operator.watchNamespaces={{{MODELS}}}",
            "--set", "modelStore.existingClaim=models",
            "--set", "prometheus.pollInterval=2",
            "--wait", "--timeout", "180s",
        )  # fmt: skip
        yield store
    finally:
        subprocess.run(
            [str(binaries.locate().helm), "uninstall", RELEASE, "-n", NAMESPACE, "--wait"],
            env=cluster.env(),
            capture_output=True,
            check=False,
            timeout=120,
        )
        for ns in (MODELS, NAMESPACE):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        cluster.kubectl("delete", "pv", f"{NAMESPACE}-models", "--wait=false", check=False)


def _operator_pod(cluster: Any) -> dict[str, Any] | None:
    pods = get_json(cluster, "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}")
    ready = [
        p
        for p in pods["items"]
        if not p["metadata"].get("deletionTimestamp")
        and any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p["status"].get("conditions", [])
        )
    ]
    return ready[0] if ready else None


def _pid(pod: dict[str, Any]) -> int:
    return int(pod["status"]["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])


def _inside(pid: int, script: str, cluster: Any) -> str:
    """`script` run in the mount namespace of process `pid`, without our credentials."""
    env = {k: v for k, v in cluster.env().items() if k != "KUBECONFIG"}
    out = subprocess.run(
        ["nsenter", "-t", str(pid), "-m", "--", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout


def test_helm_template_renders_without_a_kube_version() -> None:
    """The chart's kubeVersion (>=1.30) holds against what the test bed's helm assumes."""
    out = subprocess.run(
        [str(binaries.locate().helm), "template", RELEASE, str(CHART)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert any(d and d["kind"] == "Deployment" for d in yaml.safe_load_all(out.stdout))


def test_operator_pod_runs_as_the_chart_service_account(cluster: Any, release: Path) -> None:
    pod = eventually(lambda: _operator_pod(cluster), 120, "operator pod Ready")
    assert pod["status"]["phase"] == "Running"
    assert (
        get_json(cluster, "node", pod["spec"]["nodeName"])["metadata"]["labels"]["partita.dev/tier"]
        == "cloud"
    )
    pid = _pid(pod)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    # the venv's `partita` script (run by its interpreter) with the chart's args
    assert argv[1].endswith(b"/bin/partita") and argv[2] == b"operator", argv
    environ = dict(
        e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if e
    )
    assert "KUBECONFIG" not in environ
    assert environ["KUBERNETES_SERVICE_PORT"] == "443"
    # From inside the pod: the mounted token, the mounted CA, the name every pod dials.
    review = json.loads(
        _inside(
            pid,
            f"{binaries.bin_dir() / 'kubectl'} --kubeconfig=/dev/null "
            "--server=https://kubernetes.default.svc "
            f"--certificate-authority={TOKEN_DIR}/ca.crt "
            f'--token="$(cat {TOKEN_DIR}/token)" auth whoami -o json',
            cluster,
        )
    )
    user = review["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{NAMESPACE}:{RELEASE}"
    assert user["extra"]["authentication.kubernetes.io/pod-name"] == [pod["metadata"]["name"]]
    assert _inside(pid, f"cat {TOKEN_DIR}/namespace", cluster) == NAMESPACE


def test_operator_pod_reads_its_model_store_and_prometheus(cluster: Any, release: Path) -> None:
    """An EdgeModel whose source is in the chart's model store is fetched and profiled by the
    pod, under the chart's RBAC; and the pod's metrics polls reach the test bed's Prometheus."""
    eventually(lambda: _operator_pod(cluster), 120, "operator pod Ready")

    started = dt.datetime.now(dt.UTC)
    data = (release / "tiny.onnx").read_bytes()
    name = f"store-{uuid.uuid4().hex[:6]}"
    manifest = {
        "apiVersion": "partita.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": name, "namespace": MODELS},
        "spec": {
            "source": {
                "uri": "file:///var/lib/partita/models/tiny.onnx",
                "sha256": hashlib.sha256(data).hexdigest(),
            },
            "dataSource": "edge-a",
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def profiled() -> dict[str, str] | None:
        status = get_json(cluster, "em", name, "-n", MODELS).get("status") or {}
        conds = {c["type"]: c["status"] for c in status.get("conditions", [])}
        return conds if conds.get("Profiled") == "True" else None

    conds = eventually(profiled, 90, "EdgeModel fetched from the model store and profiled")
    assert conds["ModelFetched"] == "True"
    # Prometheus logs every query it answers: the chart's queries, asked since the test began.
    wanted = yaml.safe_load((CHART / "values.yaml").read_text())["prometheus"]["queries"]
    log = cluster.run_dir / "prometheus" / prometheus.QUERY_LOG

    def asked() -> set[str]:
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        return {
            q["params"]["query"]
            for q in lines
            if dt.datetime.fromisoformat(q["ts"].replace("Z", "+00:00")) >= started
        }

    eventually(lambda: set(wanted.values()) <= asked(), 30, "the operator pod's Prometheus polls")


def test_deleting_the_pod_stops_its_process(cluster: Any, release: Path) -> None:
    pod = eventually(lambda: _operator_pod(cluster), 120, "operator pod Ready")
    pid = _pid(pod)
    cluster.kubectl("delete", "pod", pod["metadata"]["name"], "-n", NAMESPACE, "--wait=true")
    eventually(lambda: not processes.alive(pid), 30, "the operator process gone")
    again = eventually(
        lambda: (
            (p := _operator_pod(cluster)) and p["metadata"]["uid"] != pod["metadata"]["uid"] and p
        ),
        120,
        "the Deployment's replacement pod Ready",
    )
    assert _pid(again) != pid and processes.alive(_pid(again))


def test_an_image_the_test_bed_cannot_run_is_named_in_the_status(cluster: Any) -> None:
    ns = f"image-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    try:
        cloud = next(n.name for n in cluster.nodes if n.pool == "cloud")
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {"nodeName": cloud, "containers": [{"name": "web", "image": "nginx:1.27"}]},
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))

        def waiting() -> dict[str, str] | None:
            statuses = get_json(cluster, "pod", "web", "-n", ns)["status"].get("containerStatuses")
            state = (statuses or [{}])[0].get("state", {}).get("waiting")
            return state if state and state.get("reason") == "ErrImagePull" else None

        state = eventually(waiting, 30, "ErrImagePull on the pod")
        assert "nginx:1.27" in state["message"] and "partita/operator" in state["message"]
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
