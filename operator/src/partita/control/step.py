"""One turn of the closed loop for one model, as a pure function.

`step(state, inputs, now)` reads what the loop remembers about the model (`ModelState`: the
serving plan, a rollout in progress, when it last moved, learned node speeds), what the
cluster looks like now (`ModelInputs`: the request, profile, snapshot with metrics applied,
which revisions exist and are ready) and the time, and returns the next state, what to do to
the cluster (`Actions`) and what to tell the user (`Report`). The planner decides where stages
go; this module decides when: make-before-break, cooldown, drain, giving up a rollout that
cannot become ready, learning node speeds, task dropping. No I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from partita.api.edgemodel import Phase
from partita.api.meta import ConditionStatus
from partita.control.outcome import Event, EventType
from partita.model.types import ModelProfile
from partita.planner import (
    Action,
    ClusterSnapshot,
    Compression,
    ModelRequest,
    Plan,
    Unschedulable,
    plan_many,
    predict,
    reschedule,
    same_spec,
)
from partita.planner.calibration import apply_speed_factors, update_speed
from partita.planner.request import COMPRESSION_ORDER

PLANNED = "Planned"
READY = "Ready"
METRICS_FRESH = "MetricsFresh"
OWNED_CONDITIONS = (PLANNED, READY, METRICS_FRESH)

# Online learning only from stages doing at least this share of the model's FLOPs and this
# much compute per request, within these bounds of the profiled speed: the time of a relay
# stage of two operators is all fixed overhead, and extrapolating it to the whole model once
# promised 14 ms for a 150 ms model.
LEARN_MIN_SHARE = 0.2
LEARN_MIN_COMPUTE_S = 0.005
LEARN_BOUNDS = (0.25, 4.0)
# A rollout whose objects the watches still do not show this long after they were applied is
# applied again (what a crash between writing the status and applying leaves behind).
REAPPLY_AFTER_S = 10.0


@dataclass(frozen=True)
class Rollout:
    """A revision being deployed next to the serving one; it serves once every server is ready."""

    plan: Plan
    since: float  # when its objects were first applied
    reason: str  # the Event reason: Deployed for a first plan, Rescheduled for a move
    why: str = ""  # the rescheduler's reason, for the Event when it serves
    applied_at: float = -math.inf  # when its objects were last applied


@dataclass(frozen=True)
class ModelState:
    """What the loop remembers about one model between steps (and persists in its status)."""

    serving: Plan | None = None
    rollout: Rollout | None = None
    serving_since: float = -math.inf  # when the serving revision took the traffic
    revision: int = 0  # the highest revision number used so far
    drain_until: float | None = None  # old revisions go once in-flight requests had time
    unschedulable: tuple[str, ...] = ()  # the reasons last reported, so each is said once
    # Learned per node from observed stage compute times (1.0: as profiled).
    speed_factors: Mapping[str, float] = field(default_factory=dict)
    # When the observation the speed factors last learned from was taken: each observation
    # teaches once, however many steps it is seen in.
    learned_at: float = -math.inf
    # The planned shards could not be cut: plan this model without shards (the reason).
    no_shards: str | None = None
    # A plan's int8 stages or int8 cuts measured over quantization.maxAccuracyDrop: plan
    # this model in float32 with at most fp16 cuts (the reason).
    no_int8: str | None = None
    # The cluster refused the last action (a 403, a quota...): reason, message, retry time.
    failure: Failure | None = None
    # It served until a higher-priority model took its capacity, and has not been placed
    # since: its conditions say Preempted rather than Unschedulable.
    preempted: bool = False


@dataclass(frozen=True)
class Failure:
    """What the cluster answered when the loop last tried to carry out a step."""

    reason: str  # CamelCase, e.g. Forbidden, Invalid, Conflict
    message: str
    attempts: int  # consecutive failures, for the back-off
    retry_at: float


@dataclass(frozen=True)
class Readiness:
    """How far one revision's servers are, from the cluster's Deployments."""

    ready: bool
    detail: str  # which servers are not ready yet, and why


@dataclass(frozen=True)
class ModelInputs:
    request: ModelRequest
    profile: ModelProfile
    snapshot: ClusterSnapshot  # the cluster with the last observation applied
    metrics_fresh: bool
    # Revisions whose objects exist in the cluster, with their readiness.
    revisions: Mapping[int, Readiness] = field(default_factory=dict)
    # Every other model that serves or is being deployed, for joint planning.
    others: Sequence[tuple[ModelRequest, ModelProfile, Plan]] = ()
    # (revision, stage index, node) -> compute seconds per request, measured by the
    # observation taken at `observed_at`. Keyed by revision: a step that switches to a new
    # revision learns nothing from what its predecessor's servers measured.
    observed_compute: Mapping[tuple[int, int, str], float] = field(default_factory=dict)
    observed_at: float = -math.inf
    # Can the stage servers cut this plan's shards? None, or why not.
    cut_check: Callable[[Plan], str | None] = lambda plan: None
    # The model's entry routers (what clients call) have a ready replica.
    entry_ready: bool = True
    # Are this plan's int8 stages and int8 cuts within the accuracy budget, as measured?
    # None, or the measured drop that is not.
    accuracy_check: Callable[[Plan], str | None] = lambda plan: None


@dataclass(frozen=True)
class ApplyRevision:
    """Create or update every object of `plan`'s revision (idempotent)."""

    plan: Plan


