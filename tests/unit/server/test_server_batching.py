"""The run queue on a plain numpy function whose runs the test holds and releases: a lone
request runs at once, requests queued behind busy workers share the next run, rows go back
to the request that sent them."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from partita_server.batching import MergePolicy, RunQueue
from partita_server.metrics import ServerMetrics


class Gate:
    """A run function that records each run's rows and waits until the test opens it."""

    def __init__(self) -> None:
        self.runs: list[int] = []
        self.started = threading.Semaphore(0)
        self.open = threading.Event()

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runs.append(feeds["x"].shape[0])
        self.started.release()
        assert self.open.wait(10), "the test never opened the gate"
        return {"y": feeds["x"] * 2}

    async def wait_started(self, n: int) -> None:
        for _ in range(n):
            assert await asyncio.to_thread(self.started.acquire, True, 10)


async def _with_queue(workers: int, max_rows: int, scenario):  # type: ignore[no-untyped-def]
    """`scenario` on a queue of `gate` runs, timed by a clock that ticks once per reading: every
    run takes one tick whatever its rows, so merging pays and the learnt cap stays `max_rows`
    (on the real clock a loaded machine's thread hand-offs can teach it that merging loses)."""
    gate = Gate()
    ticks = itertools.count()
    with ThreadPoolExecutor(workers) as pool:
        queue = RunQueue(
            gate, workers=workers, max_rows=max_rows, executor=pool,
            metrics=ServerMetrics("m", "s"), clock=lambda: float(next(ticks)),
        )  # fmt: skip
        queue.start()
        try:
            return gate, await scenario(queue, gate)
        finally:
            gate.open.set()
            await queue.stop()


def _x(i: int, rows: int = 1, width: int = 3) -> np.ndarray:
    return np.full((rows, width), i, np.float32)


def test_a_lone_request_runs_at_once_and_alone() -> None:
    async def scenario(queue: RunQueue, gate: Gate) -> dict[str, np.ndarray]:
        gate.open.set()
        return await asyncio.wait_for(queue.submit({"x": _x(1)}), 10)

    gate, out = asyncio.run(_with_queue(1, 8, scenario))
    assert gate.runs == [1]
    np.testing.assert_array_equal(out["y"], _x(2))


def test_requests_queued_behind_a_busy_worker_share_the_next_run() -> None:
    async def scenario(queue: RunQueue, gate: Gate) -> list[dict[str, np.ndarray]]:
        first = asyncio.ensure_future(queue.submit({"x": _x(0)}))
        await gate.wait_started(1)  # the only worker is busy with the first request
        rest = [asyncio.ensure_future(queue.submit({"x": _x(i, rows=1 + i % 2)}))
                for i in range(1, 6)]  # fmt: skip
        other = asyncio.ensure_future(queue.submit({"x": _x(9, width=5)}))
        await asyncio.sleep(0)  # let them queue
        gate.open.set()
        return await asyncio.wait_for(asyncio.gather(first, *rest, other), 10)

    gate, outs = asyncio.run(_with_queue(1, 4, scenario))
    # rows 2,1,2,1,2 queued with max 4 fill greedily: [2,1,1] then [2,2]; width 5 runs alone
    assert gate.runs[0] == 1 and sorted(gate.runs[1:]) == [1, 4, 4]
    for i, out in enumerate(outs[1:6], start=1):
        np.testing.assert_array_equal(out["y"], _x(2 * i, rows=1 + i % 2))
    np.testing.assert_array_equal(outs[6]["y"], _x(18, width=5))


def test_batching_off_never_merges_but_runs_one_request_per_worker() -> None:
    async def scenario(queue: RunQueue, gate: Gate) -> list[dict[str, np.ndarray]]:
        calls = [asyncio.ensure_future(queue.submit({"x": _x(i)})) for i in range(4)]
        await gate.wait_started(2)  # two workers, two runs at once, nothing merged
        assert gate.runs == [1, 1]
        gate.open.set()
        return await asyncio.wait_for(asyncio.gather(*calls), 10)

    gate, outs = asyncio.run(_with_queue(2, 1, scenario))
    assert gate.runs == [1, 1, 1, 1]
    assert [float(o["y"][0, 0]) for o in outs] == [0.0, 2.0, 4.0, 6.0]


def test_a_request_whose_caller_left_is_not_run() -> None:
    async def scenario(queue: RunQueue, gate: Gate) -> dict[str, np.ndarray]:
        first = asyncio.ensure_future(queue.submit({"x": _x(0)}))
        await gate.wait_started(1)
        gone = asyncio.ensure_future(queue.submit({"x": _x(1, rows=3)}))
        kept = asyncio.ensure_future(queue.submit({"x": _x(2)}))
        await asyncio.sleep(0)
        gone.cancel()
        gate.open.set()
        await first
        return await asyncio.wait_for(kept, 10)

    gate, out = asyncio.run(_with_queue(1, 8, scenario))
    assert gate.runs == [1, 1]
    np.testing.assert_array_equal(out["y"], _x(4))


