"""kopf wiring of the closed loop: one global placement loop (not a timer per object, so
EdgeModels carry no finalizer of ours) fed by watch events and the metrics poll.

Every `interval_s` it asks `PlacementService` for a step per profiled EdgeModel and writes
what happened into the status and Events. The decisions are the planner's; this module only
gathers inputs and applies results.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import kopf

from partita.api.conditions import set_condition
from partita.api.edgemodel import EdgeModel
from partita.api.errors import ManifestError
from partita.api.meta import GROUP, VERSION, Condition, ConditionStatus
from partita.kube.actuator import Actuator, ActuatorError
from partita.kube.calibration import ReferenceSpeeds
from partita.kube.manifests import ModelRef, RenderError
from partita.kube.placement import PlacementService, StepResult, build_snapshot, model_request
from partita.metrics.observation import Observation
from partita.planner import Plan, PlannerError

log = logging.getLogger("partita.placement")


@dataclass
class MetricsState:
    """What the global metrics poll last handed on (None before the first poll)."""

    observation: Observation | None = None

    @property
    def fresh(self) -> bool:
        return self.observation is not None and self.observation.fresh

    def observed_p95_s(self, namespace: str, name: str) -> float | None:
        if self.observation is None:
            return None
        return self.observation.models.get((namespace, name))


def node_doc(body: Any) -> dict[str, Any]:
    """The parts of a Node the planner reads."""
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {})
    return {
        "metadata": {
            "name": meta.get("name"),
            "labels": dict(meta.get("labels") or {}),
            "annotations": dict(meta.get("annotations") or {}),
        },
        "spec": {
            "taints": [dict(t) for t in spec.get("taints") or []],
            "unschedulable": bool(spec.get("unschedulable")),
        },
        "status": {
            "allocatable": dict(status.get("allocatable") or {}),
            "conditions": [dict(c) for c in status.get("conditions") or []],
        },
    }


def _now_text() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan_status(plan: Plan, observed_p95_s: float | None) -> dict[str, Any]:
    return {
        "revision": plan.revision,
        "stageCount": len(plan.stages),
        "pools": ",".join(s.pool for s in plan.stages),
        "stages": [
            {
                "index": s.index,
                "pool": s.pool,
                "nodes": list(s.nodes),
                "inputs": list(s.inputs)[:16],
                "outputs": list(s.outputs)[:16],
                "shards": len(s.shards),
                "compression": str(s.input_compression.value),
            }
            for s in plan.stages
        ],
        "predictedP95Ms": round(plan.latency_s * 1000, 2),
        "observedP95Ms": round(observed_p95_s * 1000, 2) if observed_p95_s else None,
        "reasons": [plan.describe(), *plan.notes][:8],
    }


def merge_conditions(
    old: list[dict[str, Any]], updates: tuple[tuple[str, str, str, str], ...], generation: int
) -> list[dict[str, Any]]:
    """The status conditions with `updates` applied by `partita.api.conditions.set_condition`
    (the same rule as the reconcile handler: a transition time moves only with the status)."""
    conditions = tuple(Condition.model_validate(c) for c in old)
    now = _now_text()
    for type_, status, reason, message in updates:
        conditions = set_condition(
            conditions,
            type_,
            ConditionStatus(status),
            reason,
            message,
            now=now,
            generation=generation,
        )
    return [c.model_dump(by_alias=True, mode="json") for c in conditions]


def status_patch(
    status: dict[str, Any], result: StepResult, metrics: MetricsState, generation: int
) -> dict[str, Any]:
    """The status fields that change, as a merge patch (empty when nothing does)."""
    patch: dict[str, Any] = {}
    if result.phase != status.get("phase"):
        patch["phase"] = result.phase
    if result.message[:4000] != status.get("message"):
        patch["message"] = result.message[:4000]
    if result.plan is not None:
        req = result.plan.request
        new = plan_status(result.plan, metrics.observed_p95_s(req.namespace, req.name))
        if new != status.get("plan"):
            patch["plan"] = new
    conditions = merge_conditions(
        list(status.get("conditions") or []), result.conditions, generation
    )
    if conditions != list(status.get("conditions") or []):
        patch["conditions"] = conditions
    return patch


class PlacementLoop:
    """Caches of the watched objects and the loop that steps every model."""

    def __init__(
        self,
        api_client: Any,
        load: Callable[[EdgeModel], tuple[Path, Any] | None],
        metrics: MetricsState,
        *,
        image: str,
        interval_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes import client

        self.nodes: dict[str, dict[str, Any]] = {}
        self.pools: dict[str, dict[str, Any]] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.metrics = metrics
        self.image = image
        self.interval_s = interval_s
        self.service = PlacementService(Actuator(api_client), clock, check=self._can_cut)
        self._paths: dict[str, Path] = {}
        self._cut_checks: dict[tuple[str, str], str | None] = {}
        self.speeds = ReferenceSpeeds()
        self._load = load
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._lock = threading.Lock()

    def step_all(self) -> None:
        with self._lock:
            models = list(self.models.items())
        for key, body in models:
            try:
                self._step(key, body)
            except (ActuatorError, PlannerError, RenderError) as exc:
                log.warning("placement of %s: %s", key, exc)
            except Exception:  # never let one model stop the loop for the others
                log.exception("placement of %s failed", key)

    def _step(self, key: str, body: dict[str, Any]) -> None:
        status = body.get("status") or {}
        if not any(
            c.get("type") == "Profiled" and c.get("status") == "True"
            for c in status.get("conditions") or []
        ):
            return
        try:
            model = EdgeModel.parse(body)
        except ManifestError:
            return
        loaded = self._load(model)
        if loaded is None:
            return
        path, profile = loaded
        ns = model.metadata.namespace or "default"
        self._paths[key] = path
        shapes = {
            k: tuple(int(d) for d in v)
            for k, v in model.spec.input_shapes.items()
            if all(isinstance(d, int) for d in v)
        }
        ref = ModelRef(
            name=model.metadata.name,
            namespace=ns,
            uid=str(body["metadata"]["uid"]),
            source_uri=model.spec.source.uri,
            sha256=model.spec.source.sha256,
            input_shapes=shapes,
            data_source_pool=model.spec.data_source,
            image=self.image,
            cascade_output=model.spec.cascade.output if model.spec.cascade else None,
            cascade_threshold=model.spec.cascade.threshold if model.spec.cascade else None,
        )
        gflops = self.speeds.get(path, profile, shapes or None)
        snapshot = build_snapshot(
            list(self.pools.values()),
            list(self.nodes.values()),
            self.metrics.observation,
            gflops,
        )
        result = self.service.step(
            key,
            ref,
            model_request(model),
            profile,
            snapshot,
            metrics_fresh=self.metrics.fresh,
            observed_compute=self._observed_compute(ns, model.metadata.name, status),
        )
        patch = status_patch(status, result, self.metrics, model.metadata.generation or 0)
        if patch:
            self._custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, ns, "edgemodels", model.metadata.name, {"status": patch}
            )
        for type_, reason, message in result.events:
            self._event(body, type_, reason, message)

    def _observed_compute(
        self, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[tuple[int, str], float]:
        """(stage index, node) -> seconds of compute per request the serving revision's
        servers report, from the last observation."""
        obs = self.metrics.observation
        revision = str((status.get("plan") or {}).get("revision", ""))
        if obs is None or not revision:
            return {}
        out = {}
        for key, seen in obs.stages.items():
            if (key.namespace, key.model, key.revision) != (namespace, name, revision):
                continue
            if key.stage.isdigit() and key.node and seen.compute_s:
                out[(int(key.stage), key.node)] = seen.compute_s
        return out

    def _can_cut(self, ref: ModelRef, plan: Plan) -> str | None:
        """Cut every sharded stage as its servers will; the first refusal, or None."""
        from partita.model.errors import ModelError
        from partita.model.load import load_model
        from partita.model.shard import shard_stage
        from partita.model.slice import extract_stage

        path = self._paths.get(f"{ref.namespace}/{ref.name}")
        if path is None:
            return None
        model = None
        for stage in plan.stages:
            if len(stage.shards) < 2:
                continue
            key = (
                f"{path}:{ref.input_shapes}:{stage.inputs}:{stage.outputs}",
                str(len(stage.shards)),
            )
            if key not in self._cut_checks:
                try:
                    model = model or load_model(path, ref.input_shapes or None)
                    piece = extract_stage(model, stage.inputs, stage.outputs)
                    shard_stage(piece, [s.proportion for s in stage.shards])
                    self._cut_checks[key] = None
                except ModelError as exc:
                    self._cut_checks[key] = f"stage {stage.index}: {exc}"
            if self._cut_checks[key] is not None:
                return self._cut_checks[key]
        return None

    def _event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        from kubernetes import client

        meta = body["metadata"]
        now = datetime.datetime.now(datetime.UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}."),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind="EdgeModel",
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta["uid"],
            ),
            type=type_,
            reason=reason,
            message=message[:1000],
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component="partita"),
        )
        with contextlib.suppress(Exception):
            self._core.create_namespaced_event(meta["namespace"], event)

    async def run_forever(self) -> None:
        while True:
            await asyncio.to_thread(self.step_all)
            await asyncio.sleep(self.interval_s)


def register(registry: kopf.OperatorRegistry, loop: PlacementLoop) -> None:
    """Watch nodes, pools and models into `loop`'s caches and run it while kopf runs."""

    def on_node(event: dict[str, Any], **_: Any) -> None:
        _cache(loop.nodes, event, node_doc)

    def on_pool(event: dict[str, Any], **_: Any) -> None:
        _cache(
            loop.pools,
            event,
            lambda b: {
                "metadata": {"name": b["metadata"]["name"]},
                "spec": dict(b.get("spec") or {}),
            },
        )

    def on_model(event: dict[str, Any], **_: Any) -> None:
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        if event.get("type") == "DELETED":
            loop.models.pop(key, None)
            loop.service.forget(key)
        else:
            loop.models[key] = dict(obj)

    kopf.on.event("", "v1", "nodes", registry=registry, id="placement-nodes")(cast(Any, on_node))
    kopf.on.event(GROUP, VERSION, "devicepools", registry=registry, id="placement-pools")(
        cast(Any, on_pool)
    )
    kopf.on.event(GROUP, VERSION, "edgemodels", registry=registry, id="placement-models")(
        cast(Any, on_model)
    )

    tasks: list[asyncio.Task[None]] = []

    @kopf.on.startup(registry=registry, id="placement-loop")
    async def start(**_: Any) -> None:
        tasks.append(asyncio.create_task(loop.run_forever(), name="partita-placement"))

    @kopf.on.cleanup(registry=registry, id="placement-loop-stop")
    async def stop(**_: Any) -> None:
        for task in tasks:
            task.cancel()


def _cache(
    store: dict[str, dict[str, Any]],
    event: dict[str, Any],
    view: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    obj = event.get("object") or {}
    name = (obj.get("metadata") or {}).get("name")
    if not name:
        return
    if event.get("type") == "DELETED":
        store.pop(name, None)
    else:
        store[name] = view(obj)


def register_metrics(registry: kopf.OperatorRegistry, config: Any, state: MetricsState) -> None:
    """The operator's single Prometheus poll loop; each observation replaces `state`'s."""
    from partita.metrics.queries import Queries
    from partita.metrics.reader import MetricsReader, PollLoop

    tasks: list[asyncio.Task[None]] = []

    def keep(observation: Observation) -> None:
        state.observation = observation

    @kopf.on.startup(registry=registry, id="metrics-loop")
    async def start(**_: Any) -> None:
        queries = Queries.load(config.queries_file) if config.queries_file else Queries()
        reader = MetricsReader(config.prometheus_url, queries)
        poll = PollLoop(reader, config.poll_interval_s, keep)
        tasks.append(asyncio.create_task(poll.run(), name="partita-metrics"))

    @kopf.on.cleanup(registry=registry, id="metrics-loop-stop")
    async def stop(**_: Any) -> None:
        for task in tasks:
            task.cancel()