@dataclass(frozen=True)
class SwitchEntry:
    """Point the model's entry Service at `revision`."""

    revision: int


@dataclass(frozen=True)
class DeleteRevisions:
    """Delete every revision's objects except those of `keep`."""

    keep: frozenset[int]


ClusterAction = ApplyRevision | SwitchEntry | DeleteRevisions


@dataclass(frozen=True)
class ConditionUpdate:
    type: str
    status: ConditionStatus
    reason: str
    message: str


@dataclass(frozen=True)
class Report:
    """What the user sees of a step: phase, message, the loop's conditions, Events."""

    phase: Phase
    message: str
    conditions: tuple[ConditionUpdate, ...]
    events: tuple[Event, ...] = ()


@dataclass(frozen=True)
class StepResult:
    state: ModelState
    actions: tuple[ClusterAction, ...]
    report: Report
    # Step again at this time even when nothing changes (a drain ends, a rollout times out).
    wake_at: float | None = None


@dataclass(frozen=True)
class Timing:
    drain_s: float = 5.0  # in-flight requests finish on the old revision
    deploy_timeout_s: float = 180.0  # a revision not ready by then is given up


class _Turn:
    """Accumulates one step's actions, Events and conditions."""

    def __init__(self, state: ModelState, inputs: ModelInputs, now: float, timing: Timing) -> None:
        self.state, self.inputs, self.now, self.timing = state, inputs, now, timing
        self.actions: list[ClusterAction] = []
        self.events: list[Event] = []
        self.conditions: dict[str, ConditionUpdate] = {}
        self.wake: list[float] = []
        if inputs.metrics_fresh:
            self.condition(METRICS_FRESH, True, "Fresh", "resource and network metrics are current")
        else:
            self.condition(
                METRICS_FRESH,
                False,
                "Stale",
                "Prometheus data is stale or missing: keeping the current plan",
            )

    def condition(self, type_: str, true: bool, reason: str, message: str) -> None:
        status = ConditionStatus.TRUE if true else ConditionStatus.FALSE
        self.conditions[type_] = ConditionUpdate(type_, status, reason, message)

    def event(self, warning: bool, reason: str, message: str) -> None:
        self.events.append(
            Event(EventType.WARNING if warning else EventType.NORMAL, reason, message)
        )

    def done(self, phase: Phase, message: str) -> StepResult:
        report = Report(phase, message, tuple(self.conditions.values()), tuple(self.events))
        wake = min(self.wake) if self.wake else None
        return StepResult(self.state, tuple(self.actions), report, wake)


def step(
    state: ModelState, inputs: ModelInputs, now: float, timing: Timing = Timing()
) -> StepResult:
    """One turn of the loop for one profiled model."""
    turn = _Turn(state, inputs, now, timing)
    if state.rollout is not None:
        result = _follow_rollout(turn)
        if result is not None:
            return result
    _collect_garbage(turn)
    if turn.state.serving is None:
        return _first_placement(turn)
    return _keep_or_move(turn)


