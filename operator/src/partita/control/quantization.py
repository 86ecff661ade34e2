"""int8 in the operator, where the model is: quantize once per model file, input shapes and
calibration mode (cached on disk with its measurements), tell the planner what int8 costs and
gives, and cut the int8 stages a plan runs into files of their own for the stage servers.

The planner prices an int8 stage by its float32 time with conv and matmul sped up by a
factor fitted so that the whole model's predicted int8 time equals the int8 time measured
here, and by its weights scaled by the measured int8/float32 weight bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from partita.api import edgemodel as api
from partita.model.compress import AccuracyDrop, quantize_model
from partita.model.load import load_model
from partita.model.samples import Calibration
from partita.model.slice import extract_stage
from partita.model.types import ModelProfile, OpClass
from partita.planner import Quantization
from partita.planner.ranges import INT8_OP_CLASSES

# The conv/matmul factor is capped: a model whose measured gain the other ops cannot
# explain is not promised more than this on conv and matmul.
MAX_CLASS_SPEEDUP = 8.0


@dataclass(frozen=True)
class Int8Figures:
    """The int8 model on disk and what it was measured to cost and give."""

    path: Path
    digest: str
    mode: str
    accuracy: AccuracyDrop
    speedup: float
    weight_bytes: int
    float_weight_bytes: int

    @property
    def weight_factor(self) -> float:
        return self.weight_bytes / max(self.float_weight_bytes, 1)


def _key(digest: str, shapes: Mapping[str, Sequence[int]] | None, calibration: str) -> str:
    text = json.dumps([digest, sorted((shapes or {}).items()), calibration])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def int8_model(
    path: Path,
    digest: str,
    shapes: Mapping[str, Sequence[int]] | None,
    calibration: Calibration,
    cache_dir: Path,
) -> Int8Figures:
    """The int8 model of the file `path` (sha256 `digest`), quantized and measured once."""
    base = cache_dir / "int8" / _key(digest, shapes, calibration.value)
    report = base.with_suffix(".json")
    if report.is_file():
        doc = json.loads(report.read_text())
        return Int8Figures(
            path=Path(doc["path"]),
            digest=doc["digest"],
            mode=doc["mode"],
            accuracy=AccuracyDrop(**doc["accuracy"]),
            speedup=doc["speedup"],
            weight_bytes=doc["weight_bytes"],
            float_weight_bytes=doc["float_weight_bytes"],
        )
    model = load_model(path, shapes)
    quantized = quantize_model(model, calibration)
    target, sha = _save(quantized.model, base.with_suffix(".onnx"))
    figures = Int8Figures(
        target,
        sha,
        quantized.mode,
        quantized.accuracy,
        quantized.speedup,
        quantized.weight_bytes,
        quantized.float_weight_bytes,
    )
    doc = {**asdict(figures), "path": str(target)}
    _write(report, json.dumps(doc).encode())
    return figures


def int8_piece(
    figures: Int8Figures, inputs: Sequence[str], outputs: Sequence[str]
) -> tuple[Path, str]:
    """The file (and its sha256) of the int8 model's stage from `inputs` to `outputs`: what
    a stage server runs for an int8 stage, whole."""
    key = hashlib.sha256(json.dumps([figures.digest, list(inputs), list(outputs)]).encode())
    target = figures.path.parent / "pieces" / f"{key.hexdigest()[:24]}.onnx"
    if target.is_file():
        return target, _sha256(target)
    piece = extract_stage(onnx.load(str(figures.path)), list(inputs), list(outputs))
    return _save(piece, target)


def planner_quantization(
    spec: api.Quantization, figures: Int8Figures | None, profile: ModelProfile
) -> Quantization:
    """What the planner knows of int8 for this model: nothing usable until measured."""
    if figures is None:
        return Quantization(allowed=spec.allowed, max_accuracy_drop=spec.max_accuracy_drop)
    return Quantization(
        allowed=spec.allowed,
        max_accuracy_drop=spec.max_accuracy_drop,
        measured_accuracy_drop=figures.accuracy.drop,
        speedup=class_speedup(profile, figures.speedup),
        weight_factor=figures.weight_factor,
    )


def class_speedup(profile: ModelProfile, measured: float) -> float:
    """The conv/matmul factor s that makes the whole model's int8 time its float32 time over
    `measured`, with every op class at one speed: f/s + (1 - f) = 1/measured, f the share of
    FLOPs in conv and matmul."""
    total = max(profile.total_flops, 1)
    share = sum(n.flops for n in profile.nodes if OpClass(n.op_class) in INT8_OP_CLASSES) / total
    rest = 1.0 / max(measured, 1e-9) - (1.0 - share)
    if share <= 0:
        return 1.0
    if rest <= share / MAX_CLASS_SPEEDUP:
        return MAX_CLASS_SPEEDUP
    return share / rest


def quantization_status(spec: api.Quantization, figures: Int8Figures) -> api.QuantizationStatus:
    usable = figures.accuracy.drop <= spec.max_accuracy_drop
    drop, limit = figures.accuracy.drop, spec.max_accuracy_drop
    if usable:
        message = (
            f"int8 usable: measured {figures.accuracy.metric} {drop:.4f} <= maxAccuracyDrop "
            f"{limit:g}; {figures.speedup:.2f}x the float32 speed, "
            f"{figures.weight_factor:.2f}x its weight bytes"
        )
    else:
        message = (
            f"int8 refused: measured {figures.accuracy.metric} {drop:.4f} > maxAccuracyDrop "
            f"{limit:g}; stages run in float32"
        )
    return api.QuantizationStatus(
        mode=figures.mode,
        accuracy=accuracy_status(figures.accuracy),
        speedup=round(figures.speedup, 4),
        weight_bytes=figures.weight_bytes,
        usable=usable,
        message=message,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _save(model: onnx.ModelProto, target: Path) -> tuple[Path, str]:
    data = model.SerializeToString()
    _write(target, data)
    return target, hashlib.sha256(data).hexdigest()


def _write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.part")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def accuracy_status(drop: AccuracyDrop | None) -> api.AccuracyStatus | None:
    if drop is None:
        return None
    return api.AccuracyStatus(
        metric=drop.metric, drop=round(drop.drop, 6), inputs=drop.inputs, source=drop.source
    )
