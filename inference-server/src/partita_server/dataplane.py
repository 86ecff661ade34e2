"""The transport-neutral data plane: what a stage server does, whatever carries the request.

Validates inputs against the stage, runs onnxruntime (batched or not) off the event loop,
applies the cascade rule, forwards through the next hops and picks the outputs the caller
asked for. The HTTP app only adapts requests and errors to this.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from partita.model.errors import ShardingError
from partita.model.exchange import ShardState
from partita.model.types import layout_id, layout_to_json
from partita.runtime import RunError, Session, TensorSpec, run_checked
from partita_server.batching import RunQueue
from partita_server.chaining import HopClient
from partita_server.errors import (
    BadGateway,
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    Relayed,
    RunLost,
    StageTimeout,
    StageUnavailable,
    Unauthorized,
)
from partita_server.metrics import ServerMetrics
from partita_server.protocol import (
    LAYOUT_ID_PARAMETER,
    LAYOUT_PARAMETER,
    RUN_PARAMETER,
    SEGMENT_PARAMETER,
    InferRequest,
    InferResponse,
    datatype_of,
    decompress,
    describes,
)
from partita_server.spec import OrtSizing, StageSpec, StageTokens
from partita_server.stage import LoadedStage

__all__ = ["SERVER_NAME", "DataPlane"]

SERVER_NAME = "partita"
SERVER_VERSION = "0.1.0"
# Requests a shard holds at once between the segments it runs; past it a new one gets 503.
MAX_HELD_RUNS = 256


def _dims(spec: TensorSpec) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in spec.shape]


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": datatype_of(spec.dtype), "shape": _dims(spec)}


class DataPlane:
    """One stage (or shard) of one model, behind the v2 protocol's operations.

    ORT runs go through a `RunQueue` per session on `sizing.workers` threads (a shard has
    one session per segment it runs; a request names its segment); `clock` is the one
    the request deadlines are on.
    """

    def __init__(
        self,
        spec: StageSpec,
        stage: LoadedStage | None,
        *,
        tokens: StageTokens,
        metrics: ServerMetrics,
        sizing: OrtSizing,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.spec, self.stage, self.metrics, self._clock = spec, stage, metrics, clock
        self.sizing = sizing
        self._tokens = tokens
        self._executor = ThreadPoolExecutor(max_workers=sizing.workers, thread_name_prefix="ort")
        self._hops = (
            HopClient(spec.next, model=spec.model, tokens=tokens, metrics=metrics, clock=clock)
            if spec.next
            else None
        )
        # A router (no stage) relays what it is given; the stage it relays to checks it.
        sessions: tuple[Session | None, ...] = ()
        if stage is not None:
            sessions = stage.segments if stage.layout is not None else (stage.session,)
        self._sessions = sessions
        self._queues = [
            None
            if session is None
            else RunQueue(
                functools.partial(self._run, session),
                workers=sizing.workers,
                max_rows=spec.batching.max_batch_size if spec.batching is not None else 1,
                executor=self._executor,
                metrics=metrics,
                clock=clock,
            )
            for session in sessions
        ]
        layout = stage.layout if stage is not None else None
        self._layout = layout_to_json(layout) if layout is not None else None
        self._layout_id = layout_id(layout) if layout is not None else None
        self._final_metadata: dict[str, Any] | None = None
        # A shard's requests between the segments it runs: run id -> (deadline, state).
        self._runs: dict[str, tuple[float, ShardState]] = {}
        self._ready = False

    async def start(self) -> None:
        if self._hops is not None:
            await self._hops.start()
        for queue in self._queues:
            if queue is not None:
                queue.start()
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        for queue in self._queues:
            if queue is not None:
                await queue.stop()
        if self._hops is not None:
            await self._hops.stop()
        self._executor.shutdown(wait=True)

    def deadline(self, caller_timeout_s: float | None = None) -> float:
        """When a request arriving now must be answered: the spec's budget, or the caller's
        shorter one (a gRPC deadline, the `partita-timeout` header a previous stage sends)."""
        budget = self.spec.deadline_s
        if caller_timeout_s is not None and caller_timeout_s < budget:
            budget = max(caller_timeout_s, 0.0)
        return self._clock() + budget

    # -- health and metadata ---------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._ready

    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": SERVER_NAME,
            "version": SERVER_VERSION,
            "extensions": ["binary_tensor_data"],
        }

    def check_model(self, name: str, version: str | None = None) -> None:
        if name != self.spec.model or (version is not None and version != self.spec.version):
            shown = name if version is None else f"{name} version {version}"
            raise ModelNotFound(
                f"model {shown!r} is not served here; this server serves "
                f"{self.spec.model!r} version {self.spec.version!r}"
            )

    def authorize(self, authorization: str | None) -> None:
        """Internal stages (entry=False) accept only calls carrying the stage token."""
        if self.spec.entry:
            return
        presented = (authorization or "").removeprefix("Bearer ").strip()
        if not self._tokens.accepts(presented):
            raise Unauthorized(
                f"stage {self.spec.stage!r} is internal: send 'Authorization: Bearer <token>' "
                "with the token of PARTITA_INTERNAL_TOKEN (or PARTITA_INTERNAL_TOKEN_FILE)"
            )

    async def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        self.check_model(name, version)
        if self.stage is None:
            return await self._relayed_metadata()
        inputs = [_tensor_metadata(t) for t in self.stage.session.inputs]
        outputs = [_tensor_metadata(t) for t in self.stage.session.outputs]
        layout = self.stage.layout
        if layout is not None:
            # A shard speaks for its stage: what the fan-out sends it whole and gathers.
            inputs = [
                _tensor_metadata(TensorSpec(x.tensor, x.dtype, x.shape)) for x in layout.scatter
            ]
            outputs = [
                _tensor_metadata(TensorSpec(t.name, t.dtype, t.shape)) for t in layout.outputs
            ]
        if self._hops is not None and self.spec.cascade is None:
            if self._final_metadata is None:
                self._final_metadata = await self._hops.metadata(self.deadline())
            if self._final_metadata is not None:
                outputs = self._final_metadata.get("outputs", outputs)
        return {
            "name": self.spec.model,
            "versions": [self.spec.version],
            "platform": "onnxruntime_onnx",
            "inputs": inputs,
            "outputs": outputs,
            "parameters": {
                "stage": self.spec.stage,
                "entry": self.spec.entry,
                **({LAYOUT_PARAMETER: self._layout} if self._layout is not None else {}),
            },
        }

    async def _relayed_metadata(self) -> dict[str, Any]:
        """A router's metadata: the serving revision's, as its entry server tells it."""
        assert self._hops is not None
        if self._final_metadata is None:
            self._final_metadata = await self._hops.metadata(self.deadline())
        if self._final_metadata is None:
            raise StageUnavailable(
                f"model {self.spec.model!r}: no serving revision answers for its metadata"
            )
        return {**self._final_metadata, "parameters": {"stage": self.spec.stage, "router": True}}

    # -- inference -------------------------------------------------------------------------

    def _segment(self, request: InferRequest) -> int:
        """The segment a request runs: a shard's request names it, anything else runs 0."""
        raw = request.parameters.get(SEGMENT_PARAMETER, 0)
        count = len(self._sessions)
        if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < count:
            raise InvalidInput(
                f"parameter {SEGMENT_PARAMETER!r} is {raw!r}; stage {self.spec.stage!r} has "
                f"segments 0..{count - 1}"
            )
        if self._sessions[raw] is None:
            assert self.spec.shard is not None
            raise InvalidInput(
                f"shard {self.spec.shard.index} of stage {self.spec.stage!r} has nothing to do "
                f"in segment {raw}"
            )
        return raw

    @staticmethod
    def _decode(request: InferRequest) -> dict[str, np.ndarray]:
        return {
            n: decompress(a, request.input_parameters.get(n, {}), name=n)
            for n, a in request.inputs.items()
        }

    def _validate(self, arrays: Mapping[str, np.ndarray], segment: int) -> dict[str, np.ndarray]:
        session = self._sessions[segment]
        assert session is not None
        inputs = {t.name: t for t in session.inputs}
        feeds: dict[str, np.ndarray] = {}
        for name, array in arrays.items():
            spec = inputs.get(name)
            if spec is None:
                raise InvalidInput(
                    f"tensor {name!r} is not an input of {self.spec.model}{self._where(segment)}; "
                    f"inputs are {sorted(inputs)}"
                )
            if array.dtype.name != spec.dtype:
                raise InvalidInput(
                    f"tensor {name!r}: datatype {datatype_of(array.dtype)}, the model takes "
                    f"{datatype_of(spec.dtype)}"
                )
            want = _dims(spec)
            if len(array.shape) != len(want) or any(
                w >= 0 and w != g for w, g in zip(want, array.shape, strict=True)
            ):
                raise InvalidInput(
                    f"tensor {name!r}: shape {list(array.shape)}, the model takes {want} "
                    "(-1: any size)"
                )
            limit = self.spec.limits.max_batch
            if want and want[0] < 0 and array.shape[0] > limit:
                raise PayloadTooLarge(
                    f"tensor {name!r}: batch of {array.shape[0]} rows, over the server's "
                    f"limit of {limit} (limits.max_batch); send smaller batches"
                )
            feeds[name] = array
        missing = sorted(set(inputs) - set(feeds))
        if missing:
            raise InvalidInput(f"tensor {missing[0]!r} is missing; the model needs {missing}")
        if self.spec.batching is not None:
            rows = {a.shape[0] for a in feeds.values()}
            if len(rows) != 1 or 0 in rows:
                raise InvalidInput(
                    f"inputs {sorted(feeds)} must share one non-zero batch size, got {sorted(rows)}"
                )
        return feeds

    def _where(self, segment: int) -> str:
        if self.spec.shard is None or len(self._sessions) == 1:
            return ""
        return f" (segment {segment} of shard {self.spec.shard.index})"

    def _run(self, session: Session, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs on the ORT thread; the only place time is spent in onnxruntime."""
        started = self._clock()
        try:
            outputs = run_checked(session, feeds)
        finally:
            self.metrics.compute.observe(self._clock() - started)
        self.metrics.batch.observe(next(iter(feeds.values())).shape[0] if feeds else 0)
        return outputs

    async def _compute(self, segment: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        queue = self._queues[segment]
        assert queue is not None
        try:
            return await queue.submit(feeds)
        except RunError as exc:
            raise InvalidInput(f"the model cannot run on these inputs: {exc}") from exc

    def _confident(self, outputs: Mapping[str, np.ndarray]) -> bool:
        assert self.spec.cascade is not None
        name = self.spec.cascade.output
        probabilities = outputs[name]
        if probabilities.size == 0:
            return True
        rows = (
            probabilities.reshape(probabilities.shape[0], -1)
            if probabilities.ndim
            else (probabilities.reshape(1, 1))
        )
        return bool(np.all(rows.max(axis=1) >= self.spec.cascade.threshold))

    async def infer(
        self,
        name: str,
        request: InferRequest,
        version: str | None = None,
        *,
        deadline: float | None = None,
    ) -> InferResponse:
        """Answer one request by `deadline` (on this plane's clock): compute here, then
        forward or answer as the spec says."""
        self.check_model(name, version)
        deadline = self.deadline() if deadline is None else deadline
        if self.stage is None:
            return await self._relay(request, deadline)
        parameters: dict[str, Any] = {}
        if self._layout_id is not None:
            parameters[LAYOUT_ID_PARAMETER] = self._layout_id
            if describes(request.parameters):
                parameters[LAYOUT_PARAMETER] = self._layout
                return InferResponse(
                    {}, parameters=parameters, model_name=self.spec.model,
                    model_version=self.spec.version, id=request.id,
                )  # fmt: skip
        segment = self._segment(request)
        if self.stage.layout is not None:
            return await self._shard_call(request, segment, deadline, parameters)
        feeds = self._validate(self._decode(request), segment)
        outputs = await self._compute(segment, feeds)
        if self._hops is not None:
            if self._clock() >= deadline:
                raise StageTimeout(
                    f"stage {self.spec.stage!r}: the request's deadline passed before it could "
                    "go on to the next stage"
                )
            if self.spec.cascade is None:
                outputs = (await self._hops.forward(outputs, deadline)).outputs
            else:
                forwarded = not self._confident(outputs)
                self.metrics.observe_cascade(forwarded)
                if forwarded:
                    outputs = (await self._hops.forward(feeds, deadline)).outputs
                parameters["partita_cascade"] = "forwarded" if forwarded else "local"
        return self._answer(request, outputs, parameters)

    async def _shard_call(
        self, request: InferRequest, segment: int, deadline: float, parameters: dict[str, Any]
    ) -> InferResponse:
        """One segment of a request through this shard: what it holds of the request and
        what the call delivers become the segment's inputs; it answers the rows its peers
        need of them, or after the last segment its parts of the stage outputs."""
        key, state = self._held_run(request, segment, deadline)
        try:
            try:
                delivered = state.feeds(segment, self._decode(request))
            except ShardingError as exc:
                raise InvalidInput(f"{self.spec.stage}{self._where(segment)}: {exc}") from exc
            outputs = await self._compute(segment, self._validate(delivered, segment))
            answer = state.answer(segment, outputs)
        except BaseException:
            self._runs.pop(key, None)
            raise
        if state.done:
            self._runs.pop(key, None)
        return self._answer(request, answer, parameters)

    def _held_run(
        self, request: InferRequest, segment: int, deadline: float
    ) -> tuple[str, ShardState]:
        """The request's state on this shard: new on its first segment, held until its
        last one or its deadline."""
        assert self.stage is not None and self.stage.layout is not None
        assert self.spec.shard is not None
        layout, index = self.stage.layout, self.spec.shard.index
        now = self._clock()
        for gone in [k for k, (until, _) in self._runs.items() if until <= now]:
            del self._runs[gone]
        key = request.parameters.get(RUN_PARAMETER, "")
        if not isinstance(key, str) or (not key and len(layout.segments) > 1):
            raise InvalidInput(
                f"parameter {RUN_PARAMETER!r} is {key!r}: stage {self.spec.stage!r} runs in "
                f"{len(layout.segments)} segments, and its shards keep what they hold of a "
                "request between them under the id the server driving them gives"
            )
        held = self._runs.get(key)
        if held is not None:
            return key, held[1]
        state = ShardState(layout, index)
        if segment != state.first:
            raise RunLost(
                f"shard {index} of stage {self.spec.stage!r} holds no request {key!r} for its "
                f"segment {segment} (it restarted, or the request's deadline passed)"
            )
        if len(self._runs) >= MAX_HELD_RUNS:
            raise StageUnavailable(
                f"shard {index} of stage {self.spec.stage!r} holds {len(self._runs)} "
                "unfinished requests already"
            )
        if key:
            self._runs[key] = (deadline, state)
        return key, state

    async def _relay(self, request: InferRequest, deadline: float) -> InferResponse:
        """A router's answer: the request as it came, relayed (and retried) by `next`, and
        the serving revision's answer as it came (its parameters too, e.g. where a cascade
        answered)."""
        assert self._hops is not None
        try:
            answer = await self._hops.forward(self._decode(request), deadline)
        except BadGateway as exc:
            status = exc.downstream_status
            if status is not None and 400 <= status < 500:
                raise Relayed(status, exc.message) from exc
            raise
        return self._answer(request, answer.outputs, dict(answer.parameters))

    def _answer(
        self, request: InferRequest, outputs: dict[str, np.ndarray], parameters: dict[str, Any]
    ) -> InferResponse:
        if request.outputs is not None:
            unknown = [o.name for o in request.outputs if o.name not in outputs]
            if unknown:
                raise InvalidInput(
                    f"requested output {unknown[0]!r} is not an output of {self.spec.model}; "
                    f"outputs are {sorted(outputs)}"
                )
            outputs = {o.name: outputs[o.name] for o in request.outputs}
        return InferResponse(
            outputs,
            parameters=parameters,
            model_name=self.spec.model,
            model_version=self.spec.version,
            id=request.id,
        )
