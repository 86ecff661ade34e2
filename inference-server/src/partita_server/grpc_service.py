"""The gRPC adapter: the v2 `GRPCInferenceService` over the same `DataPlane` as REST.

Each method only converts messages (`partita_server.grpc_codec`); errors are mapped once
(`_mapped`), from the `ServerError` classes to gRPC status codes, with the same message
the REST body carries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from partita_server.dataplane import DataPlane
from partita_server.errors import ServerError
from partita_server.grpc_codec import (
    SERVICE,
    decode_infer_request,
    encode_infer_response,
    status_code,
)
from partita_server.proto import open_inference_pb2 as pb
from partita_server.protocol import SERVER_SECONDS_HEADER

__all__ = ["InferenceService", "create_grpc_server"]

# Each operation of the service: (request, response) message classes.
OPERATIONS: dict[str, tuple[type[Any], type[Any]]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
}

log = logging.getLogger("partita_server")


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return str(value)
    return None


Reply = TypeVar("Reply")


class InferenceService:
    """The six v2 operations; each converts and calls the data plane."""

    def __init__(self, plane: DataPlane, clock: Callable[[], float] = time.perf_counter) -> None:
        self._plane, self._clock = plane, clock

    async def _mapped(
        self, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[Reply]]
    ) -> Reply:
        try:
            return await call()
        except ServerError as exc:
            await context.abort(status_code(exc.status), exc.message)
        except Exception:
            log.exception("unexpected error in a gRPC call")
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error; see the log")
        raise AssertionError("context.abort returns only by raising")

    async def ServerLive(  # the protocol names its methods
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._plane.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._plane.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        async def call() -> pb.ModelReadyResponse:
            self._plane.check_model(request.name, request.version or None)
            return pb.ModelReadyResponse(ready=self._plane.ready())

        return await self._mapped(context, call)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self._plane.server_metadata())

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        async def call() -> pb.ModelMetadataResponse:
            self._plane.authorize(_metadata(context, "authorization"))
            meta = await self._plane.model_metadata(request.name, request.version or None)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]],
                outputs=[tensor(**t) for t in meta["outputs"]],
            )

        return await self._mapped(context, call)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        started = self._clock()
        code = 500

        async def call() -> pb.ModelInferResponse:
            nonlocal code
            plane = self._plane
            try:
                plane.authorize(_metadata(context, "authorization"))
                version = request.model_version or None
                plane.check_model(request.model_name, version)
                decoded = decode_infer_request(request, plane.spec.limits)
                deadline = plane.deadline(context.time_remaining())
                answer = await plane.infer(request.model_name, decoded, version, deadline=deadline)
                reply = encode_infer_response(answer)
            except ServerError as exc:
                code = exc.status
                raise
            code = 200
            context.set_trailing_metadata(
                ((SERVER_SECONDS_HEADER, f"{self._clock() - started:.6f}"),)
            )
            return reply

        try:
            return await self._mapped(context, call)
        finally:
            self._plane.metrics.observe_request(code, self._clock() - started)


def create_grpc_server(plane: DataPlane, address: str) -> tuple[grpc.aio.Server, int]:
    """A gRPC server for `plane` bound to `address` (host:port, port 0: any); not started.

    Messages are capped at the plane's `limits.max_body_bytes`, as REST bodies are.
    """
    size = plane.spec.limits.max_body_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
    )
    service = InferenceService(plane)
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(service, name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
        for name, (request, response) in OPERATIONS.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind the gRPC server to {address}")
    return server, port
