"""The local cluster's Prometheus (the Debian binary): its configuration, its command line, and
the two HTTP calls the test bed makes to it (ready? and an instant query).

Three scrape jobs: `partita-sim` reads the metrics simulator, keeping the `instance`/`node`
labels it sets (one simulator speaks for every node, as a federated exporter would);
`partita-servers` reads the inference servers the agent lists in a file_sd file, so the servers
show up without a Prometheus restart; `partita-operator` reads the operator's own metrics from
the targets whoever runs the operator lists with `write_operator_targets`, keeping the labels
the operator sets (its `namespace` is the model's, as the chart's ServiceMonitor keeps it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from partita.testbed.errors import TestbedError

if TYPE_CHECKING:
    import httpx

SIM_JOB = "partita-sim"
SERVERS_JOB = "partita-servers"
OPERATOR_JOB = "partita-operator"
CONFIG_FILE = "prometheus.yml"
SERVERS_FILE = "targets/partita-servers.json"
OPERATOR_FILE = "targets/partita-operator.json"
RULES_GLOB = "rules/*.yml"
# Every PromQL query Prometheus answers, one JSON line each: who asks what (e.g. the operator
# pod's polls), readable by tests without a scrape of Prometheus itself.
QUERY_LOG = "queries.log"

Sample = tuple[dict[str, str], float]


@dataclass(frozen=True)
class TargetGroup:
    """One file_sd entry: `host:port` targets sharing labels (e.g. pod, namespace, node)."""

    targets: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict)


def duration(seconds: float) -> str:
    """Seconds as a Prometheus duration: 2 -> '2s', 0.5 -> '500ms'."""
    if seconds <= 0 or not math.isfinite(seconds):
        raise TestbedError(f"scrape interval {seconds!r} s must be a positive number of seconds")
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def config(
    sim_targets: Sequence[str], scrape_interval: float = 2.0, servers_file: str = SERVERS_FILE
) -> dict[str, object]:
    """The prometheus.yml document (paths relative to the config file's directory)."""
    interval = duration(scrape_interval)
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": duration(min(scrape_interval, 10.0)),
            "evaluation_interval": interval,
            "query_log_file": QUERY_LOG,
        },
        "rule_files": [RULES_GLOB],
        "scrape_configs": [
            {
                "job_name": SIM_JOB,
                "honor_labels": True,
                "static_configs": [{"targets": list(sim_targets)}],
            },
            {
                "job_name": SERVERS_JOB,
                "file_sd_configs": [{"files": [servers_file], "refresh_interval": "5s"}],
            },
            {
                "job_name": OPERATOR_JOB,
                "honor_labels": True,
                "file_sd_configs": [{"files": [OPERATOR_FILE], "refresh_interval": "5s"}],
            },
        ],
    }


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_config(directory: Path, sim_targets: Sequence[str], scrape_interval: float = 2.0) -> Path:
    """Write prometheus.yml, an empty server target list and a rules/ directory; return the
    config's path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules").mkdir(exist_ok=True)
    if not (directory / SERVERS_FILE).exists():
        write_server_targets(directory, [])
    if not (directory / OPERATOR_FILE).exists():
        write_operator_targets(directory, [])
    path = directory / CONFIG_FILE
    _write_atomic(path, yaml.safe_dump(config(sim_targets, scrape_interval), sort_keys=False))
    return path


def write_server_targets(directory: Path, groups: Sequence[TargetGroup]) -> Path:
    """Replace the inference-server targets; Prometheus notices the file change by itself."""
    doc = [{"targets": list(g.targets), "labels": dict(g.labels)} for g in groups]
    path = directory / SERVERS_FILE
    _write_atomic(path, json.dumps(doc, indent=1))
    return path


def write_operator_targets(directory: Path, groups: Sequence[TargetGroup]) -> Path:
    """Replace the operator's metrics targets (the operator pods the kubelet runs, each at its
    one HTTP port); an empty list stops the scraping."""
    doc = [{"targets": list(g.targets), "labels": dict(g.labels)} for g in groups]
    path = directory / OPERATOR_FILE
    _write_atomic(path, json.dumps(doc, indent=1))
    return path


def command(
    binary: Path | str,
    config_file: Path,
    data_dir: Path,
    port: int,
    *,
    retention: str = "2h",
    retention_size: str = "256MB",
) -> list[str]:
    """The Prometheus command line: loopback only, lifecycle API on (for /-/reload), a small
    TSDB, since a test bed never needs old data."""
    return [
        str(binary),
        f"--config.file={config_file}",
        f"--storage.tsdb.path={data_dir}",
        f"--storage.tsdb.retention.time={retention}",
        f"--storage.tsdb.retention.size={retention_size}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
        "--log.level=warn",
    ]


def wait_ready(
    url: str,
    timeout: float = 60.0,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once `url/-/ready` answers 200; TestbedError after `timeout` seconds."""
    import httpx

    deadline = clock() + timeout
    last = "no answer"
    while True:
        try:
            r = httpx.get(f"{url}/-/ready", timeout=2.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text.strip()[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc) or type(exc).__name__
        if clock() >= deadline:
            raise TestbedError(f"Prometheus at {url} not ready after {timeout:.0f} s ({last})")
        sleep(0.2)


def query(
    url: str, promql: str, *, timeout: float = 10.0, client: httpx.Client | None = None
) -> list[Sample]:
    """An instant query: one (labels, value) per series (a scalar result has empty labels).
    Pass a `client` when polling: a fresh one per call costs tens of ms (TLS context set-up)."""
    import httpx

    get = client.get if client is not None else httpx.get
    try:
        r = get(f"{url}/api/v1/query", params={"query": promql}, timeout=timeout)
        doc = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise TestbedError(f"Prometheus at {url}: query {promql!r} failed: {exc}") from None
    if doc.get("status") != "success":
        raise TestbedError(
            f"Prometheus at {url}: query {promql!r} refused: {doc.get('error', r.text[:200])}"
        )
    data = doc["data"]
    if data["resultType"] in ("scalar", "string"):
        return [({}, float(data["result"][1]))]
    if data["resultType"] != "vector":
        raise TestbedError(f"query {promql!r} gave a {data['resultType']}, not an instant vector")
    return [(dict(s["metric"]), float(s["value"][1])) for s in data["result"]]


def reload(url: str, *, timeout: float = 10.0) -> None:
    """Make Prometheus re-read its configuration and rule files."""
    import httpx

    try:
        r = httpx.post(f"{url}/-/reload", timeout=timeout)
    except httpx.HTTPError as exc:
        raise TestbedError(f"Prometheus at {url}: reload failed: {exc}") from None
    if r.status_code != 200:
        raise TestbedError(f"Prometheus at {url}: reload refused: {r.text.strip()[:300]}")
