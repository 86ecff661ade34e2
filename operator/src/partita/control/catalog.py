"""The profiled models the loop plans: each verified file, its profile and its reference
speed, loaded once per digest and input shapes (blocking: the loop calls it in a thread).

The reference speed is what one stage container computes per second for this model on the
profiling reference (see `partita.control.calibration`); each pool scales it by its
speedFactor unless it declares a throughput.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from partita.api.edgemodel import EdgeModel
from partita.control.calibration import ReferenceSpeeds
from partita.control.models import Profiler
from partita.kube.fetch import FetchError, ModelFetcher
from partita.model.errors import ModelError
from partita.model.types import ModelProfile
from partita.planner import Plan


@dataclass(frozen=True)
class Profiled:
    path: Path
    profile: ModelProfile
    input_shapes: Mapping[str, Sequence[int]]
    reference_gflops: float


class Catalog:
    def __init__(
        self,
        fetcher: ModelFetcher,
        profiler: Profiler,
        speeds: ReferenceSpeeds | None = None,
        cut: Callable[[Path, Mapping[str, Sequence[int]], Plan], str | None] | None = None,
    ) -> None:
        self._fetcher, self._profiler = fetcher, profiler
        self._speeds = speeds or ReferenceSpeeds()
        self._cut = cut or cut_refusal
        self._loaded: dict[tuple[str, str, str], Profiled] = {}
        self._cuts: dict[tuple[str, str, tuple[tuple[str, int, int, int], ...]], str | None] = {}

    def get(self, model: EdgeModel) -> Profiled | None:
        """The model's file, profile and reference speed; None when it cannot be loaded now
        (the model reconciler reports why in ModelFetched and Profiled)."""
        spec = model.spec
        shapes = {k: list(v) for k, v in spec.input_shapes.items()}
        key = (spec.source.uri, spec.source.sha256, repr(sorted(shapes.items())))
        if key not in self._loaded:
            try:
                fetched = self._fetcher.fetch(
                    spec.source.uri, spec.source.sha256, namespace=model.metadata.namespace
                )
                profile = self._profiler(fetched.path, shapes or None)
            except (FetchError, ModelError):
                return None
            gflops = self._speeds.get(fetched.path, profile, shapes or None)
            self._loaded[key] = Profiled(fetched.path, profile, shapes, gflops)
        return self._loaded[key]

    def cut_check(self, profiled: Profiled, plan: Plan) -> str | None:
        """Cut every sharded stage of `plan` as its servers will; the first refusal, or None."""
        shards = tuple(
            (",".join(s.inputs) + ">" + ",".join(s.outputs), s.start, s.end, len(s.shards))
            for s in plan.stages
            if len(s.shards) > 1
        )
        key = (profiled.profile.digest, repr(sorted(profiled.input_shapes.items())), shards)
        if key not in self._cuts:
            self._cuts[key] = self._cut(profiled.path, profiled.input_shapes, plan)
        return self._cuts[key]


def cut_refusal(path: Path, shapes: Mapping[str, Sequence[int]], plan: Plan) -> str | None:
    """The first sharded stage of `plan` that `partita.model.shard` refuses to cut."""
    from partita.model.load import load_model
    from partita.model.shard import shard_stage
    from partita.model.slice import extract_stage

    model = None
    for stage in plan.stages:
        if len(stage.shards) < 2:
            continue
        try:
            model = model or load_model(path, shapes or None)
            piece = extract_stage(model, stage.inputs, stage.outputs)
            shard_stage(piece, [s.proportion for s in stage.shards])
        except ModelError as exc:
            return f"stage {stage.index}: {exc}"
    return None
