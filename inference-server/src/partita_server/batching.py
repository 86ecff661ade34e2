"""The run queue: every request's ORT run goes through it, batched when the stage allows.

Requests are taken off the queue whenever a runtime worker is free. A request that finds a
worker free runs at once and alone: there is no waiting for company, so an idle
server answers as fast as it can. Requests that arrive while every worker is busy queue up,
and the next free worker takes all of them that fit (same non-batch dims and dtypes, rows up
to `max_rows`) in one run. Batches grow exactly when the server is saturated.

Whether a batch pays depends on the model and on the machine (on a busy core a big batch can
cost more per row than single runs): the queue keeps a moving average of each run size's
time per row and merges only up to the size that has been cheapest per row, trying the
largest size again every `probe_every` runs. So batching on costs at most those probes when
merging does not pay, and takes what it gains when it does.
"""

from __future__ import annotations

import asyncio
import functools
import time
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
        clock: Callable[[], float] = time.perf_counter,
        probe_every: int = 32,
    ) -> None:
        self._run, self._executor, self._metrics = run, executor, metrics
        self._free, self._max_rows, self._clock = workers, max_rows, clock
        self._cap, self._probe_every, self._runs = max_rows, probe_every, 0
        self._per_row: dict[int, float] = {}  # moving average of seconds per row, by rows
        self._pending: deque[_Pending] = deque()
        self._running: set[asyncio.Future[tuple[list[dict[str, np.ndarray]], int, float]]] = set()
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
            elif item.signature == batch[0].signature and rows + item.rows <= self._cap:
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

    @property
    def cap(self) -> int:
        """The most rows the next run may merge."""
        return self._cap

    def _learn(self, rows: int, seconds: float) -> None:
        """Fold one run into the per-row averages and choose the next cap."""
        if self._max_rows == 1 or rows < 1:
            return
        per_row = seconds / rows
        old = self._per_row.get(rows)
        self._per_row[rows] = per_row if old is None else 0.8 * old + 0.2 * per_row
        self._runs += 1
        if self._runs % self._probe_every == 0:
            self._cap = self._max_rows  # try the large batches again
        elif len(self._per_row) > 1:
            self._cap = min(self._per_row, key=lambda r: (self._per_row[r], -r))

    def _finished(
        self,
        run: asyncio.Future[tuple[list[dict[str, np.ndarray]], int, float]],
        *,
        batch: list[_Pending],
    ) -> None:
        self._running.discard(run)
        self._free += 1
        error = None if run.cancelled() else run.exception()
        if not run.cancelled() and error is None:
            outputs, rows, seconds = run.result()
            self._learn(rows, seconds)
        for i, item in enumerate(batch):
            if item.future.done():
                continue
            if run.cancelled():
                item.future.cancel()
            elif error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(outputs[i])
        if self._open:
            self._pump()

    def _run_batch(self, batch: list[_Pending]) -> tuple[list[dict[str, np.ndarray]], int, float]:
        """On a worker thread: one run for the batch; its outputs by request, rows, seconds."""
        rows = sum(p.rows for p in batch)
        if len(batch) == 1:
            started = self._clock()
            outputs = [self._run(batch[0].feeds)]
            return outputs, rows, self._clock() - started
        names = list(batch[0].feeds)
        feeds = {n: np.concatenate([p.feeds[n] for p in batch]) for n in names}
        started = self._clock()
        merged = self._run(feeds)
        seconds = self._clock() - started
        bounds = np.cumsum([p.rows for p in batch])[:-1]
        per_output = {n: np.split(v, bounds) for n, v in merged.items()}
        split = [{n: parts[i] for n, parts in per_output.items()} for i in range(len(batch))]
        return split, rows, seconds
