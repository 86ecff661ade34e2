"""The app factory and the HTTP adapter: FastAPI routes of the v2 REST protocol over a
`DataPlane`, and the gRPC service (`partita_server.grpc_service`) on the same plane and
event loop when a gRPC address is given.

Routes only move bytes and headers; every decision is the data plane's. Errors leave as
`{"error": "..."}` with the status of their `ServerError` class.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, NamedTuple
from urllib.parse import unquote

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from partita_server.dataplane import DataPlane
from partita_server.errors import InvalidInput, PayloadTooLarge, ServerError, StageSpecError
from partita_server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from partita_server.protocol import (
    HEADER_LENGTH,
    SERVER_SECONDS_HEADER,
    TIMEOUT_HEADER,
    decode_request,
    encode_response,
)
from partita_server.spec import OrtSizing, StageSpec, StageTokens, cpu_cores
from partita_server.stage import load_stage

__all__ = ["InferFastPath", "create_app", "create_dataplane"]

log = logging.getLogger("partita_server")

_TENSOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string"},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
_INFER_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object"},
                    "inputs": {"type": "array", "items": _TENSOR_SCHEMA},
                    "outputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string"},
                                "parameters": {"type": "object"},
                            },
                        },
                    },
                },
            }
        }
    },
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": text}
    for code, text in {
        400: "invalid input (names the tensor)",
        401: "internal stage called without the token",
        404: "unknown model",
        413: "body over the limit",
        502: "next stage sent an unusable answer",
        503: "next stage down on every endpoint",
        504: "next stage timed out (names it)",
    }.items()
}


def _json(content: object, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


class Reply(NamedTuple):
    status: int
    media_type: str
    headers: dict[str, str]
    payload: bytes


def _error_reply(status: int, message: str) -> Reply:
    return Reply(status, "application/json", {}, orjson.dumps({"error": message}))


InferFn = Callable[[str, str | None, Mapping[str, str], Callable[[], Awaitable[bytes]]],
                   Awaitable[Reply]]  # fmt: skip
_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


async def read_limited(receive: Receive, headers: Mapping[str, str], limit: int) -> bytes:
    """The request body from ASGI `receive`, refused (413) as soon as it passes `limit`."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class InferFastPath:
    """The ASGI app: infer calls go straight to the data plane, the rest to FastAPI.

    FastAPI's routing and request object cost about as much per call as a hop may cost in
    all; inference takes the short way, with the same `infer` function (and so the same
    errors, limits and metrics) the documented FastAPI routes use.
    """

    def __init__(self, api: FastAPI, infer: InferFn, limit: int) -> None:
        self.api, self._infer, self._limit = api, infer, limit
        self.state = api.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = (
            _INFER_PATH.fullmatch(scope["path"])
            if scope["type"] == "http" and scope["method"] == "POST"
            else None
        )
        if match is None:
            await self.api(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

        async def read_body() -> bytes:
            return await read_limited(receive, headers, self._limit)

        name, version = unquote(match[1]), unquote(match[2]) if match[2] else None
        reply = await self._infer(name, version, headers, read_body)
        raw = [(b"content-type", reply.media_type.encode()),
               (b"content-length", str(len(reply.payload)).encode()),
               *((k.encode(), v.encode()) for k, v in reply.headers.items())]  # fmt: skip
        await send({"type": "http.response.start", "status": reply.status, "headers": raw})
        await send({"type": "http.response.body", "body": reply.payload})


def create_dataplane(
    spec: StageSpec,
    *,
    tokens: StageTokens | None = None,
    sizing: OrtSizing | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> DataPlane:
    """Load the stage (fetch, digest, cut, ORT session) and wrap it in a data plane.

    `tokens` default to the environment's, `sizing` to the container's CPU limit.
    """
    tokens = StageTokens.from_env() if tokens is None else tokens
    if not spec.entry and not tokens:
        raise StageSpecError(
            f"stage {spec.stage} is internal (entry: false) but has no token; set "
            "PARTITA_INTERNAL_TOKEN or PARTITA_INTERNAL_TOKEN_FILE"
        )
    sizing = OrtSizing.for_cores(cpu_cores()) if sizing is None else sizing
    metrics = ServerMetrics(spec.model, spec.stage)
    if spec.router:
        return DataPlane(spec, None, tokens=tokens, metrics=metrics, sizing=sizing, clock=clock)
    stage = load_stage(spec, sizing=sizing)
    outputs = {t.name for t in stage.session.outputs}
    if spec.cascade is not None and spec.cascade.output not in outputs:
        raise StageSpecError(
            f"cascade.output {spec.cascade.output!r} is not an output of stage {spec.stage}; "
            f"outputs are {sorted(outputs)}"
        )
    return DataPlane(spec, stage, tokens=tokens, metrics=metrics, sizing=sizing, clock=clock)


def _timeout_header(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidInput(f"{TIMEOUT_HEADER} must be seconds (a number >= 0), got {value!r}")
    return seconds


def create_app(
    spec: StageSpec | None = None,
    *,
    dataplane: DataPlane | None = None,
    tokens: StageTokens | None = None,
    grpc_address: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> InferFastPath:
    """The ASGI app of one stage server; pass a spec, or a data plane built beforehand.

    With `grpc_address` (host:port) the app's lifespan also serves the v2 gRPC service on
    the same data plane; `app.state.grpc_port` then says which port it bound.
    """
    if dataplane is None:
        if spec is None:
            raise TypeError("create_app needs a spec or a dataplane")
        dataplane = create_dataplane(spec, tokens=tokens, clock=clock)
    plane = dataplane
    metrics: ServerMetrics = plane.metrics
    limit = plane.spec.limits.max_body_bytes

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await plane.start()
        grpc_server = None
        try:
            if grpc_address is not None:
                from partita_server.grpc_service import create_grpc_server

                grpc_server, app.state.grpc_port = create_grpc_server(plane, grpc_address)
                await grpc_server.start()
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=2.0)
            await plane.stop()

    app = FastAPI(
        title="Partita inference server",
        version="0.1.0",
        description="Open Inference Protocol (v2) for one stage or shard of a model.",
        lifespan=lifespan,
    )
    app.state.dataplane = plane

    @app.exception_handler(ServerError)
    async def _server_error(_: Request, exc: ServerError) -> Response:
        return _error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return _error(400, f"invalid request: {exc.errors()}")

    @app.get("/v2/health/live")
    async def live() -> Response:
        return _json({"live": plane.live()})

    @app.get("/v2/health/ready", responses={503: {"description": "not ready"}})
    async def ready() -> Response:
        return _json({"ready": plane.ready()}, 200 if plane.ready() else 503)

    @app.get("/v2")
    async def server_metadata() -> Response:
        return _json(plane.server_metadata())

    @app.get("/v2/models/{name}", responses=_ERRORS)
    async def model_metadata(name: str, request: Request) -> Response:
        plane.authorize(request.headers.get("authorization"))
        return _json(await plane.model_metadata(name))

    @app.get("/v2/models/{name}/versions/{version}", responses=_ERRORS)
    async def model_version_metadata(name: str, version: str, request: Request) -> Response:
        plane.authorize(request.headers.get("authorization"))
        return _json(await plane.model_metadata(name, version))

    @app.get("/v2/models/{name}/ready", responses=_ERRORS)
    async def model_ready(name: str) -> Response:
        plane.check_model(name)
        return _json({"name": name, "ready": plane.ready()}, 200 if plane.ready() else 503)

    async def infer(
        name: str,
        version: str | None,
        headers: Mapping[str, str],
        read_body: Callable[[], Awaitable[bytes]],
    ) -> Reply:
        """One infer call, whatever delivered it (the FastAPI route or the ASGI fast path)."""
        started = clock()
        code = 200
        try:
            plane.authorize(headers.get("authorization"))
            plane.check_model(name, version)
            deadline = plane.deadline(_timeout_header(headers.get(TIMEOUT_HEADER)))
            body = await read_body()
            length = headers.get(HEADER_LENGTH)
            if length is not None and not (length.isdigit() and len(length) < 20):
                raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {length!r}")
            decoded = decode_request(
                body, int(length) if length is not None else None, plane.spec.limits
            )
            answer = await plane.infer(name, decoded, version, deadline=deadline)
            if decoded.outputs is not None:
                binary = {o.name: o.binary for o in decoded.outputs}
            else:
                binary = dict.fromkeys(answer.outputs, decoded.binary_default)
            payload, header_length = encode_response(answer, binary)
        except ServerError as exc:
            code = exc.status
            return _error_reply(exc.status, exc.message)
        except Exception:
            code = 500
            log.exception("unexpected error serving %s", name)
            return _error_reply(500, "internal server error; see the server log")
        finally:
            metrics.observe_request(code, clock() - started)
        extra = {SERVER_SECONDS_HEADER: f"{clock() - started:.6f}"}
        if header_length is None:
            return Reply(200, "application/json", extra, payload)
        extra[HEADER_LENGTH] = str(header_length)
        return Reply(200, "application/octet-stream", extra, payload)

    async def route(name: str, version: str | None, request: Request) -> Response:
        body = lambda: read_limited(request.receive, request.headers, limit)  # noqa: E731
        reply = await infer(name, version, request.headers, body)
        return Response(reply.payload, reply.status, reply.headers, media_type=reply.media_type)

    @app.post("/v2/models/{name}/infer", openapi_extra={"requestBody": _INFER_BODY},
              responses=_ERRORS)  # fmt: skip
    async def model_infer(name: str, request: Request) -> Response:
        return await route(name, None, request)

    @app.post("/v2/models/{name}/versions/{version}/infer",
              openapi_extra={"requestBody": _INFER_BODY}, responses=_ERRORS)  # fmt: skip
    async def model_version_infer(name: str, version: str, request: Request) -> Response:
        return await route(name, version, request)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return InferFastPath(app, infer, limit)