def _follow_rollout(turn: _Turn) -> StepResult | None:
    """Switch to the rollout once ready, give it up when it cannot be, else keep waiting
    (a StepResult); None when there is no rollout left to wait for."""
    st, inputs, now = turn.state, turn.inputs, turn.now
    rollout = st.rollout
    assert rollout is not None
    plan = rollout.plan
    readiness = inputs.revisions.get(plan.revision)
    failure = st.failure
    if failure is not None and now < failure.retry_at:
        turn.wake.append(failure.retry_at)
        turn.condition(PLANNED, False, failure.reason, failure.message)
        if st.serving is not None:
            turn.condition(READY, True, "Serving", f"revision {st.serving.revision} serves traffic")
        else:
            turn.condition(READY, False, failure.reason, failure.message)
        return turn.done(
            Phase.DEPLOYING if st.serving is None else Phase.DEGRADED,
            f"revision {plan.revision} cannot be deployed: {failure.message}",
        )
    if failure is not None or (readiness is None and now - rollout.applied_at >= REAPPLY_AFTER_S):
        # The cluster refused its objects, or they are still missing well after they were
        # applied (a restart came between the two): apply again, idempotently.
        turn.actions.append(ApplyRevision(plan))
        rollout = replace(rollout, applied_at=now)
        st = turn.state = replace(st, rollout=rollout)
    if readiness is None:
        turn.wake.append(rollout.applied_at + REAPPLY_AFTER_S)
        readiness = Readiness(False, f"revision {plan.revision}: its objects are being created")
    if readiness.ready and st.serving is None and not inputs.entry_ready:
        # The first revision serves once clients can reach it: its routers run too.
        readiness = Readiness(False, "the model's entry routers are starting")
    if not readiness.ready:
        ready_nodes = {n.name for n in inputs.snapshot.nodes if n.ready}
        lost = sorted(set(plan.prediction.memory_per_node) - ready_nodes)
        deadline = rollout.since + turn.timing.deploy_timeout_s
        if not lost and now < deadline:
            turn.wake.append(deadline)
            turn.condition(PLANNED, True, rollout.reason, _deploy_message(plan, rollout.why))
            if st.serving is not None:
                turn.condition(
                    READY, True, "Serving", f"revision {st.serving.revision} serves traffic"
                )
            else:
                turn.condition(READY, False, "Deploying", readiness.detail)
            return turn.done(Phase.DEPLOYING, f"revision {plan.revision}: {readiness.detail}")
        # A revision that cannot become ready is given up (the serving one is kept) and the
        # model is planned again from what the cluster is now.
        why = f"node(s) {', '.join(lost)} lost" if lost else readiness.detail
        keep = frozenset({st.serving.revision}) if st.serving is not None else frozenset()
        turn.actions = [DeleteRevisions(keep)]
        turn.event(True, "DeployFailed", f"revision {plan.revision} given up: {why}")
        turn.state = replace(st, rollout=None)
        return None
    # Ready: traffic moves now; the old revision drains, then goes.
    turn.actions.append(SwitchEntry(plan.revision))
    moved = st.serving is not None
    turn.state = replace(
        st,
        serving=plan,
        rollout=None,
        serving_since=now,
        drain_until=now + turn.timing.drain_s if moved else None,
    )
    message = f"revision {plan.revision} serves: {plan.describe()}"
    if rollout.why:
        message += f"; because {rollout.why}"
    turn.event(False, rollout.reason, message)
    return None


def _collect_garbage(turn: _Turn) -> None:
    """Revisions that neither serve nor roll out go, once the drain after a switch is over
    (also what a crash left behind: every object belongs to a live revision). While nothing
    serves, nothing is collected: what exists may be all a client can reach."""
    st = turn.state
    if st.serving is None:
        return
    live = {p.revision for p in (st.serving, st.rollout.plan if st.rollout else None) if p}
    stale = set(turn.inputs.revisions) - live
    if st.drain_until is not None and turn.now < st.drain_until:
        turn.wake.append(st.drain_until)
        return
    turn.state = replace(st, drain_until=None)
    if stale and not any(isinstance(a, DeleteRevisions) for a in turn.actions):
        turn.actions.append(DeleteRevisions(frozenset(live)))


