"""Forwarding to the next stages: binary v2 requests over keep-alive HTTP or gRPC, every hop
measured, every call bounded by the request's deadline.

A chain hop hands tensors to the next stage and its answer becomes ours; it tries the next
endpoint when one is down and reports 503 when all are, 504 (naming the stage) on a timeout.
A fan-out hop drives the shards of the next stage through the layout they report
(`partita.model.exchange.ExchangeRouter`): each shard is sent its piece of the tensors with
its first call, the shards run each segment at once and keep what they hold of the request
(under the run id the hop gives it), the hop passes on the rows each shard sends its peers
between segments, and gathers the stage outputs from their parts. A shard that lost a
request midway (it restarted) says so, and the hop runs the request again once.

The wire is a `Transport` per endpoint scheme (`http://`: REST with binary tensors,
`grpc://`: the v2 gRPC service). A transport makes one call and reports what happened as a
`ServerError`; the `HopClient` decides what to do about it (which endpoint next, fan-out,
gather). Retry policies, or other exchanges between servers, go in the `HopClient` and reuse
the transports unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import grpc
import numpy as np
import orjson

from partita.model.errors import ModelError
from partita.model.exchange import ExchangeRouter
from partita.model.types import ShardLayout, layout_from_json
from partita_server.errors import (
    BadGateway,
    InvalidInput,
    RunLost,
    ServerError,
    StageTimeout,
    StageUnavailable,
)
from partita_server.grpc_codec import (
    SERVICE,
    decode_infer_response,
    encode_infer_request,
    http_status,
)
from partita_server.http1 import Http1Error, Http1Pool, Http1Response
from partita_server.metrics import ServerMetrics
from partita_server.proto import open_inference_pb2 as pb
from partita_server.protocol import (
    DESCRIBE_PARAMETER,
    HEADER_LENGTH,
    LAYOUT_ID_PARAMETER,
    LAYOUT_PARAMETER,
    RUN_PARAMETER,
    SEGMENT_PARAMETER,
    SERVER_SECONDS_HEADER,
    TIMEOUT_HEADER,
    InferResponse,
    compress,
    decode_response,
    decompress,
    encode_request_parts,
)
from partita_server.spec import Hop, StageTokens

__all__ = ["HopClient", "Reply", "Transport"]

CONNECT_TIMEOUT_S = 2.0
# Back-off between tries of a retrying hop: from the first to the largest, doubling.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0


@dataclass(frozen=True)
class Reply:
    """One successful call: the answer, bytes sent, and the next server's own time."""

    response: InferResponse
    sent_bytes: int
    server_seconds: float


class Transport(Protocol):
    """One way of calling a next-stage endpoint. Failures are raised as `ServerError`:
    `StageUnavailable` means "try another endpoint", anything else is final."""

    async def infer(
        self,
        hop: Hop,
        endpoint: str,
        model: str,
        tensors: Mapping[str, np.ndarray],
        parameters: Mapping[str, Mapping[str, Any]],
        timeout_s: float,
        request_parameters: Mapping[str, Any] | None = None,
    ) -> Reply: ...

    async def metadata(
        self, hop: Hop, endpoint: str, model: str, timeout_s: float
    ) -> dict[str, Any] | None: ...

    async def close(self) -> None: ...


def _where(hop: Hop, endpoint: str) -> str:
    return f"next stage {hop.stage!r} at {endpoint}"


