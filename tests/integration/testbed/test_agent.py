"""The test bed agent runs a stage pod as a real partita-server process, reports it like a
kubelet, routes Service traffic to it (entry listeners for REST and gRPC, each container port
on its own local port, and node proxy), restarts it when it crashes or fails its liveness
probe, and removes it when the pod is deleted."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from cluster_helpers import eventually
from partita.runtime import Session
from partita.testbed import processes
from partita.testbed.kubelet import agent as tb_agent
from partita.testbed.kubelet import targets

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TOKEN = "agent-test-token"


@pytest.fixture(scope="module")
def agent_info(cluster: Any) -> Iterator[targets.AgentInfo]:
    """The cluster's agent if `testbed up` started one, else one in this process."""
    with contextlib.suppress(Exception):
        info = targets.load_agent_info(cluster.run_dir)
        if processes.alive(info.pid) and info.pid != os.getpid():
            yield info
            return
    with tb_agent.running(cluster.run_dir):
        yield targets.load_agent_info(cluster.run_dir)


def _adder(path: Path) -> Path:
    const = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(1, 4), "c")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "adder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [const],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    save(model, str(path))
    return path


def _manifests(ns: str, model: Path, node: str) -> list[dict[str, Any]]:
    """ConfigMap, Secret, Deployment and Services as the operator's actuator writes them."""
    name = "adder-r1-s0"
    labels = {
        "app.kubernetes.io/name": "partita-server",
        "partita.dev/component": "stage-server",
        "partita.dev/model": "adder",
        "partita.dev/revision": "1",
        "partita.dev/stage": "0",
        "partita.dev/shard": "0",
    }
    spec = {"model": "adder", "source": {"uri": model.as_uri()}}
    container = {
        "name": "server",
        "image": "partita/server:dev",
        "command": ["partita-server"],
        "args": ["--host", "0.0.0.0", "--port", "8000", "--grpc-port", "8081"],
        "env": [
            {"name": "PARTITA_STAGE_SPEC", "value": "/etc/partita/stage.json"},
            {
                "name": "PARTITA_INTERNAL_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "partita-internal", "key": "token"}},
            },
            {"name": "PARTITA_CPU_LIMIT", "value": "1"},
        ],
        "ports": [
            {"name": "http", "containerPort": 8000},
            {"name": "grpc", "containerPort": 8081},
        ],
        "volumeMounts": [{"name": "stage", "mountPath": "/etc/partita", "readOnly": True}],
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8000}},
        # Liveness only once started: a quarter-core edge node takes 5-15 s to start it.
        "startupProbe": {
            "httpGet": {"path": "/v2/health/live", "port": 8000},
            "periodSeconds": 1,
            "failureThreshold": 60,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": 8000},
            "periodSeconds": 1,
            "timeoutSeconds": 1,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": "500m", "memory": "256Mi"},
            "limits": {"cpu": "1", "memory": "512Mi"},
        },
    }
    service_spec = {
        "selector": {"partita.dev/model": "adder", "partita.dev/stage": "0"},
        "ports": [{"name": "http", "port": 8000, "targetPort": "http"}],
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns},
            "data": {"stage.json": json.dumps(spec)},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "partita-internal", "namespace": ns},
            "stringData": {"token": TOKEN},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "terminationGracePeriodSeconds": 5,
                        "affinity": {
                            "nodeAffinity": {
                                "requiredDuringSchedulingIgnoredDuringExecution": {
                                    "nodeSelectorTerms": [
                                        {
                                            "matchExpressions": [
                                                {
                                                    "key": "kubernetes.io/hostname",
                                                    "operator": "In",
                                                    "values": [node],
                                                }
                                            ]
                                        }
                                    ]
                                }
                            }
                        },
                        "containers": [container],
                        "volumes": [{"name": "stage", "configMap": {"name": name}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": service_spec,
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "adder",
                "namespace": ns,
                "annotations": {"partita.dev/data-source-pool": "edge-a"},
            },
            "spec": {
                **service_spec,
                "ports": [
                    {"name": "http", "port": 8000, "targetPort": "http"},
                    {
                        "name": "grpc",
                        "port": 8081,
                        "targetPort": "grpc",
                        "appProtocol": "kubernetes.io/h2c",
                    },
                ],
            },
        },
    ]


def _pod(cluster: Any, ns: str) -> dict[str, Any] | None:
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", ns, "-l", "partita.dev/model=adder", "-o", "json"
        ).stdout
    )["items"]
    return pods[0] if pods else None