def test_a_failed_run_fails_every_request_in_it_and_the_queue_goes_on() -> None:
    def broken(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if feeds["x"][0, 0] < 0:
            raise ValueError("bad row")
        return {"y": feeds["x"]}

    async def scenario() -> tuple[BaseException | dict[str, np.ndarray], dict[str, np.ndarray]]:
        with ThreadPoolExecutor(1) as pool:
            queue = RunQueue(broken, workers=1, max_rows=4, executor=pool,
                             metrics=ServerMetrics("m", "s"))  # fmt: skip
            queue.start()
            try:
                bad = await asyncio.gather(queue.submit({"x": _x(-1)}), return_exceptions=True)
                return bad[0], await queue.submit({"x": _x(1)})
            finally:
                await queue.stop()

    bad, good = asyncio.run(scenario())
    assert isinstance(bad, ValueError)
    np.testing.assert_array_equal(good["y"], _x(1))


def _learning_queue(cost: Callable[[int], float], runs: int) -> tuple[list[int], int]:
    """Saturate a one-worker queue (batching up to 4) for `runs` runs whose time, on an
    injected clock, is `cost(rows)`; returns every run's rows and the final cap."""
    now = [0.0]
    sizes: list[int] = []

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = feeds["x"].shape[0]
        sizes.append(rows)
        now[0] += cost(rows)
        return {"y": feeds["x"]}

    async def scenario() -> int:
        with ThreadPoolExecutor(1) as pool:
            queue = RunQueue(run, workers=1, max_rows=4, executor=pool,
                             metrics=ServerMetrics("m", "s"), clock=lambda: now[0],
                             probe_every=10)  # fmt: skip
            queue.start()

            async def caller() -> None:
                while len(sizes) < runs:
                    await queue.submit({"x": _x(1)})

            try:
                await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(8))), 30)
                return queue.cap
            finally:
                await queue.stop()

    cap = asyncio.run(scenario())
    return sizes, cap


def test_batches_stop_growing_when_they_cost_more_per_row() -> None:
    """Rows cost 1.5x in a batch (a busy core, a cache-bound model): after the first runs
    the queue runs requests alone, but for probes of large batches (10 runs apart at first)."""
    sizes, _ = _learning_queue(lambda rows: 1.0 if rows == 1 else 1.5 * rows, 60)
    late = sizes[20:]
    assert sum(1 for s in late if s > 1) <= len(late) // 10 + 1  # the probes only


def test_batches_stay_large_when_they_pay() -> None:
    sizes, cap = _learning_queue(lambda rows: 1.0 + 0.25 * rows, 60)
    assert cap == 4 and sum(1 for s in sizes[10:] if s == 4) >= 0.8 * len(sizes[10:])


def _saturate(policy: MergePolicy, cost: Callable[[int], float], runs: int) -> list[int]:
    """Feed the policy `runs` saturated runs (every run takes as many rows as its cap)
    that cost `cost(rows)` seconds; returns each run's rows."""
    sizes = []
    for _ in range(runs):
        rows = policy.cap()
        sizes.append(rows)
        policy.observe(rows, cost(rows))
    return sizes


def test_a_policy_that_loses_every_probe_probes_ever_less_often() -> None:
    policy = MergePolicy(4, probe_every=8, max_probe_every=256)
    policy.observe(1, 1.0)
    sizes = _saturate(policy, lambda rows: 1.3 * rows, 2000)
    assert policy.best == 1
    probes = [i for i, s in enumerate(sizes) if s > 1]
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps == sorted(gaps) and gaps[-1] > 4 * gaps[0]  # backed off
    assert len(probes) <= 12  # 2000 runs: 8, 16, ..., 256, 256, ...


def test_merging_within_the_margin_of_single_runs_is_not_worth_it() -> None:
    policy = MergePolicy(4, probe_every=8, margin=0.05)
    policy.observe(1, 1.0)
    sizes = _saturate(policy, lambda rows: 0.98 * rows if rows > 1 else 1.0, 200)
    assert policy.best == 1 and sizes[-50:].count(1) >= 49


def test_merging_that_pays_is_kept_and_single_runs_are_re_measured() -> None:
    policy = MergePolicy(4, probe_every=8, max_probe_every=64)
    policy.observe(1, 1.0)
    sizes = _saturate(policy, lambda rows: 0.5 + 0.3 * rows, 500)
    assert policy.best == 4
    assert sizes[10:].count(4) >= 0.95 * len(sizes[10:])
    assert 1 in sizes[100:]  # single runs are tried again, so a stale figure cannot stick


def test_a_stale_single_run_figure_does_not_keep_batches_that_stopped_paying() -> None:
    """Single runs measured during a load spike look dear; once merging stops paying,
    the next probe of single runs brings the queue back to them."""
    policy = MergePolicy(4, probe_every=8, max_probe_every=64)
    policy.observe(1, 3.0)  # measured while the core was busy with other work
    _saturate(policy, lambda rows: 1.2 * rows if rows > 1 else 1.0, 300)
    assert policy.best == 1


def test_the_policy_follows_a_model_whose_batches_start_to_pay() -> None:
    policy = MergePolicy(4, probe_every=8, max_probe_every=64)
    policy.observe(1, 1.0)
    _saturate(policy, lambda rows: 1.3 * rows if rows > 1 else 1.0, 300)
    assert policy.best == 1
    _saturate(policy, lambda rows: 0.6 * rows if rows > 1 else 1.0, 300)
    assert policy.best == 4


def test_batching_off_never_merges() -> None:
    policy = MergePolicy(1)
    assert _saturate(policy, lambda rows: 0.1 * rows, 100) == [1] * 100
