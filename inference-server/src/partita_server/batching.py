"""The run queue: every request's ORT run goes through it, batched when the stage allows.

Requests are taken off the queue whenever a runtime worker is free. A request that finds a
worker free runs at once and alone: there is no waiting for company, so an idle
server answers as fast as it can. Requests that arrive while every worker is busy queue up,
and the next free worker takes all of them that fit (same non-batch dims and dtypes, rows up
to `max_rows`) in one run. Batches grow exactly when the server is saturated, which is when
they pay.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from partita_server.metrics import ServerMetrics

__all__ = ["RunQueue"]

RunFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
Signature = tuple[tuple[str, tuple[int, ...], str], ...]


@dataclass
class _Pending:
    feeds: Mapping[str, np.ndarray]
    rows: int
    future: asyncio.Future[dict[str, np.ndarray]] = field(repr=False)
    signature: Signature = ()

    def __post_init__(self) -> None:
        self.signature = tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(self.feeds.items()))


class RunQueue:
    """Runs requests on `workers` executor threads, merging queued ones up to `max_rows`.

    `max_rows=1` never merges (batching off): requests still run `workers` at a time. All
    state is touched on the event loop's thread only (submit, and the runs' completion
    callbacks), so it needs no lock; a request that finds a worker free starts in the same
    loop step it arrived in.
    """

    def __init__(
        self,
        run: RunFn,
        *,
        workers: int,
        max_rows: int,
        executor: Executor,
        metrics: ServerMetrics,
    ) -> None:
        self._run, self._executor, self._metrics = run, executor, metrics
        self._free, self._max_rows = workers, max_rows
        self._pending: deque[_Pending] = deque()
        self._running: set[asyncio.Future[list[dict[str, np.ndarray]]]] = set()
        self._open = False

    def start(self) -> None:
        self._open = True

    async def stop(self) -> None:
        self._open = False
        for item in self._pending:
            item.future.cancel()
        self._pending.clear()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def submit(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue one request (its own rows) and wait for its rows of the outputs."""
        if not self._open:
            raise RuntimeError("RunQueue.start() was not called, or it was stopped")
        rows = next(iter(feeds.values())).shape[0] if feeds else 0
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(feeds, rows, future))
        self._pump()
        return await future

    def _take(self) -> list[_Pending]:
        """The oldest live request and every queued one that can share its run."""
        batch: list[_Pending] = []
        rows = 0
        left: deque[_Pending] = deque()
        while self._pending:
            item = self._pending.popleft()
            if item.future.done():  # its caller went away
                continue
            if not batch:
                batch, rows = [item], item.rows
            elif item.signature == batch[0].signature and rows + item.rows <= self._max_rows:
                batch.append(item)
                rows += item.rows
            else:
                left.append(item)
        self._pending = left
        return batch

    def _pump(self) -> None:
        """Start runs while workers are free and requests wait."""
        loop = asyncio.get_running_loop()
        while self._free and self._pending:
            batch = self._take()
            if not batch:
                break
            self._free -= 1
            run = loop.run_in_executor(self._executor, self._run_batch, batch)
            self._running.add(run)
            run.add_done_callback(functools.partial(self._finished, batch=batch))
        self._metrics.queue.set(len(self._pending))

    def _finished(
        self, run: asyncio.Future[list[dict[str, np.ndarray]]], *, batch: list[_Pending]
    ) -> None:
        self._running.discard(run)
        self._free += 1
        error = None if run.cancelled() else run.exception()
        for i, item in enumerate(batch):
            if item.future.done():
                continue
            if run.cancelled():
                item.future.cancel()
            elif error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(run.result()[i])
        if self._open:
            self._pump()

    def _run_batch(self, batch: list[_Pending]) -> list[dict[str, np.ndarray]]:
        if len(batch) == 1:
            return [self._run(batch[0].feeds)]
        names = list(batch[0].feeds)
        feeds = {n: np.concatenate([p.feeds[n] for p in batch]) for n in names}
        merged = self._run(feeds)
        bounds = np.cumsum([p.rows for p in batch])[:-1]
        per_output = {n: np.split(v, bounds) for n, v in merged.items()}
        return [{n: parts[i] for n, parts in per_output.items()} for i in range(len(batch))]