def _ready(pod: dict[str, Any] | None) -> bool:
    conds = ((pod or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _infer_body(x: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }


def _server_pid(pod: dict[str, Any]) -> int:
    cid = pod["status"]["containerStatuses"][0]["containerID"]
    return int(cid.rsplit("/", 1)[1])


def test_stage_pod_runs_serves_restarts_and_goes_away(
    cluster: Any, agent_info: targets.AgentInfo, tmp_path: Path
) -> None:
    ns = f"agent-{uuid.uuid4().hex[:6]}"
    node = next(n.name for n in cluster.nodes if n.pool == "edge-a")
    model = _adder(tmp_path / "adder.onnx")
    cluster.kubectl("create", "namespace", ns)
    try:
        docs = "\n---\n".join(json.dumps(d) for d in _manifests(ns, model, node))
        cluster.kubectl("apply", "-f", "-", input=docs)
        pod = eventually(lambda: (p := _pod(cluster, ns)) and _ready(p) and p, 60, "pod Ready")
        assert pod["spec"]["nodeName"] == node
        assert pod["status"]["phase"] == "Running"
        assert pod["status"]["podIP"]
        pid = _server_pid(pod)
        assert processes.alive(pid)
        if agent_info.sandbox:  # its own mount namespace, its ConfigMap at the mountPath
            assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
            root = Path(f"/proc/{pid}/root/etc/partita/stage.json")
            assert json.loads(root.read_text())["model"] == "adder"

        x = np.array([[1.0, -2.0, 0.5, 10.0]], dtype=np.float32)
        expected = Session(model).run({"x": x})["y"]

        entry = eventually(
            lambda: targets.load_agent_info(cluster.run_dir).services.get(f"{ns}/adder"),
            10,
            "entry listener in services.json",
        )
        import tritonclient.http as triton

        client = triton.InferenceServerClient(entry.removeprefix("http://"))
        inp = triton.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        result = client.infer("adder", [inp])
        np.testing.assert_array_equal(result.as_numpy("y"), expected)
        client.close()

        # The Service's second port: its own local port, a byte forwarder to the pod's.
        grpc_entry = targets.load_agent_info(cluster.run_dir).services[f"{ns}/adder:grpc"]
        assert not grpc_entry.startswith("http") and grpc_entry != entry.removeprefix("http://")
        import tritonclient.grpc as triton_grpc

        gclient = triton_grpc.InferenceServerClient(grpc_entry)
        assert gclient.is_server_ready()
        ginp = triton_grpc.InferInput("x", list(x.shape), "FP32")
        ginp.set_data_from_numpy(x)
        np.testing.assert_array_equal(gclient.infer("adder", [ginp]).as_numpy("y"), expected)
        gclient.close()

        proxy = agent_info.proxies[next(n.name for n in cluster.nodes if n.pool == "cloud")]
        with httpx.Client(proxy=proxy, timeout=30) as http:
            url = f"http://adder-r1-s0.{ns}.svc:8000/v2/models/adder/infer"
            r = http.post(url, json=_infer_body(x))
            assert r.status_code == 200, r.text
            np.testing.assert_array_equal(
                np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(1, 4),
                expected,
            )
            r = http.post(url.replace("adder-r1-s0", "nothing-here"), json=_infer_body(x))
            assert r.status_code == 502 and f"{ns}/nothing-here" in r.json()["error"]

        os.kill(pid, signal.SIGKILL)
        pod = eventually(
            lambda: (
                (p := _pod(cluster, ns))
                and p["status"]["containerStatuses"][0]["restartCount"] >= 1
                and _ready(p)
                and p
            ),
            60,
            "restarted pod Ready again",
        )
        assert pod["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] != 0
        new_pid = _server_pid(pod)
        assert new_pid != pid

        # A hung server fails its liveness probe and is restarted (SIGTERM, then SIGKILL
        # after the pod's grace period: a stopped process cannot act on the SIGTERM).
        restarts = pod["status"]["containerStatuses"][0]["restartCount"]
        os.kill(new_pid, signal.SIGSTOP)
        pod = eventually(
            lambda: (
                (p := _pod(cluster, ns))
                and p["status"]["containerStatuses"][0]["restartCount"] > restarts
                and _ready(p)
                and p
            ),
            60,
            "pod restarted after failing its liveness probe",
        )
        assert not processes.alive(new_pid)
        new_pid = _server_pid(pod)

        cluster.kubectl("delete", "deployment", "adder-r1-s0", "-n", ns, "--wait=false")
        eventually(lambda: _pod(cluster, ns) is None, 30, "pod deleted")
        eventually(lambda: not processes.alive(new_pid), 10, "server process gone")
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
