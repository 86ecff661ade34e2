"""The arithmetic of a sharded stage's data plane, in numpy: what each shard is sent of the
stage inputs, what it sends its peers between two segments and how it assembles what it
received, and how the stage outputs are gathered from the shards' parts.

A shard server holds a `ShardState` per request between the segments it runs and the
server driving the stage an `ExchangeRouter`: only the rows that cross between shards go
through the driver. The tests and `partita verify` drive the same classes in one process
with onnxruntime running the segment models (`run_sharded`).
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


_ROWS = "/partita-rows/"


def wire_name(tensor: str, sender: int, receiver: int) -> str:
    """The name shard `sender`'s rows of `tensor` for shard `receiver` travel under."""
    return f"{tensor}{_ROWS}{sender}-{receiver}"


def _active_range(layout: ShardLayout, shard: int) -> tuple[int, int]:
    """The first and last segment shard `shard` runs."""
    runs = [s for s, seg in enumerate(layout.segments) if seg.active[shard]]
    return (runs[0], runs[-1]) if runs else (-1, -1)


class ShardState:
    """One request as one shard holds it between the segments it runs: its pieces of the
    stage inputs, what its segment models output, and the rows its peers sent.

    A shard is called once per segment it runs. `feeds` takes what the call delivered (the
    stage input pieces on the shard's first call, then its peers' rows of every exchange
    since its last call, named by `wire_name`) and gives the segment model's inputs;
    `answer` takes the model's outputs and gives what the call answers: the rows each
    peer needs of this segment's exchanges, or after the last segment the output parts the
    gathers read. Only the rows that cross between shards leave the shard.
    """

    def __init__(self, layout: ShardLayout, shard: int) -> None:
        self.layout, self.shard = layout, shard
        self.first, self.last = _active_range(layout, shard)
        self._held: dict[str, np.ndarray] = {}
        self._applied = 0  # the exchanges of segments before this one are assembled
        self._ran = 0  # the segments before this one are run
        self._scatter = {x.tensor for x in layout.scatter if x.spans[shard] is not None}

    @property
    def done(self) -> bool:
        """The shard has run its last segment of the request."""
        return self._ran > self.last

    def feeds(self, segment: int, delivered: Tensors) -> dict[str, np.ndarray]:
        """The inputs of `segment`'s model, once `delivered` is assembled into what it holds."""
        i, segments = self.shard, self.layout.segments
        if not 0 <= segment < len(segments) or not segments[segment].active[i]:
            raise ShardingError(f"shard {i} has nothing to run in segment {segment}")
        if segment < self._ran:
            raise ShardingError(f"shard {i} has run segment {segment} of this request already")
        pending = [x for s in range(self._applied, segment) for x in segments[s].exchanges]
        rows = {wire_name(x.tensor, p, i) for x in pending for p in range(self.layout.shards)}
        pieces = self._scatter if segment == self.first else set()
        unknown = sorted(set(delivered) - rows - pieces)
        if unknown:
            raise ShardingError(
                f"tensor {unknown[0]!r} is not what shard {i} receives for segment {segment}"
            )
        self._held.update({n: np.asarray(a) for n, a in delivered.items() if n in pieces})
        for x in pending:
            got = {
                p: np.asarray(delivered[n])
                for p in range(self.layout.shards)
                if (n := wire_name(x.tensor, p, i)) in delivered
            }
            own = self._held.get(GatherSpec.part_name(x.tensor, i)) if x.parts[i] else None
            if x.parts[i] and own is None:
                raise ShardingError(f"shard {i} holds no part of {x.tensor!r} to exchange")
            value = exchange_receive(x, i, own, got)
            if value is not None:
                self._held[x.tensor] = value
        self._applied = segment
        inputs = segments[segment].inputs[i]
        missing = [n for n in inputs if n not in self._held]
        if missing:
            raise ShardingError(f"segment {segment}: shard {i} lacks {missing}")
        return {n: self._held[n] for n in inputs}

    def answer(self, segment: int, outputs: Tensors) -> dict[str, np.ndarray]:
        """What the call for `segment` answers, given its model's `outputs`."""
        i, segments = self.shard, self.layout.segments
        self._held.update(outputs)
        self._ran = segment + 1
        if segment == len(segments) - 1:
            return dict(outputs)
        sends: dict[str, np.ndarray] = {}
        for x in segments[segment].exchanges:
            if not x.parts[i]:
                continue
            part = self._held.get(GatherSpec.part_name(x.tensor, i))
            if part is None:
                raise ShardingError(f"shard {i} did not output its part of {x.tensor!r}")
            for peer, rows in exchange_sends(x, i, part).items():
                sends[wire_name(x.tensor, i, peer)] = rows
        return sends