def _first_placement(turn: _Turn) -> StepResult:
    """Plan jointly with the models already placed (priority order, task dropping), deploy."""
    st, inputs = turn.state, turn.inputs
    request = _request(st, inputs)
    result = _plan_with_others(request, inputs)
    if isinstance(result, Unschedulable):
        msg = "; ".join(result.reasons)
        reason = "Preempted" if st.preempted else "Unschedulable"
        if st.unschedulable != result.reasons:
            turn.event(True, reason, msg)  # once per new reason
        turn.state = replace(turn.state, unschedulable=result.reasons)
        turn.condition(PLANNED, False, reason, msg)
        turn.condition(READY, False, reason, msg)
        return turn.done(Phase.UNSCHEDULABLE, msg)
    turn.state = replace(turn.state, unschedulable=(), preempted=False)
    return _deploy(turn, result, "Deployed")


def _keep_or_move(turn: _Turn) -> StepResult:
    st, inputs = turn.state, turn.inputs
    serving = st.serving
    assert serving is not None
    request = _request(st, inputs)
    if inputs.metrics_fresh and any(r.priority > request.priority for r, _, _ in inputs.others):
        # Task dropping also applies to a model already serving: when the models above it no
        # longer leave it room, it gives its capacity up instead of squeezing them.
        joint = _plan_with_others(request, inputs)
        if isinstance(joint, Unschedulable):
            return _preempt(turn, joint)
    if st.rollout is not None:
        return _serving(turn, "a new revision is being deployed")
    request_changed = not same_spec(serving.request, request)
    if not inputs.metrics_fresh and not request_changed:
        return _serving(turn, "metrics stale: plan kept")
    if inputs.observed_compute and inputs.metrics_fresh and inputs.observed_at > st.learned_at:
        # Once per observation: every status write wakes the loop again, and the same
        # figures learned from at each of those steps would drive the factor to whatever one
        # poll implied instead of averaging over polls.
        turn.state = replace(
            turn.state, speed_factors=_learn(turn.state, inputs), learned_at=inputs.observed_at
        )
    snapshot = apply_speed_factors(inputs.snapshot, turn.state.speed_factors)
    decision = reschedule(
        serving, inputs.profile, request, snapshot, now=turn.now, last_change=st.serving_since
    )
    if decision.action is Action.MOVE and isinstance(decision.plan, Plan):
        if decision.plan.placement == serving.placement:
            # A spec change (SLO, rescheduling knobs...) that leaves every stage where it is:
            # adopt it, redeploy nothing.
            turn.state = replace(
                turn.state,
                serving=replace(decision.plan, revision=serving.revision, request=request),
            )
            return _serving(turn, "spec change; same placement")
        return _deploy(turn, decision.plan, "Rescheduled", why=decision.reason)
    if serving.request != request and same_spec(serving.request, request):
        # Only a measured figure (the cascade's offload rate) or a rescheduling knob moved:
        # the plan stays, under the new knobs, and its prediction follows what was measured.
        kept = replace(serving, request=request)
        turn.state = replace(
            turn.state, serving=replace(kept, prediction=predict(kept, inputs.profile, snapshot))
        )
    cooldown = st.serving_since + request.rescheduling.cooldown_s
    if cooldown > turn.now:
        turn.wake.append(cooldown)
    return _serving(turn, decision.reason)


def _request(st: ModelState, inputs: ModelInputs) -> ModelRequest:
    request = inputs.request
    if st.no_shards is not None:
        request = replace(request, partitioning=replace(request.partitioning, max_shards=1))
    if st.no_int8 is not None:
        cut = min(
            request.partitioning.cut_compression, Compression.FP16, key=COMPRESSION_ORDER.index
        )
        request = replace(
            request,
            partitioning=replace(request.partitioning, cut_compression=cut),
            quantization=replace(request.quantization, allowed=False),
        )
    return request


def _plan_with_others(request: ModelRequest, inputs: ModelInputs) -> Plan | Unschedulable:
    items = [(request, inputs.profile)] + [(r, p) for r, p, _ in inputs.others]
    return plan_many(items, inputs.snapshot)[request.key]


