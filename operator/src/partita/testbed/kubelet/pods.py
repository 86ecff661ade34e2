"""One pod's process, as a kubelet runs a container: start it with the pod's volumes, env and
ServiceAccount token, probe it, restart it with back-off when it exits or fails its liveness
probe, stop it (SIGTERM, SIGKILL after the grace period) and report all of it as the pod's
status.

A pod runs its first container only (the project's pods have one). Each of its container ports
moves to a free loopback port of its own (`podspec.LocalPorts`, `images`), its probes go to the
first, its CPU is limited to its node's speed (`cgroup`), and HTTP_PROXY is its node's shaping
proxy (`serviceproxy`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import shutil
import signal
import socket
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from partita.testbed import cgroup, processes
from partita.testbed.kubelet import images, sandbox
from partita.testbed.kubelet.podspec import (
    IMAGE_ERROR,
    LOOPBACK,
    LocalPorts,
    Mount,
    PodError,
    Probe,
    Sources,
    TokenProjection,
    backoff,
    container_env,
    cpu_limit,
    local_ports,
    materialise_volumes,
    node_speed,
    probe,
)
from partita.testbed.kubelet.tokens import TokenKeeper

log = logging.getLogger(__name__)

READY_PROBE_START_S = 0.25  # readiness until first ready: find a fresh server fast
READY_PROBE_MAX_S = 1.0  # afterwards: the probe's period, but no slower than this
MAX_GRACE_S = 10.0
CONFIG_RETRY_S = 1.0  # a missing ConfigMap or Secret may appear any moment
IMAGE_RETRY_S = 10.0  # an unknown image will not
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
KUBERNETES_NAMES = (
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class KubernetesService:
    """Where pods reach the apiserver: the `kubernetes` Service's address as the test bed
    gives it (a loopback address of this cluster, in the apiserver certificate's SANs)."""

    host: str
    port: int


PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


@dataclass
class ProbeState:
    """One probe of the running process: when it is due, its failures in a row, and the check
    in flight in the prober's threads."""

    probe: Probe
    next_at: float = 0.0
    failures: int = 0
    check: Future[bool] | None = None


@dataclass
class PodRun:
    """What the agent knows about one pod it runs."""

    key: str
    uid: str
    node: str
    ip: str
    ports: LocalPorts
    container: str
    image: str
    limit_cores: float | None = None
    probes: dict[str, ProbeState] = field(default_factory=dict)  # by PROBES kind
    pid: int | None = None
    started_at: str = ""
    start_count: int = 0
    restarts: int = 0
    ready: bool = False
    started: bool = False  # its startup probe passed (or it has none)
    next_start: float = 0.0
    last_exit: int | None = None
    last_finished: str = ""
    waiting_reason: str = ""
    waiting_message: str = ""
    stopping_since: float | None = None  # SIGTERM sent (a failed probe, or deletion)
    deleting: bool = False
    node_down: bool = False
    cores: float = 0.0
    tokens: tuple[TokenProjection, ...] = ()
    reported: dict[str, Any] = field(default_factory=dict)
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def port(self) -> int:
        """The primary local port: where probes and scrapes go."""
        return self.ports.primary


def pod_status(run: PodRun, pod: Mapping[str, Any], node: Mapping[str, Any]) -> dict[str, Any]:
    """The pod's status as a kubelet reports it (conditions as a type -> status map)."""
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
        "name": run.container,
        "image": run.image,
        "imageID": "",
        "containerID": f"partita-testbed://{run.pid}" if run.pid else "",
        "ready": run.ready,
        "started": run.pid is not None and run.started,
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
    started = (pod.get("status") or {}).get("startTime") or run.started_at
    return {
        "phase": "Running" if run.start_count else "Pending",
        **({"hostIP": host_ip, "hostIPs": [{"ip": host_ip}]} if host_ip else {}),
        "podIP": run.ip,
        "podIPs": [{"ip": run.ip}],
        **({"startTime": started} if started else {}),
        "conditions": {
            "PodReadyToStartContainers": "True",
            "Initialized": "True",
            "ContainersReady": ready,
            "Ready": ready,
        },
        "containerStatuses": [cstatus],
    }


def hosts_file(service: KubernetesService) -> str:
    """The pod's /etc/hosts, as a kubelet writes it, plus the `kubernetes` Service's names."""
    lines = [
        "# Kubernetes-managed hosts file (the Partita test bed).",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{service.host}\t{' '.join(KUBERNETES_NAMES)}",
    ]
    return "\n".join(lines) + "\n"


def timestamp(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodRunner:
    """Starts, probes, restarts and stops the processes of the pods the agent runs."""

    def __init__(
        self,
        run_dir: Path,
        *,
        core: Any,
        sources: Sources,
        tokens: TokenKeeper,
        limiter: cgroup.CpuLimiter,
        proxy_url: Callable[[str], str],
        kubernetes: KubernetesService,
        sandboxed: bool,
        exe_dir: Path,
        now: Callable[[], dt.datetime],
        clock: Callable[[], float],
        sleep: Callable[[float], None],
    ) -> None:
        import httpx

        self.run_dir, self.core, self.sources, self.tokens = run_dir, core, sources, tokens
        self.limiter, self.proxy_url, self.kubernetes = limiter, proxy_url, kubernetes
        self.sandboxed, self.exe_dir = sandboxed, exe_dir
        self._now, self._clock, self._sleep = now, clock, sleep
        self.http = httpx.Client(trust_env=False)
        self.prober = ThreadPoolExecutor(max_workers=4, thread_name_prefix="probe")

    def close(self) -> None:
        self.prober.shutdown(wait=False, cancel_futures=True)
        self.http.close()

    def pod_dir(self, key: str) -> Path:
        return self.run_dir / "pods" / key

    def proc_name(self, key: str) -> str:
        return "pod-" + key.replace("/", "-")

    # -- one step of one pod --

    def step(self, run: PodRun, pod: Mapping[str, Any], node: Mapping[str, Any]) -> None:
        """Advance the pod one step: start when due, collect probes, restart or stop."""
        now = self._clock()
        if run.pid is not None:
            self._check_exit(run, now)
        if run.pid is None and run.stopping_since is None and now >= run.next_start:
            self.start(run, pod, node)
        if run.pid is not None:
            self.tokens.ensure(pod, run.tokens)
            self._probe(run, now)
            if run.stopping_since is not None:
                self._stop_overdue(run, pod, now)

    def start(self, run: PodRun, pod: Mapping[str, Any], node: Mapping[str, Any]) -> None:
        container = pod["spec"]["containers"][0]
        probes = {kind: p for kind in PROBES if (p := probe(container, kind)) is not None}
        pod_dir = self.pod_dir(run.key)
        volumes = materialise_volumes(pod, container, pod_dir, self.sources)
        self.tokens.ensure(pod, volumes.tokens)
        rewrite = None if self.sandboxed else volumes.by_path()
        declared = container_env(pod, container, self.sources, run.ip, rewrite)
        command = images.local_command(container, self.exe_dir, declared, run.ports)
        env = {
            "PATH": f"{self.exe_dir}:{SYSTEM_PATH}",
            "HOSTNAME": pod["metadata"]["name"],
            **command.image_env,
            **self._service_env(),
            **declared,
            **self._proxy_env(run.node),
        }
        argv = command.argv
        if self.sandboxed:
            argv = self._sandbox(pod_dir, volumes.mounts, argv)
        proc = processes.start(self.proc_name(run.key), argv, self.run_dir, env, inherit_env=False)
        self.limiter.place(run.uid, proc.pid, run.cores)
        run.pid, run.tokens = proc.pid, volumes.tokens
        run.start_count += 1
        run.started_at = timestamp(self._now())
        run.ready, run.started = False, "startupProbe" not in probes
        run.waiting_reason = run.waiting_message = ""
        now = self._clock()
        run.probes = {k: ProbeState(p, now + p.initial_delay_s) for k, p in probes.items()}
        log.info(
            "started %s (pid %d) on %s as 127.0.0.1:%d (container ports %s)",
            run.key,
            proc.pid,
            run.node,
            run.port,
            dict(run.ports.by_number),
        )

    def _service_env(self) -> dict[str, str]:
        host, port = self.kubernetes.host, str(self.kubernetes.port)
        return {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
        }

    def _proxy_env(self, node: str) -> dict[str, str]:
        proxy = self.proxy_url(node)
        no_proxy = ",".join([LOOPBACK, "localhost", *KUBERNETES_NAMES, self.kubernetes.host])
        return {
            "HTTP_PROXY": proxy,
            "http_proxy": proxy,
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }

    def _sandbox(self, pod_dir: Path, mounts: tuple[Mount, ...], argv: list[str]) -> list[str]:
        """The launcher's command line: its own mount namespace, then `argv`."""
        hosts = pod_dir / "etc-hosts"
        hosts.write_text(hosts_file(self.kubernetes))
        binds = [*mounts, Mount("/etc/hosts", hosts, read_only=True)]
        spec = {
            "mounts": [
                {"source": str(m.source), "target": m.path, "read_only": m.read_only} for m in binds
            ],
            "keep": images.image_files(self.exe_dir),
            "argv": argv,
        }
        path = pod_dir / "sandbox.json"
        path.write_text(json.dumps(spec, indent=1))
        return sandbox.command(path)

    def _check_exit(self, run: PodRun, now: float) -> None:
        assert run.pid is not None
        if processes.alive(run.pid):
            return
        code = processes.exit_code(run.pid)
        run.pid, run.stopping_since = None, None
        run.last_exit = code if code is not None else 1  # unknown: not a clean exit
        run.last_finished = timestamp(self._now())
        run.ready = False
        if run.deleting:
            return
        run.restarts += 1
        run.next_start = now + backoff(run.restarts)
        run.waiting_reason = "CrashLoopBackOff"
        run.waiting_message = (
            f"exited with code {run.last_exit}; restarting in {backoff(run.restarts):.1f} s; "
            f"see {self.run_dir / 'logs' / (self.proc_name(run.key) + '.log')}"
        )
        log.warning("%s exited with code %d", run.key, run.last_exit)

    # -- probes (each runs in the prober's threads; the result is collected a step later) --

    def _probe(self, run: PodRun, now: float) -> None:
        """The startup probe until it passes, then liveness and readiness, as a kubelet."""
        startup = run.probes.get("startupProbe")
        if not run.started and startup is not None:
            ok = self._collect(run, startup, now, startup.probe.period_s)
            if ok:
                run.started = True
            elif ok is not None and startup.failures >= startup.probe.failure_threshold:
                self._restart(run, now, "startup")
            return
        live = run.probes.get("livenessProbe")
        if live is not None and run.stopping_since is None:
            # its own period and timeout: a busy process is not killed early
            ok = self._collect(run, live, now, live.probe.period_s)
            if ok is False and live.failures >= live.probe.failure_threshold:
                self._restart(run, now, "liveness")
        ready = run.probes.get("readinessProbe")
        if ready is None:
            run.ready = run.stopping_since is None
            return
        # until first ready: find a fresh server fast; then its period, but at most 1 s
        interval = (
            min(ready.probe.period_s, READY_PROBE_MAX_S) if run.ready else READY_PROBE_START_S
        )
        ok = self._collect(run, ready, now, interval)
        if ok and run.stopping_since is None:
            run.ready = True
        elif ok is not None and ready.failures >= ready.probe.failure_threshold:
            run.ready = False
        if run.stopping_since is not None:
            run.ready = False

    def _collect(self, run: PodRun, state: ProbeState, now: float, interval: float) -> bool | None:
        """The result of the probe's finished check (None when none finished); starts the
        next check once it is due."""
        result = None
        if state.check is not None and state.check.done():
            result = state.check.result()
            state.check = None
            state.failures = 0 if result else state.failures + 1
            state.next_at = now + interval
        if state.check is None and now >= state.next_at:
            state.check = self.prober.submit(self._check, state.probe, run.port)
        return result

    def _check(self, p: Probe, port: int) -> bool:
        import httpx

        if p.path is None:
            try:
                socket.create_connection((LOOPBACK, port), timeout=p.timeout_s).close()
            except OSError:
                return False
            return True
        try:
            r = self.http.get(f"http://{LOOPBACK}:{port}{p.path}", timeout=p.timeout_s)
        except httpx.HTTPError:
            return False
        return 200 <= r.status_code < 400

    def _restart(self, run: PodRun, now: float, kind: str) -> None:
        assert run.pid is not None
        log.warning("%s failed its %s probe: restarting", run.key, kind)
        run.ready = False
        run.stopping_since = now
        processes.signal_group(run.pid, signal.SIGTERM)

    # -- stopping --

    def begin_delete(self, run: PodRun, pod: Mapping[str, Any]) -> bool:
        """SIGTERM once, SIGKILL after the grace period; True once the process is gone."""
        run.deleting = True
        if run.pid is None:
            return True
        now = self._clock()
        if run.stopping_since is None:
            run.stopping_since = now
            run.ready = False
            processes.signal_group(run.pid, signal.SIGTERM)
        self._check_exit(run, now)
        if run.pid is None:
            return True
        return self._stop_overdue(run, pod, now)

    def _stop_overdue(self, run: PodRun, pod: Mapping[str, Any], now: float) -> bool:
        """SIGKILL a process that outlived its grace period after SIGTERM; True once gone."""
        assert run.pid is not None and run.stopping_since is not None
        grace = min(float(pod["spec"].get("terminationGracePeriodSeconds", 30)), MAX_GRACE_S)
        if now - run.stopping_since < grace:
            return False
        self.kill(run, grace=0.0)
        return True

    def kill(self, run: PodRun, grace: float) -> None:
        """Stop the process now (waiting at most `grace` after SIGTERM), on the agent's clock."""
        if run.pid is not None:
            processes.stop_one(run.pid, grace, clock=self._clock, sleep=self._sleep)
            self._check_exit(run, self._clock())

    def forget(self, run: PodRun) -> None:
        self.limiter.remove(run.uid)
        self.tokens.forget(t.file for t in run.tokens)
        shutil.rmtree(self.pod_dir(run.key), ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.run_dir / "pids" / f"{self.proc_name(run.key)}.pid").unlink()

    def config_error(self, run: PodRun, error: PodError) -> None:
        """A pod that cannot start as specified: its waiting reason says why, and the agent
        tries again (a ConfigMap may appear, the spec may be fixed)."""
        log.warning("%s", error)
        run.waiting_reason, run.waiting_message = error.reason, str(error)
        retry = IMAGE_RETRY_S if error.reason == IMAGE_ERROR else CONFIG_RETRY_S
        run.next_start = self._clock() + retry

    def update_quota(self, run: PodRun, node: Mapping[str, Any], cpus: int, busy: float) -> None:
        cores = cgroup.quota_cores(node_speed(node), run.limit_cores, cpus, busy)
        if abs(cores - run.cores) > 1e-6:
            run.cores = cores
            if run.pid is not None:
                self.limiter.update(run.uid, cores)

    # -- status --

    def report(self, run: PodRun, pod: Mapping[str, Any], node: Mapping[str, Any]) -> None:
        """Patch the pod's status (a strategic merge, conditions by type) when it changed."""
        from kubernetes.client.exceptions import ApiException

        status = pod_status(run, pod, node)
        if status == run.reported:
            return
        stamp = timestamp(self._now())
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


def new_run(key: str, pod: Mapping[str, Any], ip: str, free_port: Callable[[], int]) -> PodRun:
    """A PodRun for a pod not started yet, each of its container ports on a free local port."""
    spec = pod["spec"]
    container = spec["containers"][0]
    return PodRun(
        key,
        pod["metadata"]["uid"],
        spec["nodeName"],
        ip,
        local_ports(container, free_port),
        container["name"],
        container.get("image", ""),
        limit_cores=cpu_limit(container),
    )
