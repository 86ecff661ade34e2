"""Bring the local cluster up and down: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok (simulated edge and cloud nodes), the metrics simulator and Prometheus.

Everything lives in one run directory (certificates, kubeconfig, data, logs, pid files,
`status.json`), so `status` and `down` work from any shell and two run directories never
collide (every port is picked free, or checked when given).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from partita.api import labels
from partita.testbed import binaries, pki, processes
from partita.testbed.errors import TestbedError
from partita.testbed.layout import POD_CIDR, Layout, NodeSpec, pod_cidr

Log = Callable[[str], None]

NOT_READY_LABEL = "node-not-ready.stage.kwok.x-k8s.io"
K3S_VERSION = f"{binaries.KUBE_VERSION}+k3s1"
SERVICE_CIDR = "10.96.0.0/16"
HTTPS_PORT = 443
# The InternalIP kwok gives every simulated node: this machine, as the cluster sees it. The
# agent dials 127.0.0.1 for an endpoint at this address (the apiserver refuses loopback ones).
NODE_IP = "10.240.0.1"
# The test bed's Prometheus as pods reach it: the Service name the chart's prometheus.url
# defaults to (prometheus-community's chart names its server so).
PROMETHEUS_SERVICE = ("monitoring", "prometheus-server", 9090)


def default_run_dir(name: str = "default") -> Path:
    return binaries.cache_dir() / "testbed" / name


@dataclass(frozen=True)
class ClusterInfo:
    run_dir: Path
    kubeconfig: Path
    apiserver_url: str
    prometheus_url: str
    metrics_url: str
    state_file: Path
    nodes: tuple[NodeSpec, ...]
    # The `kubernetes` Service as pods reach it (KUBERNETES_SERVICE_HOST/PORT, and the address
    # kubernetes.default.svc resolves to in their /etc/hosts): a loopback address of this
    # cluster that the agent forwards to the apiserver.
    service_host: str = "127.0.0.1"
    service_port: int = HTTPS_PORT

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "kubeconfig": str(self.kubeconfig),
            "apiserver_url": self.apiserver_url,
            "prometheus_url": self.prometheus_url,
            "metrics_url": self.metrics_url,
            "state_file": str(self.state_file),
            "nodes": [asdict(n) for n in self.nodes],
            "service_host": self.service_host,
            "service_port": self.service_port,
        }

    @staticmethod
    def from_json(doc: dict[str, Any]) -> ClusterInfo:
        return ClusterInfo(
            Path(doc["run_dir"]),
            Path(doc["kubeconfig"]),
            doc["apiserver_url"],
            doc["prometheus_url"],
            doc["metrics_url"],
            Path(doc["state_file"]),
            tuple(NodeSpec(**n) for n in doc["nodes"]),
            doc["service_host"],
            int(doc["service_port"]),
        )


def load_info(run_dir: Path) -> ClusterInfo:
    path = run_dir / "status.json"
    if not path.exists():
        raise TestbedError(f"no local cluster in {run_dir}: run `partita testbed up` first")
    try:
        return ClusterInfo.from_json(json.loads(path.read_text()))
    except KeyError as exc:
        raise TestbedError(
            f"{path} was written by an older test bed (no {exc}); "
            "`partita testbed down` and `up` again"
        ) from None


def _client_ssl(p: pki.Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(p.ca_cert))
    ctx.load_cert_chain(str(p.admin_cert), str(p.admin_key))
    return ctx


def _wait_http(
    url: str,
    what: str,
    proc: processes.Process,
    timeout: float,
    verify: ssl.SSLContext | bool = False,
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        processes.ensure_running(proc)
        try:
            r = httpx.get(url, verify=verify, timeout=2.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise TestbedError(
        f"{what} did not become ready within {timeout:.0f} s ({last}); see {proc.log}"
    )


def up(
    run_dir: Path,
    layout: Layout,
    *,
    apiserver_port: int | None = None,
    prometheus_port: int | None = None,
    scrape_interval: float = 2.0,
    with_agent: bool = True,
    log: Log = print,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> ClusterInfo:
    """Start every process, create the nodes, wait until they are Ready and scraped."""
    from partita.testbed import prometheus, simstate

    if (run_dir / "status.json").exists() and any(
        processes.alive(int(f.read_text() or 0)) for f in (run_dir / "pids").glob("*.pid")
    ):
        raise TestbedError(
            f"a local cluster is already running in {run_dir}; "
            "`partita testbed down` first, or use another --dir"
        )
    bins = binaries.locate()
    if apiserver_port is not None:
        processes.check_port_free(apiserver_port, "kube-apiserver")
    if prometheus_port is not None:
        processes.check_port_free(prometheus_port, "Prometheus")
    processes.stop_all(run_dir)
    for sub in ("etcd", "prometheus"):
        _rmtree(run_dir / sub)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    service_host, service_port = kubernetes_service_address(run_dir)
    p = pki.generate(run_dir / "pki", now(), extra_ips=(service_host,))
    ports = {
        k: processes.free_port() for k in ("etcd", "etcd-peer", "kcm", "sched", "kwok", "metrics")
    }
    ports["apiserver"] = apiserver_port or processes.free_port()
    ports["prometheus"] = prometheus_port or processes.free_port()
    api_url = f"https://127.0.0.1:{ports['apiserver']}"
    kubeconfig = pki.write_kubeconfig(run_dir / "kubeconfig", p, api_url)
    try:
        _start_control_plane(bins, run_dir, p, ports, kubeconfig, log)
        _create_nodes(kubeconfig, layout.nodes, log)
        state_file = run_dir / "sim-state.json"
        simstate.save(state_file, simstate.SimState.from_layout(layout))
        sim = processes.start(
            "metricsim",
            [
                sys.executable,
                "-m",
                "partita.testbed.metricsim",
                "--state",
                str(state_file),
                "--port",
                str(ports["metrics"]),
            ],
            run_dir,
        )
        metrics_url = f"http://127.0.0.1:{ports['metrics']}"
        _wait_http(f"{metrics_url}/metrics", "the metrics simulator", sim, 30)
        log(f"  metrics simulator on {metrics_url}")
        config = prometheus.write_config(
            run_dir / "prometheus", [f"127.0.0.1:{ports['metrics']}"], scrape_interval
        )
        argv = prometheus.command(
            bins.prometheus, config, run_dir / "prometheus" / "data", ports["prometheus"]
        )
        (run_dir / "prometheus" / "argv.json").write_text(json.dumps(argv))
        prom = processes.start("prometheus", argv, run_dir)
        prom_url = f"http://127.0.0.1:{ports['prometheus']}"
        _wait_http(f"{prom_url}/-/ready", "Prometheus", prom, 60)
        _publish_prometheus(kubeconfig, ports["prometheus"])
        ns, svc, port = PROMETHEUS_SERVICE
        log(f"  Prometheus on {prom_url} (pods: http://{svc}.{ns}.svc:{port})")
        _wait_nodes_ready(kubeconfig, [n.name for n in layout.nodes], timeout=60)
        log(f"  {len(layout.nodes)} nodes Ready ({', '.join(layout.pools)})")
    except BaseException:
        processes.stop_all(run_dir)
        raise
    info = ClusterInfo(
        run_dir,
        kubeconfig,
        api_url,
        prom_url,
        metrics_url,
        state_file,
        layout.nodes,
        service_host,
        service_port,
    )
    (run_dir / "status.json").write_text(json.dumps(info.to_json(), indent=2))
    if with_agent:
        try:
            agent = processes.start(
                "agent",
                [sys.executable, "-m", "partita.testbed.kubelet", "--run-dir", str(run_dir)],
                run_dir,
            )
            _wait_file(run_dir / "services.json", agent, 30)
            log("  agent running the nodes' pods as local processes")
        except BaseException:
            processes.stop_all(run_dir)
            raise
    log(f"==> local cluster up in {time.monotonic() - started:.1f} s")
    return info


def kubernetes_service_address(run_dir: Path) -> tuple[str, int]:
    """A loopback address of its own for this cluster's `kubernetes` Service, port 443 when
    this process may bind it (root), else a free port: 127.x.y.z from the run directory's
    hash, the next one when taken (two clusters never share it)."""
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).digest()
    for i in range(0, 30, 3):
        host = f"127.{64 + digest[i] % 128}.{digest[i + 1]}.{1 + digest[i + 2] % 254}"
        for port in (HTTPS_PORT, 0) if os.geteuid() == 0 else (0,):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return host, int(s.getsockname()[1])
    raise TestbedError("no free loopback address for the kubernetes Service (tried 10)")


def _publish_prometheus(kubeconfig: Path, port: int) -> None:
    """A selectorless Service whose EndpointSlice is the local Prometheus (at the nodes' IP:
    this machine), so pods reach it by name through the agent's proxy, as a cluster's own."""
    from kubernetes import client, config

    ns, name, service_port = PROMETHEUS_SERVICE
    api = config.new_client_from_config(config_file=str(kubeconfig))
    # Any: the manifests are plain dicts, which the client sends as they are.
    core: Any = client.CoreV1Api(api)
    discovery: Any = client.DiscoveryV1Api(api)
    core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_service(
        ns,
        {
            "metadata": {"name": name, "labels": {labels.MANAGED_BY: "partita-testbed"}},
            "spec": {"ports": [{"name": "http", "port": service_port, "protocol": "TCP"}]},
        },
    )
    discovery.create_namespaced_endpoint_slice(
        ns,
        {
            "metadata": {
                "name": f"{name}-local",
                "labels": {
                    "kubernetes.io/service-name": name,
                    "endpointslice.kubernetes.io/managed-by": "partita-testbed",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        },
    )


def _wait_file(path: Path, proc: processes.Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        processes.ensure_running(proc)
        if time.monotonic() > deadline:
            raise TestbedError(f"{proc.name} did not start within {timeout:.0f} s; see {proc.log}")
        time.sleep(0.1)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _start_control_plane(
    bins: binaries.Binaries,
    run_dir: Path,
    p: pki.Pki,
    ports: dict[str, int],
    kubeconfig: Path,
    log: Log,
) -> None:
    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
    etcd = processes.start(
        "etcd",
        [
            *bins.component("etcd"),
            "--name=testbed",
            f"--data-dir={run_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=testbed={peer_url}",
            "--auto-compaction-retention=1",
            "--quota-backend-bytes=2147483648",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
        run_dir,
    )
    _wait_http(f"{etcd_url}/health", "etcd", etcd, 30)
    log(f"  etcd on {etcd_url}")
    api_argv = [
            *bins.component("kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--etcd-prefix=/registry",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={p.server_cert}",
            f"--tls-private-key-file={p.server_key}",
            f"--client-ca-file={p.ca_cert}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p.sa_pub}",
            f"--service-account-signing-key-file={p.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--enable-admission-plugins=NodeRestriction,PodSecurity",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            f"--audit-policy-file={_audit_policy(run_dir)}",
            f"--audit-log-path={audit_log(run_dir)}",
            "--audit-log-maxsize=200",
            "--audit-log-format=json",
            "--v=1",
        ]  # fmt: skip
    (run_dir / APISERVER_ARGV).write_text(json.dumps(api_argv))
    api = processes.start("kube-apiserver", api_argv, run_dir)
    ctx = _client_ssl(p)
    _wait_http(f"https://127.0.0.1:{ports['apiserver']}/readyz", "kube-apiserver", api, 90, ctx)
    log(f"  kube-apiserver on https://127.0.0.1:{ports['apiserver']}")
    common = [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
        "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
    ]
    kcm = processes.start(
        "kube-controller-manager",
        [
            *bins.component("kube-controller-manager"),
            *common,
            f"--secure-port={ports['kcm']}",
            f"--root-ca-file={p.ca_cert}",
            f"--service-account-private-key-file={p.sa_key}",
            "--use-service-account-credentials",
            "--node-monitor-period=5s",
            "--node-monitor-grace-period=40s",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--profiling=false",
            "--v=1",
        ],
        run_dir,
    )
    sched = processes.start(
        "kube-scheduler",
        [
            *bins.component("kube-scheduler"),
            *common,
            f"--secure-port={ports['sched']}",
            "--profiling=false",
            "--v=1",
        ],
        run_dir,
    )
    _wait_http(f"https://127.0.0.1:{ports['kcm']}/healthz", "kube-controller-manager", kcm, 60)
    _wait_http(f"https://127.0.0.1:{ports['sched']}/healthz", "kube-scheduler", sched, 60)
    log("  kube-controller-manager and kube-scheduler healthy")
    config = run_dir / "kwok.yaml"
    config.write_text(binaries.kwok_node_stages(bins.kwok_stages))
    kwok = processes.start(
        "kwok",
        [
            *bins.component("kwok"),
            f"--kubeconfig={kubeconfig}",
            f"--config={config}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-label-selector=type=kwok",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{ports['kwok']}",
            f"--cidr={POD_CIDR}",
            f"--node-ip={NODE_IP}",
        ],
        run_dir,
    )
    time.sleep(0.5)
    processes.ensure_running(kwok)
    log("  kwok managing nodes labelled type=kwok")


def _core_v1(kubeconfig: Path) -> Any:
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=str(kubeconfig))
    return client.CoreV1Api(api_client)


def node_manifest(node: NodeSpec, index: int) -> dict[str, Any]:
    """A Node as k3s registers it, with the labels Partita's DevicePools select on."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": node.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "k3s",
                "topology.kubernetes.io/region": "local",
                "topology.kubernetes.io/zone": node.zone,
                labels.TIER: node.tier,
                labels.POOL: node.pool,
            },
            "annotations": {
                "kwok.x-k8s.io/node": "fake",
                "node.alpha.kubernetes.io/ttl": "0",
                labels.SPEED: str(node.speed),
            },
        },
        "spec": {"podCIDR": pod_cidr(index), "podCIDRs": [pod_cidr(index)]},
        "status": {
            "capacity": {
                "cpu": str(node.cpu),
                "memory": str(node.memory_bytes),
                "pods": "110",
                "ephemeral-storage": "50Gi",
            },
            "allocatable": {
                "cpu": str(node.cpu),
                "memory": str(node.memory_bytes),
                "pods": "110",
                "ephemeral-storage": "50Gi",
            },
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": K3S_VERSION,
                "kubeProxyVersion": K3S_VERSION,
                "containerRuntimeVersion": "containerd://2.0.5-k3s1",
                "kernelVersion": "6.1.0-k3s",
                "osImage": "K3s " + K3S_VERSION,
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        },
    }


