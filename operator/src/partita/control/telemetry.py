"""The operator's own Prometheus series: what the loop decided, why, and what it predicted,
so dashboards and alerts show where each stage runs and why it moved.

Counters and histograms are prometheus_client's (they lock internally). The gauges that
describe each model's current plan are frozen views the loop task replaces after every step
and a collector renders when Prometheus scrapes: the scrape never sees half a step, and a
model that is deleted leaves no series behind. `partita.metrics` is the other direction
(the operator reading Prometheus); this module is the operator being read.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from partita.api.edgemodel import EdgeModel, EdgeModelStatus, Phase
from partita.control.outcome import EventType, Outcome
from partita.control.step import ModelState
from partita.metrics.observation import Observation
from partita.planner import ClusterSnapshot

# Why a serving model's plan changed (the label `reason` of partita_reschedules_total).
NODE_LOST = "NodeLost"
NO_LONGER_FITS = "NoLongerFits"
SPEC_CHANGED = "SpecChanged"
SLO_MISSED = "SloMissed"
IMPROVEMENT = "Improvement"
PREEMPTED = "Preempted"
OTHER = "Other"
RESCHEDULE_REASONS = (
    NODE_LOST,
    NO_LONGER_FITS,
    SPEC_CHANGED,
    SLO_MISSED,
    IMPROVEMENT,
    PREEMPTED,
    OTHER,
)

# What reconciles (the label `controller` of the reconcile counters): `profile` fetches,
# verifies and profiles an EdgeModel, `placement` is one step of the control loop for it,
# `pool` counts a DevicePool's nodes.
PROFILE = "profile"
PLACEMENT = "placement"
POOL = "pool"

_PLANNING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def reschedule_reason(why: str) -> str:
    """The reason label of a move, from the rescheduler's explanation of it."""
    text = why.lower()
    if "lost" in text:
        return NODE_LOST
    if "no longer fits" in text:
        return NO_LONGER_FITS
    if "spec changed" in text:
        return SPEC_CHANGED
    if "misses the slo" in text:
        return SLO_MISSED
    if "better" in text:
        return IMPROVEMENT
    return OTHER


@dataclass(frozen=True)
class ModelView:
    """What the gauges say about one model: its spec's SLO and the status the loop wrote."""

    namespace: str
    name: str
    status: EdgeModelStatus
    slo_p95_s: float | None = None


@dataclass(frozen=True)
class ClusterView:
    """The planner's picture of nodes and links, and what Prometheus last said."""

    nodes: tuple[tuple[str, str, str, bool], ...] = ()  # name, pool, tier, ready
    # (source pool, target pool) -> bandwidth bit/s, RTT s, measured (else declared)
    links: Mapping[tuple[str, str], tuple[float, float, bool]] = field(default_factory=dict)


@dataclass(frozen=True)
class Freshness:
    last_poll_s: float | None = None  # when the last observation was taken (Unix seconds)
    fresh: bool = False  # what the loop's MetricsFresh condition says
    problems: int = 0  # what the last poll lacked or could not run


