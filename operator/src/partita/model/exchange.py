"""The arithmetic of a sharded stage's data plane, in numpy: what each shard is sent of the
stage inputs, what it sends its peers between two segments and how it assembles what it
received, and how the stage outputs are gathered from the shards' parts.

These are the functions the shard servers call; the tests and `partita verify` drive the
same functions with onnxruntime running the segment models (`run_sharded`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from partita.model.errors import ShardingError
from partita.model.types import Exchange, GatherMode, GatherSpec, ShardLayout, Span

Tensors = Mapping[str, np.ndarray]


def _rows(array: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return array[tuple(index)]


def scatter(layout: ShardLayout, shard: int, tensors: Tensors) -> dict[str, np.ndarray]:
    """The pieces of the stage inputs shard `shard` reads (only those it needs)."""
    out: dict[str, np.ndarray] = {}
    for spec in layout.scatter:
        span = spec.spans[shard]
        if span is None:
            continue
        if spec.tensor not in tensors:
            raise ShardingError(f"stage input {spec.tensor!r} is missing")
        value = np.asarray(tensors[spec.tensor])
        if span == (0, spec.shape[spec.axis] if spec.shape else 1):
            out[spec.tensor] = value  # whole, as it came (the shard checks its shape)
            continue
        # Rows along a later axis than the batch's: a batch of requests splits alike.
        batch = 1 if spec.axis > 0 and value.ndim == len(spec.shape) else 0
        if tuple(value.shape[batch:]) != spec.shape[batch:]:
            raise ShardingError(
                f"stage input {spec.tensor!r} has shape {list(value.shape)}, the layout was "
                f"made for {list(spec.shape)}"
            )
        out[spec.tensor] = _rows(value, spec.axis, *span)
    return out


def _overlap(a: Span | None, b: Span | None) -> Span | None:
    if a is None or b is None:
        return None
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def exchange_sends(exchange: Exchange, shard: int, part: np.ndarray) -> dict[int, np.ndarray]:
    """What shard `shard` sends each peer of its part (peer -> rows), nothing they lack."""
    mine = exchange.parts[shard]
    if mine is None:
        return {}
    sends: dict[int, np.ndarray] = {}
    for peer, need in enumerate(exchange.needs):
        if peer == shard or need is None:
            continue
        if exchange.mode is GatherMode.CONCAT:
            span = _overlap(mine, need)
            if span is not None:
                sends[peer] = _rows(part, exchange.axis, span[0] - mine[0], span[1] - mine[0])
        else:
            sends[peer] = _rows(part, exchange.axis, *need)
    return sends


def exchange_receive(
    exchange: Exchange, shard: int, part: np.ndarray | None, received: Mapping[int, np.ndarray]
) -> np.ndarray | None:
    """Shard `shard`'s rows `needs[shard]` of the exchanged tensor, from its own part and
    what each peer sent (`received`: peer -> rows, as `exchange_sends` cut them)."""
    need = exchange.needs[shard]
    if need is None:
        return None
    mine = exchange.parts[shard]
    if exchange.mode is GatherMode.CONCAT:
        pieces: list[tuple[int, np.ndarray]] = []
        own = _overlap(mine, need)
        if own is not None and part is not None and mine is not None:
            pieces.append((own[0], _rows(part, exchange.axis, own[0] - mine[0], own[1] - mine[0])))
        for peer, rows in received.items():
            span = _overlap(exchange.parts[peer], need)
            if span is None:
                continue
            pieces.append((span[0], np.asarray(rows)))
        pieces.sort(key=lambda p: p[0])
        covered = need[0]
        for at, rows in pieces:
            if at != covered:
                raise ShardingError(
                    f"exchange of {exchange.tensor!r}: shard {shard} lacks rows {covered}..{at}"
                )
            covered += rows.shape[exchange.axis]
        if covered != need[1]:
            raise ShardingError(
                f"exchange of {exchange.tensor!r}: shard {shard} lacks rows {covered}..{need[1]}"
            )
        if len(pieces) == 1:
            return pieces[0][1]
        return np.concatenate([p for _, p in pieces], axis=exchange.axis)
    terms = [np.asarray(r) for r in received.values()]
    if part is not None and mine is not None:
        terms.insert(0, _rows(part, exchange.axis, *need))
    expected = sum(1 for p in exchange.parts if p is not None)
    if len(terms) != expected:
        raise ShardingError(
            f"exchange of {exchange.tensor!r}: shard {shard} has {len(terms)} of "
            f"{expected} partial results"
        )
    total = terms[0].copy()
    for t in terms[1:]:
        if exchange.mode is GatherMode.MAX:
            np.maximum(total, t, out=total)
        else:
            total += t
    return total


def gather(layout: ShardLayout, parts: Sequence[Tensors]) -> dict[str, np.ndarray]:
    """Rebuild the stage outputs from each shard's part tensors."""
    if len(parts) != layout.shards:
        raise ShardingError(f"expected parts from {layout.shards} shards, got {len(parts)}")
    out: dict[str, np.ndarray] = {}
    for spec in layout.gathers:
        if spec.mode is GatherMode.TAKE:
            pieces = [parts[spec.shard].get(GatherSpec.part_name(spec.output, spec.shard))]
        else:
            pieces = [p.get(GatherSpec.part_name(spec.output, i)) for i, p in enumerate(parts)]
        if any(x is None for x in pieces):
            raise ShardingError(f"a shard did not return its part of {spec.output!r}")
        arrays = [np.asarray(x) for x in pieces]
        if spec.mode is GatherMode.CONCAT:
            out[spec.output] = np.concatenate(arrays, axis=spec.axis)
        elif spec.mode in (GatherMode.SUM, GatherMode.MAX):
            total = arrays[0].copy()
            for x in arrays[1:]:
                if spec.mode is GatherMode.MAX:
                    np.maximum(total, x, out=total)
                else:
                    total += x
            out[spec.output] = total
        else:
            out[spec.output] = arrays[0]
    return out


