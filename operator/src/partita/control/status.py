"""The loop's part of an EdgeModel's status, both ways: written after every step, read back
when the operator starts, so a restart adopts what serves instead of deploying it again.

The status carries the serving plan and a rollout in progress with everything needed to
rebuild them (stage ranges, pools, nodes, shard proportions, encodings), the time the serving
revision took the traffic (the cooldown runs from it) and the learned node speeds.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from partita.api.conditions import set_condition
from partita.api.edgemodel import (
    AccuracyStatus,
    CascadeStageStatus,
    EdgeModelStatus,
    NodeSpeedStatus,
    PlanStatus,
    ShardStatus,
    StageStatus,
)
from partita.api.edgemodel import Compression as ApiCompression
from partita.api.meta import Condition
from partita.control.step import OWNED_CONDITIONS, ModelState, Report, Rollout
from partita.kube.manifests import CASCADE_STAGE
from partita.metrics.observation import Observation
from partita.model.types import ModelProfile
from partita.planner import (
    CascadePlacement,
    ClusterSnapshot,
    Compression,
    ModelRequest,
    Plan,
    PlannerError,
    ShardPlacement,
    Stage,
    plan_for,
)
from partita.planner.cost import boundary_tensors

MAX_LISTED_TENSORS = 16
MAX_REASONS = 8


def rfc3339(t: float) -> str:
    if not math.isfinite(t):
        return ""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_rfc3339(text: str) -> float:
    if not text:
        return -math.inf
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def plan_status(
    plan: Plan,
    since: float,
    observed_p95_s: float | None = None,
    *,
    observed: PlanObservation | None = None,
) -> PlanStatus:
    observed = observed or PlanObservation()
    pred = plan.prediction
    cascade = None
    if plan.cascade is not None and plan.request.cascade is not None:
        cascade = CascadeStageStatus(
            pool=plan.cascade.pool,
            node=plan.cascade.node,
            predicted_compute_ms=_ms(pred.cascade.compute_s if pred.cascade else None),
            offload_rate=round(plan.request.cascade.offload_rate, 6),
            observed_offload_rate=observed.offload_rate,
        )
    return PlanStatus(
        revision=plan.revision,
        since=rfc3339(since),
        stage_count=len(plan.stages),
        pools=",".join(s.pool for s in plan.stages),
        stages=[
            StageStatus(
                index=s.index,
                pool=s.pool,
                start=s.start,
                end=s.end,
                nodes=list(s.nodes),
                shards=[ShardStatus(node=p.node, proportion=p.proportion) for p in s.shards],
                inputs=list(s.inputs)[:MAX_LISTED_TENSORS],
                outputs=list(s.outputs)[:MAX_LISTED_TENSORS],
                compression=ApiCompression(s.input_compression.value),
                int8=s.int8,
                predicted_compute_ms=_ms(sp.compute_s),
                predicted_transfer_ms=_ms(sp.transfer_in_s),
                wire_bytes=round(sp.wire_bytes),
            )
            for s, sp in zip(plan.stages, pred.stages, strict=True)
        ],
        predicted_p95_ms=_ms(pred.latency_s),
        observed_p95_ms=_ms(observed_p95_s),
        cascade=cascade,
        predicted_energy_j=_round(pred.energy_j),
        observed_energy_j=_round(observed.energy_j),
        cut_accuracy=observed.accuracy,
        reasons=[plan.describe(), *plan.notes][:MAX_REASONS],
    )


@dataclass(frozen=True)
class PlanObservation:
    """What was measured of a serving plan, beside the plan's predictions: the cascade's
    offload rate and the energy per request (from the servers' metrics), the accuracy drop of
    its compressed cuts and int8 stages (measured by the operator on the calibration set)."""

    offload_rate: float | None = None
    energy_j: float | None = None
    accuracy: AccuracyStatus | None = None


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, 6)


def _ms(seconds: float | None) -> float | None:
    if seconds is None or not math.isfinite(seconds):
        return None
    return round(seconds * 1000, 3)


def node_speeds(
    plan: Plan | None, snapshot: ClusterSnapshot, factors: Mapping[str, float], declared: set[str]
) -> list[NodeSpeedStatus]:
    """The speed the planner uses for every node of `plan`, and where it comes from.
    `declared` are the pools whose DevicePool states a throughput."""
    if plan is None:
        return []
    out = []
    for name in sorted({n for s in plan.stages for n in s.nodes}):
        node = snapshot.node(name)
        if node is None:
            continue
        factor = factors.get(name, 1.0)
        source = "declared" if node.pool in declared else "profiled"
        if name in factors and source == "profiled":
            source = "learned"
        gflops = max(node.speed.values(), default=0.0) * factor / 1e9
        out.append(NodeSpeedStatus(node=name, gflops=round(gflops, 4), source=source))
    return out


def loop_status(
    state: ModelState,
    report: Report,
    conditions: Sequence[Condition],
    *,
    now: str,
    generation: int,
    observed_p95_s: float | None,
    speeds: list[NodeSpeedStatus],
    observed: PlanObservation | None = None,
) -> EdgeModelStatus:
    """Every status field the loop owns (`status_fields` gives the apiserver's JSON)."""
    mine: tuple[Condition, ...] = tuple(c for c in conditions if c.type in OWNED_CONDITIONS)
    for update in report.conditions:
        mine = set_condition(
            mine,
            update.type,
            update.status,
            update.reason,
            update.message,
            now=now,
            generation=generation,
        )
    return EdgeModelStatus(
        observed_generation=generation,
        phase=report.phase,
        message=report.message[:4000],
        conditions=list(mine),
        plan=(
            plan_status(state.serving, state.serving_since, observed_p95_s, observed=observed)
            if state.serving is not None
            else None
        ),
        rollout=(
            plan_status(state.rollout.plan, state.rollout.since)
            if state.rollout is not None
            else None
        ),
        node_speeds=speeds,
    )


def status_fields(status: EdgeModelStatus) -> dict[str, Any]:
    """The fields of `status` the loop owns, as the apiserver's JSON (camelCase)."""
    out = status.model_dump(by_alias=True, mode="json", exclude_none=True)
    out.pop("observedGeneration", None)  # the model reconciler's
    out.pop("model", None)
    return out


def plan_from_status(
    status: PlanStatus, request: ModelRequest, profile: ModelProfile, snapshot: ClusterSnapshot
) -> Plan | None:
    """The plan a status describes, predicted under `snapshot`; None when it does not fit
    this profile (the model file changed) or lacks what a plan needs."""
    stages = []
    try:
        for s in status.stages:
            if not s.shards or not 0 <= s.start < s.end <= len(profile.nodes):
                return None
            stages.append(
                Stage(
                    index=s.index,
                    pool=s.pool,
                    start=s.start,
                    end=s.end,
                    shards=tuple(ShardPlacement(p.node, p.proportion) for p in s.shards),
                    inputs=tuple(t[0] for t in boundary_tensors(profile, s.start)),
                    outputs=tuple(t[0] for t in boundary_tensors(profile, s.end)),
                    input_compression=Compression(s.compression.value),
                    int8=s.int8,
                )
            )
    except PlannerError:  # a boundary that is no cut point of this profile
        return None
    if not stages:
        return None
    cascade = None
    if request.cascade is not None:
        if status.cascade is None:
            return None  # planned without the cascade the spec now has
        cascade = CascadePlacement(status.cascade.pool, status.cascade.node)
    return plan_for(request, stages, profile, snapshot, status.revision, cascade=cascade)


def state_from_status(
    status: EdgeModelStatus | None,
    request: ModelRequest,
    profile: ModelProfile,
    snapshot: ClusterSnapshot,
    existing_revisions: Sequence[int] = (),
) -> ModelState:
    """What a restarted loop knows about a model: the serving plan and rollout its status
    recorded, the revision counter past every revision that exists, the learned speeds."""
    top = max(existing_revisions, default=0)
    if status is None:
        return ModelState(revision=top)
    serving = rollout = None
    since = -math.inf
    if status.plan is not None:
        serving = plan_from_status(status.plan, request, profile, snapshot)
        since = from_rfc3339(status.plan.since)
    if status.rollout is not None:
        plan = plan_from_status(status.rollout, request, profile, snapshot)
        if plan is not None:
            rollout = Rollout(plan, from_rfc3339(status.rollout.since), "Rescheduled")
            if serving is None:
                rollout = replace(rollout, reason="Deployed")
    factors = {}
    for speed in status.node_speeds:
        node = snapshot.node(speed.node)
        if speed.source == "learned" and node is not None:
            base = max(node.speed.values(), default=0.0) / 1e9
            if base > 0:
                factors[speed.node] = speed.gflops / base
    revisions = [top]
    revisions += [p.revision for p in (serving, rollout.plan if rollout else None) if p]
    return ModelState(
        serving=serving,
        rollout=rollout,
        serving_since=since,
        revision=max(revisions),
        speed_factors=factors,
    )


def plan_observation(
    plan: Plan | None, observation: Observation | None, snapshot: ClusterSnapshot
) -> PlanObservation:
    """What the servers of `plan`'s revision measured: the cascade's offload rate and the
    energy per request, (activeWatts - idleWatts) x each server's mean compute time plus
    radioWatts x each hop's network time between pools, every stage after a cascade weighted
    by its offload rate. The upload from the data source to the first server is measured by
    no server and left out; the energy is None until every server has reported."""
    if plan is None or observation is None:
        return PlanObservation()
    ns, name, revision = plan.request.namespace, plan.request.name, str(plan.revision)
    offload = observation.offload.get((ns, name)) if plan.cascade is not None else None
    compute: dict[tuple[str, str], float] = {}
    for key, seen in observation.stages.items():
        if (key.namespace, key.model, key.revision) == (ns, name, revision) and seen.compute_s:
            compute[(key.stage, key.node)] = seen.compute_s
    hops: dict[tuple[str, str], float] = {}
    for hop, seen_hop in observation.hops.items():
        if (hop.namespace, hop.model, hop.revision) == (ns, name, revision) and seen_hop.seconds:
            hops[(hop.stage, hop.next_stage)] = seen_hop.seconds
    servers = [(str(s.index), sh.node, s.pool, s.index) for s in plan.stages for sh in s.shards]
    weight = 1.0
    energy = 0.0
    if plan.cascade is not None:
        servers.insert(0, (CASCADE_STAGE, plan.cascade.node, plan.cascade.pool, -1))
        if offload is None:
            return PlanObservation()
        weight = offload
    for stage, node, pool, index in servers:
        seconds = compute.get((stage, node))
        if seconds is None or not snapshot.has_pool(pool):
            return PlanObservation(offload_rate=offload)
        share = 1.0 if index < 0 else weight
        energy += share * snapshot.pool(pool).compute_watts * seconds
    pools = [plan.cascade.pool] if plan.cascade is not None else []
    names = [CASCADE_STAGE] if plan.cascade is not None else []
    pools += [s.pool for s in plan.stages]
    names += [str(s.index) for s in plan.stages]
    for i in range(len(names) - 1):
        seconds = hops.get((names[i], names[i + 1]), 0.0)
        if pools[i] != pools[i + 1] and snapshot.has_pool(pools[i]):
            energy += weight * snapshot.pool(pools[i]).radio_watts * seconds
    return PlanObservation(offload_rate=offload, energy_j=energy)
