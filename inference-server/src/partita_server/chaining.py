"""Forwarding to the next stages: binary v2 requests over keep-alive HTTP, every hop measured.

A chain hop hands tensors to the next stage and its answer becomes ours; it tries the next
endpoint when one is down and reports 503 when all are, 504 (naming the stage) on a timeout.
A fan-out hop sends the same tensors to every shard of the next stage at once and gathers
their parts with the layout the shards report.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import numpy as np
import orjson

from partita.model.errors import ModelError
from partita.model.shard import gather
from partita_server.errors import BadGateway, ServerError, StageTimeout, StageUnavailable
from partita_server.metrics import ServerMetrics
from partita_server.protocol import (
    HEADER_LENGTH,
    InferResponse,
    compress,
    decode_response,
    decompress,
    encode_request,
)
from partita_server.spec import Hop
from partita_server.stage import layout_from_json

__all__ = ["LAYOUT_PARAMETER", "SERVER_SECONDS_HEADER", "HopClient", "gather_parts"]

SERVER_SECONDS_HEADER = "partita-server-seconds"
LAYOUT_PARAMETER = "partita_layout"


def gather_parts(layout_raw: object, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rebuild the stage outputs from the shards' parts with `partita.model.shard.gather`."""
    layout = layout_from_json(layout_raw)
    return dict(gather(layout, parts))


class HopClient:
    """Sends a stage's tensors down the hops of its spec; one keep-alive pool for all."""

    def __init__(
        self,
        hops: tuple[Hop, ...],
        *,
        model: str,
        token: str | None,
        metrics: ServerMetrics,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._hops, self._model, self._metrics, self._clock = hops, model, metrics, clock
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client: httpx.AsyncClient | None = None
        self._turn = itertools.count()

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        self._client = httpx.AsyncClient(limits=limits, headers=self._headers)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def forward(self, tensors: Mapping[str, np.ndarray]) -> InferResponse:
        """Run the tensors through every hop; the last hop's answer is returned."""
        current = dict(tensors)
        response = InferResponse(current)
        for hop in self._hops:
            response = await (
                self._fan_out(hop, current) if hop.fan_out else self._chain(hop, current)
            )
            current = response.outputs
        return response

    async def metadata(self) -> dict[str, Any] | None:
        """The model metadata of the last chain hop, to tell clients the final outputs."""
        hop = self._hops[-1]
        if hop.fan_out or self._client is None:
            return None
        for endpoint in hop.endpoints:
            try:
                reply = await self._client.get(
                    f"{endpoint}/v2/models/{hop.model or self._model}", timeout=hop.timeout_s
                )
            except httpx.HTTPError:
                continue
            if reply.status_code == 200:
                meta: dict[str, Any] = orjson.loads(reply.content)
                return meta
        return None

    def _encode(self, hop: Hop, tensors: Mapping[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
        wire: dict[str, np.ndarray] = {}
        params: dict[str, dict[str, Any]] = {}
        for name, array in tensors.items():
            wire[name], p = compress(array, hop.compression)
            if p:
                params[name] = p
        body, header_length = encode_request(wire, input_parameters=params)
        headers = {"content-type": "application/octet-stream"}
        if header_length is not None:
            headers[HEADER_LENGTH] = str(header_length)
        return body, headers

    async def _post(
        self, hop: Hop, endpoint: str, body: bytes, headers: dict[str, str]
    ) -> InferResponse:
        """One call; raises StageUnavailable (try another endpoint) or a final ServerError."""
        assert self._client is not None, "HopClient.start() was not awaited"
        url = f"{endpoint}/v2/models/{hop.model or self._model}/infer"
        timeout = httpx.Timeout(hop.timeout_s, connect=min(hop.timeout_s, 2.0))
        started = self._clock()
        try:
            reply = await self._client.post(url, content=body, headers=headers, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
            self._metrics.observe_hop_error(hop.stage, endpoint, "unreachable")
            raise StageUnavailable(
                f"next stage {hop.stage!r} at {endpoint} is unreachable ({type(exc).__name__})"
            ) from exc
        except httpx.TimeoutException as exc:
            self._metrics.observe_hop_error(hop.stage, endpoint, "timeout")
            raise StageTimeout(
                f"next stage {hop.stage!r} at {endpoint} did not answer within {hop.timeout_s} s"
            ) from exc
        except httpx.HTTPError as exc:
            self._metrics.observe_hop_error(hop.stage, endpoint, "transport")
            raise StageUnavailable(f"next stage {hop.stage!r} at {endpoint}: {exc}") from exc
        elapsed = self._clock() - started
        if reply.status_code != 200:
            self._metrics.observe_hop_error(hop.stage, endpoint, str(reply.status_code))
            raise _downstream_error(hop, endpoint, reply)
        try:
            server_seconds = float(reply.headers.get(SERVER_SECONDS_HEADER, 0.0))
        except ValueError:
            server_seconds = 0.0
        self._metrics.observe_hop(
            hop.stage, endpoint, len(body), max(elapsed - server_seconds, 0.0)
        )
        length = reply.headers.get(HEADER_LENGTH)
        response = decode_response(
            reply.content, int(length) if length and length.isdigit() else None, stage=hop.stage
        )
        outputs = {
            n: decompress(a, response.output_parameters.get(n, {}), name=n)
            for n, a in response.outputs.items()
        }
        return InferResponse(outputs, {}, response.parameters, response.model_name)

    async def _chain(self, hop: Hop, tensors: Mapping[str, np.ndarray]) -> InferResponse:
        body, headers = self._encode(hop, tensors)
        first = next(self._turn) % len(hop.endpoints)
        order = hop.endpoints[first:] + hop.endpoints[:first]
        failures: list[str] = []
        for endpoint in order:
            try:
                return await self._post(hop, endpoint, body, headers)
            except StageUnavailable as exc:
                failures.append(exc.message)
        raise StageUnavailable(
            f"next stage {hop.stage!r} is down on all {len(order)} endpoint(s): "
            + "; ".join(failures)
        )

    async def _fan_out(self, hop: Hop, tensors: Mapping[str, np.ndarray]) -> InferResponse:
        body, headers = self._encode(hop, tensors)
        replies = await asyncio.gather(
            *(self._post(hop, e, body, headers) for e in hop.endpoints), return_exceptions=True
        )
        for reply in replies:
            if isinstance(reply, ServerError):
                raise reply
            if isinstance(reply, BaseException):
                raise reply
        responses = [r for r in replies if isinstance(r, InferResponse)]
        layout = responses[0].parameters.get(LAYOUT_PARAMETER)
        if layout is None:
            raise BadGateway(
                f"next stage {hop.stage!r} is fan_out but its servers report no shard layout; "
                "give each of them spec.shard"
            )
        try:
            gathered = gather_parts(layout, [r.outputs for r in responses])
        except (KeyError, ValueError, TypeError, ModelError) as exc:
            raise BadGateway(f"cannot gather the shards of stage {hop.stage!r}: {exc}") from exc
        return InferResponse(gathered)


def _downstream_error(hop: Hop, endpoint: str, reply: httpx.Response) -> ServerError:
    try:
        detail = str(orjson.loads(reply.content).get("error", ""))
    except (orjson.JSONDecodeError, AttributeError):
        detail = reply.text[:200]
    where = f"next stage {hop.stage!r} at {endpoint}"
    if reply.status_code == 504:
        return StageTimeout(f"{where}: {detail}")
    if reply.status_code == 503:
        return StageUnavailable(f"{where}: {detail}")
    return BadGateway(f"{where} answered {reply.status_code}: {detail}")