def _learn(st: ModelState, inputs: ModelInputs) -> dict[str, float]:
    """Each node's speed for this model, rescaled by an EWMA of predicted/observed compute
    time of the stage it serves. Factors stay within LEARN_BOUNDS of what profiling said."""
    assert st.serving is not None
    profile = inputs.profile
    factors = dict(st.speed_factors)
    pred = predict(st.serving, profile, apply_speed_factors(inputs.snapshot, factors))
    total = max(profile.total_flops, 1)
    for stage, sp in zip(st.serving.stages, pred.stages, strict=True):
        if len(stage.shards) != 1:
            continue
        share = sum(n.flops for n in profile.nodes[stage.start : stage.end]) / total
        if share < LEARN_MIN_SHARE or sp.compute_s < LEARN_MIN_COMPUTE_S:
            continue
        node = stage.shards[0].node
        seen = inputs.observed_compute.get((st.serving.revision, stage.index, node))
        if seen and sp.compute_s > 0:
            factors[node] = update_speed(
                factors.get(node, 1.0), seen, sp.compute_s, bounds=LEARN_BOUNDS
            )
    return factors


def _preempt(turn: _Turn, result: Unschedulable) -> StepResult:
    msg = "refused to make room for higher-priority models: " + "; ".join(result.reasons)
    turn.actions = [DeleteRevisions(frozenset())]
    turn.event(True, "Preempted", msg)
    turn.condition(PLANNED, False, "Preempted", msg)
    turn.condition(READY, False, "Preempted", msg)
    turn.state = replace(
        turn.state,
        serving=None,
        rollout=None,
        drain_until=None,
        unschedulable=result.reasons,
        preempted=True,
    )
    return turn.done(Phase.UNSCHEDULABLE, msg)


def _deploy_message(plan: Plan, why: str) -> str:
    predicted = plan.prediction.latency_s * 1000
    msg = f"revision {plan.revision}: {plan.describe()}; predicted {predicted:.1f} ms"
    return f"{msg}; because {why}" if why else msg


def _deploy(turn: _Turn, plan: Plan, reason: str, why: str = "") -> StepResult:
    st, inputs = turn.state, turn.inputs
    if any(len(s.shards) > 1 for s in plan.stages):
        refusal = inputs.cut_check(plan)
        if refusal is not None:
            msg = f"the planned shards cannot be cut ({refusal}); planning without shards"
            turn.event(True, "ShardingRefused", msg)
            turn.condition(PLANNED, False, "ShardingRefused", msg)
            turn.state = replace(st, no_shards=refusal)
            if st.serving is not None:
                return _serving(turn, msg)
            turn.condition(READY, False, "ShardingRefused", msg)
            turn.wake.append(turn.now)  # plan again at once, without shards
            return turn.done(Phase.PLANNING, msg)
    if _int8(plan):
        refusal = inputs.accuracy_check(plan)
        if refusal is not None:
            msg = f"{refusal}; planning in float32 with at most fp16 cuts"
            turn.event(True, "AccuracyRefused", msg)
            turn.condition(PLANNED, False, "AccuracyRefused", msg)
            turn.state = replace(st, no_int8=refusal)
            if st.serving is not None:
                return _serving(turn, msg)
            turn.condition(READY, False, "AccuracyRefused", msg)
            turn.wake.append(turn.now)  # plan again at once, in float32
            return turn.done(Phase.PLANNING, msg)
    revision = st.revision + 1
    plan = replace(plan, revision=revision)
    turn.state = replace(
        st, revision=revision, rollout=Rollout(plan, turn.now, reason, why, turn.now)
    )
    turn.actions.append(ApplyRevision(plan))
    turn.wake.append(turn.now + turn.timing.deploy_timeout_s)
    message = _deploy_message(plan, why)
    turn.event(False, "Planned" if st.serving is None else "Rescheduling", message)
    turn.condition(PLANNED, True, reason, message)
    if st.serving is not None:
        turn.condition(READY, True, "Serving", f"revision {st.serving.revision} serves traffic")
    else:
        turn.condition(READY, False, "Deploying", f"revision {revision} is being deployed")
    return turn.done(Phase.DEPLOYING, message)


def _int8(plan: Plan) -> bool:
    """Whether the plan runs an int8 stage or sends int8 tensors across a cut."""
    return any(s.int8 or s.input_compression is Compression.INT8 for s in plan.stages)


def _serving(turn: _Turn, why: str) -> StepResult:
    serving = turn.state.serving
    assert serving is not None
    if PLANNED not in turn.conditions:
        turn.condition(
            PLANNED, True, "Planned", f"revision {serving.revision}: {serving.describe()}"
        )
    turn.condition(READY, True, "Serving", f"revision {serving.revision} serves traffic")
    return turn.done(Phase.READY, f"revision {serving.revision} serving; {why}")
