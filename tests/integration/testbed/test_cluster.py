"""The local cluster behaves as a real one: scheduling, node readiness, metrics in Prometheus."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from cluster_helpers import eventually

pytestmark = pytest.mark.cluster


def _prom(url: str, query: str) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def test_nodes_carry_pool_labels_and_k3s_info(cluster) -> None:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    assert set(by_name) == {n.name for n in cluster.nodes}
    for spec in cluster.nodes:
        node = by_name[spec.name]
        labels = node["metadata"]["labels"]
        assert labels["partita.dev/tier"] == spec.tier
        assert labels["partita.dev/pool"] == spec.pool
        assert labels["topology.kubernetes.io/zone"] == spec.zone
        assert "k3s" in node["status"]["nodeInfo"]["kubeletVersion"]
        expected_cpu = "4" if spec.tier == "edge" else "32"
        assert node["status"]["allocatable"]["cpu"] == expected_cpu
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"


def test_deployment_with_edge_selector_lands_only_on_edge_nodes(cluster) -> None:
    """The scheduler honours the selector; the test bed's kubelet then says it cannot run
    busybox (it runs the project's images only), in the pod's status."""
    manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "edge-only", "namespace": "default"},
        "spec": {
            "replicas": 4,
            "selector": {"matchLabels": {"app": "edge-only"}},
            "template": {
                "metadata": {"labels": {"app": "edge-only"}},
                "spec": {
                    "nodeSelector": {"partita.dev/tier": "edge"},
                    "containers": [
                        {
                            "name": "c",
                            "image": "busybox",
                            "resources": {"requests": {"cpu": "100m"}},
                        }
                    ],
                },
            },
        },
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def refused() -> list[dict] | None:
        pods = json.loads(
            cluster.kubectl("get", "pods", "-l", "app=edge-only", "-o", "json").stdout
        )["items"]
        states = [(p["status"].get("containerStatuses") or [{}])[0].get("state", {}) for p in pods]
        ok = [s for s in states if s.get("waiting", {}).get("reason") == "ErrImagePull"]
        return pods if len(ok) == 4 and len(pods) == 4 else None

    pods = eventually(refused, 60, "4 scheduled pods, each refused with ErrImagePull")
    edge = {n.name for n in cluster.nodes if n.tier == "edge"}
    assert {p["spec"]["nodeName"] for p in pods} <= edge
    assert all(p["status"].get("podIP") for p in pods)
    cluster.kubectl("delete", "deployment", "edge-only", "--wait=false")


def test_serviceaccount_tokens_work(cluster) -> None:
    def has_default_sa() -> bool:
        return cluster.kubectl("get", "serviceaccount", "default", check=False).returncode == 0

    eventually(has_default_sa, 30, "the default ServiceAccount")
    token = cluster.kubectl("create", "token", "default", "--duration=10m").stdout.strip()
    who = cluster.kubectl(
        "auth",
        "whoami",
        "--token",
        token,
        "-o",
        "json",
        "--kubeconfig",
        str(cluster.kubeconfig),
        check=False,
    )
    # whoami with a token and the admin cert both present: prefer a clean token-only call.
    info = yaml.safe_load(cluster.kubeconfig.read_text())
    server = info["clusters"][0]["cluster"]["server"]
    ca = info["clusters"][0]["cluster"]["certificate-authority"]
    r = httpx.post(
        f"{server}/apis/authentication.k8s.io/v1/selfsubjectreviews",
        json={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        headers={"Authorization": f"Bearer {token}"},
        verify=ca,
        timeout=10,
    )
    assert r.status_code == 201, (r.text, who.stderr)
    assert r.json()["status"]["userInfo"]["username"] == "system:serviceaccount:default:default"


def test_prometheus_has_node_and_link_series(cluster) -> None:
    names = {n.name for n in cluster.nodes}

    def per_node(query: str) -> dict[str, float] | None:
        res = _prom(cluster.prometheus_url, query)
        got = {r["metric"].get("node"): float(r["value"][1]) for r in res}
        return got if set(got) >= names else None

    mem = eventually(lambda: per_node("node_memory_MemTotal_bytes"), 30, "memory series")
    for n in cluster.nodes:
        assert mem[n.name] == n.memory_bytes
    avail = per_node("node_memory_MemAvailable_bytes")
    assert avail and all(0 < avail[n] <= mem[n] for n in names)
    cpu = eventually(
        lambda: per_node('sum by (node) (rate(node_cpu_seconds_total{mode!="idle"}[10s]))'),
        40,
        "CPU rate series",
    )
    assert all(v >= 0 for v in cpu.values())
    counts = per_node('count by (node) (node_cpu_seconds_total{mode="idle"})')
    assert counts and all(counts[n.name] == n.cpu for n in cluster.nodes)
    rtt = _prom(cluster.prometheus_url, 'probe_icmp_duration_seconds{phase="rtt"}')
    pairs = {(r["metric"]["source_pool"], r["metric"]["target_pool"]) for r in rtt}
    assert ("edge-a", "cloud") in pairs and ("cloud", "edge-b") in pairs
    bw = _prom(cluster.prometheus_url, "iperf3_received_bytes / iperf3_received_seconds")
    assert bw and all(float(r["value"][1]) > 0 for r in bw)


def test_link_change_by_cli_reaches_prometheus(cluster) -> None:
    cluster.partita("testbed", "set", "link=edge-a:cloud", "bandwidth=5Mbit", "rtt=40ms")
    query = (
        'avg(iperf3_received_bytes{source_pool="edge-a",target_pool="cloud"} * 8 '
        '/ iperf3_received_seconds{source_pool="edge-a",target_pool="cloud"})'
    )

    def new_value() -> float | None:
        res = _prom(cluster.prometheus_url, query)
        v = float(res[0]["value"][1]) if res else None
        return v if v is not None and abs(v - 5e6) / 5e6 < 0.05 else None

    eventually(new_value, 30, "bandwidth 5 Mbit/s in Prometheus")
    rtt = eventually(
        lambda: [
            r
            for r in _prom(
                cluster.prometheus_url,
                'avg(probe_icmp_duration_seconds{phase="rtt",source_pool="edge-a",target_pool="cloud"})',
            )
            if abs(float(r["value"][1]) - 0.04) < 0.002
        ],
        30,
        "rtt 40 ms",
    )
    assert rtt
    # Other links keep their values.
    other = _prom(
        cluster.prometheus_url,
        'avg(iperf3_received_bytes{source_pool="edge-b",'
        'target_pool="cloud"} * 8 / iperf3_received_seconds{source_pool="edge-b",'
        'target_pool="cloud"})',
    )
    assert abs(float(other[0]["value"][1]) - 100e6) / 100e6 < 0.05


def test_node_down_and_up(cluster) -> None:
    def ready(name: str) -> str:
        node = json.loads(cluster.kubectl("get", "node", name, "-o", "json").stdout)
        return next(c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready")

    cluster.partita("testbed", "node", "edge-b-2", "--down")
    eventually(lambda: ready("edge-b-2") == "False", 30, "edge-b-2 NotReady")
    cluster.partita("testbed", "node", "edge-b-2", "--up")
    eventually(lambda: ready("edge-b-2") == "True", 60, "edge-b-2 Ready again")


def test_cli_errors_are_one_clear_line(cluster, tmp_path: Path) -> None:
    r = cluster.partita("testbed", "node", "no-such-node", "--down", check=False)
    assert r.returncode == 1
    assert "unknown node 'no-such-node'" in r.stderr and "edge-a-1" in r.stderr
    assert "Traceback" not in r.stderr
    r = cluster.partita("testbed", "set", "link=edge-a:nowhere", "bandwidth=5Mbit", check=False)
    assert r.returncode == 1 and "nowhere" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - at: soon\n    set: link=edge-a:cloud\n")
    r = cluster.partita("testbed", "scenario", str(bad), check=False)
    assert r.returncode == 1 and "steps[0]" in r.stderr and "Traceback" not in r.stderr


def _listeners() -> dict[int, set[int]]:
    """Listening TCP port -> pids holding it."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=False).stdout
    found: dict[int, set[int]] = {}
    for line in filter(str.strip, out.splitlines()):
        port = int(line.split()[3].rsplit(":", 1)[1])
        found.setdefault(port, set()).update(int(p) for p in re.findall(r"pid=(\d+)", line))
    return found


def _listening_ports() -> set[int]:
    return set(_listeners())


def test_up_refuses_taken_port_and_down_leaves_nothing(tmp_path: Path) -> None:
    from partita.testbed import cluster as tb
    from partita.testbed.errors import TestbedError
    from partita.testbed.layout import parse_nodes

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(TestbedError, match=f"port {taken} for kube-apiserver is already taken"):
            tb.up(
                tmp_path / "a",
                parse_nodes("edge=1,cloud=1"),
                apiserver_port=taken,
                log=lambda m: None,
            )
    run_dir = tmp_path / "b"
    info = tb.up(run_dir, parse_nodes("edge=1,cloud=1"), log=lambda m: None)
    pids = [int(f.read_text()) for f in (run_dir / "pids").glob("*.pid")]
    ports = {
        int(u.rsplit(":", 1)[1])
        for u in (info.apiserver_url, info.prometheus_url, info.metrics_url)
    }
    assert len(pids) >= 7 and ports <= _listening_ports()
    tb.down(run_dir)
    assert not any(os.path.exists(f"/proc/{p}") and _not_zombie(p) for p in pids)
    # Nothing we started listens any more (the free ports may be reused by others at once).
    still = {port: holders for port, holders in _listeners().items() if holders & set(pids)}
    assert not still, still
    assert not any(_listeners().get(port, set()) & set(pids) for port in ports)


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_missing_binaries_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "PARTITA_CACHE": str(tmp_path / "empty")}
    exe = Path(__file__).resolve().parents[3] / ".venv" / "bin" / "partita"
    r = subprocess.run(
        [str(exe), "testbed", "up", "--dir", str(tmp_path / "c")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1
    assert "missing binaries" in r.stderr and "make install" in r.stderr
    assert "Traceback" not in r.stderr
