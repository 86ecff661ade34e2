"""The run queue: every request's ORT run goes through it, batched when the stage allows.

One owner task takes requests off the queue whenever a runtime worker is free. A request
that finds a worker free runs at once and alone: there is no waiting for company, so an idle
server answers as fast as it can. Requests that arrive while every worker is busy queue up,
and the next free worker takes all of them that fit (same non-batch dims and dtypes, rows up
to `max_rows`) in one run. Batches grow exactly when the server is saturated, which is when
they pay.
"""

from __future__ import annotations

import asyncio
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

    `max_rows=1` never merges (batching off): requests still run `workers` at a time.
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
        self._workers, self._max_rows = workers, max_rows
        self._pending: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._free: asyncio.Semaphore | None = None
        self._owner: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._free = asyncio.Semaphore(self._workers)
        self._owner = asyncio.get_running_loop().create_task(self._loop(), name="run-queue")

    async def stop(self) -> None:
        tasks = [t for t in (self._owner, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._owner = None
        for item in self._pending:
            if not item.future.done():
                item.future.cancel()
        self._pending.clear()

    async def submit(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue one request (its own rows) and wait for its rows of the outputs."""
        rows = next(iter(feeds.values())).shape[0] if feeds else 0
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(feeds, rows, future))
        self._metrics.queue.set(len(self._pending))
        self._arrived.set()
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
        self._metrics.queue.set(len(left))
        return batch

    async def _loop(self) -> None:
        assert self._free is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._free.acquire()
            batch: list[_Pending] = []
            while not batch:
                if not self._pending:
                    self._arrived.clear()
                    await self._arrived.wait()
                batch = self._take()
            task = loop.create_task(self._dispatch(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _dispatch(self, batch: list[_Pending]) -> None:
        assert self._free is not None
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self._executor, self._run_batch, batch)
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        else:
            for item, out in zip(batch, outputs, strict=True):
                if not item.future.done():
                    item.future.set_result(out)
        finally:
            self._free.release()

    def _run_batch(self, batch: list[_Pending]) -> list[dict[str, np.ndarray]]:
        if len(batch) == 1:
            return [self._run(batch[0].feeds)]
        names = list(batch[0].feeds)
        feeds = {n: np.concatenate([p.feeds[n] for p in batch]) for n in names}
        merged = self._run(feeds)
        bounds = np.cumsum([p.rows for p in batch])[:-1]
        per_output = {n: np.split(v, bounds) for n, v in merged.items()}
        return [{n: parts[i] for n, parts in per_output.items()} for i in range(len(batch))]
