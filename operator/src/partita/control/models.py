"""EdgeModel reconciliation: fetch the model, verify its digest, profile it.

`reconcile_model` is plain Python over typed values (no kopf, no client). It owns the status
fields `model`, `observedGeneration` and the conditions ModelFetched and Profiled; the control
loop owns the rest (phase, plan, Planned, Ready, MetricsFresh) and derives the phase from all
conditions, so the two writers never overwrite each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from partita.api.conditions import set_condition
from partita.api.edgemodel import CascadeModelStatus, EdgeModel, ModelStatus, TensorStatus
from partita.api.meta import Condition, ConditionStatus
from partita.control.outcome import Backoff, Event, EventType, Outcome
from partita.control.quantization import Int8Figures, quantization_status
from partita.kube.fetch import FetchError, ModelFetcher
from partita.model.errors import ModelError
from partita.model.samples import Calibration
from partita.model.types import ModelProfile

MODEL_FETCHED = "ModelFetched"
PROFILED = "Profiled"
OWNED_CONDITIONS = (MODEL_FETCHED, PROFILED)

# (model file, input shapes) -> its profile (cached on disk by digest and shapes).
Profiler = Callable[[Path, Mapping[str, Sequence[int]] | None], ModelProfile]
# (model file, its sha256, input shapes, calibration) -> the int8 model and its measurements
# (`partita.control.quantization.int8_model` with the operator's cache directory).
Quantizer = Callable[[Path, str, Mapping[str, Sequence[int]] | None, Calibration], Int8Figures]


def model_status(profile: ModelProfile, size: int) -> ModelStatus:
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


class _Conditions:
    """The reconciler's conditions, each change an Event (True: Normal, False: Warning)."""

    def __init__(self, model: EdgeModel, now: str) -> None:
        old = model.status.conditions if model.status else []
        self.items: tuple[Condition, ...] = tuple(c for c in old if c.type in OWNED_CONDITIONS)
        self.before = {c.type: c.status for c in self.items}
        self.now = now
        self.generation = model.metadata.generation
        self.events: list[Event] = []

    def set(self, type_: str, status: ConditionStatus, reason: str, message: str) -> None:
        self.items = set_condition(
            self.items, type_, status, reason, message, now=self.now, generation=self.generation
        )
        if self.before.get(type_) != status and status != ConditionStatus.UNKNOWN:
            kind = EventType.NORMAL if status == ConditionStatus.TRUE else EventType.WARNING
            self.events.append(Event(kind, reason, message))

    def outcome(self, **fields: Any) -> Outcome:
        status = {
            "observedGeneration": self.generation,
            "conditions": [c.model_dump(by_alias=True, mode="json") for c in self.items],
            **fields,
        }
        return Outcome(status, tuple(self.events))


