"""Prove that the pieces of a partition compute what the whole model computes.

Runs the whole model and the chain of stages (each stage possibly sharded: its segment
models in onnxruntime, the exchanges and the gather in `partita.model.exchange`, the same
functions the shard servers call) on seeded inputs of the declared shapes, and reports per
output the largest absolute difference and the difference relative to the output's
magnitude, and for every sharded stage the bytes its exchanges moved beside the layout's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from partita.model.compress import deviation
from partita.model.errors import CutError, ModelError
from partita.model.exchange import SegmentRunner, run_sharded
from partita.model.load import seeded_inputs
from partita.model.shard import ShardAnalysis
from partita.model.slice import split_at
from partita.model.types import ModelProfile, ShardLayout

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ShardRequest:
    """Shard one stage over len(proportions) devices, with a strategy or the cheapest."""

    proportions: tuple[float, ...]
    strategy: str | None = None
    required: bool = True  # False: a stage that cannot be split stays whole (--auto)


@dataclass(frozen=True)
class StagePieces:
    stage: onnx.ModelProto
    start: int = 0
    end: int = 0
    layout: ShardLayout | None = None
    segments: tuple[tuple[onnx.ModelProto | None, ...], ...] = ()  # [segment][shard]
    refusal: str = ""  # why a stage asked to be sharded cannot be
    required: bool = True
    flops: int = 0  # the stage's FLOPs run whole


@dataclass(frozen=True)
class VerifyReport:
    cuts: tuple[int, ...]
    max_abs: dict[str, float]
    max_rel: float
    tolerance: float
    stages: tuple[str, ...] = field(default_factory=tuple)  # e.g. "stage 1: tile x4, ..."
    refusals: tuple[str, ...] = ()  # stages asked to be sharded that cannot be

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance and not self.refusals


def resolve_cuts(model: onnx.ModelProto, cuts: Sequence[str | int]) -> list[int]:
    """Cut positions from node indices or tensor names (cut right after the producer)."""
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output if o}
    positions: list[int] = []
    for cut in cuts:
        if isinstance(cut, int) or str(cut).isdigit():
            positions.append(int(cut))
        elif cut in producer:
            positions.append(producer[str(cut)] + 1)
        else:
            raise CutError(f"cut tensor {cut!r} is not produced by a node of the loaded model")
    return sorted(set(positions))


def auto_cuts(profile: ModelProfile, count: int = 3) -> list[int]:
    """A few representative cuts: the frontier cuts closest to 1/4, 1/2, 3/4 of the FLOPs."""
    if not profile.cut_points:
        return []
    targets = [profile.total_flops * (k + 1) / (count + 1) for k in range(count)]
    chosen = {
        min(profile.cut_points, key=lambda c: abs(c.flops_before - t)).position for t in targets
    }
    return sorted(chosen)


def build_pieces(
    model: onnx.ModelProto,
    cuts: Sequence[int],
    profile: ModelProfile,
    shards: Mapping[int, ShardRequest] | None = None,
    analysis: ShardAnalysis | None = None,
) -> list[StagePieces]:
    """Stages for `cuts`; the stages listed in `shards` are sharded, or carry the refusal."""
    pieces: list[StagePieces] = []
    bounds = [0, *cuts, len(model.graph.node)]
    for i, stage in enumerate(split_at(model, cuts, profile)):
        request = (shards or {}).get(i)
        flops = sum(n.flops for n in profile.nodes[bounds[i] : bounds[i + 1]])
        if request is None:
            pieces.append(StagePieces(stage, bounds[i], bounds[i + 1], flops=flops))
            continue
        analysis = analysis or ShardAnalysis(model)
        try:
            layout = analysis.layout(
                bounds[i], bounds[i + 1], request.proportions, request.strategy
            )
            segments = tuple(tuple(per) for per in analysis.build(layout))
        except ModelError as exc:
            pieces.append(
                StagePieces(
                    stage,
                    bounds[i],
                    bounds[i + 1],
                    refusal=str(exc),
                    required=request.required,
                    flops=flops,
                )
            )
            continue
        pieces.append(StagePieces(stage, bounds[i], bounds[i + 1], layout, segments, flops=flops))
    return pieces


def run_pieces(
    pieces: Sequence[StagePieces], feeds: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], list[tuple[int, ...]]]:
    """Every stage's outputs in turn, and the bytes each shard of each sharded stage
    received in exchanges (measured from the arrays moved)."""
    from partita import runtime

    values = dict(feeds)
    moved: list[tuple[int, ...]] = []
    for piece in pieces:
        if piece.layout is None:
            session = runtime.Session(piece.stage.SerializeToString(), intra_op_threads=1)
            values.update(session.run({i.name: values[i.name] for i in session.inputs}))
            continue
        done = run_sharded(piece.layout, _runner(piece.segments), values)
        values.update(done.result())
        moved.append(tuple(done.received_bytes))
    return values, moved


def _runner(segments: Sequence[Sequence[onnx.ModelProto | None]]) -> SegmentRunner:
    """Runs segment models in onnxruntime (one session each, opened once)."""
    from partita import runtime

    sessions = [
        [runtime.Session(m.SerializeToString(), intra_op_threads=1) if m else None for m in per]
        for per in segments
    ]

    def run(segment: int, shard: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = sessions[segment][shard]
        assert session is not None
        return session.run(inputs)

    return run


def describe(piece: StagePieces, index: int, moved: tuple[int, ...] | None = None) -> str:
    layout = piece.layout
    if layout is None:
        if piece.refusal:
            verdict = "cannot be sharded" if piece.required else "stays whole"
            return f"stage {index}: {verdict}: {piece.refusal}"
        return f"stage {index}: whole"
    shares = ", ".join(f"{f / max(piece.flops, 1):.3f}" for f in layout.shard_flops)
    planned = [sum(x.received_bytes[j] for x in layout.exchanges) for j in range(layout.shards)]
    text = (
        f"stage {index}: {layout.strategy} x{layout.shards}, {len(layout.segments)} segment(s), "
        f"{len(layout.exchanges)} exchange(s); shard FLOPs / stage FLOPs: {shares}; "
        f"exchange bytes per shard planned {planned}"
    )
    if moved is not None:
        text += f", moved {list(moved)}"
    return text


def verify(
    model: onnx.ModelProto,
    profile: ModelProfile,
    cuts: Sequence[int],
    shards: Mapping[int, ShardRequest] | None = None,
    *,
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    reference: onnx.ModelProto | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> VerifyReport:
    """`reference` is the model as it was in its file (before loading folded constants);
    by default the loaded model is the reference. `feeds` default to seeded inputs."""
    from partita import runtime

    inputs = seeded_inputs(model, seed)
    if feeds is not None:
        missing = sorted(set(inputs) - set(feeds))
        if missing:
            raise ModelError(f"the given inputs lack {missing}")
        inputs = {name: np.asarray(feeds[name]) for name in inputs}
    ref = reference if reference is not None else model
    whole = runtime.Session(ref.SerializeToString(), intra_op_threads=1).run(inputs)
    pieces = build_pieces(model, cuts, profile, shards)
    got, moved = run_pieces(pieces, inputs)
    dev = deviation(whole, {k: got[k] for k in whole})
    described = []
    sharded = iter(moved)
    for i, p in enumerate(pieces):
        described.append(describe(p, i, next(sharded) if p.layout is not None else None))
    refusals = tuple(
        f"stage {i}: {p.refusal}" for i, p in enumerate(pieces) if p.refusal and p.required
    )
    return VerifyReport(
        tuple(cuts), dev.max_abs, dev.max_rel, tolerance, tuple(described), refusals
    )
