"""A pod spec read for this machine, as a kubelet reads it: the container's volumes written
under the pod's directory, its environment, its probes and its CPU limit.

No API calls: ConfigMaps, Secrets and claims come through a `Sources` the caller passes.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from partita.api import labels
from partita.api.quantity import cpu_cores
from partita.testbed.errors import TestbedError

LOOPBACK = "127.0.0.1"
DEFAULT_TOKEN_EXPIRATION_S = 3600
MAX_BACKOFF_S = 10.0

# Waiting reasons a kubelet reports, used here with the same meaning.
CONFIG_ERROR = "CreateContainerConfigError"  # a referenced ConfigMap, Secret or claim is missing
IMAGE_ERROR = "ErrImagePull"  # an image the test bed has no local program for
CREATE_ERROR = "CreateContainerError"  # the program to run cannot be found


class PodError(TestbedError):
    """A pod the test bed cannot run as given; `reason` is the container's waiting reason and
    the message names the pod and the field."""

    def __init__(self, message: str, reason: str = CONFIG_ERROR) -> None:
        super().__init__(message)
        self.reason = reason


class Sources(Protocol):
    """Where a pod's volumes and env come from (the API server, or a test's dict)."""

    def data(self, kind: str, namespace: str, name: str) -> Mapping[str, str] | None:
        """A ConfigMap's or Secret's data as text; None when it does not exist."""

    def claim_path(self, namespace: str, claim: str) -> Path:
        """The local directory behind a bound PersistentVolumeClaim (raises PodError)."""


def config_data(kind: str, obj: Mapping[str, Any]) -> dict[str, str]:
    """A ConfigMap's or Secret's data as text (Secret data is base64 in the API)."""
    if kind == "Secret":
        out = _decode(obj.get("data") or {})
        out.update(obj.get("stringData") or {})
        return out
    out = dict(obj.get("data") or {})
    out.update(_decode(obj.get("binaryData") or {}))
    return out


def _decode(data: Mapping[str, str]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in data.items()}


def pod_name(pod: Mapping[str, Any]) -> str:
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


# ---- volumes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """A volume mount: what the container sees at `path`, and the local directory it is."""

    path: str
    source: Path
    read_only: bool = False


@dataclass(frozen=True)
class TokenProjection:
    """A ServiceAccount token file the kubelet keeps fresh inside a projected volume."""

    file: Path
    service_account: str
    audience: str | None
    expiration_s: int


@dataclass(frozen=True)
class Volumes:
    mounts: tuple[Mount, ...]
    tokens: tuple[TokenProjection, ...]

    def by_path(self) -> dict[str, Path]:
        return {m.path: m.source for m in self.mounts}


def materialise_volumes(
    pod: Mapping[str, Any], container: Mapping[str, Any], pod_dir: Path, sources: Sources
) -> Volumes:
    """Write the container's ConfigMap, Secret, downward API and emptyDir volumes under
    `pod_dir`, resolve hostPath and claim volumes to local directories, and list the
    ServiceAccount tokens to project. A missing required source is a PodError."""
    name = pod_name(pod)
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    mounts: list[Mount] = []
    tokens: list[TokenProjection] = []
    for i, mount in enumerate(container.get("volumeMounts") or []):
        where = f"pod {name}: volumeMounts[{i}] ({mount['name']})"
        vol = volumes.get(mount["name"])
        if vol is None:
            raise PodError(f"{where}: no volume of that name in spec.volumes")
        read_only = bool(mount.get("readOnly"))
        if "hostPath" in vol:
            local = _host_path(vol["hostPath"], where)
        elif "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]
            local = sources.claim_path(pod["metadata"]["namespace"], claim.get("claimName", ""))
            read_only = read_only or bool(claim.get("readOnly"))
        else:
            local = pod_dir / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            for rel, text, secret in _files(pod, vol, sources, where):
                _write_file(local, rel, text, secret, where)
            tokens += [
                TokenProjection(local / rel, account, audience, expiration)
                for rel, account, audience, expiration in _token_sources(pod, vol)
            ]
        path = mount["mountPath"].rstrip("/") or "/"
        sub = mount.get("subPath")
        mounts.append(Mount(path, local / sub if sub else local, read_only))
    return Volumes(tuple(mounts), tuple(tokens))


def _host_path(spec: Mapping[str, Any], where: str) -> Path:
    path = Path(spec.get("path", ""))
    kind = spec.get("type", "")
    if kind == "DirectoryOrCreate":
        path.mkdir(parents=True, exist_ok=True)
    if not path.is_absolute() or (kind == "Directory" and not path.is_dir()):
        raise PodError(f"{where}: hostPath {str(path)!r} is not an existing directory")
    return path


def _files(
    pod: Mapping[str, Any], vol: Mapping[str, Any], sources: Sources, where: str
) -> list[tuple[str, str, bool]]:
    """(relative path, text, is secret) of every file a configMap/secret/downwardAPI/projected
    volume holds."""
    refs: list[tuple[str, Mapping[str, Any]]] = []
    downward: list[Mapping[str, Any]] = []
    if "configMap" in vol:
        refs.append(("ConfigMap", vol["configMap"]))
    elif "secret" in vol:
        refs.append(("Secret", {**vol["secret"], "name": vol["secret"].get("secretName", "")}))
    elif "downwardAPI" in vol:
        downward += vol["downwardAPI"].get("items") or []
    elif "projected" in vol:
        for s in vol["projected"].get("sources") or []:
            if "configMap" in s:
                refs.append(("ConfigMap", s["configMap"]))
            elif "secret" in s:
                refs.append(("Secret", s["secret"]))
            elif "downwardAPI" in s:
                downward += s["downwardAPI"].get("items") or []
    elif "emptyDir" not in vol:
        kinds = ", ".join(k for k in vol if k != "name") or "none"
        raise PodError(f"{where}: volume source {kinds} is not supported by the test bed")
    ns = pod["metadata"]["namespace"]
    out: list[tuple[str, str, bool]] = []
    for kind, ref in refs:
        data = sources.data(kind, ns, ref.get("name", ""))
        if data is None:
            if ref.get("optional"):
                continue
            raise PodError(
                f"{where}: {kind} {ns}/{ref.get('name')} not found; create it, or mark the "
                "volume optional"
            )
        for item in ref.get("items") or [{"key": k, "path": k} for k in data]:
            if item["key"] not in data:
                if ref.get("optional"):
                    continue
                raise PodError(f"{where}: {kind} {ns}/{ref.get('name')} has no key {item['key']!r}")
            out.append((item["path"], data[item["key"]], kind == "Secret"))
    for item in downward:
        if "fieldRef" in item:
            value = field_ref(pod, item["fieldRef"]["fieldPath"], "")
        else:
            value = resource_ref(pod["spec"]["containers"][0], item.get("resourceFieldRef") or {})
        out.append((item["path"], value, False))
    return out


def _token_sources(
    pod: Mapping[str, Any], vol: Mapping[str, Any]
) -> list[tuple[str, str, str | None, int]]:
    account = pod["spec"].get("serviceAccountName") or "default"
    out = []
    for s in (vol.get("projected") or {}).get("sources") or []:
        t = s.get("serviceAccountToken")
        if t is not None:
            expiration = int(t.get("expirationSeconds", DEFAULT_TOKEN_EXPIRATION_S))
            out.append((t["path"], account, t.get("audience") or None, expiration))
    return out


def _write_file(local: Path, rel: str, text: str, secret: bool, where: str) -> None:
    dest = local / rel
    if not dest.resolve().is_relative_to(local.resolve()):
        raise PodError(f"{where}: item path {rel!r} leaves the volume")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    if secret:
        dest.chmod(0o600)


def rewrite_path(value: str, mounts: Mapping[str, Path]) -> str:
    """A value naming a file under a mountPath, pointed at the local copy (longest mount wins);
    for processes that cannot have their own mount namespace."""
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount:
            return str(mounts[mount])
        if value.startswith(mount.rstrip("/") + "/"):
            return str(mounts[mount] / value[len(mount.rstrip("/")) + 1 :])
    return value


# ---- environment -----------------------------------------------------------------------------

_VAR_RE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known names are replaced, `$$` is a literal `$`."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_RE.sub(sub, value)


def field_ref(pod: Mapping[str, Any], path: str, pod_ip: str) -> str:
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
    raise PodError(f"pod {pod_name(pod)}: fieldRef {path!r} is not supported by the test bed")


def resource_ref(container: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    kind, _, res = ref.get("resource", "").partition(".")
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
    sources: Sources,
    pod_ip: str = "",
    rewrite: Mapping[str, Path] | None = None,
) -> dict[str, str]:
    """The container's environment as a kubelet computes it (envFrom, then env in order, with
    `$(VAR)` expansion). With `rewrite` (mountPath -> local directory), values naming a path
    under a mountPath point at the local copy instead."""
    ns = pod["metadata"]["namespace"]
    where = f"pod {pod_name(pod)}"
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        kind, ref = (
            ("ConfigMap", src["configMapRef"])
            if "configMapRef" in src
            else ("Secret", src.get("secretRef") or {})
        )
        data = sources.data(kind, ns, ref.get("name", ""))
        if data is None:
            if ref.get("optional"):
                continue
            raise PodError(f"{where}: envFrom {kind} {ns}/{ref.get('name')} not found")
        prefix = src.get("prefix", "")
        env.update({prefix + k: v for k, v in data.items()})
    for i, var in enumerate(container.get("env") or []):
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = rewrite_path(expand(var.get("value", ""), env), rewrite or {})
            continue
        vf = var["valueFrom"]
        for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
            if key in vf:
                ref = vf[key]
                data = sources.data(kind, ns, ref["name"])
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        break
                    raise PodError(
                        f"{where}: env[{i}] ({name}).valueFrom.{key}: {kind} {ns}/{ref['name']} "
                        f"has no key {ref['key']!r}; create it or mark it optional"
                    )
                env[name] = data[ref["key"]]
                break
        else:
            if "fieldRef" in vf:
                env[name] = field_ref(pod, vf["fieldRef"]["fieldPath"], pod_ip)
            elif "resourceFieldRef" in vf:
                env[name] = resource_ref(container, vf["resourceFieldRef"])
            else:
                raise PodError(f"{where}: env[{i}] ({name}).valueFrom: unsupported source")
    return env


# ---- probes, limits, nodes -------------------------------------------------------------------


@dataclass(frozen=True)
class LocalPorts:
    """Where a container's ports listen on this machine: every pod shares one loopback, so
    each declared containerPort moves to a free local port of its own (as each pod has its
    own IP on a real cluster). `primary` is the first declared port's, or the one port a
    container that declares none gets; probes and scrapes go there."""

    primary: int
    by_number: Mapping[int, int] = field(default_factory=dict)  # containerPort -> local
    names: Mapping[str, int] = field(default_factory=dict)  # port name -> containerPort

    def local(self, port: int | str | None) -> int:
        """The local port of a containerPort given by number or name (a Service's
        targetPort); a port the container does not declare is its primary one."""
        number = self.names.get(port) if isinstance(port, str) else port
        return self.by_number.get(number, self.primary) if number is not None else self.primary


def local_ports(container: Mapping[str, Any], free_port: Callable[[], int]) -> LocalPorts:
    """A free local port for each of the container's declared ports."""
    declared = [p for p in container.get("ports") or [] if "containerPort" in p]
    by_number = {int(p["containerPort"]): free_port() for p in declared}
    names = {str(p["name"]): int(p["containerPort"]) for p in declared if p.get("name")}
    primary = by_number[int(declared[0]["containerPort"])] if declared else free_port()
    return LocalPorts(primary, by_number, names)


