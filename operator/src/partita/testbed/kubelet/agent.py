"""The agent: the kubelet of every simulated node of one local cluster, in one process.

Its sync loop runs whenever an informer sees a change (and every 0.25 s for probes): each pod
scheduled on a simulated node gets a local process (`pods`, one local port per container port),
a deleted pod's process is stopped and the deletion finished, a NotReady node's processes are
stopped, and the routing table, entry listeners (one per port of each data-source Service,
listed in services.json; see `targets`) and scrape targets follow.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from partita.api import labels
from partita.testbed import cgroup, cluster, processes, prometheus
from partita.testbed.errors import TestbedError
from partita.testbed.kubelet import images, sandbox, targets
from partita.testbed.kubelet.informer import Informer
from partita.testbed.kubelet.pods import KubernetesService, PodRun, PodRunner, new_run
from partita.testbed.kubelet.podspec import (
    LOOPBACK,
    PodError,
    allocate_ip,
    config_data,
    node_ready,
    pod_name,
)
from partita.testbed.kubelet.serviceproxy import (
    EntryPort,
    LocalPod,
    ServiceProxy,
    endpoints_for,
    entry_ports,
)
from partita.testbed.kubelet.tokens import TokenKeeper
from partita.testbed.netshape import Endpoint, Target

log = logging.getLogger(__name__)

SYNC_INTERVAL_S = 0.25
DEFAULT_POD_CIDR = "10.248.0.0/24"  # a node without a podCIDR: outside the nodes' block
HOST_IPS = frozenset({cluster.NODE_IP})


class ApiSources:
    """ConfigMaps, Secrets and claims read from the API server when a pod starts."""

    def __init__(self, core: Any) -> None:
        self.core = core

    def data(self, kind: str, namespace: str, name: str) -> Mapping[str, str] | None:
        read = (
            self.core.read_namespaced_secret
            if kind == "Secret"
            else self.core.read_namespaced_config_map
        )
        doc = self._read(read, f"{kind} {namespace}/{name}", name, namespace)
        return None if doc is None else config_data(kind, doc)

    def claim_path(self, namespace: str, claim: str) -> Path:
        """A Bound claim's volume as a local directory: its PersistentVolume's hostPath or
        local path (the test bed has no other storage)."""
        what = f"PersistentVolumeClaim {namespace}/{claim}"
        pvc = self._read(self.core.read_namespaced_persistent_volume_claim, what, claim, namespace)
        if pvc is None:
            raise PodError(f"{what} not found")
        volume = (pvc.get("spec") or {}).get("volumeName")
        if (pvc.get("status") or {}).get("phase") != "Bound" or not volume:
            raise PodError(f"{what} is not Bound to a PersistentVolume yet")
        pv = self._read(self.core.read_persistent_volume, f"PersistentVolume {volume}", volume)
        spec = (pv or {}).get("spec") or {}
        path = (spec.get("hostPath") or spec.get("local") or {}).get("path")
        if not path or not Path(path).is_dir():
            raise PodError(
                f"{what}: PersistentVolume {volume} has no hostPath or local path that is a "
                "directory on this machine"
            )
        return Path(path)

    def _read(self, read: Callable[..., Any], what: str, *args: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            resp = read(*args, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise PodError(f"cannot read {what}: {exc.status} {exc.reason}") from None
        doc: dict[str, Any] = json.loads(resp.data)
        return doc


class Agent:
    """Runs the pods of one local cluster; see the module docstring."""

    def __init__(
        self,
        run_dir: Path,
        *,
        exe_dir: Path | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        from kubernetes import client, config

        self.run_dir = run_dir
        self.info = cluster.load_info(run_dir)
        api = config.new_client_from_config(config_file=str(self.info.kubeconfig))
        # Any: raw JSON (`_preload_content=False`) does not fit the client's typed returns.
        self.core: Any = client.CoreV1Api(api)
        self.discovery: Any = client.DiscoveryV1Api(api)
        self.stop_event = threading.Event()
        self.dirty = threading.Event()
        self.runs: dict[str, PodRun] = {}
        self.local_pods: dict[str, LocalPod] = {}  # pod key -> its ports; replaced, not mutated
        self.pools = {n.name: n.pool for n in self.info.nodes}
        self.limiter = cgroup.CpuLimiter(cgroup.detect(run_dir))
        self.proxy = ServiceProxy(self.info.state_file, self.resolve)
        self.proxy_ports: dict[str, int] = {}
        self.entry_urls: dict[str, str] | None = None  # None: services.json not written yet
        self._targets_written: list[prometheus.TargetGroup] | None = None
        self._operators_written: list[prometheus.TargetGroup] | None = None
        self.sandboxed = sandbox.available()
        if not self.sandboxed:
            log.warning(
                "no mount namespaces here (they need root): pods see their volumes only "
                "through env values, and no ServiceAccount token at %s",
                "/var/run/secrets/kubernetes.io/serviceaccount",
            )
        self.kubernetes = KubernetesService(self.info.service_host, self.info.service_port)
        self.pods = PodRunner(
            run_dir,
            core=self.core,
            sources=ApiSources(self.core),
            tokens=TokenKeeper(self.core, now),
            limiter=self.limiter,
            proxy_url=lambda node: f"http://{LOOPBACK}:{self.proxy_ports[node]}",
            kubernetes=self.kubernetes,
            sandboxed=self.sandboxed,
            exe_dir=exe_dir or Path(sys.executable).parent,
            now=now,
            clock=clock,
            sleep=sleep,
        )
        self._clock = clock
        self.informers = {
            "pods": Informer(
                "pods", self.core.list_pod_for_all_namespaces, self.dirty.set, self.stop_event
            ),
            "services": Informer(
                "services",
                self.core.list_service_for_all_namespaces,
                self.dirty.set,
                self.stop_event,
            ),
            "slices": Informer(
                "endpointslices",
                self.discovery.list_endpoint_slice_for_all_namespaces,
                self.dirty.set,
                self.stop_event,
            ),
            "nodes": Informer("nodes", self.core.list_node, self.dirty.set, self.stop_event),
        }

    # -- routing (called from the service proxy's thread) --

    def resolve(self, target: Target) -> list[Endpoint]:
        """Service -> its ready EndpointSlice endpoints -> the local processes behind them."""
        return endpoints_for(
            target,
            self.informers["services"].items,
            self.informers["slices"].items,
            self.local_pods,
            HOST_IPS,
        )

    # -- lifecycle --

    def start(self) -> None:
        (self.run_dir / "pods").mkdir(parents=True, exist_ok=True)
        self.proxy.start()
        for node in self.info.nodes:
            port = self.proxy.call(self.proxy.add_node_proxy(node.name, node.pool))
            self.proxy_ports[node.name] = port
        api = urlsplit(self.info.apiserver_url)
        self.proxy.call(
            self.proxy.forward(
                (self.kubernetes.host, self.kubernetes.port),
                (api.hostname or LOOPBACK, api.port or 443),
            )
        )
        for inf in self.informers.values():
            inf.start()
        for inf in self.informers.values():
            if not inf.synced.wait(30):
                raise TestbedError(f"the agent could not list {inf.name} within 30 s")
        self.sync()  # services.json exists once start() returns
        self._write_agent_file()
        log.info(
            "agent up: node proxies %s, cgroup %s, mount namespaces %s, kubernetes Service %s:%d",
            self.proxy_ports,
            self._cgroup_mode(),
            "yes" if self.sandboxed else "no",
            self.kubernetes.host,
            self.kubernetes.port,
        )

    def _cgroup_mode(self) -> str:
        backend = self.limiter.backend
        return f"v{backend.version}" if backend else "none"

    def _write_agent_file(self) -> None:
        targets.write_json_atomic(
            self.run_dir / targets.AGENT_FILE,
            {
                "pid": os.getpid(),
                "proxies": {n: f"http://{LOOPBACK}:{p}" for n, p in self.proxy_ports.items()},
                "cgroup": self._cgroup_mode(),
                "sandbox": self.sandboxed,
            },
        )

    def run_until(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.dirty.wait(SYNC_INTERVAL_S)
            self.dirty.clear()
            try:
                self.sync()
            except Exception:
                log.exception("agent sync failed; retrying")
                stop.wait(1.0)

    def shutdown(self) -> None:
        self.stop_event.set()
        for run in list(self.runs.values()):
            self.pods.kill(run, grace=3.0)
            self._forget(run)
        self.proxy.stop()
        self.limiter.close()
        self.pods.close()
        self._sync_prometheus_targets()  # no process left: an empty target list
        for name in (targets.SERVICES_FILE, targets.AGENT_FILE):
            with contextlib.suppress(OSError):
                (self.run_dir / name).unlink()

    # -- the sync loop --

    def sync(self) -> None:
        pods = self.informers["pods"].items
        nodes = self.informers["nodes"].items
        mine = {
            k: p for k, p in pods.items() if (p.get("spec") or {}).get("nodeName") in self.pools
        }
        for key, run in list(self.runs.items()):
            pod = mine.get(key)
            if pod is None or pod["metadata"].get("uid") != run.uid:
                self.pods.kill(run, grace=0.0)  # deleted behind our back, or replaced
                self._forget(run)
        for key, pod in mine.items():
            self._sync_pod(key, pod, nodes.get(pod["spec"]["nodeName"]) or {})
        self.local_pods = {
            k: LocalPod(k, r.node, self.pools[r.node], r.ports)
            for k, r in self.runs.items()
            if r.pid is not None and r.stopping_since is None
        }
        self._sync_entries()
        self._sync_prometheus_targets()

    def _sync_pod(self, key: str, pod: dict[str, Any], node: Mapping[str, Any]) -> None:
        run = self.runs.get(key)
        if pod["metadata"].get("deletionTimestamp"):
            if run is None or self.pods.begin_delete(run, pod):
                self._delete_pod(pod)
                if run is not None:
                    self._forget(run)
            return
        if run is None:
            run = self._new_run(key, pod)
        if not node_ready(node):
            if not run.node_down:
                log.info("node %s is down: stopping %s", run.node, key)
                self.pods.kill(run, grace=0.0)
                run.node_down, run.ready, run.reported = True, False, {}
            return
        if run.node_down:
            run.node_down, run.next_start = False, 0.0
        self._update_quota(run, node)
        try:
            self.pods.step(run, pod, node)
        except PodError as exc:
            self.pods.config_error(run, exc)
        self.pods.report(run, pod, node)

    def _new_run(self, key: str, pod: dict[str, Any]) -> PodRun:
        spec = pod["spec"]
        extra = [c["name"] for c in [*spec.get("initContainers", []), *spec["containers"][1:]]]
        if extra:
            log.warning("pod %s: running only its first container; not %s", key, extra)
        node = self.informers["nodes"].items.get(spec["nodeName"]) or {}
        used = {r.ip for r in self.runs.values() if r.node == spec["nodeName"]}
        ip = (pod.get("status") or {}).get("podIP") or ""
        cidr = (node.get("spec") or {}).get("podCIDR") or DEFAULT_POD_CIDR
        if not ip or ip in used or ipaddress.ip_address(ip) not in ipaddress.ip_network(cidr):
            ip = allocate_ip(cidr, used)
        taken = {p for r in self.runs.values() for p in (r.port, *r.ports.by_number.values())}

        def free_port() -> int:  # one the OS offers that no other pod holds yet
            while (port := processes.free_port()) in taken:
                pass
            taken.add(port)
            return port

        run = new_run(key, pod, ip, free_port)
        self.runs[key] = run
        return run

    def _update_quota(self, run: PodRun, node: Mapping[str, Any]) -> None:
        state = self.proxy.watcher.state
        cpus, busy = 1, 0.0
        if state is not None:
            for n in state.nodes:
                if n.name == run.node:
                    cpus, busy = n.cpu, n.cpu_utilisation
        self.pods.update_quota(run, node, cpus, busy)

    def _forget(self, run: PodRun) -> None:
        self.runs.pop(run.key, None)
        self.pods.forget(run)

    def _delete_pod(self, pod: Mapping[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        meta = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                grace_period_seconds=0,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                log.warning("cannot delete pod %s: %s", pod_name(pod), exc.reason)

    # -- entry listeners, services.json, Prometheus targets --

    def _sync_entries(self) -> None:
        desired: dict[str, EntryPort] = {}
        for key, svc in self.informers["services"].items.items():
            pool = (svc["metadata"].get("annotations") or {}).get(labels.DATA_SOURCE_POOL)
            if pool:
                desired.update(entry_ports(key, svc, pool))
        if (
            self.entry_urls is not None
            and set(desired) == set(self.entry_urls)
            and all(spec == desired.get(k) for k, (spec, _) in self.proxy.entries.items())
        ):
            return
        preferred = targets.previous_ports(self.run_dir / targets.SERVICES_FILE)
        ports = self.proxy.call(self.proxy.set_entries(desired, preferred))
        self.entry_urls = {k: desired[k].address(p) for k, p in ports.items()}
        targets.write_json_atomic(self.run_dir / targets.SERVICES_FILE, self.entry_urls)
        log.info("entry listeners: %s", self.entry_urls)

    def _sync_prometheus_targets(self) -> None:
        directory = self.run_dir / "prometheus"
        if not directory.is_dir():
            return
        pods = self.informers["pods"].items
        groups = targets.server_targets(
            [
                targets.ServerProcess(
                    key,
                    run.port,
                    run.node,
                    self.pools[run.node],
                    (pods.get(key, {}).get("metadata") or {}).get("labels") or {},
                )
                for key, run in self.runs.items()
                if run.pid is not None
            ]
        )
        if groups != self._targets_written:
            prometheus.write_server_targets(directory, groups)
            self._targets_written = groups
        operators = targets.operator_targets(
            [
                (key, run.port)
                for key, run in self.runs.items()
                if run.pid is not None and images.runs_operator(pods.get(key, {}))
            ]
        )
        if operators != self._operators_written:
            prometheus.write_operator_targets(directory, operators)
            self._operators_written = operators


@contextlib.contextmanager
def running(run_dir: Path, **kwargs: Any) -> Iterator[Agent]:
    """An agent running in a background thread of this process (for tests and the demo)."""
    stop = threading.Event()
    agent = Agent(run_dir, **kwargs)
    agent.start()
    thread = threading.Thread(target=agent.run_until, args=(stop,), name="agent", daemon=True)
    thread.start()
    try:
        yield agent
    finally:
        stop.set()
        thread.join(10)
        agent.shutdown()


def run(run_dir: Path, stop_event: threading.Event) -> None:
    """Run the agent until `stop_event` is set; every process it started is stopped on return."""
    agent = Agent(run_dir)
    try:
        agent.start()
        agent.run_until(stop_event)
    finally:
        agent.shutdown()
