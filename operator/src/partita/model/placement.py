"""What a sharding strategy decides for one range of nodes, before any model is built.

A strategy pass (`partita.model.tiling` for row tiles, `partita.model.width` for channel,
column and head splits) returns a `RangePlacement`: for every tensor of the range the
`Piece` each shard holds, for every node how each shard runs it (`NodeShard`), and the
point where a tensor is exchanged between the shards. `partita.model.shard` turns that
into per-shard segment models and their figures; the two never disagree because both are
read from the same placement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from partita.model.types import GatherMode

Interval = tuple[int, int]


@dataclass(frozen=True)
class Piece:
    """What one shard holds of a tensor: rows [start, stop) along `axis`, all of it
    (`axis` None), or a summand / partial maximum of all of it (`partial`)."""

    axis: int | None = None
    start: int = 0
    stop: int = 0
    partial: bool = False

    @property
    def whole(self) -> bool:
        return self.axis is None and not self.partial

    def shape(self, whole: Sequence[int]) -> tuple[int, ...]:
        if self.axis is None:
            return tuple(whole)
        out = list(whole)
        out[self.axis] = self.stop - self.start
        return tuple(out)

    def nbytes(self, whole: Sequence[int], itemsize: int) -> int:
        return math.prod(self.shape(whole)) * itemsize

    def covers(self, size: int) -> bool:
        return self.axis is None or (self.start <= 0 and self.stop >= size)

    def contains(self, other: Piece) -> bool:
        if self.partial or other.partial:
            return self.partial == other.partial
        if self.axis is None:
            return True
        return other.axis == self.axis and self.start <= other.start and other.stop <= self.stop


WHOLE = Piece()
SUMMAND = Piece(partial=True)


def rows(axis: int, start: int, stop: int, size: int) -> Piece:
    """Rows [start, stop) of an axis of `size` rows; all rows are the whole tensor."""
    start, stop = max(0, start), min(size, stop)
    if start <= 0 and stop >= size:
        return WHOLE
    return Piece(axis, start, stop)


def hull(a: Piece | None, b: Piece | None) -> Piece | None:
    """The smallest piece holding both (rows on two different axes need the whole)."""
    if a is None:
        return b
    if b is None:
        return a
    if a.partial or b.partial:
        if a.partial and b.partial:
            return a
        raise ValueError("a summand and a slice of one tensor cannot be held together")
    if a.axis is None or b.axis is None or a.axis != b.axis:
        return WHOLE
    return Piece(a.axis, min(a.start, b.start), max(a.stop, b.stop))


def partition(size: int, proportions: Sequence[float], granularity: int = 1) -> tuple[int, ...]:
    """Split `size` units into parts proportional to `proportions` (largest remainder),
    each a positive multiple of `granularity`."""
    k = len(proportions)
    units = size // granularity
    if size % granularity or units < k:
        raise ValueError(f"{size} cannot be split in {k} parts of multiples of {granularity}")
    total = float(sum(proportions))
    raw = [p / total * (units - k) for p in proportions]
    base = [math.floor(r) for r in raw]
    rest = units - k - sum(base)
    order = sorted(range(k), key=lambda i: -(raw[i] - base[i]))
    for i in order[:rest]:
        base[i] += 1
    return tuple((b + 1) * granularity for b in base)


def bounds(sizes: Sequence[int]) -> tuple[Interval, ...]:
    out = []
    at = 0
    for s in sizes:
        out.append((at, at + s))
        at += s
    return tuple(out)


@dataclass
class NodeShard:
    """How one shard runs one node of the range."""

    reads: dict[int, Piece] = field(default_factory=dict)  # input slot -> the piece it reads
    attrs: dict[str, object] = field(default_factory=dict)  # attribute overrides
    consts: dict[int, np.ndarray] = field(default_factory=dict)  # slot -> replacement constant
    drop: tuple[int, ...] = ()  # input slots left empty (a bias only shard 0 adds)
    identity_of: int | None = None  # run Identity(input[slot]) instead (summand pass-through)
    scale: float | None = None  # multiply the output by this (a shard's share of a mean)
    vocab: tuple[int, int] | None = None  # embedding lookup of only these table rows
    computed: Piece | None = None  # rows the node computes (it keeps those it owes)


@dataclass
class TensorShards:
    """One non-constant tensor of the range across the shards.

    `held[i]` is what shard i's producer side holds (for a stage input: what the scatter
    sends it). When `exchange_at` is set, the shards exchange the tensor before node
    `exchange_at` runs: shard i contributes `owned[i]` (rows) or its summand, and from then
    on holds `after[i]`.
    """

    held: list[Piece | None]
    mode: GatherMode = GatherMode.TAKE  # CONCAT (rows), SUM/MAX (summands), TAKE (whole)
    axis: int = 0
    owned: tuple[Interval, ...] | None = None
    exchange_at: int | None = None
    after: list[Piece | None] | None = None
    take_from: int = 0  # for TAKE: the shard whose copy is the stage output

    def version(self, shard: int, position: int) -> Piece | None:
        """What shard `shard` holds when node `position` runs (or the range ends)."""
        if self.exchange_at is not None and position >= self.exchange_at:
            assert self.after is not None
            return self.after[shard]
        return self.held[shard]


@dataclass
class RangePlacement:
    """Nodes [start, end) of a model split across len(proportions) shards."""

    start: int
    end: int
    proportions: tuple[float, ...]
    strategy: str
    nodes: dict[int, list[NodeShard | None]]  # None: the shard does not run the node
    tensors: dict[str, TensorShards]
    inputs: tuple[str, ...]  # tensors crossing `start` that the range reads
    outputs: tuple[str, ...]  # tensors crossing `end`

    @property
    def shards(self) -> int:
        return len(self.proportions)

    def exchange_points(self) -> list[int]:
        return sorted(
            {
                t.exchange_at
                for t in self.tensors.values()
                if t.exchange_at is not None and self.start < t.exchange_at < self.end
            }
        )


@dataclass(frozen=True)
class ReferenceCosts:
    """The device and LAN a strategy's local choices are weighed on (exchange a tensor or
    compute it whole; split an operator or not; which strategy for a range).

    The defaults are an edge board at a quarter of a core of this machine (a quarter of the
    single-thread onnxruntime rates `bench/model.py` measures per op class) on a 1 Gbit/s
    LAN where one exchange costs a millisecond of round trip and serving overhead. The
    planner weighs the resulting layouts again with each device's measured speed.
    """

    flops_per_s: tuple[tuple[str, float], ...] = (
        ("conv", 5.3e9),
        ("matmul", 6.3e9),
        ("elementwise", 0.45e9),
        ("pool", 0.53e9),
        ("norm", 0.5e9),
        ("movement", 1e12),
        ("other", 0.45e9),
    )
    lan_bytes_per_s: float = 125e6
    exchange_s: float = 1e-3

    def speed(self, op_class: str) -> float:
        return dict(self.flops_per_s).get(op_class, 0.45e9)

    def transfer_s(self, nbytes: float) -> float:
        return self.exchange_s + nbytes / self.lan_bytes_per_s


REFERENCE = ReferenceCosts()