def _create_nodes(kubeconfig: Path, nodes: tuple[NodeSpec, ...], log: Log) -> None:
    from kubernetes.client.exceptions import ApiException

    core = _core_v1(kubeconfig)
    for i, node in enumerate(nodes):
        try:
            core.create_node(node_manifest(node, i))
        except ApiException as exc:
            if exc.status != 409:
                raise TestbedError(f"cannot create node {node.name}: {exc.reason}") from None
    log(f"  created {len(nodes)} nodes")


def _node_ready(node: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])


def _wait_nodes_ready(kubeconfig: Path, names: list[str], timeout: float) -> None:
    core = _core_v1(kubeconfig)
    deadline = time.monotonic() + timeout
    pending = set(names)
    while time.monotonic() < deadline:
        pending = {n.metadata.name for n in core.list_node().items if not _node_ready(n)} & set(
            names
        )
        seen = {n.metadata.name for n in core.list_node().items}
        pending |= set(names) - seen
        if not pending:
            return
        time.sleep(0.3)
    raise TestbedError(f"nodes not Ready after {timeout:.0f} s: {sorted(pending)}")


def set_node_ready(run_dir: Path, name: str, ready: bool) -> None:
    """Down: kwok's chaos stage marks the node NotReady (its heartbeat stops counting);
    up: removing the label lets the heartbeat stage make it Ready again."""
    from kubernetes.client.exceptions import ApiException

    info = load_info(run_dir)
    if name not in {n.name for n in info.nodes}:
        known = ", ".join(n.name for n in info.nodes)
        raise TestbedError(f"unknown node {name!r}; the local cluster has: {known}")
    from partita.testbed import simstate

    # A dead node's exporters go silent too, as on a real cluster.
    simstate.update(info.state_file, lambda s: simstate.set_node_up(s, name, ready))
    core = _core_v1(info.kubeconfig)
    patch = {"metadata": {"labels": {NOT_READY_LABEL: None if ready else "true"}}}
    try:
        core.patch_node(name, patch)
    except ApiException as exc:
        raise TestbedError(f"cannot patch node {name}: {exc.reason}") from None


