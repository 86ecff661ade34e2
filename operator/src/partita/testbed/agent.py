"""The local cluster's kubelet and kube-proxy for stage pods: every pod labelled
`partita.dev/component=stage-server` that the scheduler puts on a simulated node runs as a real
local process, and the traffic between simulated nodes is shaped like the simulator's links.

    python -m partita.testbed.agent --run-dir DIR

Like a kubelet it materialises ConfigMap/Secret volumes (under DIR/pods/<ns>/<pod>/), resolves
env, starts the container's command (with --host/--port moved to a free loopback port, and
HTTP_PROXY set to its node's proxy), limits its CPU to the node's speed, reports the pod's
status from its readinessProbe, restarts it with back-off when it crashes, and finishes
deletions. Like kube-proxy it routes `<svc>.<ns>.svc` through EndpointSlices to those processes
(`netshape`). The operator never knows: only this module knows it is a test bed.

Files it writes for tests, the demo and `partita testbed status`: DIR/services.json (entry
Services -> URL), DIR/agent.json (node proxies, cgroup mode) and Prometheus' server targets.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from partita.api.quantity import cpu_cores
from partita.testbed import cgroup, processes
from partita.testbed.errors import TestbedError
from partita.testbed.netshape import (
    Endpoint,
    LinkTable,
    RouteError,
    ShapingProxy,
    StateWatcher,
    Target,
)

log = logging.getLogger("partita.testbed.agent")

STAGE_SELECTOR = "partita.dev/component=stage-server"
DATA_SOURCE_ANNOTATION = "partita.dev/data-source-pool"
SPEED_ANNOTATION = "partita.dev/speed"
POOL_LABEL = "partita.dev/pool"
SERVICES_FILE = "services.json"
AGENT_FILE = "agent.json"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
LOOPBACK = "127.0.0.1"

PROBE_START_INTERVAL_S = 0.25  # until first ready: find a fresh server fast
PROBE_MAX_INTERVAL_S = 1.0  # afterwards: the probe's period, but no slower than this
MAX_BACKOFF_S = 10.0
MAX_GRACE_S = 10.0
WATCH_TIMEOUT_S = 10  # watches end and resume this often (a stopped agent's threads exit then)

Lookup = Callable[[str, str, str], Mapping[str, str] | None]  # (kind, ns, name) -> data


class AgentError(TestbedError):
    """A pod the agent cannot run as given; the message names the pod and the field."""


# ---- pod spec -> local process (pure) --------------------------------------------------------


def _decode_secret(data: Mapping[str, str]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in data.items()}


def config_data(kind: str, obj: Mapping[str, Any]) -> dict[str, str]:
    """A ConfigMap's or Secret's data as text (Secret data is base64 in the API)."""
    if kind == "Secret":
        out = _decode_secret(obj.get("data") or {})
        out.update(obj.get("stringData") or {})
        return out
    out = dict(obj.get("data") or {})
    out.update(_decode_secret(obj.get("binaryData") or {}))
    return out


def materialise_volumes(
    pod: Mapping[str, Any], container: Mapping[str, Any], pod_dir: Path, lookup: Lookup
) -> dict[str, Path]:
    """Write the container's ConfigMap/Secret/emptyDir volumes under `pod_dir`; return
    mountPath -> local directory. A missing required source is an AgentError."""
    ns = pod["metadata"]["namespace"]
    name = pod["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    mounts: dict[str, Path] = {}
    for i, mount in enumerate(container.get("volumeMounts") or []):
        where = f"pod {ns}/{name}: volumeMounts[{i}] ({mount['name']})"
        vol = volumes.get(mount["name"])
        if vol is None:
            raise AgentError(f"{where}: no volume of that name in spec.volumes")
        local = pod_dir / "volumes" / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        sources: list[tuple[str, Mapping[str, Any]]] = []
        if "configMap" in vol:
            sources.append(("ConfigMap", vol["configMap"]))
        elif "secret" in vol:
            secret = dict(vol["secret"])
            secret["name"] = secret.get("secretName", "")
            sources.append(("Secret", secret))
        elif "projected" in vol:
            for s in vol["projected"].get("sources") or []:
                for kind, key in (("ConfigMap", "configMap"), ("Secret", "secret")):
                    if key in s:
                        sources.append((kind, s[key]))
        for kind, src in sources:
            data = lookup(kind, ns, src.get("name", ""))
            if data is None:
                if src.get("optional"):
                    continue
                raise AgentError(
                    f"{where}: {kind} {ns}/{src.get('name')} not found; create it, or mark "
                    "the volume optional"
                )
            items = src.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                if item["key"] not in data:
                    if src.get("optional"):
                        continue
                    raise AgentError(
                        f"{where}: {kind} {ns}/{src.get('name')} has no key {item['key']!r}"
                    )
                dest = local / item["path"]
                if not dest.resolve().is_relative_to(local.resolve()):
                    raise AgentError(f"{where}: item path {item['path']!r} leaves the volume")
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(data[item["key"]])
                if kind == "Secret":
                    dest.chmod(0o600)
        path = mount["mountPath"].rstrip("/") or "/"
        sub = mount.get("subPath")
        mounts[path] = local / sub if sub else local
    return mounts


def rewrite_path(value: str, mounts: Mapping[str, Path]) -> str:
    """A value naming a file under a mountPath, pointed at the local copy (longest mount wins)."""
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount:
            return str(mounts[mount])
        if value.startswith(mount.rstrip("/") + "/"):
            return str(mounts[mount] / value[len(mount.rstrip("/")) + 1 :])
    return value


_VAR_RE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known names are replaced, `$$` is a literal `$`."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_RE.sub(sub, value)


def _field_ref(pod: Mapping[str, Any], path: str, pod_ip: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.hostIP": pod_ip,
    }
    if path in simple:
        return str(simple[path])
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    raise AgentError(f"fieldRef {path!r} is not supported by the test bed agent")


def _resource_ref(container: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    kind, _, res = ref["resource"].partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(res)
    if value is None:
        return "0"
    if res == "cpu":
        divisor = cpu_cores(ref.get("divisor", "1"))
        return str(max(1, int(-(-cpu_cores(value) // divisor))))
    return str(value)


def container_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    mounts: Mapping[str, Path],
    lookup: Lookup,
    pod_ip: str = "",
) -> dict[str, str]:
    """The container's environment as a kubelet computes it (envFrom, then env in order, with
    `$(VAR)` expansion), plus one test bed twist: paths under a mountPath point at local copies."""
    ns = pod["metadata"]["namespace"]
    where = f"pod {ns}/{pod['metadata']['name']}"
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        kind, ref = (
            ("ConfigMap", src["configMapRef"])
            if "configMapRef" in src
            else (
                "Secret",
                src.get("secretRef") or {},
            )
        )
        data = lookup(kind, ns, ref.get("name", ""))
        if data is None:
            if ref.get("optional"):
                continue
            raise AgentError(f"{where}: envFrom {kind} {ns}/{ref.get('name')} not found")
        prefix = src.get("prefix", "")
        env.update({prefix + k: v for k, v in data.items()})
    for i, var in enumerate(container.get("env") or []):
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = rewrite_path(expand(var.get("value", ""), env), mounts)
            continue
        vf = var["valueFrom"]
        for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
            if key in vf:
                ref = vf[key]
                data = lookup(kind, ns, ref["name"])
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        break
                    raise AgentError(
                        f"{where}: env[{i}] ({name}).valueFrom.{key}: {kind} {ns}/{ref['name']} "
                        f"has no key {ref['key']!r}; create it or mark it optional"
                    )
                env[name] = data[ref["key"]]
                break
        else:
            if "fieldRef" in vf:
                env[name] = _field_ref(pod, vf["fieldRef"]["fieldPath"], pod_ip)
            elif "resourceFieldRef" in vf:
                env[name] = _resource_ref(container, vf["resourceFieldRef"])
            else:
                raise AgentError(f"{where}: env[{i}] ({name}).valueFrom: unsupported source")
    return env


def server_argv(
    command: list[str], args: list[str], port: int, exe_dir: Path, env: Mapping[str, str]
) -> list[str]:
    """The container's command line for this machine: the command found next to our Python
    (the venv's console scripts) when it is not an absolute path, `$(VAR)` expanded, and
    --host/--port replaced by loopback and the port the agent picked."""
    if not command:
        raise AgentError("the container has no command; the agent cannot run images")
    exe = command[0]
    if not os.path.isabs(exe):
        local = exe_dir / exe
        found = str(local) if local.exists() else shutil.which(exe)
        if found is None:
            raise AgentError(
                f"container command {exe!r} not found next to {exe_dir} or on PATH; "
                "install the project into the venv (`make install`)"
            )
        exe = found
    rest = [expand(a, env) for a in [*command[1:], *args]]
    out: list[str] = [exe]
    seen: set[str] = set()
    i = 0
    while i < len(rest):
        arg = rest[i]
        flag, eq, _ = arg.partition("=")
        if flag in ("--host", "--port"):
            seen.add(flag)
            value = LOOPBACK if flag == "--host" else str(port)
            out.append(f"{flag}={value}" if eq else flag)
            if not eq:
                out.append(value)
                i += 1  # skip the old value
        else:
            out.append(arg)
        i += 1
    if "--host" not in seen:
        out += ["--host", LOOPBACK]
    if "--port" not in seen:
        out += ["--port", str(port)]
    return out


def allocate_ip(pod_cidr: str, used: set[str]) -> str:
    """A pod IP from the top of the node's podCIDR (kwok hands out its own from the bottom).
    Only API data: nothing is ever sent to it."""
    net = ipaddress.ip_network(pod_cidr, strict=False)
    for addr in reversed(list(net.hosts())):
        if str(addr) not in used:
            return str(addr)
    raise AgentError(f"podCIDR {pod_cidr} is full")


@dataclass(frozen=True)
class Probe:
    path: str
    period_s: float
    failure_threshold: int
    timeout_s: float
    initial_delay_s: float


def readiness_probe(container: Mapping[str, Any]) -> Probe | None:
    """The httpGet readinessProbe (only the path matters: the port is the process's)."""
    p = container.get("readinessProbe") or {}
    get = p.get("httpGet")
    if not get:
        return None
    return Probe(
        get.get("path", "/"),
        float(p.get("periodSeconds", 10)),
        int(p.get("failureThreshold", 3)),
        float(p.get("timeoutSeconds", 1)),
        float(p.get("initialDelaySeconds", 0)),
    )


def backoff(restarts: int) -> float:
    """Seconds before restart number `restarts` (1, 2, ...): 0.5 s doubling, at most 10 s
    (a kubelet uses 10 s to 5 min; a test bed wants crashes visible, not slow)."""
    return min(MAX_BACKOFF_S, 0.5 * 2 ** max(0, restarts - 1))


def cpu_limit(container: Mapping[str, Any]) -> float | None:
    limits = (container.get("resources") or {}).get("limits") or {}
    return cpu_cores(limits["cpu"]) if "cpu" in limits else None


def node_speed(node: Mapping[str, Any]) -> float:
    raw = (node.get("metadata", {}).get("annotations") or {}).get(SPEED_ANNOTATION, "1")
    try:
        speed = float(raw)
    except ValueError:
        log.warning(
            "node %s: %s=%r is not a number", node["metadata"]["name"], SPEED_ANNOTATION, raw
        )
        return 1.0
    return speed if speed > 0 else 1.0


def node_ready(node: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (node.get("status") or {}).get("conditions") or []
    )


def write_json_atomic(path: Path, doc: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(doc, out, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---- the API side: list+watch caches ---------------------------------------------------------


def obj_key(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]


class Informer:
    """A list+watch cache of one resource as plain JSON dicts (relists on 410 Gone or error).

    The cache is replaced, never mutated, so readers in other threads need no lock."""

    def __init__(
        self,
        name: str,
        list_fn: Callable[..., Any],
        on_change: Callable[[], None],
        stop: threading.Event,
        **kwargs: Any,
    ) -> None:
        self.name, self._list, self._on_change, self._stop = name, list_fn, on_change, stop
        self._kwargs = kwargs
        self.items: dict[str, dict[str, Any]] = {}
        self.synced = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"informer-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rv = self._relist()
                while rv and not self._stop.is_set():
                    rv = self._watch(rv)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning("watch of %s failed (%s); relisting", self.name, exc)
                self._stop.wait(1.0)

    def _relist(self) -> str:
        resp = self._list(_preload_content=False, **self._kwargs)
        doc = json.loads(resp.data)
        self.items = {obj_key(o): o for o in doc.get("items") or []}
        self.synced.set()
        self._on_change()
        return str(doc["metadata"]["resourceVersion"])

    def _watch(self, rv: str) -> str:
        """Apply events from `rv` on; the next version to watch from, or "" to relist."""
        from kubernetes import watch

        w = watch.Watch()
        for ev in w.stream(
            self._list,
            resource_version=rv,
            timeout_seconds=WATCH_TIMEOUT_S,
            allow_watch_bookmarks=True,
            **self._kwargs,
        ):
            if self._stop.is_set():
                w.stop()
                return ""
            kind, obj = ev["type"], ev["raw_object"]
            if kind == "ERROR":
                return ""  # 410 Gone: our version is too old
            rv = obj["metadata"]["resourceVersion"]
            if kind == "BOOKMARK":
                continue
            items = dict(self.items)
            if kind == "DELETED":
                items.pop(obj_key(obj), None)
            else:
                items[obj_key(obj)] = obj
            self.items = items
            self._on_change()
        return rv


# ---- one pod's process ---------------------------------------------------------------------


@dataclass
class PodRun:
    """What the agent knows about one stage pod it runs."""

    key: str
    uid: str
    node: str
    ip: str
    port: int
    container: str
    probe: Probe | None
    limit_cores: float | None
    pid: int | None = None
    started_at: str = ""
    start_count: int = 0
    restarts: int = 0
    ready: bool = False
    failures: int = 0
    next_probe: float = 0.0
    next_start: float = 0.0
    last_exit: int | None = None
    last_finished: str = ""
    waiting_reason: str = ""
    waiting_message: str = ""
    terminating_since: float | None = None
    node_down: bool = False
    cores: float = 0.0
    reported: dict[str, Any] = field(default_factory=dict)
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentInfo:
    """Where the agent's listeners are, as DIR/agent.json records them."""

    pid: int
    proxies: dict[str, str]
    services: dict[str, str]
    cgroup: str


def load_agent_info(run_dir: Path) -> AgentInfo:
    try:
        doc = json.loads((run_dir / AGENT_FILE).read_text())
        services = json.loads((run_dir / SERVICES_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise TestbedError(f"{run_dir}: the test bed agent is not running ({exc})") from None
    return AgentInfo(int(doc["pid"]), dict(doc["proxies"]), dict(services), str(doc["cgroup"]))


class DataPlane:
    """The asyncio side: one forward proxy per simulated node, one entry listener per data-source
    Service, and the simulator state watcher, all in one event loop thread."""

    def __init__(self, state_file: Path, resolver: Callable[[Target], list[Endpoint]]) -> None:
        self.links = LinkTable()
        self.watcher = StateWatcher(state_file, self.links)
        self.resolver = resolver
        self.loop = asyncio.new_event_loop()
        self.node_proxies: dict[str, ShapingProxy] = {}
        self.entries: dict[str, ShapingProxy] = {}
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="data-plane", daemon=True)
        self._started = threading.Event()

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(10):
            raise TestbedError("the agent's data plane did not start within 10 s")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        self.watcher.poll()
        self._started.set()
        while not self._stopping.is_set():
            self.watcher.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 0.25)
        for proxy in [*self.node_proxies.values(), *self.entries.values()]:
            await proxy.close()

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def add_node_proxy(self, node: str, pool: str) -> int:
        proxy = ShapingProxy(f"proxy/{node}", pool, self.resolver, self.links)
        self.node_proxies[node] = proxy
        return await proxy.start()

    async def set_entries(
        self, desired: Mapping[str, tuple[str, str, int, str]], preferred: Mapping[str, int]
    ) -> dict[str, int]:
        """Entry listeners for exactly `desired` (key -> ns, svc, port, pool); keep ports."""
        for key in list(self.entries):
            proxy = self.entries[key]
            want = desired.get(key)
            if want is None or (proxy.service, proxy.source_pool) != (want[:3], want[3]):
                await proxy.close()
                del self.entries[key]
        for key, (ns, svc, port, pool) in desired.items():
            if key in self.entries:
                continue
            proxy = ShapingProxy(
                f"entry/{key}", pool, self.resolver, self.links, service=(ns, svc, port)
            )
            try:
                await proxy.start(preferred.get(key, 0))
            except OSError:
                await proxy.start(0)
            self.entries[key] = proxy
        return {k: p.port for k, p in self.entries.items()}

    def stop(self) -> None:
        if self._stopping is not None:
            self.loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)


class Agent:
    """Runs the stage pods of one local cluster; see the module docstring."""

    def __init__(
        self,
        run_dir: Path,
        *,
        exe_dir: Path | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes import client, config

        from partita.testbed import cluster

        self.run_dir = run_dir
        self.info = cluster.load_info(run_dir)
        self.exe_dir = exe_dir or Path(sys.executable).parent
        self._now, self._clock = now, clock
        api = config.new_client_from_config(config_file=str(self.info.kubeconfig))
        # Any: raw JSON (`_preload_content=False`) does not fit the client's typed returns.
        self.core: Any = client.CoreV1Api(api)
        self.discovery: Any = client.DiscoveryV1Api(api)
        self.stop_event = threading.Event()
        self.dirty = threading.Event()
        self.runs: dict[str, PodRun] = {}
        self.local_ports: dict[str, Endpoint] = {}  # pod key -> endpoint; replaced, not mutated
        self.pools = {n.name: n.pool for n in self.info.nodes}
        self.limiter = cgroup.CpuLimiter(cgroup.detect(run_dir))
        self.data_plane = DataPlane(self.info.state_file, self.resolve)
        self.proxy_ports: dict[str, int] = {}
        self.entry_urls: dict[str, str] | None = None  # None: services.json not written yet
        self.informers = {
            "pods": Informer(
                "pods",
                self.core.list_pod_for_all_namespaces,
                self.dirty.set,
                self.stop_event,
                label_selector=STAGE_SELECTOR,
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
        import httpx

        self.http = httpx.Client(trust_env=False)

    # -- routing (called from the data plane's thread) --

    def resolve(self, target: Target) -> list[Endpoint]:
        """Service -> its ready EndpointSlice endpoints -> the pods' local processes."""
        svc = self.informers["services"].items.get(f"{target.namespace}/{target.service}")
        if svc is None:
            raise RouteError(502, f"no Service {target.namespace}/{target.service}")
        ports = (svc.get("spec") or {}).get("ports") or []
        if not any(p.get("port") == target.port for p in ports):
            known = ", ".join(str(p.get("port")) for p in ports) or "none"
            raise RouteError(
                502,
                f"Service {target.namespace}/{target.service} has no port {target.port} "
                f"(ports: {known})",
            )
        local = self.local_ports
        out: list[Endpoint] = []
        for sl in self.informers["slices"].items.values():
            meta = sl["metadata"]
            if meta.get("namespace") != target.namespace:
                continue
            if (meta.get("labels") or {}).get(SERVICE_NAME_LABEL) != target.service:
                continue
            for ep in sl.get("endpoints") or []:
                if (ep.get("conditions") or {}).get("ready") is False:
                    continue
                ref = ep.get("targetRef") or {}
                if ref.get("kind") != "Pod":
                    continue
                found = local.get(f"{ref.get('namespace', target.namespace)}/{ref.get('name')}")
                if found is not None and found not in out:
                    out.append(found)
        return out

    # -- lifecycle --

    def start(self) -> None:
        (self.run_dir / "pods").mkdir(parents=True, exist_ok=True)
        self.data_plane.start()
        for node in self.info.nodes:
            port = self.data_plane.call(self.data_plane.add_node_proxy(node.name, node.pool))
            self.proxy_ports[node.name] = port
        for inf in self.informers.values():
            inf.start()
        for inf in self.informers.values():
            if not inf.synced.wait(30):
                raise TestbedError(f"the agent could not list {inf.name} within 30 s")
        self.sync()  # services.json exists once start() returns
        self._write_agent_file()
        log.info("agent up: node proxies %s, cgroup %s", self.proxy_ports, self._cgroup_mode())

    def _cgroup_mode(self) -> str:
        backend = self.limiter.backend
        return f"v{backend.version}" if backend else "none"

    def _write_agent_file(self) -> None:
        write_json_atomic(
            self.run_dir / AGENT_FILE,
            {
                "pid": os.getpid(),
                "proxies": {n: f"http://{LOOPBACK}:{p}" for n, p in self.proxy_ports.items()},
                "cgroup": self._cgroup_mode(),
            },
        )

    def run_until(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.dirty.wait(PROBE_START_INTERVAL_S)
            self.dirty.clear()
            try:
                self.sync()
            except Exception:
                log.exception("agent sync failed; retrying")
                stop.wait(1.0)

    def shutdown(self) -> None:
        self.stop_event.set()
        for run in list(self.runs.values()):
            self._kill(run, grace=3.0)
            self._forget(run)
        self.data_plane.stop()
        self.limiter.close()
        self.http.close()
        self._sync_prometheus_targets()  # no process left: an empty target list
        for name in (SERVICES_FILE, AGENT_FILE):
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
                self._kill(run, grace=0.0)  # deleted behind our back, or replaced
                self._forget(run)
        for key, pod in mine.items():
            try:
                self._sync_pod(key, pod, nodes.get(pod["spec"]["nodeName"]) or {})
            except AgentError as exc:
                self._report_config_error(pod, str(exc))
        self.local_ports = {
            k: Endpoint(k, r.port, r.node, self.pools[r.node])
            for k, r in self.runs.items()
            if r.pid is not None and r.terminating_since is None
        }
        self._sync_entries()
        self._sync_prometheus_targets()

    def _sync_pod(self, key: str, pod: dict[str, Any], node: Mapping[str, Any]) -> None:
        run = self.runs.get(key)
        if pod["metadata"].get("deletionTimestamp"):
            if run is None or self._terminate(run, pod):
                self._delete_pod(pod)
                if run is not None:
                    self._forget(run)
            return
        if run is None:
            run = self._new_run(key, pod)
        if not node_ready(node):
            if not run.node_down:
                log.info("node %s is down: stopping %s", run.node, key)
                self._kill(run, grace=0.0)
                run.node_down, run.ready, run.reported = True, False, {}
            return
        if run.node_down:
            run.node_down, run.next_start = False, 0.0
        self._update_quota(run, node)
        now = self._clock()
        if run.pid is not None:
            self._check_exit(run, now)
        if run.pid is None and now >= run.next_start:
            self._start(run, pod, node)
        if run.pid is not None and now >= run.next_probe:
            self._probe(run, now)
        self._report(run, pod, node)

    def _new_run(self, key: str, pod: dict[str, Any]) -> PodRun:
        spec = pod["spec"]
        container = spec["containers"][0]
        if len(spec["containers"]) > 1:
            log.warning("pod %s: running only its first container %s", key, container["name"])
        node = self.informers["nodes"].items.get(spec["nodeName"]) or {}
        used = {r.ip for r in self.runs.values() if r.node == spec["nodeName"]}
        ip = (pod.get("status") or {}).get("podIP") or ""
        cidr = (node.get("spec") or {}).get("podCIDR") or "10.244.255.0/24"
        if not ip or ip in used or ipaddress.ip_address(ip) not in ipaddress.ip_network(cidr):
            ip = allocate_ip(cidr, used)
        run = PodRun(
            key,
            pod["metadata"]["uid"],
            spec["nodeName"],
            ip,
            processes.free_port(),
            container["name"],
            readiness_probe(container),
            cpu_limit(container),
        )
        self.runs[key] = run
        return run

    def _pod_dir(self, key: str) -> Path:
        return self.run_dir / "pods" / key

    def _proc_name(self, key: str) -> str:
        return "pod-" + key.replace("/", "-")

    def _lookup(self, kind: str, ns: str, name: str) -> dict[str, str] | None:
        from kubernetes.client.exceptions import ApiException

        read = (
            self.core.read_namespaced_secret
            if kind == "Secret"
            else self.core.read_namespaced_config_map
        )
        try:
            resp = read(name, ns, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise AgentError(f"cannot read {kind} {ns}/{name}: {exc.reason}") from None
        return config_data(kind, json.loads(resp.data))

    def _start(self, run: PodRun, pod: dict[str, Any], node: Mapping[str, Any]) -> None:
        container = pod["spec"]["containers"][0]
        pod_dir = self._pod_dir(run.key)
        mounts = materialise_volumes(pod, container, pod_dir, self._lookup)
        env = container_env(pod, container, mounts, self._lookup, run.ip)
        env.update(
            {
                "HTTP_PROXY": f"http://{LOOPBACK}:{self.proxy_ports[run.node]}",
                "http_proxy": f"http://{LOOPBACK}:{self.proxy_ports[run.node]}",
                "NO_PROXY": f"{LOOPBACK},localhost",
                "no_proxy": f"{LOOPBACK},localhost",
                "HTTPS_PROXY": "",
                "https_proxy": "",
                "ALL_PROXY": "",
                "all_proxy": "",
            }
        )
        argv = server_argv(
            container.get("command") or [],
            container.get("args") or [],
            run.port,
            self.exe_dir,
            env,
        )
        proc = processes.start(self._proc_name(run.key), argv, self.run_dir, env)
        self.limiter.place(run.uid, proc.pid, run.cores)
        run.pid = proc.pid
        run.start_count += 1
        run.started_at = _ts(self._now())
        run.ready, run.failures = False, 0
        run.waiting_reason = run.waiting_message = ""
        run.next_probe = self._clock() + (run.probe.initial_delay_s if run.probe else 0.0)
        log.info("started %s (pid %d) on %s as 127.0.0.1:%d", run.key, proc.pid, run.node, run.port)

    def _update_quota(self, run: PodRun, node: Mapping[str, Any]) -> None:
        state = self.data_plane.watcher.state
        cpus, busy = 1, 0.0
        if state is not None:
            for n in state.nodes:
                if n.name == run.node:
                    cpus, busy = n.cpu, n.cpu_utilisation
        cores = cgroup.quota_cores(node_speed(node), run.limit_cores, cpus, busy)
        if abs(cores - run.cores) > 1e-6:
            run.cores = cores
            if run.pid is not None:
                self.limiter.update(run.uid, cores)

    def _check_exit(self, run: PodRun, now: float) -> None:
        assert run.pid is not None
        if processes.alive(run.pid):
            return
        code = processes.exit_code(run.pid)
        run.pid = None
        run.last_exit = code if code is not None else 1  # unknown: not a clean exit
        run.last_finished = _ts(self._now())
        run.restarts += 1
        run.ready = False
        run.next_start = now + backoff(run.restarts)
        run.waiting_reason = "CrashLoopBackOff"
        run.waiting_message = (
            f"exited with code {run.last_exit}; restarting in {backoff(run.restarts):.1f} s; "
            f"see {self.run_dir / 'logs' / (self._proc_name(run.key) + '.log')}"
        )
        log.warning("%s exited with code %d", run.key, run.last_exit)

    def _probe(self, run: PodRun, now: float) -> None:
        import httpx

        probe = run.probe
        if probe is None:
            run.ready = True
            run.next_probe = now + PROBE_MAX_INTERVAL_S
            return
        try:
            r = self.http.get(
                f"http://{LOOPBACK}:{run.port}{probe.path}", timeout=min(probe.timeout_s, 1.0)
            )
            ok = 200 <= r.status_code < 400
        except httpx.HTTPError:
            ok = False
        if ok:
            run.ready, run.failures = True, 0
        else:
            run.failures += 1
            if run.failures >= probe.failure_threshold:
                run.ready = False
        interval = min(probe.period_s, PROBE_MAX_INTERVAL_S)
        run.next_probe = now + (interval if run.ready else PROBE_START_INTERVAL_S)

    def _status(
        self, run: PodRun, pod: Mapping[str, Any], node: Mapping[str, Any]
    ) -> dict[str, Any]:
        container = pod["spec"]["containers"][0]
        ready = "True" if run.ready else "False"
        # hostIPs merge by ip: keep the first one reported, or the pod gets two of a family
        host_ip = (pod.get("status") or {}).get("hostIP") or next(
            (
                a["address"]
                for a in (node.get("status") or {}).get("addresses") or []
                if a.get("type") == "InternalIP"
            ),
            None,
        )
        state: dict[str, Any]
        if run.pid is not None:
            state = {"running": {"startedAt": run.started_at}}
        else:
            state = {"waiting": {"reason": run.waiting_reason or "ContainerCreating"}}
            if run.waiting_message:
                state["waiting"]["message"] = run.waiting_message
        cstatus: dict[str, Any] = {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "containerID": f"partita-testbed://{run.pid}" if run.pid else "",
            "ready": run.ready,
            "started": run.pid is not None,
            "restartCount": run.restarts,
            "state": state,
            "lastState": {},
        }
        if run.last_exit is not None:
            cstatus["lastState"] = {
                "terminated": {
                    "exitCode": run.last_exit,
                    "reason": "Completed" if run.last_exit == 0 else "Error",
                    "finishedAt": run.last_finished,
                }
            }
        conds = {
            "PodReadyToStartContainers": "True",
            "Initialized": "True",
            "ContainersReady": ready,
            "Ready": ready,
        }
        started = (pod.get("status") or {}).get("startTime") or run.started_at
        return {
            "phase": "Running" if run.start_count else "Pending",
            **({"hostIP": host_ip, "hostIPs": [{"ip": host_ip}]} if host_ip else {}),
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            **({"startTime": started} if started else {}),
            "conditions": conds,
            "containerStatuses": [cstatus],
        }

    def _report(self, run: PodRun, pod: Mapping[str, Any], node: Mapping[str, Any]) -> None:
        """Patch the pod's status (a strategic merge, conditions by type) when it changed."""
        from kubernetes.client.exceptions import ApiException

        status = self._status(run, pod, node)
        if status == run.reported:
            return
        stamp = _ts(self._now())
        conditions = []
        for ctype, value in status["conditions"].items():
            if run.transitions.get(ctype, ("", ""))[0] != value:
                run.transitions[ctype] = (value, stamp)
            conditions.append(
                {
                    "type": ctype,
                    "status": value,
                    "lastProbeTime": None,
                    "lastTransitionTime": run.transitions[ctype][1],
                }
            )
        body = {"status": {**status, "conditions": conditions}}
        ns, name = run.key.split("/", 1)
        try:
            self.core.patch_namespaced_pod_status(
                name, ns, body, _content_type="application/strategic-merge-patch+json"
            )
        except ApiException as exc:
            if exc.status != 404:
                log.warning("cannot patch status of %s: %s %s", run.key, exc.reason, exc.body)
            return
        run.reported = status

    def _report_config_error(self, pod: Mapping[str, Any], message: str) -> None:
        key = obj_key(pod)
        run = self.runs.get(key)
        if run is None:
            return
        log.warning("%s", message)
        run.waiting_reason, run.waiting_message = "CreateContainerConfigError", message
        run.next_start = self._clock() + 1.0
        self._report(run, pod, self.informers["nodes"].items.get(run.node) or {})

    def _terminate(self, run: PodRun, pod: Mapping[str, Any]) -> bool:
        """SIGTERM once, SIGKILL after the grace period; True once the process is gone."""
        if run.pid is None:
            return True
        now = self._clock()
        if run.terminating_since is None:
            run.terminating_since = now
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run.pid, signal.SIGTERM)
        grace = min(float(pod["spec"].get("terminationGracePeriodSeconds", 30)), MAX_GRACE_S)
        if not processes.alive(run.pid):
            run.pid = None
            return True
        if now - run.terminating_since >= grace:
            self._kill(run, grace=0.0)
            return True
        return False

    def _kill(self, run: PodRun, grace: float) -> None:
        if run.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and processes.alive(run.pid):
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and processes.alive(run.pid):
            time.sleep(0.05)
        run.pid = None

    def _forget(self, run: PodRun) -> None:
        self.runs.pop(run.key, None)
        self.limiter.remove(run.uid)
        shutil.rmtree(self._pod_dir(run.key), ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.run_dir / "pids" / f"{self._proc_name(run.key)}.pid").unlink()

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
                log.warning("cannot delete pod %s: %s", obj_key(pod), exc.reason)

    # -- entry listeners, services.json, Prometheus targets --

    def _sync_entries(self) -> None:
        desired: dict[str, tuple[str, str, int, str]] = {}
        for key, svc in self.informers["services"].items.items():
            pool = (svc["metadata"].get("annotations") or {}).get(DATA_SOURCE_ANNOTATION)
            ports = (svc.get("spec") or {}).get("ports") or []
            if pool and ports:
                desired[key] = (
                    svc["metadata"]["namespace"],
                    svc["metadata"]["name"],
                    int(ports[0]["port"]),
                    pool,
                )
        if (
            self.entry_urls is not None
            and set(desired) == set(self.entry_urls)
            and all(
                (p.service, p.source_pool) == (desired[k][:3], desired[k][3])
                for k, p in self.data_plane.entries.items()
            )
        ):
            return
        preferred = _previous_ports(self.run_dir / SERVICES_FILE)
        ports = self.data_plane.call(self.data_plane.set_entries(desired, preferred))
        self.entry_urls = {k: f"http://{LOOPBACK}:{p}" for k, p in ports.items()}
        write_json_atomic(self.run_dir / SERVICES_FILE, self.entry_urls)
        log.info("entry listeners: %s", self.entry_urls)

    def _sync_prometheus_targets(self) -> None:
        from partita.testbed import prometheus

        directory = self.run_dir / "prometheus"
        if not directory.is_dir():
            return
        pods = self.informers["pods"].items
        groups = []
        for key, run in sorted(self.runs.items()):
            if run.pid is None:
                continue
            labels = (pods.get(key, {}).get("metadata") or {}).get("labels") or {}
            ns, name = key.split("/", 1)
            groups.append(
                prometheus.TargetGroup(
                    (f"{LOOPBACK}:{run.port}",),
                    {
                        "namespace": ns,
                        "pod": name,
                        "node": run.node,
                        "pool": self.pools[run.node],
                        **{
                            k.split("/", 1)[1]: v
                            for k, v in labels.items()
                            if k.startswith("partita.dev/")
                        },
                    },
                )
            )
        doc = [(g.targets, dict(g.labels)) for g in groups]
        if doc != getattr(self, "_targets_written", None):
            prometheus.write_server_targets(directory, groups)
            self._targets_written = doc


def _previous_ports(path: Path) -> dict[str, int]:
    try:
        doc = json.loads(path.read_text())
        return {k: int(v.rsplit(":", 1)[1]) for k, v in doc.items()}
    except (OSError, ValueError, IndexError, AttributeError):
        return {}


def _ts(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m partita.testbed.agent", description=__doc__)
    parser.add_argument("--run-dir", type=Path, required=True, help="the local cluster's run dir")
    parser.add_argument("--log-level", default="INFO")
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe otherwise
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        run(ns.run_dir.resolve(), stop)
    except TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