class ShardedRun:
    """One request through a sharded stage, segment by segment: what each shard is fed,
    what its answer leads to (the exchanges), and the gathered stage outputs.

    Whoever drives it holds every tensor a shard will read again (kept tensors, received
    rows), so the shards themselves keep nothing between segments: `run_sharded` drives it
    in one process, the fan-out hop of a stage server over the network.
    """

    def __init__(self, layout: ShardLayout, inputs: Tensors) -> None:
        self.layout = layout
        k = layout.shards
        self._held: list[dict[str, np.ndarray]] = [scatter(layout, i, inputs) for i in range(k)]
        self._last: list[dict[str, np.ndarray]] = [{} for _ in range(k)]
        self.received_bytes = [0] * k
        # What the driver relays at the exchange points: answers before them, feeds after.
        self.relayed_bytes = 0

    def feeds(self, segment: int) -> dict[int, dict[str, np.ndarray]]:
        """The inputs of segment `segment` for each shard active in it."""
        seg = self.layout.segments[segment]
        out: dict[int, dict[str, np.ndarray]] = {}
        for i, active in enumerate(seg.active):
            if not active:
                continue
            missing = [n for n in seg.inputs[i] if n not in self._held[i]]
            if missing:
                raise ShardingError(f"segment {segment}: shard {i} lacks {missing}")
            out[i] = {n: self._held[i][n] for n in seg.inputs[i]}
        if segment > 0:
            self.relayed_bytes += sum(int(a.nbytes) for f in out.values() for a in f.values())
        return out

    def take(self, segment: int, outputs: Mapping[int, Mapping[str, np.ndarray]]) -> None:
        """Record what each active shard answered for `segment`, then do its exchanges."""
        k = self.layout.shards
        seg = self.layout.segments[segment]
        for i in range(k):
            got = dict(outputs.get(i, {})) if seg.active[i] else {}
            if seg.active[i] and i not in outputs:
                raise ShardingError(f"segment {segment}: shard {i} did not answer")
            self._held[i].update(got)
            self._last[i] = got
            if segment < len(self.layout.segments) - 1:
                self.relayed_bytes += sum(int(a.nbytes) for a in got.values())
        for x in seg.exchanges:
            sends: list[dict[int, np.ndarray]] = []
            for i in range(k):
                part = self._held[i].get(GatherSpec.part_name(x.tensor, i)) if x.parts[i] else None
                if x.parts[i] and part is None:
                    raise ShardingError(f"shard {i} did not return its part of {x.tensor!r}")
                sends.append(exchange_sends(x, i, part) if part is not None else {})
            for j in range(k):
                got_rows = {i: sends[i][j] for i in range(k) if j in sends[i]}
                self.received_bytes[j] += sum(int(a.nbytes) for a in got_rows.values())
                own = self._held[j].get(GatherSpec.part_name(x.tensor, j)) if x.parts[j] else None
                value = exchange_receive(x, j, own, got_rows)
                if value is not None:
                    self._held[j][x.tensor] = value

    def result(self) -> dict[str, np.ndarray]:
        """The stage outputs, gathered from the shards' answers to the last segment."""
        return gather(self.layout, self._last)


SegmentRunner = Callable[[int, int, dict[str, np.ndarray]], Mapping[str, np.ndarray]]


def run_sharded(layout: ShardLayout, run: SegmentRunner, inputs: Tensors) -> ShardedRun:
    """Run a sharded stage in one process: `run(segment, shard, feeds)` runs one segment
    model. Returns the finished run: its `result()`, and the bytes each shard received in
    exchanges and the driver relayed (measured from the arrays moved, to set beside the
    layout's figures)."""
    steps = ShardedRun(layout, inputs)
    for s in range(len(layout.segments)):
        steps.take(s, {i: run(s, i, feeds) for i, feeds in steps.feeds(s).items()})
    return steps
