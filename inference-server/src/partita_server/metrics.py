"""What a stage server measures, in Prometheus form, for the operator's online learning.

Each server gets its own registry (no process-global collectors), so several servers can
share a process in tests and the bench.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The `partita_*` series of one stage server."""

    def __init__(self, model: str, stage: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model, self.stage = model, stage
        labels = ("model", "stage")
        self.requests = Counter(
            "partita_requests", "Inference requests by result code.",
            (*labels, "code"), registry=self.registry,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "partita_request_seconds", "Request latency at this server, chain included.",
            (*labels, "code"), buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.compute_seconds = Histogram(
            "partita_compute_seconds", "onnxruntime time per run of this stage.",
            labels, buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        hop = (*labels, "next_stage", "endpoint")
        self.hop_bytes = Counter(
            "partita_hop_bytes", "Bytes sent to the next stage (request bodies).",
            hop, registry=self.registry,
        )  # fmt: skip
        self.hop_seconds = Histogram(
            "partita_hop_seconds",
            "Network time of a hop: round trip minus the next server's own time. "
            "rate(partita_hop_bytes_total) / rate(partita_hop_seconds_sum) is the link rate.",
            hop, buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.hop_errors = Counter(
            "partita_hop_errors", "Failed calls to a next-stage endpoint by reason.",
            (*hop, "reason"), registry=self.registry,
        )  # fmt: skip
        self.hop_retries = Counter(
            "partita_hop_retries", "Requests sent again to a next stage after it failed on the "
            "way (a hop with retry: a model's entry routers).",
            (*labels, "next_stage"), registry=self.registry,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "partita_queue_depth", "Requests waiting for the batcher or the runtime.",
            labels, registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "partita_batch_size", "Rows per onnxruntime run.",
            labels, buckets=_BATCH_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.cascade = Counter(
            "partita_cascade_requests", "Cascade decisions: answered locally or forwarded.",
            (*labels, "decision"), registry=self.registry,
        )  # fmt: skip
        self.offload_ratio = Gauge(
            "partita_cascade_offload_ratio", "Share of cascade requests forwarded so far.",
            labels, registry=self.registry,
        )  # fmt: skip
        self._cascade_seen = [0, 0]  # local, forwarded
        self.queue = self.queue_depth.labels(model, stage)
        self.compute = self.compute_seconds.labels(model, stage)
        self.batch = self.batch_size.labels(model, stage)

    def observe_request(self, code: int, seconds: float) -> None:
        self.requests.labels(self.model, self.stage, str(code)).inc()
        self.request_seconds.labels(self.model, self.stage, str(code)).observe(seconds)

    def observe_hop(self, next_stage: str, endpoint: str, nbytes: int, seconds: float) -> None:
        self.hop_bytes.labels(self.model, self.stage, next_stage, endpoint).inc(nbytes)
        self.hop_seconds.labels(self.model, self.stage, next_stage, endpoint).observe(seconds)

    def observe_hop_error(self, next_stage: str, endpoint: str, reason: str) -> None:
        self.hop_errors.labels(self.model, self.stage, next_stage, endpoint, reason).inc()

    def observe_retry(self, next_stage: str) -> None:
        self.hop_retries.labels(self.model, self.stage, next_stage).inc()

    def observe_cascade(self, forwarded: bool) -> None:
        self._cascade_seen[forwarded] += 1
        decision = "forward" if forwarded else "local"
        self.cascade.labels(self.model, self.stage, decision).inc()
        self.offload_ratio.labels(self.model, self.stage).set(
            self._cascade_seen[1] / sum(self._cascade_seen)
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
