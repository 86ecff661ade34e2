"""The kubelet's reading of a pod spec: volumes (ConfigMap, Secret, downward API, projected
tokens, hostPath, claims), env, probes, pod IPs and CPU quotas."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from partita.testbed import cgroup
from partita.testbed.kubelet import podspec
from partita.testbed.kubelet.podspec import CONFIG_ERROR, PodError

TOKEN = "s3cret-token"


class DictSources:
    """ConfigMaps, Secrets and claims from dicts, as the API server would give them."""

    def __init__(self, claims: Mapping[str, Path] | None = None) -> None:
        self.stores = {
            ("ConfigMap", "models", "m-r1-s0"): {"stage.json": '{"model": "m"}', "other": "x"},
            ("ConfigMap", "models", "kube-root-ca.crt"): {"ca.crt": "-----CA-----"},
            ("Secret", "models", "partita-internal"): {"token": TOKEN},
        }
        self.claims = dict(claims or {})

    def data(self, kind: str, namespace: str, name: str) -> Mapping[str, str] | None:
        return self.stores.get((kind, namespace, name))

    def claim_path(self, namespace: str, claim: str) -> Path:
        if claim not in self.claims:
            raise PodError(f"PersistentVolumeClaim {namespace}/{claim} not found")
        return self.claims[claim]


def _pod() -> dict[str, Any]:
    """A stage pod as the actuator renders it."""
    return {
        "metadata": {"name": "m-r1-s0-abc", "namespace": "models", "uid": "u-1", "labels": {}},
        "spec": {
            "nodeName": "edge-a-1",
            "serviceAccountName": "partita",
            "volumes": [{"name": "stage", "configMap": {"name": "m-r1-s0"}}],
            "containers": [
                {
                    "name": "server",
                    "image": "partita/server:0.1.0",
                    "command": ["partita-server"],
                    "args": ["--host", "0.0.0.0", "--port", "8000"],
                    "env": [
                        {"name": "PARTITA_STAGE_SPEC", "value": "/etc/partita/stage.json"},
                        {
                            "name": "PARTITA_INTERNAL_TOKEN",
                            "valueFrom": {
                                "secretKeyRef": {"name": "partita-internal", "key": "token"}
                            },
                        },
                        {"name": "PARTITA_CPU_LIMIT", "value": "1"},
                        {"name": "GREETING", "value": "limit=$(PARTITA_CPU_LIMIT) $$(HOME)"},
                        {
                            "name": "POD",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        },
                    ],
                    "volumeMounts": [{"name": "stage", "mountPath": "/etc/partita"}],
                    "readinessProbe": {
                        "httpGet": {"path": "/v2/health/ready", "port": 8000},
                        "periodSeconds": 5,
                    },
                    "resources": {"limits": {"cpu": "500m", "memory": "512Mi"}},
                }
            ],
        },
    }


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod["spec"]["containers"][0]
    return container


def test_configmap_volume_is_written_and_env_can_point_at_it(tmp_path: Path) -> None:
    pod = _pod()
    volumes = podspec.materialise_volumes(pod, _container(pod), tmp_path, DictSources())
    assert [(m.path, m.read_only) for m in volumes.mounts] == [("/etc/partita", False)]
    assert (volumes.mounts[0].source / "stage.json").read_text() == '{"model": "m"}'
    env = podspec.container_env(pod, _container(pod), DictSources(), "10.244.0.254")
    assert env["PARTITA_STAGE_SPEC"] == "/etc/partita/stage.json"  # as the pod spec says
    assert env["PARTITA_INTERNAL_TOKEN"] == TOKEN
    assert env["GREETING"] == "limit=1 $(HOME)"
    assert env["POD"] == "m-r1-s0-abc"
    # Without a mount namespace, the path is pointed at the local copy instead.
    local = podspec.container_env(pod, _container(pod), DictSources(), rewrite=volumes.by_path())
    assert Path(local["PARTITA_STAGE_SPEC"]).read_text() == '{"model": "m"}'


def test_volume_items_subpath_and_secret_volumes(tmp_path: Path) -> None:
    pod = _pod()
    pod["spec"]["volumes"] = [
        {
            "name": "stage",
            "configMap": {"name": "m-r1-s0", "items": [{"key": "stage.json", "path": "a/s.json"}]},
        },
        {"name": "tok", "secret": {"secretName": "partita-internal"}},
    ]
    _container(pod)["volumeMounts"] = [
        {"name": "stage", "mountPath": "/etc/partita", "readOnly": True},
        {"name": "tok", "mountPath": "/var/run/partita/token", "subPath": "token"},
    ]
    mounts = podspec.materialise_volumes(pod, _container(pod), tmp_path, DictSources()).by_path()
    assert (mounts["/etc/partita"] / "a" / "s.json").exists()
    assert not (mounts["/etc/partita"] / "other").exists()
    assert mounts["/var/run/partita/token"].read_text() == TOKEN
    assert mounts["/var/run/partita/token"].stat().st_mode & 0o077 == 0


def test_the_service_account_volume_admission_adds(tmp_path: Path) -> None:
    """kube-api-access-*: a projected token for the pod's ServiceAccount, the cluster CA and
    the namespace, at the path in-cluster clients read."""
    pod = _pod()
    pod["spec"]["volumes"].append(
        {
            "name": "kube-api-access-x1",
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {
                        "configMap": {
                            "name": "kube-root-ca.crt",
                            "items": [{"key": "ca.crt", "path": "ca.crt"}],
                        }
                    },
                    {
                        "downwardAPI": {
                            "items": [
                                {
                                    "path": "namespace",
                                    "fieldRef": {"fieldPath": "metadata.namespace"},
                                }
                            ]
                        }
                    },
                ]
            },
        }
    )
    where = "/var/run/secrets/kubernetes.io/serviceaccount"
    _container(pod)["volumeMounts"].append(
        {"name": "kube-api-access-x1", "mountPath": where, "readOnly": True}
    )
    volumes = podspec.materialise_volumes(pod, _container(pod), tmp_path, DictSources())
    local = volumes.by_path()[where]
    assert (local / "ca.crt").read_text() == "-----CA-----"
    assert (local / "namespace").read_text() == "models"
    assert volumes.tokens == (podspec.TokenProjection(local / "token", "partita", None, 3607),)
    assert not (local / "token").exists()  # the token keeper writes it, with a TokenRequest


def test_host_path_and_claim_volumes_are_local_directories(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    pod = _pod()
    pod["spec"]["volumes"] += [
        {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
        {"name": "host", "hostPath": {"path": str(tmp_path / "made"), "type": "DirectoryOrCreate"}},
    ]
    _container(pod)["volumeMounts"] += [
        {"name": "models", "mountPath": "/var/lib/partita/models"},
        {"name": "host", "mountPath": "/data"},
    ]
    sources = DictSources({"models": store})
    mounts = podspec.materialise_volumes(pod, _container(pod), tmp_path / "pod", sources).mounts
    by_path = {m.path: m for m in mounts}
    assert by_path["/var/lib/partita/models"] == podspec.Mount(
        "/var/lib/partita/models", store, read_only=True
    )
    assert by_path["/data"].source == tmp_path / "made" and (tmp_path / "made").is_dir()
    pod["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"] = "gone"
    with pytest.raises(PodError, match="PersistentVolumeClaim models/gone"):
        podspec.materialise_volumes(pod, _container(pod), tmp_path / "pod", sources)


def test_missing_configmap_names_the_pod_and_the_volume(tmp_path: Path) -> None:
    pod = _pod()
    pod["spec"]["volumes"][0]["configMap"]["name"] = "gone"
    with pytest.raises(
        PodError, match=r"models/m-r1-s0-abc.*\(stage\).*ConfigMap models/gone"
    ) as e:
        podspec.materialise_volumes(pod, _container(pod), tmp_path, DictSources())
    assert e.value.reason == CONFIG_ERROR
    pod["spec"]["volumes"][0]["configMap"]["optional"] = True
    podspec.materialise_volumes(pod, _container(pod), tmp_path, DictSources())


def test_unsupported_volume_source_is_named(tmp_path: Path) -> None:
    pod = _pod()
    pod["spec"]["volumes"][0] = {"name": "stage", "csi": {"driver": "x"}}
    with pytest.raises(PodError, match="volume source csi is not supported"):
        podspec.materialise_volumes(pod, _container(pod), tmp_path, DictSources())


def test_missing_secret_key_names_the_env_var() -> None:
    pod = _pod()
    _container(pod)["env"][1]["valueFrom"]["secretKeyRef"]["key"] = "nope"
    with pytest.raises(PodError, match=r"env\[1\] \(PARTITA_INTERNAL_TOKEN\).*'nope'"):
        podspec.container_env(pod, _container(pod), DictSources())


def test_volume_item_path_cannot_escape(tmp_path: Path) -> None:
    pod = _pod()
    pod["spec"]["volumes"][0]["configMap"]["items"] = [{"key": "other", "path": "../../x"}]
    with pytest.raises(PodError, match="leaves the volume"):
        podspec.materialise_volumes(pod, _container(pod), tmp_path, DictSources())


def test_rewrite_path_prefers_the_longest_mount() -> None:
    mounts = {"/etc": Path("/l/etc"), "/etc/partita": Path("/l/p")}
    assert podspec.rewrite_path("/etc/partita/stage.json", mounts) == "/l/p/stage.json"
    assert podspec.rewrite_path("/etc/hosts", mounts) == "/l/etc/hosts"
    assert podspec.rewrite_path("/etcetera", mounts) == "/etcetera"
    assert podspec.rewrite_path("/etc/partita", mounts) == "/l/p"


def test_env_from_and_secret_data_decoding() -> None:
    secret = {"data": {"token": base64.b64encode(TOKEN.encode()).decode()}}
    assert podspec.config_data("Secret", secret) == {"token": TOKEN}
    pod = _pod()
    container = {"name": "c", "envFrom": [{"configMapRef": {"name": "m-r1-s0"}, "prefix": "C_"}]}
    env = podspec.container_env(pod, container, DictSources())
    assert env == {"C_stage.json": '{"model": "m"}', "C_other": "x"}


def test_allocate_ip_counts_down_from_the_top_of_the_pod_cidr() -> None:
    assert podspec.allocate_ip("10.244.3.0/24", set()) == "10.244.3.254"
    assert podspec.allocate_ip("10.244.3.0/24", {"10.244.3.254"}) == "10.244.3.253"
    with pytest.raises(PodError, match="full"):
        podspec.allocate_ip("10.0.0.0/30", {"10.0.0.1", "10.0.0.2"})


def test_probes_and_backoff() -> None:
    container = _container(_pod())
    assert podspec.probe(container, "readinessProbe") == podspec.Probe(
        "/v2/health/ready", 5.0, 3, 1.0, 0.0
    )
    assert podspec.probe(container, "livenessProbe") is None
    container["livenessProbe"] = {"tcpSocket": {"port": 8000}, "initialDelaySeconds": 10}
    assert podspec.probe(container, "livenessProbe") == podspec.Probe(None, initial_delay_s=10)
    container["livenessProbe"] = {"exec": {"command": ["true"]}}
    with pytest.raises(PodError, match="livenessProbe with exec is not supported"):
        podspec.probe(container, "livenessProbe")
    assert [podspec.backoff(n) for n in (1, 2, 3, 10)] == [0.5, 1.0, 2.0, podspec.MAX_BACKOFF_S]


def test_node_speed_and_readiness_from_the_node_object() -> None:
    node = {
        "metadata": {"name": "edge-a-1", "annotations": {"partita.dev/speed": "0.25"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }
    assert podspec.node_speed(node) == 0.25 and podspec.node_ready(node)
    node["metadata"]["annotations"]["partita.dev/speed"] = "fast"
    node["status"]["conditions"][0]["status"] = "Unknown"
    assert podspec.node_speed(node) == 1.0 and not podspec.node_ready(node)


def test_quota_follows_speed_limit_and_noisy_neighbour() -> None:
    assert cgroup.quota_cores(0.25) == 0.25
    assert cgroup.quota_cores(1.0, limit_cores=0.5) == 0.5
    assert cgroup.quota_cores(0.25, limit_cores=2.0) == 0.25  # one node core, at node speed
    # 4 edge cores 90 % busy leave 0.4 of a core
    assert cgroup.quota_cores(1.0, None, node_cpus=4, node_utilisation=0.9) == pytest.approx(0.4)
    assert cgroup.quota_cores(1.0, None, node_cpus=4, node_utilisation=0.5) == 1.0
    assert cgroup.quota_us(0.25) == cgroup.PERIOD_US // 4
    assert cgroup.quota_us(0.0) == cgroup.MIN_QUOTA_US
    assert podspec.cpu_limit(_container(_pod())) == 0.5


def test_cgroup_detection_uses_a_writable_v1_tree(tmp_path: Path) -> None:
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("-1")
    backend = cgroup.detect(tmp_path / "run", v1_root=v1, v2_roots=())
    assert backend is not None and backend.version == 1 and backend.parent.parent == v1
    group = backend.parent / "pod-x"
    group.mkdir()
    backend.set_quota(group, 25_000)
    assert (group / "cpu.cfs_quota_us").read_text() == "25000"


def test_cgroup_v2_needs_the_cpu_controller(tmp_path: Path) -> None:
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("hugetlb")
    assert cgroup.detect(tmp_path / "run", v1_root=tmp_path / "none", v2_roots=(v2,)) is None
    (v2 / "cgroup.controllers").write_text("cpu memory")
    backend = cgroup.detect(tmp_path / "run", v1_root=tmp_path / "none", v2_roots=(v2,))
    assert backend is not None and backend.version == 2
    group = backend.parent / "pod-y"
    group.mkdir()
    backend.set_quota(group, 50_000)
    assert (group / "cpu.max").read_text() == f"50000 {cgroup.PERIOD_US}"


def test_limiter_without_cgroups_warns_once_and_does_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = cgroup.CpuLimiter(None)
    assert limiter.place("uid", 1, 0.5) is False
    limiter.update("uid", 0.3)
    limiter.remove("uid")
    assert sum("no writable cpu cgroup" in r.message for r in caplog.records) == 1
