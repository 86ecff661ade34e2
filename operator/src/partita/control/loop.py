"""The closed loop: one asyncio task owns every model's state and steps the models when
something they depend on changes.

Signals come through one queue: a watch event (an EdgeModel, DevicePool, Node or stage
Deployment changed: kopf handlers call `wake`), a fresh Prometheus observation (`observe`) or
a model's own deadline (a drain or cooldown ends, a rollout times out). A round reads what
the kopf indexes hold (`ClusterView`), builds each model's inputs (`partita.control.inputs`),
runs the pure `step`, writes the status first (so a restart knows what was started), then
carries the actions out through the `Cluster` (the actuator). Blocking calls run in a worker
thread one at a time, awaited by the task: no state is shared between threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from partita.api import labels
from partita.api.devicepool import DevicePool
from partita.api.edgemodel import EdgeModel, Phase
from partita.api.errors import ManifestError
from partita.api.meta import ConditionStatus
from partita.control.catalog import Catalog, Profiled
from partita.control.distribution import model_token, model_url
from partita.control.inputs import NodeInfo, apply_observation, model_request, snapshot_from_pools
from partita.control.models import MODEL_FETCHED, PROFILED
from partita.control.outcome import Backoff, Event, EventType, Outcome
from partita.control.quantization import accuracy_status, planner_quantization
from partita.control.status import (
    PlanObservation,
    loop_status,
    node_speeds,
    plan_observation,
    rfc3339,
    state_from_status,
    status_fields,
)
from partita.control.step import (
    PLANNED,
    READY,
    ApplyRevision,
    ClusterAction,
    ConditionUpdate,
    DeleteRevisions,
    Failure,
    ModelInputs,
    ModelState,
    Readiness,
    Report,
    SwitchEntry,
    Timing,
    step,
)
from partita.control.telemetry import PLACEMENT, Telemetry
from partita.kube.actuator import ActuatorError
from partita.kube.manifests import (
    CASCADE_STAGE,
    EntryPlacement,
    ModelRef,
    cascade_name,
    gateway_name,
    gateway_stage,
    object_name,
    server_names,
)
from partita.metrics.observation import Observation, is_stale
from partita.model.errors import ModelError
from partita.model.samples import Calibration
from partita.model.types import ModelProfile
from partita.planner import ModelRequest, Plan, PlannerError

log = logging.getLogger("partita.control")
ROUND_STUCK_S = 300.0  # a round that takes longer than this is a loop that hangs


@dataclass(frozen=True)
class DeploymentInfo:
    """The part of a stage server's Deployment the loop reads (what the index holds)."""

    namespace: str
    model: str
    revision: int  # 0 for the model's entry routers (they serve every revision)
    name: str
    ready: bool
    detail: str  # why not ready, when not

    @property
    def router(self) -> bool:
        return self.revision == 0


def deployment_info(body: Mapping[str, Any]) -> DeploymentInfo | None:
    """A DeploymentInfo of a Deployment Partita made, None for any other Deployment."""
    meta = body.get("metadata") or {}
    tags = meta.get("labels") or {}
    revision = str(tags.get(labels.REVISION, ""))
    component = tags.get(labels.COMPONENT)
    if component == labels.ENTRY_ROUTER:
        revision = "0"
    elif component != labels.STAGE_SERVER or not revision.isdigit():
        return None
    wanted = int((body.get("spec") or {}).get("replicas") or 1)
    status = body.get("status") or {}
    ready = int(status.get("readyReplicas") or 0)
    failing = [
        f"{c.get('reason')}: {c.get('message')}"
        for c in status.get("conditions") or []
        if c.get("type") == "ReplicaFailure" and c.get("status") == "True"
    ]
    detail = "; ".join(failing) or f"{ready}/{wanted} ready"
    return DeploymentInfo(
        namespace=str(meta.get("namespace", "")),
        model=str(tags.get(labels.MODEL, "")),
        revision=int(revision),
        name=str(meta.get("name", "")),
        ready=ready >= wanted,
        detail=detail,
    )


@dataclass(frozen=True)
class PodInfo:
    """Why a stage server's pod does not run, when it does not (what the pod index holds)."""

    namespace: str
    model: str
    revision: int
    server: str  # the name of its Deployment (and Service, ConfigMap)
    problem: str  # e.g. "Unschedulable: 0/6 nodes are available: ...", "" when none