@dataclass(frozen=True)
class Probe:
    """An httpGet or tcpSocket probe. Its port is the process's primary local port (the test
    bed moves every container port to a free loopback port; see `LocalPorts`)."""

    path: str | None  # None: a tcpSocket probe
    period_s: float = 10.0
    failure_threshold: int = 3
    timeout_s: float = 1.0
    initial_delay_s: float = 0.0
    success_threshold: int = 1


def probe(container: Mapping[str, Any], kind: str) -> Probe | None:
    """The container's `readinessProbe`, `livenessProbe` or `startupProbe`, if it has one."""
    p = container.get(kind)
    if not p:
        return None
    if "httpGet" in p:
        path: str | None = p["httpGet"].get("path", "/")
    elif "tcpSocket" in p:
        path = None
    else:
        handler = ", ".join(k for k in p if k in ("exec", "grpc")) or "no handler"
        raise PodError(
            f"container {container.get('name')}: {kind} with {handler} is not supported by the "
            "test bed (httpGet and tcpSocket are)"
        )
    return Probe(
        path,
        float(p.get("periodSeconds", 10)),
        int(p.get("failureThreshold", 3)),
        float(p.get("timeoutSeconds", 1)),
        float(p.get("initialDelaySeconds", 0)),
        int(p.get("successThreshold", 1)),
    )


