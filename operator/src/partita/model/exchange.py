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
        if tuple(value.shape) != spec.shape:
            raise ShardingError(
                f"stage input {spec.tensor!r} has shape {list(value.shape)}, the layout was "
                f"made for {list(spec.shape)}"
            )
        full = (0, spec.shape[spec.axis] if spec.shape else 1)
        out[spec.tensor] = value if span == full else _rows(value, spec.axis, *span)
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


SegmentRunner = Callable[[int, int, dict[str, np.ndarray]], Mapping[str, np.ndarray]]


def run_sharded(
    layout: ShardLayout, run: SegmentRunner, inputs: Tensors
) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    """Run a sharded stage in one process: `run(segment, shard, feeds)` runs one segment
    model. Returns the stage outputs and the bytes each shard received in exchanges
    (measured from the arrays moved, to set beside the layout's figures)."""
    k = layout.shards
    held: list[dict[str, np.ndarray]] = [scatter(layout, i, inputs) for i in range(k)]
    received_bytes = [0] * k
    last: list[dict[str, np.ndarray]] = [{} for _ in range(k)]
    for s, segment in enumerate(layout.segments):
        for i in range(k):
            if not segment.active[i]:
                last[i] = {}
                continue
            names = segment.inputs[i]
            missing = [n for n in names if n not in held[i]]
            if missing:
                raise ShardingError(f"segment {s}: shard {i} lacks {missing}")
            outputs = dict(run(s, i, {n: held[i][n] for n in names}))
            held[i].update(outputs)
            last[i] = outputs
        for x in segment.exchanges:
            sends = [
                exchange_sends(x, i, held[i][GatherSpec.part_name(x.tensor, i)])
                if x.parts[i]
                else {}
                for i in range(k)
            ]
            for j in range(k):
                got = {i: sends[i][j] for i in range(k) if j in sends[i]}
                received_bytes[j] += sum(int(a.nbytes) for a in got.values())
                own = held[j].get(GatherSpec.part_name(x.tensor, j)) if x.parts[j] else None
                value = exchange_receive(x, j, own, got)
                if value is not None:
                    held[j][x.tensor] = value
    return gather(layout, last), tuple(received_bytes)
