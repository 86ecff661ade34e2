"""The batcher on a plain numpy function: rows go back to the request that sent them."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from partita_server.batching import Batcher
from partita_server.metrics import ServerMetrics


def test_requests_are_merged_and_split_back() -> None:
    runs: list[int] = []

    def double(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        runs.append(feeds["x"].shape[0])
        return {"y": feeds["x"] * 2}

    async def scenario() -> list[dict[str, np.ndarray]]:
        metrics = ServerMetrics("m", "s")
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(
                double, max_batch_size=4, max_delay_s=0.05, executor=pool, metrics=metrics
            )
            batcher.start()
            try:
                xs = [np.full((1 + i % 2, 3), i, np.float32) for i in range(5)]
                xs.append(np.full((1, 5), 9, np.float32))  # other shape: its own group
                return await asyncio.gather(*(batcher.submit({"x": x}) for x in xs))
            finally:
                await batcher.stop()

    results = asyncio.run(scenario())
    for i, out in enumerate(results[:5]):
        np.testing.assert_array_equal(out["y"], np.full((1 + i % 2, 3), 2 * i))
    np.testing.assert_array_equal(results[5]["y"], np.full((1, 5), 18))
    assert sum(runs) == 8 and max(runs) <= 4 and len(runs) < 6
