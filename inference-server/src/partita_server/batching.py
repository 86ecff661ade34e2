"""The run queue: every request's ORT run goes through it, batched when the stage allows.

Requests are taken off the queue whenever a runtime worker is free. A request that finds a
worker free runs at once and alone: there is no waiting for company, so an idle
server answers as fast as it can. Requests that arrive while every worker is busy queue up,
and the next free worker takes all of them that fit (same non-batch dims and dtypes, rows up
to `max_rows`) in one run. Batches grow exactly when the server is saturated.

Whether a batch pays depends on the model and on the machine (on a busy core a big batch can
cost more per row than single runs): a `MergePolicy` learns it from each run's time, as the
event loop sees it (from the hand-off to the worker to the answer back, so the cost of a
run's trip through the executor counts too), and merges only when merging has been cheaper
per row. Its probes of the size it does not use back off while they lose, so batching on
costs ever less when merging does not pay, and takes what it gains when it does.
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

__all__ = ["MergePolicy", "RunQueue"]

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


class MergePolicy:
    """How many rows the next run may merge, learnt from measured run times.

    Pure (fed `(rows, seconds)` of each run), so tests give it times instead of waiting.
    It keeps a moving average of each run size's seconds per row and merges only when a
    larger size has been cheaper per row than single runs by `margin`: batching must pay
    to be used, and an even call runs requests alone. The size it does not use is tried
    again after `probe_every` runs (the largest one while it runs requests alone, single
    runs while it merges, so neither estimate goes stale); each probe that changes nothing
    doubles the wait, up to `max_probe_every`, so at saturation on a model that batching
    does not help the probes cost ever less; a probe that changes the choice starts over.
    """

    def __init__(
        self,
        max_rows: int,
        *,
        probe_every: int = 32,
        max_probe_every: int = 1024,
        margin: float = 0.05,
    ) -> None:
        self.max_rows, self._margin = max_rows, margin
        self._first_wait, self._max_wait = probe_every, max(probe_every, max_probe_every)
        self._wait = probe_every
        self._countdown = probe_every
        self._per_row: dict[int, float] = {}
        self._best = max_rows  # until single and merged runs are both measured
        self._probe: int | None = None  # the size being tried, until a run of it is seen

    @property
    def best(self) -> int:
        """The size the measurements favour (the cap outside probes)."""
        return self._best

    @property
    def wait(self) -> int:
        """Runs between probes, as backed off so far."""
        return self._wait

    def cap(self) -> int:
        """The most rows the run about to start may merge."""
        return self._best if self._probe is None else self._probe

    def observe(self, rows: int, seconds: float) -> None:
        """Fold in one finished run and choose the next cap."""
        if self.max_rows == 1 or rows < 1:
            return
        per_row = seconds / rows
        old = self._per_row.get(rows)
        # A size run only in probes is seen rarely: its newest run counts for half.
        weight = 0.2 if rows == self._best else 0.5
        self._per_row[rows] = per_row if old is None else (1 - weight) * old + weight * per_row
        before = self._best
        self._best = self._choose()
        if self._probe is not None and (rows > 1) == (self._probe > 1):
            self._probe = None  # answered
            self._wait = (
                self._first_wait if self._best != before else min(2 * self._wait, self._max_wait)
            )
            self._countdown = self._wait
        elif self._probe is None:
            self._countdown -= 1
            if self._countdown <= 0:
                self._probe = 1 if self._best > 1 else self.max_rows

    def _choose(self) -> int:
        single = self._per_row.get(1)
        merged = {r: t for r, t in self._per_row.items() if r > 1}
        if single is None or not merged:
            return self._best
        size = min(merged, key=lambda r: (merged[r], -r))
        return size if merged[size] < (1 - self._margin) * single else 1


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
        self._policy = MergePolicy(max_rows, probe_every=probe_every)
        self._cap = 1
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
            self._cap = self._policy.cap()
            batch = self._take()
            if not batch:
                break
            self._free -= 1
            run = loop.run_in_executor(self._executor, self._run_batch, batch)
            self._running.add(run)
            run.add_done_callback(
                functools.partial(self._finished, batch=batch, started=self._clock())
            )
        self._metrics.queue.set(len(self._pending))

    @property
    def cap(self) -> int:
        """The most rows the next run may merge."""
        return self._policy.cap()

    def _finished(
        self,
        run: asyncio.Future[list[dict[str, np.ndarray]]],
        *,
        batch: list[_Pending],
        started: float,
    ) -> None:
        self._running.discard(run)
        self._free += 1
        error = None if run.cancelled() else run.exception()
        if not run.cancelled() and error is None:
            outputs = run.result()
            self._policy.observe(sum(p.rows for p in batch), self._clock() - started)
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

    def _run_batch(self, batch: list[_Pending]) -> list[dict[str, np.ndarray]]:
        """On a worker thread: one run for the batch; its outputs by request."""
        if len(batch) == 1:
            return [self._run(batch[0].feeds)]
        names = list(batch[0].feeds)
        feeds = {n: np.concatenate([p.feeds[n] for p in batch]) for n in names}
        merged = self._run(feeds)
        bounds = np.cumsum([p.rows for p in batch])[:-1]
        per_output = {n: np.split(v, bounds) for n, v in merged.items()}
        split = [{n: parts[i] for n, parts in per_output.items()} for i in range(len(batch))]
        return split
