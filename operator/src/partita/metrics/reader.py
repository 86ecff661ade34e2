"""The one global Prometheus poll loop: `MetricsReader.poll()` runs every query at once and
never raises; `PollLoop` polls on a period, keeps the last good Observation, and hands each
result to the operator.

A Prometheus that is down or a query that fails makes the observation not fresh and names
the problem; the loop then republishes the last good data marked not fresh, so the
operator keeps its plan (MetricsFresh=False) instead of planning from nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import Any, Protocol

import httpx

from .observation import Expectation, Observation, Sample, build_observation
from .queries import CHART_KEYS, Queries

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0


class QueryFailed(Exception):
    """One query got no usable answer; `poll` turns it into a problem line."""


def parse_query_response(doc: Any) -> list[Sample]:
    """The samples of an `/api/v1/query` answer (a scalar gives one sample with no labels)."""
    if not isinstance(doc, Mapping):
        raise QueryFailed(f"answer is not a JSON object but {type(doc).__name__}")
    if doc.get("status") != "success":
        raise QueryFailed(
            f"refused ({doc.get('errorType', 'error')}): {doc.get('error', 'no error message')}"
        )
    data = doc.get("data")
    if not isinstance(data, Mapping) or "result" not in data:
        raise QueryFailed("answer has no data.result")
    kind, result = data.get("resultType"), data["result"]
    try:
        if kind == "scalar":
            return [({}, float(result[1]))]
        if kind != "vector":
            raise QueryFailed(f"gave a {kind}, expected an instant vector (no range selector)")
        return [
            ({str(k): str(v) for k, v in s["metric"].items()}, float(s["value"][1])) for s in result
        ]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise QueryFailed(f"malformed {kind} result: {exc!r}") from None


class MetricsReader:
    """Runs the configured queries against one Prometheus; one per operator process."""

    def __init__(
        self,
        url: str,
        queries: Queries | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.url = url.rstrip("/")
        self.queries = queries if queries is not None else Queries()
        self.timeout_s = timeout_s
        self._clock = clock
        self._client = client
        self._owns_client = client is None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client if the reader made it."""
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> MetricsReader:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def query(self, promql: str) -> list[Sample]:
        """One instant query; QueryFailed says why it gave nothing."""
        try:
            r = await asyncio.wait_for(
                self._http().get(
                    f"{self.url}/api/v1/query",
                    params={"query": promql},
                    timeout=self.timeout_s,
                ),
                self.timeout_s,
            )
        except (TimeoutError, httpx.TimeoutException):
            raise QueryFailed(f"no answer within {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            raise QueryFailed(f"Prometheus at {self.url} unreachable: {reason}") from None
        try:
            doc = r.json()
        except ValueError:
            raise QueryFailed(
                f"HTTP {r.status_code} from {self.url} is not JSON: {r.text.strip()[:200]!r}"
            ) from None
        return parse_query_response(doc)

    async def _run(self, name: str, promql: str) -> tuple[str, list[Sample] | str]:
        try:
            return name, await self.query(promql)
        except QueryFailed as exc:
            return name, str(exc)
        except Exception as exc:  # anything else must not stop the loop either
            log.exception("query %s failed unexpectedly", name)
            return name, f"unexpected {type(exc).__name__}: {exc}"

    async def poll(self, expect: Expectation | None = None) -> Observation:
        """Every enabled query at once; failures become problems, never exceptions."""
        taken_at = self._clock()
        answers = await asyncio.gather(
            *(self._run(name, text) for name, text in self.queries.enabled().items())
        )
        results: dict[str, list[Sample]] = {}
        failures: list[str] = []
        for name, got in answers:
            if isinstance(got, str):
                line = (
                    got
                    if got.startswith(f"Prometheus at {self.url} unreachable")
                    else f"query {CHART_KEYS[name]} failed: {got}"
                )
                if line not in failures:  # Prometheus down: one line, not one per query
                    failures.append(line)
            else:
                results[name] = got
        return build_observation(results, taken_at, failures=failures, expect=expect)


class Poller(Protocol):
    """What the loop polls: a MetricsReader, or anything answering the same way."""

    async def poll(self, expect: Expectation | None = None) -> Observation: ...


ObservationHandler = Callable[[Observation], Awaitable[None] | None]


class PollLoop:
    """The operator's single metrics loop (started once at startup, not per object).

    Each poll's result goes to `on_observation`. When a poll is not fresh and an earlier one
    was, what is handed on is that last good observation with `fresh=False` and the new
    problems: the data the current plan was made from, flagged, never a half-empty one.
    """

    def __init__(
        self,
        reader: Poller,
        interval: float,
        on_observation: ObservationHandler,
        *,
        expect: Callable[[], Expectation | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"poll interval must be above 0 s, got {interval}")
        self.reader = reader
        self.interval = interval
        self._on_observation = on_observation
        self._expect = expect
        self._clock = clock
        self._sleep = sleep
        self.last: Observation | None = None  # what was last handed on
        self.last_good: Observation | None = None  # the last fresh poll
        self.polls = 0

    @property
    def last_fresh_at(self) -> float | None:
        """`taken_at` of the last fresh poll (the reader's clock), None before the first."""
        return self.last_good.taken_at if self.last_good is not None else None

    async def poll_once(self) -> Observation:
        """Poll, update the cache, hand the result on; returns what was handed on."""
        expect = self._expect() if self._expect is not None else None
        seen = await self.reader.poll(expect)
        self.polls += 1
        if seen.fresh:
            self.last_good = published = seen
        elif self.last_good is not None:
            published = replace(self.last_good, fresh=False, problems=seen.problems)
        else:
            published = seen
        self.last = published
        try:
            result = self._on_observation(published)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("the metrics observation handler failed; polling goes on")
        return published

    async def run(self) -> None:
        """Poll every `interval` seconds until cancelled."""
        while True:
            started = self._clock()
            await self.poll_once()
            await self._sleep(max(0.0, self.interval - (self._clock() - started)))
