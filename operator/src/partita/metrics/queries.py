"""The PromQL the metrics loop runs: every query configurable, defaults for the exporters a
real cluster has (node_exporter, blackbox_exporter, iperf3_exporter) and for the inference
servers' own `partita_*` series.

The chart renders `prometheus.queries` from its values into a YAML file of camelCase keys
(`cpuBusy`, `linkBandwidthBps`, ...); `Queries.load` reads it, keys it does not set keep the
defaults below. A query set to "" is not run (e.g. a cluster without iperf3_exporter), and
nothing is then reported missing for it.

Result shapes the reader understands (see `partita.metrics.observation`):
- node queries: one series per node, labelled `node` (or `instance`, `host:port` stripped);
- link queries: one series per pool pair, labelled `source_pool`/`target_pool` (or
  `source`/`target`); pool names are DevicePool names;
- stage, hop and model queries: labelled as the servers' metrics are (`namespace`, `model`,
  `stage`, `next_stage`, and where the scrape adds them `revision`, `shard`, `node`).
Several series with the same key (e.g. an unaggregated query) are averaged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from .errors import MetricsError

# The server clients call: the pod's `partita.dev/entry` label, which the scrape copies (the
# stage ServiceMonitor's relabelings, the local cluster's agent): the first stage, the
# gateway of a sharded first stage, or a cascade's small model.
ENTRY_STAGE = 'entry="true"'
# Latency of answered requests only: a fast failure is not a fast answer.
ANSWERED = 'code="200"'
_STAGE_BY = "namespace, model, revision, stage, shard, node"
_HOP_BY = "namespace, model, revision, stage, next_stage, node"

DEFAULTS: dict[str, str] = {
    "node_cpu_utilisation": (
        '1 - sum by (node) (rate(node_cpu_seconds_total{mode="idle"}[30s]))'
        " / sum by (node) (rate(node_cpu_seconds_total[30s]))"
    ),
    "node_memory_available": "max by (node) (node_memory_MemAvailable_bytes)",
    "node_memory_total": "max by (node) (node_memory_MemTotal_bytes)",
    "link_rtt": 'avg by (source_pool, target_pool) (probe_icmp_duration_seconds{phase="rtt"})',
    "link_bandwidth": (
        "avg by (source_pool, target_pool) (8 * iperf3_received_bytes / iperf3_received_seconds)"
    ),
    "stage_compute": (
        f"sum by ({_STAGE_BY}) (rate(partita_compute_seconds_sum[1m]))"
        f" / sum by ({_STAGE_BY}) (rate(partita_compute_seconds_count[1m]))"
    ),
    "stage_latency_p95": (
        f"histogram_quantile(0.95, sum by (le, {_STAGE_BY})"
        f" (rate(partita_request_seconds_bucket{{{ANSWERED}}}[1m])))"
    ),
    "hop_bytes_rate": f"sum by ({_HOP_BY}) (rate(partita_hop_bytes_total[1m]))",
    "hop_seconds": (
        f"sum by ({_HOP_BY}) (rate(partita_hop_seconds_sum[1m]))"
        f" / sum by ({_HOP_BY}) (rate(partita_hop_seconds_count[1m]))"
    ),
    "model_latency_p95": (
        "histogram_quantile(0.95, sum by (le, namespace, model)"
        f" (rate(partita_request_seconds_bucket{{{ENTRY_STAGE}, {ANSWERED}}}[1m])))"
    ),
    "cascade_offload": (
        'sum by (namespace, model) (rate(partita_cascade_requests_total{decision="forward"}[1m]))'
        " / sum by (namespace, model) (rate(partita_cascade_requests_total[1m]))"
    ),
}

# The chart's recording rules (charts/partita/files/prometheus-rules.yaml) record exactly these
# defaults under these names; a test keeps both in step.
RECORDING_RULES: dict[str, str] = {
    "node_cpu_utilisation": "partita:node_cpu_utilisation:ratio",
    "node_memory_available": "partita:node_memory_available:bytes",
    "node_memory_total": "partita:node_memory_total:bytes",
    "link_rtt": "partita:link_rtt_seconds",
    "link_bandwidth": "partita:link_bandwidth_bps",
    "stage_compute": "partita:stage_compute_seconds:mean1m",
    "stage_latency_p95": "partita:stage_request_seconds:p95",
    "hop_bytes_rate": "partita:hop_bytes:rate1m",
    "hop_seconds": "partita:hop_seconds:mean1m",
    "model_latency_p95": "partita:model_request_seconds:p95",
    "cascade_offload": "partita:cascade_offload:ratio1m",
}

# The chart's keys (values.yaml `prometheus.queries`), by field name.
CHART_KEYS: dict[str, str] = {
    "node_cpu_utilisation": "cpuBusy",
    "node_memory_available": "memoryAvailableBytes",
    "node_memory_total": "memoryTotalBytes",
    "link_rtt": "linkRttSeconds",
    "link_bandwidth": "linkBandwidthBps",
    "stage_compute": "stageComputeSeconds",
    "stage_latency_p95": "stageLatencyP95Seconds",
    "hop_bytes_rate": "hopBytesPerSecond",
    "hop_seconds": "hopSeconds",
    "model_latency_p95": "modelLatencyP95Seconds",
    "cascade_offload": "cascadeOffloadRatio",
}


def _query(name: str, description: str) -> Any:
    """A query field: set by its chart key or its field name, dumped under the chart key."""
    return Field(
        default=DEFAULTS[name],
        validation_alias=AliasChoices(CHART_KEYS[name], name),
        serialization_alias=CHART_KEYS[name],
        description=description,
    )


class Queries(BaseModel):
    """One PromQL expression per purpose; field names in Python, camelCase in the chart."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node_cpu_utilisation: str = _query(
        "node_cpu_utilisation", "busy share (0..1) of all CPUs of a node"
    )
    node_memory_available: str = _query("node_memory_available", "bytes a node can still hand out")
    node_memory_total: str = _query("node_memory_total", "bytes of memory a node has")
    link_rtt: str = _query("link_rtt", "round-trip time between two pools, seconds")
    link_bandwidth: str = _query(
        "link_bandwidth", "available bandwidth from one pool to another, bit/s"
    )
    stage_compute: str = _query("stage_compute", "mean onnxruntime seconds per run of a stage")
    stage_latency_p95: str = _query(
        "stage_latency_p95", "p95 request seconds at a stage, the rest of the chain included"
    )
    hop_bytes_rate: str = _query("hop_bytes_rate", "bytes per second a stage sends to the next")
    hop_seconds: str = _query("hop_seconds", "mean network seconds of one hop to the next stage")
    model_latency_p95: str = _query(
        "model_latency_p95", "observed end-to-end p95 seconds of a model, at its entry stage"
    )
    cascade_offload: str = _query(
        "cascade_offload", "share of a cascade's requests its small model forwarded"
    )

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any] | None, where: str = "queries") -> Queries:
        """Queries from the chart's mapping (camelCase or field names); unset keys keep defaults."""
        if doc is None:
            return cls()
        if not isinstance(doc, Mapping):
            raise MetricsError(
                f"{where}: expected a mapping of query name to PromQL, got {type(doc).__name__}"
            )
        try:
            return cls.model_validate(dict(doc))
        except ValidationError as exc:
            known = ", ".join(f"{key} ({name})" for name, key in CHART_KEYS.items())
            details = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                for e in exc.errors()
            )
            raise MetricsError(f"{where}: {details}. Known queries: {known}") from None

    @classmethod
    def load(cls, path: Path) -> Queries:
        """The queries file the chart mounts (PARTITA_QUERIES_FILE); an empty file: defaults."""
        try:
            doc = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise MetricsError(f"{path}: cannot read the queries file: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise MetricsError(f"{path}: not YAML: {exc}") from None
        return cls.from_mapping(doc, str(path))

    @classmethod
    def recorded(cls) -> Queries:
        """Queries that read the chart's recorded series (cheaper on a big Prometheus; needs
        the PrometheusRule or the rules file loaded)."""
        return cls.model_validate(RECORDING_RULES)

    def enabled(self) -> dict[str, str]:
        """Field name -> PromQL of every query that runs (not set to "")."""
        return {name: text for name, text in self.model_dump().items() if text.strip()}