def pod_info(body: Mapping[str, Any]) -> PodInfo | None:
    """A PodInfo of a stage server's pod, None for any other pod."""
    meta = body.get("metadata") or {}
    tags = meta.get("labels") or {}
    revision = str(tags.get(labels.REVISION, ""))
    stage = str(tags.get(labels.STAGE, ""))
    if tags.get(labels.COMPONENT) != labels.STAGE_SERVER or not revision.isdigit() or not stage:
        return None
    model = str(tags.get(labels.MODEL, ""))
    shard = str(tags.get(labels.SHARD, ""))
    gateway = gateway_stage(stage)
    if gateway is not None:
        server = gateway_name(model, int(revision), gateway)
    elif stage == CASCADE_STAGE:
        server = cascade_name(model, int(revision))
    else:
        server = object_name(model, int(revision), int(stage), int(shard) if shard else None)
    status = body.get("status") or {}
    problems = [
        f"{c.get('reason')}: {c.get('message')}"
        for c in status.get("conditions") or []
        if c.get("type") == "PodScheduled" and c.get("status") == "False"
    ]
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            problems.append(f"{waiting.get('reason')}: {waiting.get('message') or ''}".strip())
    return PodInfo(
        namespace=str(meta.get("namespace", "")),
        model=model,
        revision=int(revision),
        server=server,
        problem="; ".join(problems),
    )


class ClusterView(Protocol):
    """What the watches hold right now (the kopf indexes)."""

    def models(self) -> Iterable[Mapping[str, Any]]: ...
    def pools(self) -> Iterable[Mapping[str, Any]]: ...
    def nodes(self) -> Iterable[NodeInfo]: ...
    def deployments(self) -> Iterable[DeploymentInfo]: ...
    def pods(self) -> Iterable[PodInfo]: ...


class Cluster(Protocol):
    """Carries the loop's actions out (`partita.kube.actuator.Actuator`); raises ActuatorError."""

    def apply_revision(self, ref: ModelRef, plan: Plan) -> int: ...
    def switch_entry(self, ref: ModelRef, revision: int) -> None: ...
    def delete_revisions(self, ref: ModelRef, keep: set[int]) -> list[str]: ...


# Writes an object's status fields and posts its Events (the handlers' `apply_outcome`).
Reporter = Callable[[Mapping[str, Any], Outcome], None]


@dataclass(frozen=True)
class LoopConfig:
    image: str  # the stage servers' image
    # Where stage servers fetch models from the operator (`partita.control.distribution`),
    # and the key of the tokens for it; None: stage servers read each model's source.
    distribution_url: str | None = None
    distribution_key: bytes | None = None
    metrics_max_age_s: float = 60.0  # an observation older than this is stale
    timing: Timing = field(default_factory=Timing)
    backoff: Backoff = field(default_factory=lambda: Backoff(first_s=2.0, factor=2.0, max_s=60.0))


def readiness(
    model: str,
    plan: Plan,
    present: Mapping[str, DeploymentInfo],
    problems: Mapping[str, str] | None = None,
) -> Readiness:
    """Whether every server of `plan` is ready, and for those not, why (the Deployment's
    replica failures, the pod's scheduling or image problems)."""
    waiting = []
    for name in server_names(model, plan):
        info = present.get(name)
        problem = (problems or {}).get(name)
        if info is None:
            waiting.append(f"{name}: not created yet")
        elif not info.ready:
            waiting.append(f"{name}: {problem or info.detail}")
    return Readiness(not waiting, "; ".join(waiting) or "all stage servers ready")


def pre_plan_report(model: EdgeModel) -> Report:
    """Phase and conditions of a model the loop cannot plan yet (not fetched or profiled)."""
    conditions = {c.type: c for c in (model.status.conditions if model.status else [])}
    failed = next(
        (
            conditions[t]
            for t in (MODEL_FETCHED, PROFILED)
            if t in conditions and conditions[t].status == ConditionStatus.FALSE
        ),
        None,
    )
    if failed is not None:
        phase, message = Phase.FAILED, failed.message
        waiting = ConditionUpdate(PLANNED, ConditionStatus.UNKNOWN, "WaitingForModel", message)
        ready = ConditionUpdate(READY, ConditionStatus.FALSE, failed.reason, message)
    else:
        profiled = PROFILED in conditions
        phase = Phase.PLANNING if profiled else Phase.PENDING
        message = "profiled; waiting for a plan" if profiled else "fetching and profiling the model"
        waiting = ConditionUpdate(
            PLANNED, ConditionStatus.UNKNOWN, "WaitingForPlanner", "waiting for the planner"
        )
        ready = ConditionUpdate(READY, ConditionStatus.FALSE, "NotPlanned", "no plan yet")
    return Report(phase, message, (waiting, ready))