class ExchangeRouter:
    """The side of whoever drives a sharded stage: it sends each shard its pieces of the
    stage inputs with its first call, passes the rows each shard answers to the peers that
    need them with their next call, and gathers the stage outputs. It holds nothing else:
    what a shard keeps between segments stays in its `ShardState`.

    `relayed_bytes` counts the exchanged rows through it (answered up, delivered down) and
    `received_bytes` what each shard was delivered of them, measured from the arrays moved.
    """

    def __init__(self, layout: ShardLayout, inputs: Tensors) -> None:
        self.layout = layout
        k = layout.shards
        self._pending: list[dict[str, np.ndarray]] = [scatter(layout, i, inputs) for i in range(k)]
        self._parts: list[dict[str, np.ndarray]] = [{} for _ in range(k)]
        self.received_bytes = [0] * k
        self.relayed_bytes = 0

    def calls(self, segment: int) -> dict[int, dict[str, np.ndarray]]:
        """What each shard running `segment` is sent (stage input pieces, peers' rows)."""
        seg = self.layout.segments[segment]
        out: dict[int, dict[str, np.ndarray]] = {}
        for i, active in enumerate(seg.active):
            if not active:
                continue
            out[i], self._pending[i] = self._pending[i], {}
            rows = sum(int(a.nbytes) for n, a in out[i].items() if _ROWS in n)
            self.received_bytes[i] += rows
            self.relayed_bytes += rows
        return out

    def take(self, segment: int, answers: Mapping[int, Tensors]) -> None:
        """Route what each shard running `segment` answered."""
        k, segments = self.layout.shards, self.layout.segments
        seg = segments[segment]
        self.check_answered(segment, answers)
        if segment == len(segments) - 1:
            self._parts = [dict(answers.get(i, {})) for i in range(k)]
            return
        for x in seg.exchanges:
            for i in range(k):
                for j in range(k):
                    name = wire_name(x.tensor, i, j)
                    rows = answers.get(i, {}).get(name)
                    if rows is not None:
                        self._pending[j][name] = rows
                        self.relayed_bytes += int(rows.nbytes)

    def check_answered(self, segment: int, answers: Mapping[int, object]) -> None:
        for i, active in enumerate(self.layout.segments[segment].active):
            if active and i not in answers:
                raise ShardingError(f"segment {segment}: shard {i} did not answer")

    def result(self) -> dict[str, np.ndarray]:
        """The stage outputs, gathered from the shards' answers to the last segment."""
        return gather(self.layout, self._parts)


class ShardedRun:
    """One request through a sharded stage in one process: the router and every shard's
    state, exactly as the stage servers hold them, with `run_sharded` running the models."""

    def __init__(self, layout: ShardLayout, inputs: Tensors) -> None:
        self.layout = layout
        self.router = ExchangeRouter(layout, inputs)
        self.states = [ShardState(layout, i) for i in range(layout.shards)]

    def feeds(self, segment: int) -> dict[int, dict[str, np.ndarray]]:
        """The inputs of segment `segment`'s model for each shard active in it."""
        calls = self.router.calls(segment)
        return {i: self.states[i].feeds(segment, sent) for i, sent in calls.items()}

    def take(self, segment: int, outputs: Mapping[int, Mapping[str, np.ndarray]]) -> None:
        """Record what each active shard's model output for `segment`; route the answers."""
        seg = self.layout.segments[segment]
        self.router.check_answered(segment, outputs)
        answers = {
            i: self.states[i].answer(segment, out) for i, out in outputs.items() if seg.active[i]
        }
        self.router.take(segment, answers)

    @property
    def received_bytes(self) -> list[int]:
        return self.router.received_bytes

    @property
    def relayed_bytes(self) -> int:
        return self.router.relayed_bytes

    def result(self) -> dict[str, np.ndarray]:
        return self.router.result()


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
