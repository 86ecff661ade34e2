"""partita.metrics: one global Prometheus poll loop feeding the planner's ClusterSnapshot.

`MetricsReader.poll()` runs the configured PromQL (`Queries`) and returns an `Observation`;
`PollLoop` runs it on a period and keeps the last good one; `with_observation` turns it
into the Node annotations and LinkEstimate documents `snapshot_from_manifests` reads.
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
from .overlays import to_manifest_overlays, with_observation
from .queries import Queries
from .reader import MetricsReader, Poller, PollLoop, parse_query_response

__all__ = [
    "Expectation",
    "HopKey",
    "HopObservation",
    "LinkObservation",
    "MetricsError",
    "MetricsReader",
    "NodeUsage",
    "Observation",
    "PollLoop",
    "Poller",
    "Queries",
    "StageKey",
    "StageObservation",
    "build_observation",
    "is_stale",
    "parse_query_response",
    "significant_change",
    "to_manifest_overlays",
    "with_observation",
]