def reconcile_model(
    model: EdgeModel,
    fetcher: ModelFetcher,
    profiler: Profiler,
    *,
    now: str,
    retry: int = 0,
    backoff: Backoff | None = None,
    quantizer: Quantizer | None = None,
) -> Outcome:
    """Fetch and profile `model` (and its cascade's small model), quantize it when int8 is
    allowed; the conditions, `status.model` and Events say how far it got and why not."""
    backoff = backoff or Backoff()
    st = _Conditions(model, now)
    spec = model.spec
    try:
        fetched = fetcher.fetch(
            spec.source.uri, spec.source.sha256, namespace=model.metadata.namespace
        )
    except FetchError as exc:
        delay = backoff.delay(retry)
        st.set(
            MODEL_FETCHED,
            ConditionStatus.FALSE,
            exc.reason.value,
            f"{exc} (retrying in {delay:.0f}s)",
        )
        st.set(PROFILED, ConditionStatus.UNKNOWN, "WaitingForModel", "the model is not fetched")
        out = st.outcome()
        return Outcome(out.status, out.events, retry_after_s=delay)
    how = "found in the cache" if fetched.cached else "downloaded"
    st.set(
        MODEL_FETCHED,
        ConditionStatus.TRUE,
        "DigestVerified",
        f"sha256 {fetched.sha256[:12]}… verified, {fetched.size} bytes, {how}",
    )
    shapes = {k: list(v) for k, v in spec.input_shapes.items()} or None
    try:
        profile = profiler(fetched.path, shapes)
    except ModelError as exc:
        message = f"cannot analyse the model: {exc}; fix the file or spec.inputShapes"
        st.set(PROFILED, ConditionStatus.FALSE, "InvalidModel", message)
        out = st.outcome()
        return Outcome(out.status, out.events, permanent_error=message)
    except Exception as exc:  # a bug or a resource limit in analysis: retry, never crash
        delay = backoff.delay(retry)
        message = f"model analysis failed: {type(exc).__name__}: {exc} (retrying in {delay:.0f}s)"
        st.set(PROFILED, ConditionStatus.FALSE, "ProfileFailed", message)
        out = st.outcome()
        return Outcome(out.status, out.events, retry_after_s=delay)
    summary = model_status(profile, fetched.size)
    if spec.cascade is not None:
        try:
            small = _cascade_model(model, profile, fetcher, profiler, shapes)
        except (FetchError, ModelError) as exc:
            delay = backoff.delay(retry)
            retry_it = isinstance(exc, FetchError)
            message = f"cascade.model: {exc}" + (f" (retrying in {delay:.0f}s)" if retry_it else "")
            st.set(PROFILED, ConditionStatus.FALSE, "InvalidCascade", message)
            out = st.outcome(
                model=summary.model_dump(by_alias=True, mode="json", exclude_none=True)
            )
            if retry_it:
                return Outcome(out.status, out.events, retry_after_s=delay)
            return Outcome(out.status, out.events, permanent_error=message)
        summary = summary.model_copy(update={"cascade": small})
    if spec.quantization.allowed and quantizer is not None:
        calibration = Calibration(spec.quantization.calibration.value)
        try:
            figures = quantizer(fetched.path, fetched.sha256, shapes, calibration)
        except ModelError as exc:
            st.events.append(Event(EventType.WARNING, "QuantizationFailed", str(exc)))
        else:
            quantized = quantization_status(spec.quantization, figures)
            summary = summary.model_copy(update={"quantization": quantized})
            if not quantized.usable:
                st.events.append(Event(EventType.WARNING, "Int8Refused", quantized.message))
    st.set(
        PROFILED,
        ConditionStatus.TRUE,
        "Profiled",
        f"{len(profile.nodes)} nodes, {summary.total_flops / 1e9:.2f} GFLOP per inference, "
        f"{summary.cut_points} cut points",
    )
    return st.outcome(model=summary.model_dump(by_alias=True, mode="json", exclude_none=True))


def _cascade_model(
    model: EdgeModel,
    main: ModelProfile,
    fetcher: ModelFetcher,
    profiler: Profiler,
    shapes: Mapping[str, Sequence[int]] | None,
) -> CascadeModelStatus:
    """Fetch, verify and profile the cascade's small model and check that its answers look
    like the main model's: the same inputs, the main model's outputs, and `cascade.output`."""
    cascade = model.spec.cascade
    assert cascade is not None
    fetched = fetcher.fetch(
        cascade.model.uri, cascade.model.sha256, namespace=model.metadata.namespace
    )
    small = profiler(fetched.path, shapes)
    want = {(t.name, t.dtype, tuple(t.shape)) for t in main.inputs}
    have = {(t.name, t.dtype, tuple(t.shape)) for t in small.inputs}
    if want != have:
        raise ModelError(
            f"the small model's inputs {sorted(have)} are not the main model's {sorted(want)}; "
            "both take the same request"
        )
    outputs = {t.name: t.dtype for t in small.outputs}
    missing = [t.name for t in main.outputs if outputs.get(t.name) != t.dtype]
    if missing:
        raise ModelError(
            f"the small model lacks the main model's output(s) {missing} (name and type): an "
            "answer must look the same whichever model gave it"
        )
    if cascade.output not in outputs:
        raise ModelError(
            f"cascade.output {cascade.output!r} is not an output of the small model "
            f"(outputs: {sorted(outputs)})"
        )
    return CascadeModelStatus(
        digest=small.digest,
        size_bytes=fetched.size,
        total_flops=int(small.total_flops),
        param_bytes=int(small.param_bytes),
    )
