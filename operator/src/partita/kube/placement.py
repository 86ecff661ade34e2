"""The closed loop for one model: plan, deploy make-before-break, re-evaluate, move.

`PlacementService.step` is called by a kopf timer per EdgeModel. Decisions are the
planner's (pure); this module turns the live objects and the latest metrics into its
inputs and carries its answers out through the `Actuator`. State between steps (the
serving plan, the plan being deployed, when the model last moved) lives here, in memory:
after an operator restart the model is planned afresh and a new revision replaces the
old one make-before-break.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from partita.api.edgemodel import EdgeModel
from partita.kube.manifests import ModelRef, RenderError
from partita.metrics.observation import Observation
from partita.metrics.overlays import with_observation
from partita.model.types import ModelProfile
from partita.planner import (
    Action,
    Cascade,
    ClusterSnapshot,
    Compression,
    ModelRequest,
    Objective,
    Partitioning,
    PartitioningMode,
    Plan,
    Quantization,
    Rescheduling,
    Slo,
    Tier,
    Toleration,
    Unschedulable,
    plan_many,
    predict,
    reschedule,
)
from partita.planner.calibration import apply_speed_factors, update_speed
from partita.planner.manifests import snapshot_from_manifests


class Cluster(Protocol):
    """What the service needs from the cluster (the Actuator, or a fake in unit tests)."""

    def apply_revision(self, ref: ModelRef, plan: Plan) -> int: ...
    def revision_readiness(self, ref: ModelRef, plan: Plan) -> Any: ...
    def switch_entry(self, ref: ModelRef, revision: int) -> None: ...
    def delete_revisions(self, ref: ModelRef, keep: set[int]) -> list[str]: ...


def model_request(model: EdgeModel, offload_rate: float | None = None) -> ModelRequest:
    """The planner's view of an EdgeModel spec."""
    s = model.spec
    cascade = None
    if s.cascade is not None:
        rate = offload_rate if offload_rate is not None else s.cascade.expected_offload_rate
        cascade = Cascade(threshold=s.cascade.threshold, offload_rate=rate)
    return ModelRequest(
        name=model.metadata.name,
        namespace=model.metadata.namespace or "default",
        data_source=s.data_source,
        priority=s.priority,
        pools=tuple(s.pools),
        partitioning=Partitioning(
            mode=PartitioningMode(s.partitioning.mode.value),
            max_stages=s.partitioning.max_stages,
            max_shards=s.partitioning.max_shards,
            cut_compression=Compression(s.partitioning.cut_compression.value),
        ),
        objective=Objective(s.objective.value),
        slo=Slo(
            p95_latency_s=s.slo.p95_latency_seconds if s.slo else None,
            min_throughput_rps=s.slo.min_throughput_rps if s.slo else None,
        ),
        privacy=Tier(s.privacy.raw_input_tier.value) if s.privacy else None,
        cascade=cascade,
        quantization=Quantization(
            allowed=s.quantization.allowed, max_accuracy_drop=s.quantization.max_accuracy_drop
        ),
        rescheduling=Rescheduling(
            min_improvement=s.rescheduling.min_improvement,
            cooldown_s=s.rescheduling.cooldown_seconds,
        ),
        tolerations=tuple(
            Toleration(t.key, t.value, t.effect.value if t.effect else None) for t in s.tolerations
        ),
        cpu=s.resources.cpu,
    )


def build_snapshot(
    pools: Iterable[Mapping[str, Any]],
    nodes: Iterable[Mapping[str, Any]],
    observation: Observation | None,
    reference_gflops: float,
) -> ClusterSnapshot:
    """DevicePools and Nodes as the apiserver has them, with what metrics measured laid
    over them (node load as annotations, links as LinkEstimates), in the planner's terms."""
    docs: list[Mapping[str, Any]] = [dict(p, kind="DevicePool") for p in pools]
    docs += [dict(n, kind="Node") for n in nodes]
    taken_at = observation.taken_at if observation is not None else 0.0
    return snapshot_from_manifests(
        with_observation(docs, observation), reference_gflops=reference_gflops, taken_at=taken_at
    )