def _profiled(model: EdgeModel) -> bool:
    return any(
        c.type == PROFILED and c.status == ConditionStatus.TRUE
        for c in (model.status.conditions if model.status else [])
    )


class ControlLoop:
    """The single owner of every model's loop state; run it as one task."""

    def __init__(
        self,
        view: ClusterView,
        cluster: Cluster,
        report: Reporter,
        catalog: Catalog,
        config: LoopConfig,
        *,
        clock: Callable[[], float] = time.time,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._view, self._cluster, self._report = view, cluster, report
        self._telemetry = telemetry or Telemetry()
        self._catalog, self._config, self._clock = catalog, config, clock
        self._queue: asyncio.Queue[Observation | None] = asyncio.Queue()
        self._states: dict[str, ModelState] = {}
        self._placed: dict[str, tuple[ModelRequest, ModelProfile, Plan]] = {}
        self._wake_at: dict[str, float] = {}
        self._observation: Observation | None = None
        self._running = False
        self._round_started: float | None = None

    # -- signals (called on the event loop by handlers and the metrics poll) ----------------

    def wake(self) -> None:
        """Something the models depend on changed: step them."""
        self._queue.put_nowait(None)

    def observe(self, observation: Observation) -> None:
        """A metrics poll finished: step the models with what it measured."""
        self._queue.put_nowait(observation)

    # -- the task -------------------------------------------------------------------------

    def healthy(self) -> bool:
        """The loop runs and no round has been stuck for ROUND_STUCK_S (the liveness probe)."""
        started = self._round_started
        return self._running and (started is None or self._clock() - started < ROUND_STUCK_S)

    async def run(self) -> None:
        self._running = True
        try:
            await self._run()
        finally:
            self._running = False

    async def _run(self) -> None:
        # Nothing happens before the first signal: kopf calls resource handlers (which wake
        # the loop) only once every index is filled, so the first round sees the whole cluster.
        await self._take(None)
        while True:
            self._round_started = self._clock()
            try:
                await self.round()
            except Exception:  # a bug in one round must not end the loop for every model
                log.exception("control loop round failed")
            finally:
                self._round_started = None
            deadline = min(self._wake_at.values(), default=math.inf)
            await self._take(
                max(0.0, deadline - self._clock()) if math.isfinite(deadline) else None
            )

    async def _take(self, timeout: float | None) -> None:
        """Wait for a signal (or the timeout), then drain every signal already queued."""
        try:
            first = await asyncio.wait_for(self._queue.get(), timeout)
            self._note(first)
        except TimeoutError:
            return
        while not self._queue.empty():
            self._note(self._queue.get_nowait())

    def _note(self, signal: Observation | None) -> None:
        if signal is not None:
            self._observation = signal
            self._telemetry.observed(signal)

    @property
    def metrics_fresh(self) -> bool:
        """A fresh poll arrived recently (a poll loop that stopped is stale too)."""
        return not is_stale(self._observation, self._clock(), self._config.metrics_max_age_s)

    async def round(self) -> None:
        """Step every model once, highest priority first."""
        models: list[tuple[EdgeModel, Mapping[str, Any]]] = []
        for body in self._view.models():
            try:
                models.append((EdgeModel.parse(body), body))
            except ManifestError as exc:
                log.warning("EdgeModel %s: %s", (body.get("metadata") or {}).get("name"), exc)
        pools = []
        for body in self._view.pools():
            try:
                pools.append(DevicePool.parse(body))
            except ManifestError:
                continue  # its own handler reports it
        nodes = list(self._view.nodes())
        deployments: dict[tuple[str, str], dict[str, DeploymentInfo]] = {}
        for info in self._view.deployments():
            deployments.setdefault((info.namespace, info.model), {})[info.name] = info
        problems: dict[tuple[str, str], dict[str, str]] = {}
        for pod in self._view.pods():
            if pod.problem:
                problems.setdefault((pod.namespace, pod.model), {})[pod.server] = pod.problem
        keys = set()
        models.sort(key=lambda m: (-m[0].spec.priority, _key(m[0])))
        for model, body in models:
            key = _key(model)
            keys.add(key)
            where = (model.metadata.namespace or "", model.metadata.name)
            await self._step_model(
                model, body, pools, nodes, deployments.get(where, {}), problems.get(where, {})
            )
        for gone in set(self._states) - keys:
            self._states.pop(gone, None)
            self._placed.pop(gone, None)
            self._wake_at.pop(gone, None)
        self._telemetry.retain(_split(k) for k in keys)
        self._telemetry.freshness(self.metrics_fresh)

    async def _step_model(
        self,
        model: EdgeModel,
        body: Mapping[str, Any],
        pools: list[DevicePool],
        nodes: list[NodeInfo],
        present: Mapping[str, DeploymentInfo],
        problems: Mapping[str, str],
    ) -> None:
        key = _key(model)
        now = self._clock()
        if not _profiled(model):
            self._states.pop(key, None)
            self._placed.pop(key, None)
            await self._write(model, body, ModelState(), pre_plan_report(model), None, [])
            return
        profiled = await asyncio.to_thread(self._catalog.get, model)
        if profiled is None:
            return
        observation = self._observation
        snapshot = apply_observation(
            snapshot_from_pools(pools, nodes, reference_gflops=profiled.reference_gflops),
            observation,
        )
        request = model_request(
            model,
            offload_rate=self._offload_rate(model, observation),
            small=profiled.small_model,
            quantization=planner_quantization(
                model.spec.quantization, profiled.int8, profiled.profile
            ),
        )
        revisions = sorted({i.revision for i in present.values() if not i.router})
        routers = [i for i in present.values() if i.router]
        state = self._states.get(key)
        if state is None:
            state = state_from_status(model.status, request, profiled.profile, snapshot, revisions)
        inputs = ModelInputs(
            request=request,
            profile=profiled.profile,
            snapshot=snapshot,
            metrics_fresh=self.metrics_fresh,
            revisions=self._revisions(model.metadata.name, state, present, problems, revisions),
            entry_ready=any(i.ready for i in routers),
            others=[v for k, v in self._placed.items() if k != key],
            observed_compute=self._observed_compute(model),
            observed_at=observation.taken_at if observation is not None else -math.inf,
            cut_check=lambda plan: self._catalog.cut_check(profiled, plan),
            accuracy_check=lambda plan: self._catalog.accuracy_refusal(
                profiled, plan, model.spec.quantization
            ),
        )
        started = time.perf_counter()
        try:
            result = step(state, inputs, now, self._config.timing)
        except PlannerError as exc:
            log.warning("planning %s: %s", key, exc)
            self._telemetry.error("EdgeModel", PLACEMENT, "PlannerError")
            return
        self._telemetry.stepped(model, state, result.state, time.perf_counter() - started)
        self._telemetry.cluster(snapshot, observation)
        state = result.state
        self._wake_at.pop(key, None)
        if result.wake_at is not None:
            self._wake_at[key] = result.wake_at
        speeds = node_speeds(
            state.serving or (state.rollout.plan if state.rollout else None),
            snapshot,
            state.speed_factors,
            {p.metadata.name for p in pools if p.spec.device.throughput_gflops is not None},
        )
        p95 = observation.models.get((request.namespace, request.name)) if observation else None
        seen = plan_observation(state.serving, observation, snapshot)
        if state.serving is not None:
            mode = Calibration(model.spec.quantization.calibration.value)
            try:
                drop = await asyncio.to_thread(
                    self._catalog.plan_accuracy, profiled, state.serving, mode
                )
            except ModelError as exc:  # measured nothing: say so, keep serving
                log.warning("%s: cannot measure the plan's accuracy: %s", key, exc)
                drop = None
            seen = replace(seen, accuracy=accuracy_status(drop))
        # Status first: a rollout is on record before its objects exist.
        await self._write(model, body, state, result.report, p95, speeds, seen)
        live = [p for p in (state.serving, state.rollout.plan if state.rollout else None) if p]
        entry = _entry_placement(model, pools, nodes, live)
        state = await self._carry_out(model, body, state, result.actions, entry, profiled)
        self._states[key] = state
        placed = state.serving or (state.rollout.plan if state.rollout else None)
        if placed is not None:
            self._placed[key] = (request, profiled.profile, placed)
        else:
            self._placed.pop(key, None)

    def _offload_rate(self, model: EdgeModel, observation: Observation | None) -> float | None:
        """The cascade's offload rate to plan with: as the servers last measured it, else the
        one the serving plan was made with (a pause in traffic measures nothing and must not
        bring the declared rate back), else None (the declared one)."""
        if model.spec.cascade is None:
            return None
        key = (model.metadata.namespace or "", model.metadata.name)
        if observation is not None and key in observation.offload:
            return observation.offload[key]
        state = self._states.get(_key(model))
        serving = state.serving if state is not None else None
        if serving is not None and serving.request.cascade is not None:
            return serving.request.cascade.offload_rate
        recorded = model.status.plan.cascade if model.status and model.status.plan else None
        return recorded.offload_rate if recorded is not None else None

    def _revisions(
        self,
        model: str,
        state: ModelState,
        present: Mapping[str, DeploymentInfo],
        problems: Mapping[str, str],
        revisions: list[int],
    ) -> dict[int, Readiness]:
        out: dict[int, Readiness] = {}
        plans = {
            p.revision: p
            for p in (state.serving, state.rollout.plan if state.rollout else None)
            if p
        }
        for revision in revisions:
            plan = plans.get(revision)
            if plan is not None:
                out[revision] = readiness(model, plan, present, problems)
            else:
                mine = [i for i in present.values() if i.revision == revision]
                out[revision] = Readiness(all(i.ready for i in mine), "not a live revision")
        return out

    def _observed_compute(self, model: EdgeModel) -> dict[tuple[int, int, str], float]:
        """(revision, stage index, node) -> compute seconds per request that the model's stage
        servers report, from the last observation."""
        obs = self._observation
        if obs is None:
            return {}
        out = {}
        where = (model.metadata.namespace, model.metadata.name)
        for key, seen in obs.stages.items():
            if (key.namespace, key.model) != where or not key.revision.isdigit():
                continue
            if key.stage.isdigit() and key.node and seen.compute_s:
                out[(int(key.revision), int(key.stage), key.node)] = seen.compute_s
        return out

    async def _write(
        self,
        model: EdgeModel,
        body: Mapping[str, Any],
        state: ModelState,
        report: Report,
        p95: float | None,
        speeds: list[Any],
        seen: PlanObservation | None = None,
    ) -> None:
        current = model.status
        owned = loop_status(
            state,
            report,
            current.conditions if current else [],
            now=rfc3339(self._clock()),
            generation=model.metadata.generation,
            observed_p95_s=p95,
            speeds=speeds,
            observed=seen,
        )
        self._telemetry.model_status(model, owned)
        status = status_fields(owned)
        before = (
            current.model_dump(by_alias=True, mode="json", exclude_none=True) if current else {}
        )
        if all(before.get(k) == v for k, v in status.items()) and not report.events:
            return
        try:
            await asyncio.to_thread(self._report, body, Outcome(status, report.events))
        except ActuatorError as exc:  # the next round writes it again
            log.warning("%s: %s", _key(model), exc)

    async def _carry_out(
        self,
        model: EdgeModel,
        body: Mapping[str, Any],
        state: ModelState,
        actions: tuple[ClusterAction, ...],
        entry: EntryPlacement,
        profiled: Profiled | None = None,
    ) -> ModelState:
        if not actions:
            return state
        ref = self._ref(model, body, entry)
        try:
            for action in actions:
                if isinstance(action, ApplyRevision) and profiled is not None:
                    pieces = await asyncio.to_thread(
                        self._catalog.int8_pieces, profiled, action.plan
                    )
                    ref = self._with_int8(ref, pieces)
                await asyncio.to_thread(self._do, ref, action)
        except ActuatorError as exc:
            self._telemetry.error("EdgeModel", PLACEMENT, exc.reason)
            attempts = state.failure.attempts + 1 if state.failure else 1
            delay = self._config.backoff.delay(attempts - 1)
            failure = Failure(exc.reason, str(exc), attempts, self._clock() + delay)
            log.warning("%s: %s (retrying in %.0f s)", _key(model), exc, delay)
            if state.failure is None or state.failure.message != failure.message:
                event = Event(EventType.WARNING, exc.reason, str(exc))
                with contextlib.suppress(ActuatorError):
                    await asyncio.to_thread(self._report, body, Outcome({}, (event,)))
            self._wake_at[_key(model)] = failure.retry_at
            return replace(state, failure=failure)
        return replace(state, failure=None)

    def _do(self, ref: ModelRef, action: ClusterAction) -> None:
        if isinstance(action, ApplyRevision):
            self._cluster.apply_revision(ref, action.plan)
        elif isinstance(action, SwitchEntry):
            self._cluster.switch_entry(ref, action.revision)
        elif isinstance(action, DeleteRevisions):
            self._cluster.delete_revisions(ref, set(action.keep))

    def _ref(
        self,
        model: EdgeModel,
        body: Mapping[str, Any],
        entry: EntryPlacement,
    ) -> ModelRef:
        spec = model.spec
        shapes = {
            k: tuple(int(d) for d in v)
            for k, v in spec.input_shapes.items()
            if all(isinstance(d, int) for d in v)
        }
        tokens: dict[str, str] = {}
        source = self._distributed(spec.source.uri, spec.source.sha256, tokens)
        small = spec.cascade.model if spec.cascade else None
        return ModelRef(
            name=model.metadata.name,
            namespace=model.metadata.namespace or "default",
            uid=str((body.get("metadata") or {}).get("uid", "")),
            source_uri=source,
            entry=entry,
            sha256=spec.source.sha256,
            input_shapes=shapes,
            data_source_pool=spec.data_source,
            image=self._config.image,
            cascade_source=(self._distributed(small.uri, small.sha256, tokens), small.sha256)
            if small
            else None,
            cascade_output=spec.cascade.output if spec.cascade else None,
            cascade_threshold=spec.cascade.threshold if spec.cascade else None,
            tolerations=tuple(
                (
                    t.key,
                    t.operator.value,
                    t.value,
                    t.effect.value if t.effect else None,
                )
                for t in spec.tolerations
            ),
            model_tokens=tokens,
        )

    def _distributed(self, uri: str, sha256: str, tokens: dict[str, str]) -> str:
        """Where servers get the file `sha256`: the operator's distribution endpoint (its
        token into `tokens`) when the operator distributes models, else `uri` itself."""
        base, key = self._config.distribution_url, self._config.distribution_key
        if base is None or key is None:
            return uri
        tokens[sha256] = model_token(key, sha256)
        return model_url(base, sha256)

    def _with_int8(self, ref: ModelRef, pieces: Mapping[int, tuple[str, str]]) -> ModelRef:
        """`ref` with the int8 files of a plan's int8 stages (each served by its digest)."""
        tokens = dict(ref.model_tokens)
        sources = {i: (self._distributed(u, sha, tokens), sha) for i, (u, sha) in pieces.items()}
        return replace(ref, int8_sources=sources, model_tokens=tokens)


MAX_ROUTERS = 2


def _entry_placement(
    model: EdgeModel, pools: list[DevicePool], nodes: list[NodeInfo], plans: list[Plan]
) -> EntryPlacement:
    """Where a model's entry routers go: its data source pool's nodes, one router per Ready
    node the live plans leave free (at least one, at most MAX_ROUTERS), away from those
    plans' nodes where the pool has others. Only the plans' nodes in that pool count: a
    plan moving between other pools' nodes leaves the routers' spec, and so the routers and
    the requests they hold, alone."""
    pool = next((p for p in pools if p.metadata.name == model.spec.data_source), None)
    if pool is None:
        return EntryPlacement()
    selector = tuple(sorted(pool.spec.node_selector.items()))
    in_pool = {n.name for n in nodes if n.matches(dict(selector))}
    used = {n for plan in plans for s in plan.stages for n in s.nodes}
    avoid = tuple(sorted(used & in_pool))
    free = sum(
        1
        for n in nodes
        if n.ready and n.schedulable and n.matches(dict(selector)) and n.name not in avoid
    )
    return EntryPlacement(selector, max(1, min(MAX_ROUTERS, free)), avoid)


def _key(model: EdgeModel) -> str:
    return f"{model.metadata.namespace}/{model.metadata.name}"


def _split(key: str) -> tuple[str, str]:
    namespace, _, name = key.partition("/")
    return namespace, name


__all__ = [
    "Cluster",
    "ClusterView",
    "ControlLoop",
    "DeploymentInfo",
    "LoopConfig",
    "PodInfo",
    "Profiled",
    "deployment_info",
    "pod_info",
]
