"""Prove that the pieces of a partition compute what the whole model computes.

Runs the whole model and the chain of stages (each stage possibly sharded and gathered)
in onnxruntime on seeded inputs of the declared shapes, and reports per output the
largest absolute difference and the difference relative to the output's magnitude.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from partita.model.compress import deviation
from partita.model.errors import CutError, ModelError
from partita.model.load import seeded_inputs
from partita.model.shard import gather, shard_stage
from partita.model.slice import split_at
from partita.model.types import ModelProfile, ShardLayout

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class StagePieces:
    stage: onnx.ModelProto
    shards: tuple[onnx.ModelProto, ...] = ()
    layout: ShardLayout | None = None
    why_whole: str = ""  # why a stage asked to be sharded stays whole


@dataclass(frozen=True)
class VerifyReport:
    cuts: tuple[int, ...]
    max_abs: dict[str, float]
    max_rel: float
    tolerance: float
    stages: tuple[str, ...] = field(default_factory=tuple)  # e.g. "stage 1: megatron x2"

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance


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
    shards: Mapping[int, Sequence[float]] | None = None,
) -> list[StagePieces]:
    """Stages for `cuts`; stages listed in `shards` are sharded when they can be."""
    pieces: list[StagePieces] = []
    for i, stage in enumerate(split_at(model, cuts, profile)):
        proportions = (shards or {}).get(i)
        if not proportions:
            pieces.append(StagePieces(stage))
            continue
        try:
            parts, layout = shard_stage(stage, proportions)
            pieces.append(StagePieces(stage, tuple(parts), layout))
        except ModelError as exc:
            pieces.append(StagePieces(stage, why_whole=str(exc)))
    return pieces


def run_pieces(
    pieces: Sequence[StagePieces], feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    from partita import runtime

    values = dict(feeds)
    for piece in pieces:
        if piece.layout is None:
            session = runtime.Session(piece.stage.SerializeToString(), intra_op_threads=1)
            values.update(session.run({i.name: values[i.name] for i in session.inputs}))
            continue
        parts = []
        for shard in piece.shards:
            session = runtime.Session(shard.SerializeToString(), intra_op_threads=1)
            parts.append(session.run({i.name: values[i.name] for i in session.inputs}))
        values.update(gather(piece.layout, parts))
    return values


def verify(
    model: onnx.ModelProto,
    profile: ModelProfile,
    cuts: Sequence[int],
    shards: Mapping[int, Sequence[float]] | None = None,
    *,
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    reference: onnx.ModelProto | None = None,
) -> VerifyReport:
    """`reference` is the model as it was in its file (before loading folded constants);
    by default the loaded model is the reference."""
    from partita import runtime

    feeds = seeded_inputs(model, seed)
    ref = reference if reference is not None else model
    whole = runtime.Session(ref.SerializeToString(), intra_op_threads=1).run(feeds)
    pieces = build_pieces(model, cuts, profile, shards)
    got = run_pieces(pieces, feeds)
    dev = deviation(whole, {k: got[k] for k in whole})
    described = []
    for i, p in enumerate(pieces):
        if p.layout is not None:
            described.append(f"stage {i}: {p.layout.strategy} x{p.layout.shards}")
        elif p.why_whole:
            described.append(f"stage {i}: whole ({p.why_whole})")
        else:
            described.append(f"stage {i}: whole")
    return VerifyReport(tuple(cuts), dev.max_abs, dev.max_rel, tolerance, tuple(described))