def backoff(restarts: int) -> float:
    """Seconds before restart number `restarts` (1, 2, ...): 0.5 s doubling, at most 10 s
    (a kubelet uses 10 s to 5 min; a test bed wants crashes visible, not slow)."""
    return min(MAX_BACKOFF_S, 0.5 * 2 ** max(0, restarts - 1))


def cpu_limit(container: Mapping[str, Any]) -> float | None:
    limits = (container.get("resources") or {}).get("limits") or {}
    return cpu_cores(limits["cpu"], "resources.limits.cpu") if "cpu" in limits else None


def node_speed(node: Mapping[str, Any]) -> float:
    """How fast one core of the node computes, in cores of this machine (1.0 when unset or bad:
    the cluster's own nodes always carry a valid one)."""
    raw = (node.get("metadata", {}).get("annotations") or {}).get(labels.SPEED, "1")
    try:
        speed = float(raw)
    except ValueError:
        return 1.0
    return speed if speed > 0 else 1.0


def node_ready(node: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (node.get("status") or {}).get("conditions") or []
    )


def allocate_ip(pod_cidr: str, used: set[str]) -> str:
    """A pod IP from the top of the node's podCIDR. Only API data: nothing is ever sent to it."""
    net = ipaddress.ip_network(pod_cidr, strict=False)
    for addr in reversed(list(net.hosts())):
        if str(addr) not in used:
            return str(addr)
    raise PodError(f"podCIDR {pod_cidr} is full")
