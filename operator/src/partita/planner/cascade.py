"""What the confidence cascade's small model costs on a node (time and memory).

The small model answers every request first, on one node of the data source's pool
(`space.place_cascade`), so the raw input travels no further than without a cascade; the
inputs it is not confident about go on to the main model, whose stages the search places on
what the small model leaves (`space.reserve`), every one of them weighted by the offload rate.
"""

from __future__ import annotations

from .ranges import RangeTable
from .request import ModelRequest
from .snapshot import NodeState


def small_table(request: ModelRequest) -> RangeTable:
    """The small model's range table: the whole model as one range."""
    assert request.cascade is not None
    profile = request.cascade.profile
    return RangeTable.build(profile, [0, len(profile.nodes)])


def small_compute_s(table: RangeTable, node: NodeState, request: ModelRequest) -> float:
    """Seconds one small-model inference takes on `node`."""
    assert request.cascade is not None
    return float(table.times(node)[-1]) / request.cascade.speed_ratio


def small_memory(table: RangeTable, request: ModelRequest) -> int:
    """Bytes the small model's server holds: weights, peak activations, runtime overhead."""
    return int(table.memory(0, table.size - 1, False, float(request.runtime_overhead_bytes)))
