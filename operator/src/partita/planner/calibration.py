"""Online learning of device speeds: a dynamic model of the system, refined as it runs.

Profiling gives each pool a speed; at run time every stage reports its observed
compute time. The ratio predicted/observed, smoothed by an EWMA, rescales the speed
of the node that ran it, so the next prediction starts from what was seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from .errors import PlannerError
from .snapshot import ClusterSnapshot


def update_speed(
    factor: float,
    observed_s: float,
    predicted_s: float,
    alpha: float = 0.2,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> float:
    """The next speed factor of a node after a stage predicted at `predicted_s` took `observed_s`.

    `predicted_s` must have been computed with the current `factor` applied; the
    result is an EWMA (weight `alpha`) of the factor that would have predicted the
    observation, clamped to `bounds` so one outlier cannot zero a node's speed.
    """
    if not 0.0 < alpha <= 1.0:
        raise PlannerError(f"calibration alpha must be in (0, 1], got {alpha}")
    if observed_s <= 0 or predicted_s <= 0:
        return factor
    implied = factor * predicted_s / observed_s
    new = (1.0 - alpha) * factor + alpha * implied
    return min(max(new, bounds[0]), bounds[1])


def apply_speed_factors(snapshot: ClusterSnapshot, factors: Mapping[str, float]) -> ClusterSnapshot:
    """The snapshot with each named node's speeds multiplied by its learned factor."""
    nodes = tuple(
        replace(n, speed={c: v * factors[n.name] for c, v in n.speed.items()})
        if n.name in factors
        else n
        for n in snapshot.nodes
    )
    return replace(snapshot, nodes=nodes)
