"""Dynamic batching: requests that arrive within `max_delay` share one onnxruntime run.

Only for stages whose every input and output has a symbolic leading (batch) dimension.
Requests whose non-batch dims or dtypes differ cannot be concatenated, so each run groups
them by that signature.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from partita_server.metrics import ServerMetrics

__all__ = ["Batcher"]

RunFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class _Pending:
    feeds: Mapping[str, np.ndarray]
    rows: int
    future: asyncio.Future[dict[str, np.ndarray]] = field(repr=False)

    @property
    def signature(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        return tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(self.feeds.items()))


class Batcher:
    """Collects requests for up to `max_delay_s` or `max_batch_size` rows, then runs once."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int,
        max_delay_s: float,
        executor: Executor,
        metrics: ServerMetrics,
    ) -> None:
        self._run, self._executor, self._metrics = run, executor, metrics
        self._max_rows, self._max_delay = max_batch_size, max_delay_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._carry: _Pending | None = None
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    async def submit(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue one request (its own batch of rows) and wait for its rows of the outputs."""
        rows = next(iter(feeds.values())).shape[0]
        future = asyncio.get_running_loop().create_future()
        self._metrics.queue.inc()
        await self._queue.put(_Pending(feeds, rows, future))
        return await future

    async def _collect(self) -> list[_Pending]:
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, rows = [first], first.rows
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_delay
        while rows < self._max_rows:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), left)
                except TimeoutError:
                    break
            if rows + item.rows > self._max_rows:
                self._carry = item
                break
            batch.append(item)
            rows += item.rows
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self._metrics.queue.dec(len(batch))
            groups: dict[object, list[_Pending]] = {}
            for item in batch:
                groups.setdefault(item.signature, []).append(item)
            for group in groups.values():
                live = [p for p in group if not p.future.cancelled()]
                if not live:
                    continue
                try:
                    outputs = await loop.run_in_executor(self._executor, self._run_group, live)
                except Exception as exc:
                    for p in live:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                for p, out in zip(live, outputs, strict=True):
                    if not p.future.done():
                        p.future.set_result(out)

    def _run_group(self, group: list[_Pending]) -> list[dict[str, np.ndarray]]:
        if len(group) == 1:
            return [self._run(group[0].feeds)]
        names = list(group[0].feeds)
        feeds = {n: np.concatenate([p.feeds[n] for p in group]) for n in names}
        merged = self._run(feeds)
        bounds = np.cumsum([p.rows for p in group])[:-1]
        per_output = {n: np.split(v, bounds) for n, v in merged.items()}
        return [{n: parts[i] for n, parts in per_output.items()} for i in range(len(group))]
