"""Which container images the test bed can run, and as which local program.

The test bed has no container runtime: an image it knows stands for a console script of the
project's venv (the venv is what the image's /opt/partita holds), with the ENTRYPOINT, CMD and
ENV its Dockerfile gives. Any other image is refused with ErrImagePull and the reason.

Every pod's processes share this machine's loopback, so each port a container declares is
moved to a free one; each image says where its command line names its ports.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from partita.testbed.kubelet.podspec import (
    CREATE_ERROR,
    IMAGE_ERROR,
    LOOPBACK,
    LocalPorts,
    PodError,
    expand,
)

Listen = Callable[[Sequence[str], LocalPorts], list[str]]
SERVER_PORT_FLAGS = ("--port", "--grpc-port")  # the stage server's REST and gRPC ports


def host_port_flags(args: Sequence[str], ports: LocalPorts) -> list[str]:
    """The stage server's command line: `--host H` moved to loopback, and each port flag
    (`--port P`, `--grpc-port G`, or `--flag=V`) moved to the local port of the containerPort it
    names; `--host` and `--port` (the primary port) added when missing, `--grpc-port 0` (no
    gRPC) kept."""
    out: list[str] = []
    seen: set[str] = set()
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, inline = arg.partition("=")
        if flag == "--host" or flag in SERVER_PORT_FLAGS:
            seen.add(flag)
            given = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
            value = LOOPBACK if flag == "--host" else _moved_port(flag, given, ports)
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
        out += ["--port", str(ports.primary)]
    return out


def _moved_port(flag: str, given: str, ports: LocalPorts) -> str:
    if flag == "--port":
        return str(ports.local(int(given)) if given.isdigit() else ports.primary)
    if given == "0":
        return given
    if not given.isdigit() or int(given) not in ports.by_number:
        declared = sorted(ports.by_number) or "none"
        raise PodError(
            f"{flag} {given}: the test bed moves only declared container ports to loopback; "
            f"declare it in the container's ports (declared: {declared})",
            CREATE_ERROR,
        )
    return str(ports.by_number[int(given)])


def operator_flags(args: Sequence[str], ports: LocalPorts) -> list[str]:
    """The operator's command line: `--listen=HOST:PORT` (its one HTTP port: /healthz, /metrics,
    /v1/models) moved to loopback and its primary port, where its probes go and its Service
    leads."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg.startswith("--listen="):
            out[i] = f"--listen={LOOPBACK}:{ports.primary}"
        elif arg == "--listen" and i + 1 < len(out):
            out[i + 1] = f"{LOOPBACK}:{ports.primary}"
    return out


def runs_operator(pod: Mapping[str, Any]) -> bool:
    """The pod's container is the chart's operator image."""
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    return repository(str(containers[0].get("image", ""))) == OPERATOR_IMAGE


@dataclass(frozen=True)
class LocalImage:
    """An image as a local program: what its Dockerfile says, and where it listens."""

    repository: str
    entrypoint: str  # the venv console script its ENTRYPOINT runs
    listen: Listen
    cmd: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # its ENV, PATH aside


OPERATOR_IMAGE = "partita/operator"
_PYTHON_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "HOME": "/tmp"}
_SERVER = LocalImage("partita/server", "partita-server", host_port_flags, env=_PYTHON_ENV)

# Dockerfile.operator and Dockerfile.server (a unit test holds this table to them).
IMAGES: dict[str, LocalImage] = {
    OPERATOR_IMAGE: LocalImage(
        OPERATOR_IMAGE,
        "partita",
        operator_flags,
        ("operator", "--all-namespaces", "--listen=0.0.0.0:8080"),
        {**_PYTHON_ENV, "PARTITA_OPERATOR_CACHE": "/var/cache/partita"},
    ),
    "partita/server": _SERVER,
    # The name `partita operator --server-image` defaults to, for the same image.
    "partita-server": _SERVER,
}


def repository(image: str) -> str:
    """`registry:5000/partita/server:0.1.0@sha256:...` -> `partita/server`."""
    name = image.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    if ":" in last:
        last = last.split(":", 1)[0]
    parts = [*head.split("/"), last] if head else [last]
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    return "/".join(parts)


@dataclass(frozen=True)
class LocalCommand:
    argv: list[str]
    image_env: dict[str, str]


def local_command(
    container: Mapping[str, Any], exe_dir: Path, env: Mapping[str, str], ports: LocalPorts
) -> LocalCommand:
    """The container's command line for this machine: the image's program (or the container's
    `command`, found in the venv or on PATH), `$(VAR)` expanded, listening on `ports`."""
    image = container.get("image", "")
    local = IMAGES.get(repository(image))
    if local is None:
        known = ", ".join(f"{k} -> {v.entrypoint}" for k, v in IMAGES.items())
        raise PodError(
            f"container {container.get('name')}: image {image!r} has no local program in the "
            f"test bed (it runs {known})",
            IMAGE_ERROR,
        )
    command = list(container.get("command") or [])
    args = list(container.get("args") or ([] if command else local.cmd))
    exe, rest = (command[0], command[1:] + args) if command else (local.entrypoint, args)
    return LocalCommand(
        [_find(exe, exe_dir), *local.listen([expand(a, env) for a in rest], ports)],
        dict(local.env),
    )


def image_files(exe_dir: Path) -> list[str]:
    """Where the images' files are on this machine: the venv `exe_dir` belongs to, the
    checkout its packages are installed from (editable), and the Python it runs on."""
    checkout = Path(__file__).resolve().parents[5]
    places = {exe_dir.resolve().parent, checkout, Path(sys.base_prefix)}
    return sorted(str(p) for p in places if not any(q in p.parents for q in places))


def _find(exe: str, exe_dir: Path) -> str:
    if os.path.isabs(exe):
        if not os.access(exe, os.X_OK):
            raise PodError(f"container command {exe!r} is not an executable file", CREATE_ERROR)
        return exe
    local = exe_dir / exe
    found = str(local) if local.exists() else shutil.which(exe)
    if found is None:
        raise PodError(
            f"container command {exe!r} not found next to {exe_dir} or on PATH; install the "
            "project into the venv (`make install`)",
            CREATE_ERROR,
        )
    return found
