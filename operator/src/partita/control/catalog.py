"""The profiled models the loop plans: each verified file, its profile and its reference
speed, loaded once per digest and input shapes (blocking: the loop calls it in a thread).

The reference speed is what one stage container computes per second for this model on the
profiling reference (see `partita.control.calibration`); each pool scales it by its
speedFactor unless it declares a throughput.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from partita.api.edgemodel import EdgeModel
from partita.api.edgemodel import Quantization as ApiQuantization
from partita.control.calibration import ReferenceSpeeds
from partita.control.models import Profiler, Quantizer
from partita.control.quantization import Int8Figures, int8_piece
from partita.kube.fetch import FetchError, ModelFetcher
from partita.model.compress import AccuracyDrop, ChainStage, chain_drop
from partita.model.errors import ModelError
from partita.model.load import load_model
from partita.model.samples import Calibration
from partita.model.types import ModelProfile
from partita.planner import Compression, Plan


@dataclass(frozen=True)
class Profiled:
    path: Path
    profile: ModelProfile
    input_shapes: Mapping[str, Sequence[int]]
    reference_gflops: float
    small: Profiled | None = None  # the cascade's small model
    int8: Int8Figures | None = None  # the int8 model, with quantization.allowed

    @property
    def small_model(self) -> tuple[ModelProfile, float] | None:
        """The small model's profile and its speed over the main model's, for the planner."""
        if self.small is None:
            return None
        return self.small.profile, self.small.reference_gflops / max(self.reference_gflops, 1e-12)


class Catalog:
    def __init__(
        self,
        fetcher: ModelFetcher,
        profiler: Profiler,
        speeds: ReferenceSpeeds | None = None,
        cut: Callable[[Path, Mapping[str, Sequence[int]], Plan], str | None] | None = None,
        quantizer: Quantizer | None = None,
    ) -> None:
        self._fetcher, self._profiler, self._quantizer = fetcher, profiler, quantizer
        self._speeds = speeds or ReferenceSpeeds()
        self._cut = cut or cut_refusal
        self._loaded: dict[tuple[str, ...], Profiled] = {}
        self._accuracy: dict[tuple[str, str, str], AccuracyDrop] = {}
        self._cuts: dict[
            tuple[str, str, tuple[tuple[str, int, int, int, str], ...]], str | None
        ] = {}

    def get(self, model: EdgeModel) -> Profiled | None:
        """The model's file, profile and reference speed (with its cascade's small model and
        its int8 measurements when the spec asks for them); None when it cannot be loaded now
        (the model reconciler reports why in ModelFetched and Profiled)."""
        spec = model.spec
        shapes = {k: list(v) for k, v in spec.input_shapes.items()}
        small = spec.cascade.model if spec.cascade else None
        int8 = spec.quantization.calibration.value if spec.quantization.allowed else ""
        key = (
            spec.source.uri,
            spec.source.sha256,
            repr(sorted(shapes.items())),
            f"{small.uri}@{small.sha256}" if small else "",
            int8,
        )
        if key not in self._loaded:
            try:
                main = self._load(model, spec.source.uri, spec.source.sha256, shapes)
                if small is not None:
                    main = replace(main, small=self._load(model, small.uri, small.sha256, shapes))
                if int8 and self._quantizer is not None:
                    figures = self._quantizer(
                        main.path, spec.source.sha256, shapes or None, Calibration(int8)
                    )
                    main = replace(main, int8=figures)
            except (FetchError, ModelError):
                return None
            self._loaded[key] = main
        return self._loaded[key]

    def _load(
        self, model: EdgeModel, uri: str, sha256: str, shapes: Mapping[str, Sequence[int]]
    ) -> Profiled:
        fetched = self._fetcher.fetch(uri, sha256, namespace=model.metadata.namespace)
        profile = self._profiler(fetched.path, shapes or None)
        gflops = self._speeds.get(fetched.path, profile, shapes or None)
        return Profiled(fetched.path, profile, shapes, gflops)

    def plan_accuracy(
        self, profiled: Profiled, plan: Plan, calibration: Calibration
    ) -> AccuracyDrop | None:
        """The measured drop of `plan`'s final outputs against the whole float32 model, with
        its compressed cuts and int8 stages as the servers run them; None when every stage
        and cut is float32. Measured once per placement."""
        lossy = [s for s in plan.stages if s.int8 or s.input_compression is not Compression.NONE]
        if not lossy or (any(s.int8 for s in plan.stages) and profiled.int8 is None):
            return None
        key = (profiled.profile.digest, repr(plan.placement), calibration.value)
        if key not in self._accuracy:
            model = load_model(profiled.path, profiled.input_shapes or None)
            int8 = onnx.load(str(profiled.int8.path)) if profiled.int8 is not None else None
            stages = [
                ChainStage(s.inputs, s.outputs, s.input_compression.value, s.int8)
                for s in plan.stages
            ]
            self._accuracy[key] = chain_drop(model, int8, stages, calibration)
        return self._accuracy[key]

    def accuracy_refusal(self, profiled: Profiled, plan: Plan, spec: ApiQuantization) -> str | None:
        """Why `plan`'s int8 stages and int8 cuts cannot serve: their measured drop is over
        `spec.max_accuracy_drop` (or cannot be measured); None when within the budget."""
        mode = Calibration(spec.calibration.value)
        try:
            drop = self.plan_accuracy(profiled, plan, mode)
        except ModelError as exc:
            return f"the plan's accuracy cannot be measured ({exc})"
        if drop is not None and drop.drop > spec.max_accuracy_drop:
            return (
                f"the plan's measured {drop.metric} is {drop.drop:.4f} over "
                f"{drop.inputs} inputs, above quantization.maxAccuracyDrop "
                f"{spec.max_accuracy_drop:g}"
            )
        return None

    def int8_pieces(self, profiled: Profiled, plan: Plan) -> dict[int, tuple[str, str]]:
        """stage index -> (file:// uri, sha256) of the int8 file of every int8 stage of `plan`
        (cut from the model's int8 copy once, then found on disk), each held with the
        verified models by its digest, where the distribution endpoint serves files from."""
        out: dict[int, tuple[str, str]] = {}
        for stage in plan.stages:
            if stage.int8 and profiled.int8 is not None:
                path, sha = int8_piece(profiled.int8, stage.inputs, stage.outputs)
                held = self._fetcher.cached(sha)
                if not held.is_file():
                    partial = held.with_suffix(".partial")
                    shutil.copyfile(path, partial)
                    partial.replace(held)
                out[stage.index] = (held.resolve().as_uri(), sha)
        return out

    def cut_check(self, profiled: Profiled, plan: Plan) -> str | None:
        """Cut every sharded stage of `plan` as its servers will; the first refusal, or None."""
        predicted = plan.prediction.stages
        shards = tuple(
            (
                ",".join(s.inputs) + ">" + ",".join(s.outputs), s.start, s.end, len(s.shards),
                predicted[s.index].strategy if s.index < len(predicted) else "",
            )
            for s in plan.stages
            if len(s.shards) > 1
        )  # fmt: skip
        key = (profiled.profile.digest, repr(sorted(profiled.input_shapes.items())), shards)
        if key not in self._cuts:
            self._cuts[key] = self._cut(profiled.path, profiled.input_shapes, plan)
        return self._cuts[key]


def cut_refusal(path: Path, shapes: Mapping[str, Sequence[int]], plan: Plan) -> str | None:
    """The first sharded stage of `plan` that `partita.model.shard` refuses to cut, cut as
    its shard servers will (`stage_layout` with the plan's strategy)."""
    from partita.model.load import load_model
    from partita.model.shard import stage_layout

    model = None
    predicted = plan.prediction.stages
    for stage in plan.stages:
        if len(stage.shards) < 2:
            continue
        strategy = predicted[stage.index].strategy if stage.index < len(predicted) else ""
        try:
            model = model or load_model(path, shapes or None)
            analysis, layout = stage_layout(
                model, stage.inputs, stage.outputs, stage.proportions, strategy
            )
            analysis.build(layout)
        except ModelError as exc:
            return f"stage {stage.index}: {exc}"
    return None
