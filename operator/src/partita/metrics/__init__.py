"""partita.metrics: what Prometheus measured, as typed values.

`partita.metrics.reader.MetricsReader.poll()` runs the configured PromQL (`Queries`) and
returns an `Observation`; `PollLoop` runs it on a period and keeps the last good one; the
control loop lays it over its ClusterSnapshot (`partita.control.inputs.apply_observation`).
The package itself exports only the pure parts (no HTTP client at import).
"""

from __future__ import annotations

from .errors import MetricsError
from .observation import (
    Expectation,
    HopKey,
    HopObservation,
    LinkObservation,
    NodeUsage,
    Observation,
    StageKey,
    StageObservation,
    build_observation,
    is_stale,
    significant_change,
)
from .queries import Queries

__all__ = [
    "Expectation",
    "HopKey",
    "HopObservation",
    "LinkObservation",
    "MetricsError",
    "NodeUsage",
    "Observation",
    "Queries",
    "StageKey",
    "StageObservation",
    "build_observation",
    "is_stale",
    "significant_change",
]