# Online learning only from stages doing at least this share of the model's FLOPs and this
# much compute per request, within these bounds of the profiled speed.
LEARN_MIN_SHARE = 0.2
LEARN_MIN_COMPUTE_S = 0.005
LEARN_BOUNDS = (0.25, 4.0)


@dataclass
class ModelState:
    ref: ModelRef
    request: ModelRequest
    profile: ModelProfile
    serving: Plan | None = None
    pending: Plan | None = None
    last_change: float = -math.inf
    revision: int = 0
    drain_until: float | None = None
    pending_since: float = 0.0
    unschedulable: Unschedulable | None = None
    # Learned per node from observed stage compute times (1.0: as profiled).
    speed_factors: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepResult:
    """What a step did, for the status and Events (the handler applies it)."""

    phase: str
    message: str
    plan: Plan | None  # the serving plan (or the one being deployed)
    events: tuple[tuple[str, str, str], ...] = ()  # (type, reason, message)
    conditions: tuple[tuple[str, str, str, str], ...] = ()  # (type, status, reason, message)
    unschedulable: Unschedulable | None = None
    # Learned per node from observed stage compute times (1.0: as profiled).
    speed_factors: dict[str, float] = field(default_factory=dict)


@dataclass
class PlacementService:
    cluster: Cluster
    clock: Callable[[], float]
    drain_s: float = 5.0
    deploy_timeout_s: float = 180.0  # a revision not ready by then is given up
    # Can the stage servers really cut this plan? The planner's cost model assumes what a
    # stage's shardable work is; `partita.model.shard` has the last word on whether a given
    # stage splits. A refusal makes this model plan without shards from then on.
    check: Callable[[ModelRef, Plan], str | None] = lambda ref, plan: None
    models: dict[str, ModelState] = field(default_factory=dict)
    no_shards: dict[str, str] = field(default_factory=dict)

    def forget(self, key: str) -> None:
        self.models.pop(key, None)

    def step(
        self,
        key: str,
        ref: ModelRef,
        request: ModelRequest,
        profile: ModelProfile,
        snapshot: ClusterSnapshot,
        *,
        metrics_fresh: bool,
        others: Sequence[tuple[ModelRequest, ModelProfile, Plan | None]] = (),
        observed_compute: Mapping[tuple[int, str], float] | None = None,
    ) -> StepResult:
        """One turn of the loop for one model. `observed_compute` maps (stage index, node) of
        the serving revision to the compute time its server measured (seconds per request)."""
        now = self.clock()
        if key in self.no_shards:
            request = replace(request, partitioning=replace(request.partitioning, max_shards=1))
        st = self.models.get(key)
        if st is None or st.profile.digest != profile.digest:
            st = ModelState(ref, request, profile)
            self.models[key] = st
        st.ref, st.profile = ref, profile
        events: list[tuple[str, str, str]] = []
        conditions: list[tuple[str, str, str, str]] = []
        fresh = ("MetricsFresh", "True", "Fresh", "resource and network metrics are current")
        stale = (
            "MetricsFresh",
            "False",
            "Stale",
            "Prometheus data is stale or missing: keeping the current plan",
        )
        conditions.append(fresh if metrics_fresh else stale)

        # 1. A revision being deployed: switch traffic once every server is ready.
        if st.pending is not None:
            readiness = self.cluster.revision_readiness(ref, st.pending)
            ready_nodes = {n.name for n in snapshot.nodes if n.ready}
            lost = sorted(set(st.pending.memory_per_node) - ready_nodes)
            if not readiness.ready and (lost or now - st.pending_since > self.deploy_timeout_s):
                # A revision that cannot become ready is given up (the serving one is kept)
                # and the model is planned again from what the cluster is now.
                why = f"node(s) {', '.join(lost)} lost" if lost else readiness.detail
                keep = {st.serving.revision} if st.serving is not None else set()
                self.cluster.delete_revisions(ref, keep=keep)
                events.append(
                    ("Warning", "DeployFailed", f"revision {st.pending.revision} given up: {why}")
                )
                st.pending = None
            elif not readiness.ready:
                return StepResult(
                    "Deploying",
                    f"revision {st.pending.revision}: {readiness.detail}",
                    st.pending,
                    tuple(events),
                    tuple(conditions),
                )
        if st.pending is not None:
            self.cluster.switch_entry(ref, st.pending.revision)
            moved = st.serving is not None
            st.serving, st.pending = st.pending, None
            st.last_change = now
            st.drain_until = now + self.drain_s
            reason = "Rescheduled" if moved else "Deployed"
            events.append(
                (
                    "Normal",
                    reason,
                    f"revision {st.serving.revision} serves: {st.serving.describe()}",
                )
            )
        # 2. Old revisions go only after the new one serves and in-flight requests drained.
        if st.drain_until is not None and now >= st.drain_until and st.serving is not None:
            self.cluster.delete_revisions(ref, keep={st.serving.revision})
            st.drain_until = None

        request_changed = st.request != request
        st.request = request
        if st.serving is None:
            # First placement: plan jointly with the models already placed (priority order,
            # task dropping), then take this model's answer.
            placed = self._placed(key)
            result = self._plan_with_others(request, profile, snapshot, [*others, *placed])
            if isinstance(result, Unschedulable):
                msg = "; ".join(result.reasons)
                if st.unschedulable is None or st.unschedulable.reasons != result.reasons:
                    events.append(("Warning", "Unschedulable", msg))  # once per new reason
                st.unschedulable = result
                conditions.append(("Planned", "False", "Unschedulable", msg))
                return StepResult(
                    "Unschedulable", msg, None, tuple(events), tuple(conditions), result
                )
            st.unschedulable = None
            return self._deploy(st, result, events, conditions, "Planned", key=key)
        placed = self._placed(key)
        if metrics_fresh and any(r.priority > request.priority for r, _, _ in placed):
            # Task dropping also applies to a model already serving: when the models above
            # it no longer leave it room, it gives its capacity up instead of squeezing them.
            joint = self._plan_with_others(request, profile, snapshot, [*others, *placed])
            if isinstance(joint, Unschedulable):
                return self._evict(st, joint, events, conditions)
        if not metrics_fresh and not request_changed:
            return self._serving(st, events, conditions, "metrics stale: plan kept")
        if observed_compute and metrics_fresh:
            self._learn(st, profile, snapshot, observed_compute)
        snapshot = apply_speed_factors(snapshot, st.speed_factors)
        current = st.serving
        decision = reschedule(
            current, profile, request, snapshot, now=now, last_change=st.last_change
        )
        if (
            decision.action is Action.MOVE
            and isinstance(decision.plan, Plan)
            and decision.plan.placement == st.serving.placement
        ):
            # A spec change (SLO, rescheduling knobs...) that leaves every stage where it
            # is: adopt it, redeploy nothing.
            st.serving = replace(decision.plan, revision=st.serving.revision)
            return self._serving(st, events, conditions, "spec change; same placement")
        if decision.action is Action.MOVE and isinstance(decision.plan, Plan):
            return self._deploy(
                st, decision.plan, events, conditions, "Rescheduling", why=decision.reason, key=key
            )
        pred = predict(st.serving, profile, snapshot)
        return self._serving(st, events, conditions, decision.reason, pred.latency_s)

    def _learn(
        self,
        st: ModelState,
        profile: ModelProfile,
        snapshot: ClusterSnapshot,
        observed: Mapping[tuple[int, str], float],
    ) -> None:
        """The seed's dynamic model: each node's speed for this model is rescaled by an EWMA
        of predicted/observed compute time of the stage it serves.

        Only stages that carry a real share of the model teach anything: the time of a
        relay stage of two operators is all fixed overhead, and extrapolating it to the
        whole model once promised 14 ms for a 150 ms model. Factors stay within 4x either
        way of what profiling said."""
        assert st.serving is not None
        pred = predict(st.serving, profile, apply_speed_factors(snapshot, st.speed_factors))
        total = max(profile.total_flops, 1)
        for stage, sp in zip(st.serving.stages, pred.stages, strict=True):
            if len(stage.shards) != 1:
                continue
            share = sum(n.flops for n in profile.nodes[stage.start : stage.end]) / total
            if share < LEARN_MIN_SHARE or sp.compute_s < LEARN_MIN_COMPUTE_S:
                continue
            node = stage.shards[0].node
            seen = observed.get((stage.index, node))
            if seen and sp.compute_s > 0:
                st.speed_factors[node] = update_speed(
                    st.speed_factors.get(node, 1.0), seen, sp.compute_s, bounds=LEARN_BOUNDS
                )

    def _placed(self, key: str) -> list[tuple[ModelRequest, ModelProfile, Plan | None]]:
        """The other models that serve or are being deployed."""
        return [
            (m.request, m.profile, m.serving or m.pending)
            for k, m in self.models.items()
            if k != key and (m.serving or m.pending)
        ]

    def _evict(
        self,
        st: ModelState,
        result: Unschedulable,
        events: list[tuple[str, str, str]],
        conditions: list[tuple[str, str, str, str]],
    ) -> StepResult:
        deleted = self.cluster.delete_revisions(st.ref, keep=set())
        msg = "refused to make room for higher-priority models: " + "; ".join(result.reasons)
        events.append(("Warning", "Unschedulable", f"{msg} ({len(deleted)} objects deleted)"))
        conditions.append(("Planned", "False", "Preempted", msg))
        conditions.append(("Ready", "False", "Preempted", msg))
        st.serving, st.pending, st.drain_until, st.unschedulable = None, None, None, result
        return StepResult("Unschedulable", msg, None, tuple(events), tuple(conditions), result)

    def _plan_with_others(
        self,
        request: ModelRequest,
        profile: ModelProfile,
        snapshot: ClusterSnapshot,
        others: Sequence[tuple[ModelRequest, ModelProfile, Plan | None]],
    ) -> Plan | Unschedulable:
        items = [(request, profile)] + [(r, p) for r, p, _ in others]
        results = plan_many(items, snapshot)
        return results[request.key]

    def _deploy(
        self,
        st: ModelState,
        plan: Plan,
        events: list[tuple[str, str, str]],
        conditions: list[tuple[str, str, str, str]],
        reason: str,
        why: str = "",
        *,
        key: str,
    ) -> StepResult:
        refusal = self.check(st.ref, plan) if any(len(s.shards) > 1 for s in plan.stages) else None
        if refusal is not None:
            self.no_shards[key] = refusal
            msg = f"the planned shards cannot be cut ({refusal}); planning without shards"
            events.append(("Warning", "ShardingRefused", msg))
            conditions.append(("Planned", "False", "ShardingRefused", msg))
            phase = "Ready" if st.serving is not None else "Planning"
            return StepResult(phase, msg, st.serving, tuple(events), tuple(conditions))
        st.revision += 1
        plan = replace(plan, revision=st.revision)
        try:
            count = self.cluster.apply_revision(st.ref, plan)
        except RenderError as exc:
            conditions.append(("Planned", "False", "NotDeployable", str(exc)))
            st.revision -= 1
            return StepResult(
                "Degraded" if st.serving else "Unschedulable",
                str(exc),
                st.serving,
                tuple(events),
                tuple(conditions),
            )
        st.pending = plan
        st.pending_since = self.clock()
        msg = (
            f"revision {plan.revision}: {plan.describe()}; predicted "
            f"{plan.latency_s * 1000:.1f} ms ({count} objects applied)"
        )
        if why:
            msg += f"; because {why}"
        events.append(("Normal", reason, msg))
        conditions.append(("Planned", "True", reason, msg))
        return StepResult("Deploying", msg, plan, tuple(events), tuple(conditions))

    def _serving(
        self,
        st: ModelState,
        events: list[tuple[str, str, str]],
        conditions: list[tuple[str, str, str, str]],
        why: str,
        predicted_s: float | None = None,
    ) -> StepResult:
        assert st.serving is not None
        conditions.append(
            ("Ready", "True", "Serving", f"revision {st.serving.revision} serves traffic")
        )
        return StepResult(
            "Ready",
            f"revision {st.serving.revision} serving; {why}",
            st.serving,
            tuple(events),
            tuple(conditions),
        )