def node_status(run_dir: Path) -> list[dict[str, Any]]:
    info = load_info(run_dir)
    core = _core_v1(info.kubeconfig)
    out = []
    for n in core.list_node().items:
        node_labels = n.metadata.labels or {}
        out.append(
            {
                "name": n.metadata.name,
                "pool": node_labels.get(labels.POOL, ""),
                "tier": node_labels.get(labels.TIER, ""),
                "ready": _node_ready(n),
                "cpu": n.status.allocatable.get("cpu"),
                "memory": n.status.allocatable.get("memory"),
            }
        )
    return out


def set_prometheus(run_dir: Path, running: bool) -> None:
    """Stop Prometheus (the operator's metrics go stale) or start it again, same port and data."""
    info = load_info(run_dir)
    pid_file = run_dir / "pids" / "prometheus.pid"
    pid = int(pid_file.read_text() or 0) if pid_file.exists() else 0
    if not running:
        if pid and processes.alive(pid):
            processes.stop_one(pid)
        return
    if pid and processes.alive(pid):
        return
    argv = json.loads((run_dir / "prometheus" / "argv.json").read_text())
    proc = processes.start("prometheus", argv, run_dir)
    _wait_http(f"{info.prometheus_url}/-/ready", "Prometheus", proc, 60)


