"""The Helm chart on the local cluster: lint, server-side dry run, install under the
restricted Pod Security Standard, the operator pod on a cloud node, least-privilege RBAC that
is still enough for the real operator, and peering that stops a second replica."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_cluster import ROOT, edge_model, tiny_model

from cluster_helpers import eventually, get_json, holds_for

pytestmark = pytest.mark.cluster

CHART = ROOT / "charts/partita"
RELEASE = "partita-it"
NAMESPACE = "partita-system-it"
MODELS = "partita-rbac-it"
SA = f"system:serviceaccount:{NAMESPACE}:{RELEASE}"


def server_version(cluster: Any) -> str:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    return str(version["gitVersion"]).lstrip("v")


def test_helm_lint(crds: Any) -> None:
    out = crds.helm("lint", str(CHART), "--strict")
    assert "0 chart(s) failed" in out.stdout


def test_values_schema_refuses_bad_values(crds: Any) -> None:
    out = crds.helm("lint", str(CHART), "--set", "prometheus.url=ftp://x", check=False)
    assert out.returncode != 0 and "prometheus" in (out.stdout + out.stderr)


def test_chart_crds_identical_to_crds_dir() -> None:
    ours = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    assert ours == chart and ours


@pytest.mark.parametrize("extra", [[], ["--set", "operator.watchNamespaces={default}"]])
def test_template_accepted_by_apiserver(crds: Any, extra: list[str]) -> None:
    rendered = crds.helm(
        "template", RELEASE, str(CHART), "-n", "default", "--kube-version", server_version(crds),
        *extra,
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    out = crds.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)
    assert out.stdout.count("(server dry run)") == len(docs)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "NetworkPolicy"} <= kinds


def test_model_source_values_reach_the_operator_as_its_fetch_reads_them(crds: Any) -> None:
    """modelSources.allowLinkLocal and modelStore become the env `ModelFetcher` defaults from."""
    from partita.kube.fetch import ModelFetcher

    for extra, allow, store in (
        ([], False, None),
        (["--set", "modelSources.allowLinkLocal=true", "--set", "modelStore.existingClaim=m"],
         True, "/var/lib/partita/models"),
    ):  # fmt: skip
        rendered = crds.helm("template", RELEASE, str(CHART), "-n", "default", *extra).stdout
        deployment = next(d for d in yaml.safe_load_all(rendered)
                          if d and d["kind"] == "Deployment")  # fmt: skip
        env = {
            e["name"]: e["value"]
            for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            if "value" in e
        }
        fetcher = ModelFetcher(Path("/nonexistent"), env=env)
        assert fetcher.allow_link_local is allow
        assert fetcher.model_store == (Path(store) if store else None)


@pytest.fixture(scope="module")
def release(crds: Any) -> Iterator[Any]:
    """The chart installed into a namespace that enforces the restricted Pod Security level."""
    crds.kubectl("create", "namespace", NAMESPACE)
    crds.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
    try:
        crds.helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--wait", "--timeout", "180s")
        yield crds
    finally:
        crds.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", check=False)
        crds.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def test_operator_pod_runs_on_a_cloud_node(release: Any) -> None:
    deployment = get_json(release, "deployment", RELEASE, "-n", NAMESPACE)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"

    def running() -> dict[str, Any] | None:
        pods = get_json(
            release, "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}"
        )["items"]
        ok = [p for p in pods if p["status"].get("phase") == "Running"]
        return ok[0] if ok else None

    pod = eventually(running, 120, "operator pod Running")
    node = get_json(release, "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["partita.dev/tier"] == "cloud"
    container = pod["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"


ALLOWED = [
    ("list", "edgemodels.partita.dev", "-A"),
    ("watch", "devicepools.partita.dev", ""),
    ("patch", "edgemodels.partita.dev", "--subresource=status -n default"),
    ("patch", "devicepools.partita.dev", "--subresource=status"),
    ("watch", "nodes", ""),
    ("list", "pods", "-A"),
    ("create", "events", "-n default"),
    ("get", "configmaps", "-n default"),
    ("create", "deployments.apps", "-n default"),
    ("delete", "services", "-n default"),
    ("patch", "clusterkopfpeerings.kopf.dev", ""),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("watch", "namespaces", ""),
]
REFUSED = [
    ("get", "nodes", ""),
    ("get", "edgemodels.partita.dev", "-n default"),
    ("get", "secrets", "-n default"),
    ("list", "secrets", "-A"),
    ("create", "pods", "-n default"),
    ("delete", "edgemodels.partita.dev", "-n default"),
    ("update", "edgemodels.partita.dev", "-n default"),
    ("delete", "devicepools.partita.dev", ""),
    ("patch", "nodes", ""),
    ("delete", "nodes", ""),
    ("create", "daemonsets.apps", "-n default"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", ""),
    ("create", "leases.coordination.k8s.io", f"-n {NAMESPACE}"),
    ("create", "pods/exec", "-n default"),
    ("delete", "namespaces", ""),
]


@pytest.mark.parametrize(("verb", "resource", "where"), ALLOWED + REFUSED)
def test_service_account_permissions(release: Any, verb: str, resource: str, where: str) -> None:
    out = release.kubectl(
        "auth", "can-i", verb, resource, *where.split(), f"--as={SA}", check=False
    )
    expected = "yes" if (verb, resource, where) in ALLOWED else "no"
    assert out.stdout.strip() == expected, (verb, resource, where, out.stdout, out.stderr)


def sa_kubeconfig(cluster: Any, path: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount."""
    token = cluster.kubectl(
        "create", "token", RELEASE, "-n", NAMESPACE, "--duration=1h"
    ).stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    target = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": target}],
        "users": [{"name": "partita", "user": {"token": token}}],
        "contexts": [{"name": "partita", "context": {"cluster": "local", "user": "partita"}}],
        "current-context": "partita",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start_operator(cluster: Any, kubeconfig: Path, log: Path, cache: Path) -> subprocess.Popen:
    exe = ROOT / ".venv/bin/partita"
    args = [str(exe), "operator", "--kubeconfig", str(kubeconfig), "--namespace", MODELS]
    args += ["--peering", "partita", "--cache-dir", str(cache)]
    env = {k: v for k, v in cluster.env().items() if k != "KUBECONFIG"}
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def test_operator_works_with_the_chart_rbac_and_peering(release: Any, tmp_path: Path) -> None:
    cluster = release
    # The chart's own operator pod runs (the test bed's kubelet runs it) and watches every
    # namespace: stop it, so only the two replicas below act in MODELS.
    cluster.kubectl("scale", "deployment", RELEASE, "-n", NAMESPACE, "--replicas=0")
    eventually(
        lambda: not get_json(cluster, "pods", "-n", NAMESPACE)["items"], 60, "operator pod gone"
    )
    cluster.kubectl("create", "namespace", MODELS)
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
               "metadata": {"name": "partita", "namespace": MODELS}}  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=json.dumps(peering))
    # Namespaced permissions are bound cluster-wide by default, so they hold in MODELS too.
    data = tiny_model(3)
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "model", "namespace": MODELS},
        "binaryData": {"m.onnx": base64.b64encode(data).decode()},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(configmap))
    kubeconfig = sa_kubeconfig(cluster, tmp_path / "sa.kubeconfig")
    first = start_operator(cluster, kubeconfig, tmp_path / "first.log", tmp_path / "c1")
    second: subprocess.Popen | None = None
    try:
        uri = f"configmap://{MODELS}/model/m.onnx"
        manifest = edge_model("rbac", MODELS, uri, hashlib.sha256(data).hexdigest())
        cluster.kubectl("apply", "-f", "-", input=manifest)

        def profiled() -> dict[str, Any] | None:
            status = get_json(cluster, "em", "rbac", "-n", MODELS).get("status") or {}
            conds = {c["type"]: c["status"] for c in status.get("conditions", [])}
            return status if conds.get("Profiled") == "True" else None

        eventually(profiled, 90, "EdgeModel profiled by the ServiceAccount's operator")
        events = get_json(
            cluster, "events", "-n", MODELS, "--field-selector", "involvedObject.name=rbac"
        )["items"]
        assert "Profiled" in {e["reason"] for e in events}
        log = (tmp_path / "first.log").read_text()
        assert "403" not in log and "Forbidden" not in log, log[-3000:]

        second = start_operator(cluster, kubeconfig, tmp_path / "second.log", tmp_path / "c2")
        # Same priority: kopf pauses both replicas rather than let two act at once.
        logs = (tmp_path / "first.log", tmp_path / "second.log")
        eventually(
            lambda: (
                all("Pausing" in p.read_text() or "conflicting" in p.read_text() for p in logs)
                and any("Pausing" in p.read_text() for p in logs)
            ),
            90,
            "the replicas seeing each other in the peering and pausing",
        )
        peers = get_json(cluster, "kopfpeering", "partita", "-n", MODELS).get("status") or {}
        assert len(peers) == 2, peers
        # While paused, a new EdgeModel is not touched by either replica.
        cluster.kubectl(
            "apply", "-f", "-",
            input=edge_model("while-paused", MODELS, uri, hashlib.sha256(data).hexdigest()),
        )  # fmt: skip
        # A window in which an unpaused operator would have written status.
        holds_for(
            lambda: "status" not in get_json(cluster, "em", "while-paused", "-n", MODELS),
            5,
            "no status on an EdgeModel while both replicas pause",
        )
    finally:
        for process in (second, first):
            if process is not None:
                stop(process)
        cluster.kubectl("delete", "namespace", MODELS, "--wait=false", check=False)