class HttpTransport:
    """v2 REST with binary tensors over keep-alive connections (`partita_server.http1`)."""

    def __init__(self, tokens: StageTokens) -> None:
        self._tokens = tokens
        self._pool = Http1Pool.from_env()

    def _headers(self, extra: Mapping[str, str]) -> dict[str, str]:
        token = self._tokens.current
        return {**extra, **({"authorization": f"Bearer {token}"} if token else {})}

    async def _request(
        self, hop: Hop, endpoint: str, method: str, path: str, headers: Mapping[str, str],
        body: bytes | Sequence[bytes | memoryview], timeout_s: float,
    ) -> Http1Response:  # fmt: skip
        url = urlsplit(endpoint)
        try:
            return await self._pool.request(
                url.hostname or "", url.port or 80, method, path, self._headers(headers), body,
                timeout_s=timeout_s, connect_timeout_s=min(timeout_s, CONNECT_TIMEOUT_S),
            )  # fmt: skip
        except Http1Error as exc:
            if exc.kind == "timeout":
                raise StageTimeout(
                    f"{_where(hop, endpoint)} did not answer within {timeout_s:.3f} s"
                ) from exc
            raise StageUnavailable(f"{_where(hop, endpoint)} is unreachable ({exc})") from exc

    async def infer(
        self,
        hop: Hop,
        endpoint: str,
        model: str,
        tensors: Mapping[str, np.ndarray],
        parameters: Mapping[str, Mapping[str, Any]],
        timeout_s: float,
        request_parameters: Mapping[str, Any] | None = None,
    ) -> Reply:
        body, header_length = encode_request_parts(
            tensors, input_parameters=parameters, parameters=request_parameters
        )
        headers = {"content-type": "application/octet-stream", TIMEOUT_HEADER: f"{timeout_s:.6f}"}
        if header_length is not None:
            headers[HEADER_LENGTH] = str(header_length)
        reply = await self._request(
            hop, endpoint, "POST", f"/v2/models/{model}/infer", headers, body, timeout_s
        )
        if reply.status != 200:
            raise _downstream_error(hop, endpoint, reply.status, _error_text(reply.body))
        try:
            server_seconds = float(reply.headers.get(SERVER_SECONDS_HEADER, 0.0))
        except ValueError:
            server_seconds = 0.0
        length = reply.headers.get(HEADER_LENGTH)
        response = decode_response(
            reply.body, int(length) if length and length.isdigit() else None, stage=hop.stage
        )
        return Reply(response, sum(memoryview(b).nbytes for b in body), server_seconds)

    async def metadata(
        self, hop: Hop, endpoint: str, model: str, timeout_s: float
    ) -> dict[str, Any] | None:
        try:
            reply = await self._request(
                hop, endpoint, "GET", f"/v2/models/{model}", {}, b"", timeout_s
            )
            if reply.status != 200:
                return None
            meta: dict[str, Any] = orjson.loads(reply.body)
        except (ServerError, orjson.JSONDecodeError):
            return None
        return meta

    async def close(self) -> None:
        await self._pool.close()


@dataclass(frozen=True)
class _Stub:
    channel: grpc.aio.Channel
    infer: Any  # grpc.aio.UnaryUnaryMultiCallable
    metadata: Any


