"""The files the agent writes for the rest of the test bed: DIR/services.json (entry Services
-> where to call them, read by tests, the demo and the bench), DIR/agent.json (node proxies,
the cgroup mode, the `kubernetes` Service address) and Prometheus' scrape targets of the stage
servers.

services.json has one key per port of each data-source Service (one annotated with
`partita.dev/data-source-pool`, such as a model's Service):
- `"ns/name"` -> `"http://127.0.0.1:PORT"`: its first HTTP port (a model's v2 REST), a base URL;
- `"ns/name:PORT_NAME"` (or `:NUMBER` for an unnamed port) -> its other ports: a base URL for
  another HTTP port, `"127.0.0.1:PORT"` (no scheme: a gRPC target) for a port carried as bytes,
  such as a model's v2 gRPC, `"ns/name:grpc"`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partita.api import labels
from partita.testbed import prometheus
from partita.testbed.errors import TestbedError

SERVICES_FILE = "services.json"
AGENT_FILE = "agent.json"


@dataclass(frozen=True)
class AgentInfo:
    """Where the agent's listeners are, as DIR/agent.json records them."""

    pid: int
    proxies: dict[str, str]
    services: dict[str, str]
    cgroup: str
    sandbox: bool


def load_agent_info(run_dir: Path) -> AgentInfo:
    try:
        doc = json.loads((run_dir / AGENT_FILE).read_text())
        services = json.loads((run_dir / SERVICES_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise TestbedError(f"{run_dir}: the test bed agent is not running ({exc})") from None
    return AgentInfo(
        int(doc["pid"]),
        dict(doc["proxies"]),
        dict(services),
        str(doc["cgroup"]),
        bool(doc.get("sandbox")),
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


def previous_ports(path: Path) -> dict[str, int]:
    """The entry ports of an earlier services.json, so a restarted agent keeps its URLs."""
    try:
        doc = json.loads(path.read_text())
        return {k: int(v.rsplit(":", 1)[1]) for k, v in doc.items()}
    except (OSError, ValueError, IndexError, AttributeError):
        return {}


@dataclass(frozen=True)
class ServerProcess:
    """A running stage server, as Prometheus should label its samples."""

    key: str  # namespace/pod
    port: int
    node: str
    pool: str
    pod_labels: Mapping[str, str]


def server_targets(servers: list[ServerProcess]) -> list[prometheus.TargetGroup]:
    """One target group per stage server: namespace, pod, node, pool and its partita.dev/
    labels (model, revision, stage, shard) without the prefix."""
    groups = []
    for s in sorted(servers, key=lambda s: s.key):
        if s.pod_labels.get(labels.COMPONENT) != labels.STAGE_SERVER:
            continue
        ns, name = s.key.split("/", 1)
        groups.append(
            prometheus.TargetGroup(
                (f"127.0.0.1:{s.port}",),
                {
                    "namespace": ns,
                    "pod": name,
                    "node": s.node,
                    "pool": s.pool,
                    **{
                        k.split("/", 1)[1]: v
                        for k, v in s.pod_labels.items()
                        if k.startswith(labels.PREFIX + "/")
                    },
                },
            )
        )
    return groups


def operator_targets(pods: list[tuple[str, int]]) -> list[prometheus.TargetGroup]:
    """One target group per running operator pod (namespace/pod, its port: the operator's
    one HTTP port, where /metrics is)."""
    groups = []
    for key, port in sorted(pods):
        name = key.split("/", 1)[1]
        groups.append(prometheus.TargetGroup((f"127.0.0.1:{port}",), {"pod": name}))
    return groups
