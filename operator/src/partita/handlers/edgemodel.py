"""EdgeModel reconciliation: fetch the model, verify it, profile it, report each step.

`reconcile_model` is plain Python over typed values (no kopf, no client); the kopf handler in
`partita.handlers.registry` only parses the body, calls it and applies the `Outcome`.
Planning and deployment are the closed loop's (the planner and actuator); until they are
wired in, the model waits in phase Planning with Planned=Unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from partita.api.conditions import find, set_condition
from partita.api.edgemodel import EdgeModel, ModelStatus, Phase, TensorStatus
from partita.api.meta import Condition, ConditionStatus
from partita.handlers.outcome import Backoff, Event, EventType, Outcome
from partita.kube.fetch import FetchError, ModelFetcher

MODEL_FETCHED = "ModelFetched"
PROFILED = "Profiled"
PLANNED = "Planned"
READY = "Ready"

# (model file, input shapes) -> partita.model.types.ModelProfile; None when partita.model
# is not part of this build.
Profiler = Callable[[Path, Mapping[str, Sequence[int]] | None], Any]


def default_profiler(cache_dir: Path | None) -> Profiler | None:
    """`partita.model.profile.profile_model` when importable, caching profiles on disk."""
    try:
        from partita.model.profile import profile_model
    except ImportError:
        return None

    def profile(path: Path, shapes: Mapping[str, Sequence[int]] | None) -> Any:
        return profile_model(path, shapes, cache_dir=cache_dir)

    return profile


def model_status(profile: Any, size: int) -> ModelStatus:
    """The part of a ModelProfile a person wants in `kubectl get -o yaml`."""

    def tensors(items: Sequence[Any]) -> list[TensorStatus]:
        return [TensorStatus(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in items]

    return ModelStatus(
        digest=profile.digest,
        size_bytes=size,
        inputs=tensors(profile.inputs),
        outputs=tensors(profile.outputs),
        total_flops=int(profile.total_flops),
        param_bytes=int(profile.param_bytes),
        cut_points=len(profile.cut_points),
    )


class _Status:
    """Accumulates condition changes and Events for one reconciliation."""

    def __init__(self, model: EdgeModel, now: str) -> None:
        status = model.status
        self.conditions: tuple[Condition, ...] = tuple(status.conditions) if status else ()
        self.before = {c.type: c.status for c in self.conditions}
        self.now = now
        self.generation = model.metadata.generation
        self.events: list[Event] = []

    def set(self, type_: str, status: ConditionStatus, reason: str, message: str) -> None:
        changed = self.before.get(type_) != status
        self.conditions = set_condition(
            self.conditions,
            type_,
            status,
            reason,
            message,
            now=self.now,
            generation=self.generation,
        )
        # Ready=False repeats the step that failed; only its becoming True is news.
        quiet = type_ == READY and status != ConditionStatus.TRUE
        if changed and status != ConditionStatus.UNKNOWN and not quiet:
            kind = EventType.NORMAL if status == ConditionStatus.TRUE else EventType.WARNING
            self.events.append(Event(kind, reason, message))

    def outcome(self, phase: Phase, message: str, **fields: Any) -> dict[str, Any]:
        return {
            "observedGeneration": self.generation,
            "phase": phase.value,
            "message": message,
            "conditions": [c.model_dump(by_alias=True, mode="json") for c in self.conditions],
            **fields,
        }


def reconcile_model(
    model: EdgeModel,
    fetcher: ModelFetcher,
    profiler: Profiler | None,
    *,
    now: str,
    retry: int = 0,
    backoff: Backoff | None = None,
) -> Outcome:
    """Fetch and profile `model`; the status and Events say how far it got and why not further."""
    backoff = backoff or Backoff()
    st = _Status(model, now)
    spec = model.spec
    try:
        fetched = fetcher.fetch(
            spec.source.uri, spec.source.sha256, namespace=model.metadata.namespace
        )
    except FetchError as exc:
        delay = backoff.delay(retry)
        message = f"{exc} (retrying in {delay:.0f}s)"
        st.set(MODEL_FETCHED, ConditionStatus.FALSE, exc.reason.value, message)
        st.set(PROFILED, ConditionStatus.UNKNOWN, "WaitingForModel", "the model is not fetched")
        st.set(READY, ConditionStatus.FALSE, exc.reason.value, str(exc))
        return Outcome(st.outcome(Phase.FAILED, message), tuple(st.events), retry_after_s=delay)
    how = "found in the cache" if fetched.cached else "downloaded"
    st.set(
        MODEL_FETCHED,
        ConditionStatus.TRUE,
        "DigestVerified",
        f"sha256 {fetched.sha256[:12]}… verified, {fetched.size} bytes, {how}",
    )
    if profiler is None:
        message = "model analysis (partita.model) is not available in this operator build"
        st.set(PROFILED, ConditionStatus.UNKNOWN, "NotAvailable", message)
        st.set(PLANNED, ConditionStatus.UNKNOWN, "NotAvailable", "waiting for a profile")
        st.set(READY, ConditionStatus.FALSE, "NotPlanned", "no plan yet")
        return Outcome(st.outcome(Phase.PENDING, message), tuple(st.events))

    from partita.model.errors import ModelError

    shapes = {k: list(v) for k, v in spec.input_shapes.items()} or None
    try:
        profile = profiler(fetched.path, shapes)
    except ModelError as exc:
        message = f"cannot analyse the model: {exc}; fix the file or spec.inputShapes"
        st.set(PROFILED, ConditionStatus.FALSE, "InvalidModel", message)
        st.set(READY, ConditionStatus.FALSE, "InvalidModel", message)
        return Outcome(st.outcome(Phase.FAILED, message), tuple(st.events), permanent_error=message)
    except Exception as exc:  # a bug or a resource limit in analysis: retry, never crash
        delay = backoff.delay(retry)
        message = f"model analysis failed: {type(exc).__name__}: {exc} (retrying in {delay:.0f}s)"
        st.set(PROFILED, ConditionStatus.FALSE, "ProfileFailed", message)
        st.set(READY, ConditionStatus.FALSE, "ProfileFailed", message)
        return Outcome(st.outcome(Phase.FAILED, message), tuple(st.events), retry_after_s=delay)
    summary = model_status(profile, fetched.size)
    gflop = summary.total_flops / 1e9
    st.set(
        PROFILED,
        ConditionStatus.TRUE,
        "Profiled",
        f"{len(profile.nodes)} nodes, {gflop:.2f} GFLOP per inference, "
        f"{summary.cut_points} cut points",
    )
    planned = find(st.conditions, PLANNED)
    if planned is None or planned.reason in ("NotAvailable", "WaitingForPlanner"):
        st.set(
            PLANNED,
            ConditionStatus.UNKNOWN,
            "WaitingForPlanner",
            "profiled; waiting for the planner to place the stages",
        )
        st.set(READY, ConditionStatus.FALSE, "NotPlanned", "no plan yet")
    phase = model.status.phase if model.status and model.status.plan else Phase.PLANNING
    fields = {"model": summary.model_dump(by_alias=True, mode="json")}
    return Outcome(st.outcome(phase, "profiled; waiting for a plan", **fields), tuple(st.events))