APISERVER_ARGV = "kube-apiserver.argv.json"


def restart_apiserver(run_dir: Path) -> None:
    """Stop the apiserver (SIGTERM, as a control-plane upgrade or crash-restart does) and
    start it again with the same flags, port and etcd; return once it is ready."""
    info = load_info(run_dir)
    pid_file = run_dir / "pids" / "kube-apiserver.pid"
    pid = int(pid_file.read_text() or 0) if pid_file.exists() else 0
    if pid and processes.alive(pid):
        processes.stop_one(pid)
    argv = json.loads((run_dir / APISERVER_ARGV).read_text())
    proc = processes.start("kube-apiserver", argv, run_dir)
    ctx = _client_ssl(pki.load(run_dir / "pki"))
    _wait_http(f"{info.apiserver_url}/readyz", "kube-apiserver", proc, 90, ctx)


def audit_log(run_dir: Path) -> Path:
    """The apiserver's audit log: every request a ServiceAccount made (the chart's operator
    pod is one), with its verb, resource and answer, one JSON object per line."""
    return run_dir / "logs" / "audit.log"


def _audit_policy(run_dir: Path) -> Path:
    path = run_dir / "audit-policy.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "audit.k8s.io/v1",
                "kind": "Policy",
                "omitStages": ["RequestReceived"],
                "rules": [
                    {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
                    {"level": "None"},
                ],
            }
        )
    )
    return path


def down(run_dir: Path) -> list[str]:
    stopped = processes.stop_all(run_dir)
    status = run_dir / "status.json"
    if status.exists():
        status.unlink()
    return stopped


def rss_by_process(run_dir: Path) -> dict[str, int]:
    out = {}
    for f in sorted((run_dir / "pids").glob("*.pid")):
        pid = int(f.read_text() or 0)
        if pid and processes.alive(pid):
            out[f.stem] = processes.rss_bytes(pid)
    return out


def write_manifest(path: Path, docs: list[dict[str, Any]]) -> None:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