class GrpcTransport:
    """The v2 gRPC service, one channel per endpoint (HTTP/2 multiplexes the calls)."""

    def __init__(self, tokens: StageTokens) -> None:
        self._tokens = tokens
        self._stubs: dict[str, _Stub] = {}

    def _stub(self, endpoint: str) -> _Stub:
        if endpoint not in self._stubs:
            url = urlsplit(endpoint)
            channel = grpc.aio.insecure_channel(
                f"{url.hostname}:{url.port or 80}",
                options=[
                    ("grpc.max_receive_message_length", -1),
                    ("grpc.max_send_message_length", -1),
                ],
            )
            self._stubs[endpoint] = _Stub(
                channel,
                channel.unary_unary(
                    f"/{SERVICE}/ModelInfer",
                    request_serializer=pb.ModelInferRequest.SerializeToString,
                    response_deserializer=pb.ModelInferResponse.FromString,
                ),
                channel.unary_unary(
                    f"/{SERVICE}/ModelMetadata",
                    request_serializer=pb.ModelMetadataRequest.SerializeToString,
                    response_deserializer=pb.ModelMetadataResponse.FromString,
                ),
            )
        return self._stubs[endpoint]

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = self._tokens.current
        return (("authorization", f"Bearer {token}"),) if token else ()

    async def infer(
        self,
        hop: Hop,
        endpoint: str,
        model: str,
        tensors: Mapping[str, np.ndarray],
        parameters: Mapping[str, Mapping[str, Any]],
        timeout_s: float,
        request_parameters: Mapping[str, Any] | None = None,
    ) -> Reply:
        request = encode_infer_request(model, tensors, parameters, request_parameters)
        call = self._stub(endpoint).infer(request, timeout=timeout_s, metadata=self._metadata())
        try:
            message = await call
            trailers = await call.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            code, detail = exc.code(), exc.details() or ""
            if code is grpc.StatusCode.DEADLINE_EXCEEDED and detail == "Deadline Exceeded":
                raise StageTimeout(  # our own timeout, not an error the next stage reported
                    f"{_where(hop, endpoint)} did not answer within {timeout_s:.3f} s"
                ) from exc
            if code is grpc.StatusCode.UNAVAILABLE:
                raise StageUnavailable(f"{_where(hop, endpoint)}: {detail}") from exc
            raise _downstream_error(hop, endpoint, http_status(code), detail) from exc
        server_seconds = 0.0
        for key, value in trailers or ():
            if key == SERVER_SECONDS_HEADER:
                with contextlib.suppress(ValueError):
                    server_seconds = float(value)
        try:
            response = decode_infer_response(message)
        except InvalidInput as exc:
            raise BadGateway(
                f"stage {hop.stage!r} sent an unusable response: {exc.message}"
            ) from exc
        return Reply(response, request.ByteSize(), server_seconds)

    async def metadata(
        self, hop: Hop, endpoint: str, model: str, timeout_s: float
    ) -> dict[str, Any] | None:
        try:
            meta = await self._stub(endpoint).metadata(
                pb.ModelMetadataRequest(name=model), timeout=timeout_s, metadata=self._metadata()
            )
        except grpc.aio.AioRpcError:
            return None
        tensors = lambda ts: [  # noqa: E731
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts
        ]
        return {"name": meta.name, "inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs)}

    async def close(self) -> None:
        for stub in self._stubs.values():
            await stub.channel.close()
        self._stubs.clear()


class HopClient:
    """Sends a stage's tensors down the hops of its spec, within the request's deadline."""

    def __init__(
        self,
        hops: tuple[Hop, ...],
        *,
        model: str,
        tokens: StageTokens,
        metrics: ServerMetrics,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._hops, self._model, self._metrics, self._clock = hops, model, metrics, clock
        self._tokens = tokens
        self._transports: dict[str, Transport] = {}
        self._turn = itertools.count()
        # The layout (and its id) the shards behind each fan-out hop reported, by stage.
        self._layouts: dict[str, tuple[ShardLayout, str]] = {}

    async def start(self) -> None:
        schemes = {urlsplit(e).scheme for hop in self._hops for e in hop.endpoints}
        if "http" in schemes:
            self._transports["http"] = HttpTransport(self._tokens)
        if "grpc" in schemes:
            self._transports["grpc"] = GrpcTransport(self._tokens)

    async def stop(self) -> None:
        for transport in self._transports.values():
            await transport.close()
        self._transports.clear()

    def _transport(self, endpoint: str) -> Transport:
        transport = self._transports.get(urlsplit(endpoint).scheme)
        assert transport is not None, "HopClient.start() was not awaited"
        return transport

    async def forward(self, tensors: Mapping[str, np.ndarray], deadline: float) -> InferResponse:
        """Run the tensors through every hop by `deadline`; the last hop's answer is returned."""
        current = dict(tensors)
        response = InferResponse(current)
        for hop in self._hops:
            response = await (
                self._fan_out(hop, current, deadline)
                if hop.fan_out
                else self._chain(hop, current, deadline)
            )
            current = response.outputs
        return response

    async def metadata(self, deadline: float) -> dict[str, Any] | None:
        """The model metadata of the last hop (a fan-out's shards speak for their stage),
        to tell clients the final outputs."""
        hop = self._hops[-1]
        if not self._transports:
            return None
        for endpoint in hop.endpoints:
            timeout = min(hop.timeout_s, max(deadline - self._clock(), 0.001))
            meta = await self._transport(endpoint).metadata(
                hop, endpoint, hop.model or self._model, timeout
            )
            if meta is not None:
                return meta
        return None

    def _timeout(self, hop: Hop, deadline: float) -> float:
        left = deadline - self._clock()
        if left <= 0:
            raise StageTimeout(
                f"the request's deadline passed before it could go on to stage {hop.stage!r}"
            )
        return min(hop.timeout_s, left)

    def _wire(
        self, hop: Hop, tensors: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
        wire: dict[str, np.ndarray] = {}
        params: dict[str, dict[str, Any]] = {}
        for name, array in tensors.items():
            wire[name], p = compress(array, hop.compression)
            if p:
                params[name] = p
        return wire, params

    async def _call(
        self,
        hop: Hop,
        endpoint: str,
        wire: Mapping[str, np.ndarray],
        params: Mapping[str, Mapping[str, Any]],
        deadline: float,
        request_parameters: Mapping[str, Any] | None = None,
    ) -> InferResponse:
        """One call, measured; raises StageUnavailable (try another endpoint) or a final error."""
        timeout = self._timeout(hop, deadline)
        started = self._clock()
        try:
            reply = await self._transport(endpoint).infer(
                hop, endpoint, hop.model or self._model, wire, params, timeout,
                request_parameters,
            )  # fmt: skip
        except StageTimeout:
            self._metrics.observe_hop_error(hop.stage, endpoint, "timeout")
            raise
        except StageUnavailable:
            self._metrics.observe_hop_error(hop.stage, endpoint, "unreachable")
            raise
        except ServerError as exc:
            self._metrics.observe_hop_error(hop.stage, endpoint, str(exc.status))
            raise
        elapsed = self._clock() - started
        self._metrics.observe_hop(
            hop.stage, endpoint, reply.sent_bytes, max(elapsed - reply.server_seconds, 0.0)
        )
        response = reply.response
        outputs = {
            n: decompress(a, response.output_parameters.get(n, {}), name=n)
            for n, a in response.outputs.items()
        }
        return InferResponse(outputs, {}, response.parameters, response.model_name)

    async def _chain(
        self, hop: Hop, tensors: Mapping[str, np.ndarray], deadline: float
    ) -> InferResponse:
        if not hop.retry:
            return await self._chain_once(hop, tensors, deadline)
        pause = RETRY_FIRST_S
        while True:
            try:
                return await self._chain_once(hop, tensors, deadline)
            except (StageUnavailable, StageTimeout, BadGateway) as exc:
                # Down, gone mid-request or too slow: the Service may lead to the revision
                # that replaces the failed one by the next try. Anything else is the answer.
                if isinstance(exc, BadGateway) and exc.downstream_status not in (None, 502):
                    raise
                left = deadline - self._clock()
                if left <= pause:
                    raise
                self._metrics.observe_retry(hop.stage)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX_S)

    async def _chain_once(
        self, hop: Hop, tensors: Mapping[str, np.ndarray], deadline: float
    ) -> InferResponse:
        wire, params = self._wire(hop, tensors)
        first = next(self._turn) % len(hop.endpoints)
        order = hop.endpoints[first:] + hop.endpoints[:first]
        failures: list[str] = []
        for endpoint in order:
            try:
                return await self._call(hop, endpoint, wire, params, deadline)
            except StageUnavailable as exc:
                failures.append(exc.message)
        raise StageUnavailable(
            f"next stage {hop.stage!r} is down on all {len(order)} endpoint(s): "
            + "; ".join(failures)
        )

    async def _layout(self, hop: Hop, deadline: float) -> tuple[ShardLayout, str]:
        """The layout the shards of `hop` cut, as its first shard describes it (once per
        hop: a revision's shard Services keep their layout for the revision's life)."""
        known = self._layouts.get(hop.stage)
        if known is not None:
            return known
        response = await self._call(
            hop, hop.endpoints[0], {}, {}, deadline, {DESCRIBE_PARAMETER: True}
        )
        raw = response.parameters.get(LAYOUT_PARAMETER)
        if isinstance(raw, str):  # gRPC carries structured parameters as JSON text
            raw = orjson.loads(raw)
        if raw is None:
            raise BadGateway(
                f"next stage {hop.stage!r} is fan_out but its servers report no shard layout; "
                "give each of them spec.shard"
            )
        try:
            layout = layout_from_json(raw)
        except (KeyError, ValueError, TypeError) as exc:
            raise BadGateway(f"stage {hop.stage!r} sent an unusable shard layout: {exc}") from exc
        if layout.shards != len(hop.endpoints):
            raise BadGateway(
                f"next stage {hop.stage!r} is split into {layout.shards} shards but the hop "
                f"lists {len(hop.endpoints)} endpoints"
            )
        known = (layout, str(response.parameters.get(LAYOUT_ID_PARAMETER, "")))
        self._layouts[hop.stage] = known
        return known

    async def _fan_out(
        self, hop: Hop, tensors: Mapping[str, np.ndarray], deadline: float
    ) -> InferResponse:
        """Drive the shards of `hop` through their layout; a request a shard lost midway
        is run again once, from the start."""
        try:
            return await self._fan_out_once(hop, tensors, deadline)
        except BadGateway as exc:
            if exc.downstream_status != RunLost.status:
                raise
            return await self._fan_out_once(hop, tensors, deadline)

    async def _fan_out_once(
        self, hop: Hop, tensors: Mapping[str, np.ndarray], deadline: float
    ) -> InferResponse:
        """One run through the shards: the stage input pieces go over the hop's
        compression, the exchanged rows as they are."""
        layout, layout_id = await self._layout(hop, deadline)
        run = secrets.token_hex(8)
        try:
            router = ExchangeRouter(layout, tensors)
            pieces = {x.tensor for x in layout.scatter}
            for segment in range(len(layout.segments)):
                calls = []
                sent = router.calls(segment)
                for shard, delivered in sent.items():
                    first = {n: a for n, a in delivered.items() if n in pieces}
                    wire, params = self._wire(hop, first)
                    wire.update((n, a) for n, a in delivered.items() if n not in pieces)
                    asked = {SEGMENT_PARAMETER: segment, RUN_PARAMETER: run}
                    endpoint = hop.endpoints[shard]
                    calls.append(self._call(hop, endpoint, wire, params, deadline, asked))
                replies = await asyncio.gather(*calls, return_exceptions=True)
                for reply in replies:
                    if isinstance(reply, BaseException):
                        raise reply
                answers = [r for r in replies if isinstance(r, InferResponse)]
                for answer in answers:
                    if answer.parameters.get(LAYOUT_ID_PARAMETER) != layout_id:
                        self._layouts.pop(hop.stage, None)
                        raise BadGateway(
                            f"the shards of stage {hop.stage!r} no longer cut the layout this "
                            "server drives them with; it asks them again on the next request"
                        )
                router.take(segment, {i: a.outputs for i, a in zip(sent, answers, strict=True)})
            return InferResponse(router.result())
        except ModelError as exc:
            raise BadGateway(f"cannot run the shards of stage {hop.stage!r}: {exc}") from exc


def _error_text(body: bytes) -> str:
    try:
        return str(orjson.loads(body).get("error", ""))
    except (orjson.JSONDecodeError, AttributeError):
        return body[:200].decode(errors="replace")


def _downstream_error(hop: Hop, endpoint: str, status: int, detail: str) -> ServerError:
    where = _where(hop, endpoint)
    if status == 504:
        return StageTimeout(f"{where}: {detail}")
    if status == 503:
        return StageUnavailable(f"{where}: {detail}")
    return BadGateway(f"{where} answered {status}: {detail}", downstream_status=status)
