"""The reference speed the planner scales by each pool's speedFactor: measured, per model,
by running it once on the operator's own CPU with one thread (a stage container's share).

On the local cluster this is the test bed's definition of speed (nodes compute at
speedFactor x one core of this machine). On a real cluster a per-pool profiling Job
would measure each pool directly; until then the declared factor scales this figure.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from partita.model.load import load_model, seeded_inputs
from partita.model.types import ModelProfile
from partita.runtime import Session


def measure_gflops(
    path: Path,
    profile: ModelProfile,
    input_shapes: Mapping[str, Sequence[int]] | None,
    *,
    runs: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """FLOP/s (in GFLOP/s) of one thread on this CPU for this model: total FLOPs over the
    median of `runs` timed inferences after a warm-up."""
    model = load_model(path, input_shapes)
    session = Session(model.SerializeToString(), intra_op_threads=1)
    feeds = seeded_inputs(model, seed=0)
    session.run(feeds)
    times = []
    for _ in range(runs):
        start = clock()
        session.run(feeds)
        times.append(clock() - start)
    return profile.total_flops / max(statistics.median(times), 1e-6) / 1e9


class ReferenceSpeeds:
    """Measured once per model digest and input shapes."""

    def __init__(self, measure: Callable[..., float] = measure_gflops) -> None:
        self._measure = measure
        self._cache: dict[tuple[str, str], float] = {}

    def get(
        self, path: Path, profile: ModelProfile, input_shapes: Mapping[str, Sequence[int]] | None
    ) -> float:
        key = (profile.digest, repr(sorted((input_shapes or {}).items())))
        if key not in self._cache:
            self._cache[key] = self._measure(path, profile, input_shapes)
        return self._cache[key]