class Telemetry:
    """The operator's metrics registry; `serve` exposes it over HTTP."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # the operator's CPU, memory, open files
        self.reconciles = Counter(
            "partita_reconciles", "Reconciles by object kind and controller.",
            ("kind", "controller"), registry=self.registry,
        )  # fmt: skip
        self.reconcile_errors = Counter(
            "partita_reconcile_errors",
            "Reconciles that failed or must be retried, by kind, controller and reason.",
            ("kind", "controller", "reason"), registry=self.registry,
        )  # fmt: skip
        self.planning = Histogram(
            "partita_planning_seconds",
            "Time of one control-loop step of a model (planning and rescheduling decisions).",
            ("namespace", "model"), buckets=_PLANNING_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.reschedules = Counter(
            "partita_reschedules", "Plan changes of a serving model, by reason.",
            ("namespace", "model", "reason"), registry=self.registry,
        )  # fmt: skip
        self.polls = Counter(
            "partita_metrics_polls", "Prometheus polls of the operator, by freshness.",
            ("fresh",), registry=self.registry,
        )  # fmt: skip
        self._models: dict[tuple[str, str], ModelView] = {}
        self._counted: set[tuple[str, str]] = set()  # models with counter series
        self._cluster = ClusterView()
        self._freshness = Freshness()
        self.registry.register(_Gauges(self))

    # -- what the loop and the handlers report ---------------------------------------------

    def reconciled(self, kind: str, controller: str, outcome: Outcome | None = None) -> None:
        """One reconcile; an outcome asking for a retry or stopping for good is an error too,
        named by its Warning Event (e.g. DigestMismatch) when it has one."""
        self.reconciles.labels(kind, controller).inc()
        if outcome is None or (outcome.retry_after_s is None and outcome.permanent_error is None):
            return
        warning = next((e.reason for e in outcome.events if e.type is EventType.WARNING), None)
        default = "PermanentError" if outcome.permanent_error is not None else "Retry"
        self.error(kind, controller, warning or default)

    def error(self, kind: str, controller: str, reason: str) -> None:
        self.reconcile_errors.labels(kind, controller, reason).inc()

    def observed(self, observation: Observation) -> None:
        """A Prometheus poll finished."""
        self.polls.labels("true" if observation.fresh else "false").inc()
        self._freshness = Freshness(
            observation.taken_at, self._freshness.fresh, len(observation.problems)
        )

    def freshness(self, fresh: bool) -> None:
        """What the loop concluded about the metrics for this round (MetricsFresh)."""
        if fresh != self._freshness.fresh:
            f = self._freshness
            self._freshness = Freshness(f.last_poll_s, fresh, f.problems)

    def stepped(
        self,
        model: EdgeModel,
        before: ModelState | None,
        after: ModelState,
        seconds: float,
    ) -> None:
        """One step of the loop for `model` took `seconds`; count the move it started."""
        ns, name = model.metadata.namespace or "", model.metadata.name
        self.reconciles.labels("EdgeModel", PLACEMENT).inc()
        self.planning.labels(ns, name).observe(seconds)
        self._counted.add((ns, name))
        for reason in RESCHEDULE_REASONS:  # every reason a series from the start, at 0
            self.reschedules.labels(ns, name, reason)
        rollout = after.rollout
        started = rollout is not None and (
            before is None
            or before.rollout is None
            or before.rollout.plan.revision != rollout.plan.revision
        )
        if started and rollout is not None and rollout.reason == "Rescheduled":
            self.reschedules.labels(ns, name, reschedule_reason(rollout.why)).inc()
        elif before is not None and before.serving is not None and after.serving is None:
            self.reschedules.labels(ns, name, PREEMPTED).inc()

    def model_status(self, model: EdgeModel, status: EdgeModelStatus) -> None:
        """The status the loop just wrote for `model` (phase, plan, node speeds)."""
        ns, name = model.metadata.namespace or "", model.metadata.name
        slo = model.spec.slo.p95_latency_seconds if model.spec.slo else None
        self._models = {**self._models, (ns, name): ModelView(ns, name, status, slo)}

    def cluster(self, snapshot: ClusterSnapshot, observation: Observation | None) -> None:
        """The links and nodes the planner used (measured, or the DevicePools' defaults)."""
        measured = observation.links if observation is not None else {}
        links = {}
        for link in snapshot.links:
            seen = measured.get((link.src, link.dst))
            known = seen is not None and seen.bandwidth_bps is not None
            links[(link.src, link.dst)] = (link.bandwidth_bps, link.rtt_s, known)
        nodes = tuple((n.name, n.pool, n.tier.value, n.ready) for n in snapshot.nodes)
        self._cluster = ClusterView(nodes, links)

    def retain(self, keys: Iterable[tuple[str, str]]) -> None:
        """Only these (namespace, name) models exist: the series of every other one go."""
        keep = set(keys)
        gone = {k for k in self._models if k not in keep} | (self._counted - keep)
        self._models = {k: v for k, v in self._models.items() if k in keep}
        self._counted &= keep
        for ns, name in gone:
            for reason in RESCHEDULE_REASONS:
                self._remove(self.reschedules, ns, name, reason)
            self._remove(self.planning, ns, name)

    @staticmethod
    def _remove(metric: Counter | Histogram, *labels: str) -> None:
        with contextlib.suppress(KeyError):
            metric.remove(*labels)

    # -- serving --------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """What /metrics answers (the operator's HTTP endpoint, `partita.control.endpoint`)."""
        return generate_latest(self.registry)

    # -- what a scrape reads --------------------------------------------------------------

    def views(self) -> tuple[list[ModelView], ClusterView, Freshness]:
        return list(self._models.values()), self._cluster, self._freshness


class _Gauges:
    """Renders the current views as gauge families at scrape time."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry
        self._lock = threading.Lock()  # two scrapes at once render one after the other

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            models, cluster, freshness = self._telemetry.views()
            yield from _model_families(models)
            yield from _cluster_families(cluster)
            yield from _freshness_families(freshness)


def _gauge(name: str, doc: str, labels: Iterable[str], unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels), unit=unit)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _model_families(models: list[ModelView]) -> Iterator[Metric]:
    key = ("namespace", "model")
    phase = _gauge("partita_model_phase", "1 for the model's current phase, 0 for the others.",
                   (*key, "phase"))  # fmt: skip
    slo = _gauge("partita_model_slo_seconds", "The p95 latency the EdgeModel's spec.slo asks.", key)
    revision = _gauge("partita_plan_revision", "Revision of the plan serving the model.", key)
    stage_info = _gauge(
        "partita_plan_stage_info",
        "1 for every server of the serving plan: its stage, shard, pool and node.",
        (*key, "revision", "stage", "shard", "pool", "node"),
    )
    predicted = _gauge(
        "partita_model_predicted_latency_seconds",
        "End-to-end latency the planner predicts for the serving plan.", key,
    )  # fmt: skip
    observed = _gauge(
        "partita_model_observed_latency_seconds",
        "p95 end-to-end latency the loop last read from the inference servers.", key,
    )  # fmt: skip
    compute = _gauge(
        "partita_stage_predicted_compute_seconds",
        "Compute time per request the planner predicts for a stage's slowest server.",
        (*key, "stage"),
    )
    transfer = _gauge(
        "partita_stage_predicted_transfer_seconds",
        "Time the planner predicts to bring a stage its inputs (previous stage or data source).",
        (*key, "stage"),
    )
    energy = _gauge(
        "partita_model_energy_joules",
        "Energy per request of the serving plan, in joules: predicted by the planner, and "
        "observed (from the compute and hop times the servers measured), by source.",
        (*key, "source"),
    )
    offload = _gauge(
        "partita_model_cascade_offload_ratio",
        "Share of a cascade's requests going on to the main model: planned (what the plan "
        "was predicted with) and observed (what the servers last reported), by source.",
        (*key, "source"),
    )
    speed = _gauge(
        "partita_node_speed_gflops",
        "GFLOP/s the planner uses for the model on a node, by source: declared, profiled or "
        "learned (profiled, corrected by observed compute times).",
        (*key, "node", "source"),
    )
    for view in models:
        k = (view.namespace, view.name)
        st = view.status
        for p in Phase:
            phase.add_metric([*k, p.value], 1.0 if st.phase == p else 0.0)
        if _finite(view.slo_p95_s):
            slo.add_metric(list(k), float(view.slo_p95_s))  # type: ignore[arg-type]
        for s in st.node_speeds:
            speed.add_metric([*k, s.node, s.source], s.gflops)
        plan = st.plan
        if plan is None:
            continue
        revision.add_metric(list(k), float(plan.revision))
        if plan.predicted_p95_ms is not None:
            predicted.add_metric(list(k), plan.predicted_p95_ms / 1000)
        if plan.observed_p95_ms is not None:
            observed.add_metric(list(k), plan.observed_p95_ms / 1000)
        for source, joules in (
            ("predicted", plan.predicted_energy_j),
            ("observed", plan.observed_energy_j),
        ):
            if joules is not None:
                energy.add_metric([*k, source], joules)
        if plan.cascade is not None:
            offload.add_metric([*k, "planned"], plan.cascade.offload_rate)
            if plan.cascade.observed_offload_rate is not None:
                offload.add_metric([*k, "observed"], plan.cascade.observed_offload_rate)
        for stage in plan.stages:
            index = str(stage.index)
            shards = stage.shards or []
            for i, shard in enumerate(shards):
                label = str(i) if len(shards) > 1 else ""
                stage_info.add_metric(
                    [*k, str(plan.revision), index, label, stage.pool, shard.node], 1.0
                )
            if stage.predicted_compute_ms is not None:
                compute.add_metric([*k, index], stage.predicted_compute_ms / 1000)
            if stage.predicted_transfer_ms is not None:
                transfer.add_metric([*k, index], stage.predicted_transfer_ms / 1000)
    yield from (phase, slo, revision, stage_info, predicted, observed, compute, transfer, speed)
    yield from (energy, offload)


def _cluster_families(cluster: ClusterView) -> Iterator[Metric]:
    link = ("source_pool", "target_pool", "source")
    bandwidth = _gauge(
        "partita_link_bandwidth_estimate_bps",
        "Bandwidth the planner uses between two pools, bit/s; source: measured (Prometheus) or "
        "declared (the DevicePool's network defaults).",
        link,
    )
    rtt = _gauge(
        "partita_link_rtt_estimate_seconds",
        "Round-trip time the planner uses between two pools; source as for the bandwidth.",
        link,
    )
    nodes = _gauge(
        "partita_node_info", "1 for every node the planner knows, with its pool and tier.",
        ("node", "pool", "tier"),
    )  # fmt: skip
    ready = _gauge("partita_node_ready", "1 when the planner sees the node Ready.", ("node",))
    for (src, dst), (bps, rtt_s, measured) in sorted(cluster.links.items()):
        source = "measured" if measured else "declared"
        bandwidth.add_metric([src, dst, source], bps)
        rtt.add_metric([src, dst, source], rtt_s)
    for name, pool, tier, is_ready in cluster.nodes:
        nodes.add_metric([name, pool, tier], 1.0)
        ready.add_metric([name], 1.0 if is_ready else 0.0)
    yield from (bandwidth, rtt, nodes, ready)


def _freshness_families(freshness: Freshness) -> Iterator[Metric]:
    fresh = _gauge(
        "partita_metrics_fresh",
        "1 while the loop plans on current Prometheus data (condition MetricsFresh).", (),
    )  # fmt: skip
    fresh.add_metric([], 1.0 if freshness.fresh else 0.0)
    yield fresh
    problems = _gauge(
        "partita_metrics_problems", "Queries that failed or expected series missing, last poll.",
        (),
    )  # fmt: skip
    problems.add_metric([], float(freshness.problems))
    yield problems
    if freshness.last_poll_s is not None:
        last = _gauge(
            "partita_metrics_last_poll_timestamp_seconds",
            "When the operator's last Prometheus poll was taken (Unix time).", (),
        )  # fmt: skip
        last.add_metric([], freshness.last_poll_s)
        yield last
