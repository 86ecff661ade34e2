"""PollLoop: one loop, the last good observation kept while Prometheus is away; fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from partita.metrics import Expectation, NodeUsage, Observation
from partita.metrics.reader import PollLoop


class Script:
    """Polls answered from a list, as a MetricsReader would answer them."""

    def __init__(self, answers: list[Observation]) -> None:
        self.answers = answers
        self.expected: list[Expectation | None] = []

    async def poll(self, expect: Expectation | None = None) -> Observation:
        self.expected.append(expect)
        return self.answers.pop(0)


def good(t: float, cpu: float) -> Observation:
    return Observation(taken_at=t, nodes={"n": NodeUsage(cpu, 1e9, 2e9)})


def bad(t: float) -> Observation:
    return Observation(taken_at=t, fresh=False, problems=("Prometheus at X unreachable: refused",))


def run(coro: Awaitable[object]) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_failed_poll_republishes_the_last_good_data_marked_not_fresh() -> None:
    seen: list[Observation] = []
    loop = PollLoop(Script([bad(0.0), good(1.0, 0.2), bad(2.0), good(3.0, 0.9)]), 1.0, seen.append)

    async def four() -> None:
        for _ in range(4):
            await loop.poll_once()

    run(four())
    first, second, third, fourth = seen
    assert not first.fresh and first.nodes == {}  # nothing good yet: what was seen
    assert second.fresh and loop.last_good is fourth
    assert not third.fresh and third.nodes == second.nodes and third.taken_at == 1.0
    assert third.problems == ("Prometheus at X unreachable: refused",)
    assert fourth.fresh and fourth.nodes["n"].cpu_utilisation == 0.9
    assert loop.last_fresh_at == 3.0 and loop.last is fourth


def test_run_paces_polls_and_survives_a_failing_handler() -> None:
    now = [0.0]
    sleeps: list[float] = []
    handled: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds
        if len(sleeps) == 3:
            raise asyncio.CancelledError

    async def handler(obs: Observation) -> None:
        now[0] += 0.25  # the handler's own work counts against the interval
        handled.append(obs.taken_at)
        if len(handled) == 1:
            raise RuntimeError("planner blew up")

    script = Script([good(t, 0.1) for t in range(5)])
    expect = Expectation(nodes=frozenset({"n"}))
    loop = PollLoop(script, 2.0, handler, expect=lambda: expect, clock=lambda: now[0], sleep=sleep)
    with pytest.raises(asyncio.CancelledError):
        run(loop.run())
    assert handled == [0.0, 1.0, 2.0]
    assert sleeps == [1.75, 1.75, 1.75]
    assert script.expected == [expect] * 3
    assert loop.polls == 3


def test_a_synchronous_handler_is_fine_and_the_interval_must_be_positive() -> None:
    seen: list[Observation] = []
    handler: Callable[[Observation], None] = seen.append
    run(PollLoop(Script([good(0.0, 0.1)]), 5.0, handler).poll_once())
    assert len(seen) == 1
    with pytest.raises(ValueError, match="above 0"):
        PollLoop(Script([]), 0.0, handler)
