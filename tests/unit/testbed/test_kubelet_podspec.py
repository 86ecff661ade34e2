"""The agent's kubelet arithmetic: volumes, env, command line, pod IPs, probes, CPU quotas."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from partita.testbed import agent, cgroup
from partita.testbed.agent import AgentError

TOKEN = "s3cret-token"


def _stores() -> dict[tuple[str, str, str], dict[str, str]]:
    return {
        ("ConfigMap", "models", "m-r1-s0"): {"stage.json": '{"model": "m"}', "other": "x"},
        ("Secret", "models", "partita-internal"): {"token": TOKEN},
    }


def lookup(kind: str, ns: str, name: str) -> Mapping[str, str] | None:
    return _stores().get((kind, ns, name))


def _pod() -> dict[str, Any]:
    """A stage pod as the actuator's contract describes it."""
    return {
        "metadata": {"name": "m-r1-s0-abc", "namespace": "models", "uid": "u-1", "labels": {}},
        "spec": {
            "nodeName": "edge-a-1",
            "volumes": [{"name": "stage", "configMap": {"name": "m-r1-s0"}}],
            "containers": [
                {
                    "name": "server",
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


def test_configmap_volume_is_materialised_and_env_points_at_it(tmp_path: Path) -> None:
    pod = _pod()
    container = pod["spec"]["containers"][0]
    mounts = agent.materialise_volumes(pod, container, tmp_path, lookup)
    env = agent.container_env(pod, container, mounts, lookup, "10.244.0.254")
    spec_file = Path(env["PARTITA_STAGE_SPEC"])
    assert spec_file.is_relative_to(tmp_path)
    assert spec_file.read_text() == '{"model": "m"}'
    assert env["PARTITA_INTERNAL_TOKEN"] == TOKEN
    assert env["GREETING"] == "limit=1 $(HOME)"
    assert env["POD"] == "m-r1-s0-abc"


def test_volume_items_subpath_and_secret_volumes(tmp_path: Path) -> None:
    pod = _pod()
    pod["spec"]["volumes"] = [
        {
            "name": "stage",
            "configMap": {"name": "m-r1-s0", "items": [{"key": "stage.json", "path": "a/s.json"}]},
        },
        {"name": "tok", "secret": {"secretName": "partita-internal"}},
    ]
    container = pod["spec"]["containers"][0]
    container["volumeMounts"] = [
        {"name": "stage", "mountPath": "/etc/partita"},
        {"name": "tok", "mountPath": "/var/run/partita/token", "subPath": "token"},
    ]
    mounts = agent.materialise_volumes(pod, container, tmp_path, lookup)
    assert (mounts["/etc/partita"] / "a" / "s.json").exists()
    assert not (mounts["/etc/partita"] / "other").exists()
    assert mounts["/var/run/partita/token"].read_text() == TOKEN
    assert mounts["/var/run/partita/token"].stat().st_mode & 0o077 == 0


def test_missing_configmap_names_the_pod_and_the_volume(tmp_path: Path) -> None:
    pod = _pod()
    pod["spec"]["volumes"][0]["configMap"]["name"] = "gone"
    with pytest.raises(AgentError, match=r"models/m-r1-s0-abc.*\(stage\).*ConfigMap models/gone"):
        agent.materialise_volumes(pod, pod["spec"]["containers"][0], tmp_path, lookup)
    pod["spec"]["volumes"][0]["configMap"]["optional"] = True
    agent.materialise_volumes(pod, pod["spec"]["containers"][0], tmp_path, lookup)


def test_missing_secret_key_names_the_env_var(tmp_path: Path) -> None:
    pod = _pod()
    container = pod["spec"]["containers"][0]
    container["env"][1]["valueFrom"]["secretKeyRef"]["key"] = "nope"
    with pytest.raises(AgentError, match=r"env\[1\] \(PARTITA_INTERNAL_TOKEN\).*'nope'"):
        agent.container_env(pod, container, {}, lookup)


def test_volume_item_path_cannot_escape(tmp_path: Path) -> None:
    pod = _pod()
    pod["spec"]["volumes"][0]["configMap"]["items"] = [{"key": "other", "path": "../../x"}]
    with pytest.raises(AgentError, match="leaves the volume"):
        agent.materialise_volumes(pod, pod["spec"]["containers"][0], tmp_path, lookup)


def test_rewrite_path_prefers_the_longest_mount() -> None:
    mounts = {"/etc": Path("/l/etc"), "/etc/partita": Path("/l/p")}
    assert agent.rewrite_path("/etc/partita/stage.json", mounts) == "/l/p/stage.json"
    assert agent.rewrite_path("/etc/hosts", mounts) == "/l/etc/hosts"
    assert agent.rewrite_path("/etcetera", mounts) == "/etcetera"
    assert agent.rewrite_path("/etc/partita", mounts) == "/l/p"


def test_env_from_and_secret_data_decoding() -> None:
    secret = {"data": {"token": base64.b64encode(TOKEN.encode()).decode()}}
    assert agent.config_data("Secret", secret) == {"token": TOKEN}
    pod = _pod()
    container = {"name": "c", "envFrom": [{"configMapRef": {"name": "m-r1-s0"}, "prefix": "C_"}]}
    env = agent.container_env(pod, container, {}, lookup)
    assert env == {"C_stage.json": '{"model": "m"}', "C_other": "x"}


def test_server_argv_moves_the_server_to_loopback(tmp_path: Path) -> None:
    (tmp_path / "partita-server").write_text("")
    argv = agent.server_argv(
        ["partita-server"],
        ["--host", "0.0.0.0", "--port", "8000", "--log-level=info"],
        4321,
        tmp_path,
        {},
    )
    assert argv == [
        str(tmp_path / "partita-server"),
        "--host",
        "127.0.0.1",
        "--port",
        "4321",
        "--log-level=info",
    ]
    argv = agent.server_argv(["/bin/sh"], ["--port=80", "-c", "$(X)"], 5, tmp_path, {"X": "y"})
    assert argv == ["/bin/sh", "--port=5", "-c", "y", "--host", "127.0.0.1"]


def test_server_argv_without_a_known_command_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="make install"):
        agent.server_argv(["no-such-server-xyz"], [], 1, tmp_path, {})


def test_allocate_ip_counts_down_from_the_top_of_the_pod_cidr() -> None:
    assert agent.allocate_ip("10.244.3.0/24", set()) == "10.244.3.254"
    assert agent.allocate_ip("10.244.3.0/24", {"10.244.3.254"}) == "10.244.3.253"
    with pytest.raises(AgentError, match="full"):
        agent.allocate_ip("10.0.0.0/30", {"10.0.0.1", "10.0.0.2"})


def test_readiness_probe_and_backoff() -> None:
    probe = agent.readiness_probe(_pod()["spec"]["containers"][0])
    assert probe == agent.Probe("/v2/health/ready", 5.0, 3, 1.0, 0.0)
    assert agent.readiness_probe({"name": "c"}) is None
    assert [agent.backoff(n) for n in (1, 2, 3, 10)] == [0.5, 1.0, 2.0, agent.MAX_BACKOFF_S]


def test_node_speed_and_readiness_from_the_node_object() -> None:
    node = {
        "metadata": {"name": "edge-a-1", "annotations": {"partita.dev/speed": "0.25"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }
    assert agent.node_speed(node) == 0.25 and agent.node_ready(node)
    node["metadata"]["annotations"]["partita.dev/speed"] = "fast"
    node["status"]["conditions"][0]["status"] = "Unknown"
    assert agent.node_speed(node) == 1.0 and not agent.node_ready(node)


def test_quota_follows_speed_limit_and_noisy_neighbour() -> None:
    assert cgroup.quota_cores(0.25) == 0.25
    assert cgroup.quota_cores(1.0, limit_cores=0.5) == 0.5
    assert cgroup.quota_cores(0.25, limit_cores=2.0) == 0.25  # one node core, at node speed
    # 4 edge cores 90 % busy leave 0.4 of a core
    assert cgroup.quota_cores(1.0, None, node_cpus=4, node_utilisation=0.9) == pytest.approx(0.4)
    assert cgroup.quota_cores(1.0, None, node_cpus=4, node_utilisation=0.5) == 1.0
    assert cgroup.quota_us(0.25) == cgroup.PERIOD_US // 4
    assert cgroup.quota_us(0.0) == cgroup.MIN_QUOTA_US


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
