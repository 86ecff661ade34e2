"""Compression as a placement lever: int8 stages, and fp16/int8 tensors at a cut.

Every function measures what it costs: the bytes saved and the deviation of the outputs
against the float32 original on seeded inputs, run in onnxruntime (through
`partita.runtime`, the one module importing it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from partita.model.errors import CompressionError
from partita.model.load import seeded_inputs
from partita.model.samples import Calibration, Split, sample_set

Codec = Literal["fp16", "int8"]


@dataclass(frozen=True)
class Deviation:
    """Largest absolute difference per output, and relative to the output's magnitude."""

    max_abs: dict[str, float]
    max_rel: float


@dataclass(frozen=True)
class QuantizationReport:
    mode: str
    bytes_before: int
    bytes_after: int
    deviation: Deviation


@dataclass(frozen=True)
class BoundaryReport:
    codec: str
    tensors: tuple[str, ...]
    bytes_before: int
    bytes_after: int
    deviation: Deviation


def deviation(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> Deviation:
    max_abs: dict[str, float] = {}
    rel = 0.0
    for name, want in ref.items():
        have = got[name]
        if want.shape != have.shape:
            raise CompressionError(f"output {name!r} changed shape {want.shape} -> {have.shape}")
        w = want.astype(np.float64)
        diff = float(np.max(np.abs(w - have.astype(np.float64)))) if w.size else 0.0
        max_abs[name] = diff
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        rel = max(rel, diff / scale if scale > 0 else diff)
    return Deviation(max_abs, rel)


def _run(model: onnx.ModelProto | bytes, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from partita import runtime

    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = runtime.Session(data, intra_op_threads=1)
    return session.run({i.name: feeds[i.name] for i in session.inputs})


def quantize_stage(
    stage: onnx.ModelProto,
    mode: Literal["dynamic", "static"] = "dynamic",
    calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
    seed: int = 0,
) -> tuple[onnx.ModelProto, QuantizationReport]:
    """int8 copy of `stage`; static mode needs calibration feeds (seeded ones if None)."""
    from partita import runtime

    data = stage.SerializeToString()
    try:
        if mode == "dynamic":
            out = runtime.quantize_dynamic(data)
        else:
            feeds = (
                list(calibration)
                if calibration
                else [seeded_inputs(stage, seed + k) for k in range(4)]
            )
            out = runtime.quantize_static(data, feeds)
    except Exception as exc:
        raise CompressionError(f"{mode} int8 quantization failed: {exc}") from exc
    probe = seeded_inputs(stage, seed + 1000)
    dev = deviation(_run(data, probe), _run(out, probe))
    quantized = onnx.load_from_string(out)
    return quantized, QuantizationReport(mode, len(data), len(out), dev)


def _float_tensors(stage: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inputs = {i.name for i in stage.graph.input}
    return [
        o
        for o in stage.graph.output
        if o.type.tensor_type.elem_type == TensorProto.FLOAT and o.name not in inputs
    ]


def _nbytes(vi: onnx.ValueInfoProto, itemsize: int) -> int:
    return int(np.prod([d.dim_value for d in vi.type.tensor_type.shape.dim])) * itemsize


def compress_boundary(
    stages: Sequence[onnx.ModelProto],
    boundary: int,
    codec: Codec = "fp16",
    *,
    seed: int = 0,
    calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> tuple[list[onnx.ModelProto], BoundaryReport]:
    """Compress the float32 tensors stage `boundary` sends to stage `boundary + 1`.

    fp16 adds Cast nodes; int8 adds QuantizeLinear/DequantizeLinear with one scale and
    zero point per tensor, fitted on calibration feeds of the first stage (seeded ones
    by default). The final outputs of the compressed chain are compared with the
    original chain on other seeded inputs.
    """
    if not 0 <= boundary < len(stages) - 1:
        raise CompressionError(f"boundary {boundary} is not between two of {len(stages)} stages")
    producer, consumer = stages[boundary], stages[boundary + 1]
    consumer_inputs = {i.name for i in consumer.graph.input}
    targets = [o for o in _float_tensors(producer) if o.name in consumer_inputs]
    if not targets:
        raise CompressionError(f"no float32 tensor crosses boundary {boundary} to compress")
    params: dict[str, tuple[float, int]] = {}
    if codec == "int8":
        feeds_list = (
            list(calibration)
            if calibration
            else [seeded_inputs(stages[0], seed + k) for k in range(4)]
        )
        lo = {t.name: np.inf for t in targets}
        hi = {t.name: -np.inf for t in targets}
        for feeds in feeds_list:
            values = _run_chain(stages[: boundary + 1], feeds)
            for t in targets:
                lo[t.name] = min(lo[t.name], float(values[t.name].min()))
                hi[t.name] = max(hi[t.name], float(values[t.name].max()))
        for t in targets:
            a, b = min(lo[t.name], 0.0), max(hi[t.name], 0.0)
            scale = (b - a) / 255.0 or 1.0
            params[t.name] = (scale, int(np.clip(round(-a / scale), 0, 255)))
    new_producer, new_consumer = onnx.ModelProto(), onnx.ModelProto()
    new_producer.CopyFrom(producer)
    new_consumer.CopyFrom(consumer)
    wire_type = TensorProto.FLOAT16 if codec == "fp16" else TensorProto.UINT8
    before = after = 0
    for t in targets:
        wire = f"{t.name}__{codec}"
        shape = [d.dim_value for d in t.type.tensor_type.shape.dim]
        before += _nbytes(t, 4)
        after += _nbytes(t, 2 if codec == "fp16" else 1)
        if codec == "fp16":
            enc = [helper.make_node("Cast", [t.name], [wire], to=TensorProto.FLOAT16)]
            dec = [helper.make_node("Cast", [wire], [t.name], to=TensorProto.FLOAT)]
            enc_inits: list[onnx.TensorProto] = []
        else:
            scale, zp = params[t.name]
            s_name, z_name = f"{t.name}__scale", f"{t.name}__zero"
            enc_inits = [
                numpy_helper.from_array(np.array(scale, dtype=np.float32), s_name),
                numpy_helper.from_array(np.array(zp, dtype=np.uint8), z_name),
            ]
            enc = [helper.make_node("QuantizeLinear", [t.name, s_name, z_name], [wire])]
            dec = [helper.make_node("DequantizeLinear", [wire, s_name, z_name], [t.name])]
        new_producer.graph.node.extend(enc)
        new_producer.graph.initializer.extend(enc_inits)
        for o in new_producer.graph.output:
            if o.name == t.name:
                o.CopyFrom(helper.make_tensor_value_info(wire, wire_type, shape))
        kept = [n for n in new_consumer.graph.node]
        del new_consumer.graph.node[:]
        new_consumer.graph.node.extend(dec + kept)
        new_consumer.graph.initializer.extend(enc_inits)
        for i in new_consumer.graph.input:
            if i.name == t.name:
                i.CopyFrom(helper.make_tensor_value_info(wire, wire_type, shape))
    _ensure_opset(new_producer, 10 if codec == "int8" else 6)
    _ensure_opset(new_consumer, 10 if codec == "int8" else 6)
    result = [*stages[:boundary], new_producer, new_consumer, *stages[boundary + 2 :]]
    probe = seeded_inputs(stages[0], seed + 1000)
    final = [o.name for o in stages[-1].graph.output]
    ref = _run_chain(stages, probe)
    got = _run_chain(result, probe)
    dev = deviation({k: ref[k] for k in final}, {k: got[k] for k in final})
    report = BoundaryReport(codec, tuple(t.name for t in targets), before, after, dev)
    return result, report


def _ensure_opset(model: onnx.ModelProto, minimum: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < minimum:
            raise CompressionError(
                f"boundary compression needs opset >= {minimum}; the stage has {op.version}"
            )


def _run_chain(
    stages: Sequence[onnx.ModelProto], feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    values = dict(feeds)
    for stage in stages:
        values.update(_run(stage, values))
    return values


# ---- int8 models within a measured budget ------------------------------------------------

TOP1 = "top1-disagreement"
RELATIVE_ERROR = "relative-error"
CALIBRATION_INPUTS = 8
EVALUATION_INPUTS = 32
TIMING_RUNS = 5


@dataclass(frozen=True)
class AccuracyDrop:
    """A drop measured against float32: `metric` is TOP1 (share of inputs whose top-1 class
    differs, for a classifier) or RELATIVE_ERROR (mean over inputs of the largest
    max |x - fp32| / max |fp32| over the outputs)."""

    metric: str
    drop: float
    inputs: int
    source: str


@dataclass(frozen=True)
class Int8Model:
    """An int8 copy of a model and what it was measured to cost and give."""

    model: onnx.ModelProto
    mode: Literal["dynamic", "static"]
    accuracy: AccuracyDrop
    speedup: float  # float32 seconds over int8 seconds, one thread, median of TIMING_RUNS
    weight_bytes: int
    float_weight_bytes: int


# Ops that pass a tensor's values on unchanged, between a Softmax and a graph output.
_PASS_THROUGH = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def classifier_output(model: onnx.ModelProto) -> str | None:
    """The first float output of shape [N, C], C >= 2, that a Softmax computes (class
    probabilities), None if none: an embedding or a logit of that shape is no class score."""
    producers = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
        if out.type.tensor_type.elem_type != TensorProto.FLOAT or len(dims) != 2 or dims[1] < 2:
            continue
        node = producers.get(out.name)
        while node is not None and node.op_type in _PASS_THROUGH and node.input:
            node = producers.get(node.input[0])
        if node is not None and node.op_type == "Softmax":
            return out.name
    return None


def accuracy_drop(
    reference: Sequence[Mapping[str, np.ndarray]],
    measured: Sequence[Mapping[str, np.ndarray]],
    classifier: str | None,
    source: str,
) -> AccuracyDrop:
    """How far `measured` outputs are from `reference` ones, input by input."""
    if classifier is not None:
        differ = sum(
            int(np.any(np.argmax(ref[classifier], -1) != np.argmax(got[classifier], -1)))
            for ref, got in zip(reference, measured, strict=True)
        )
        return AccuracyDrop(TOP1, differ / max(len(reference), 1), len(reference), source)
    errors = [
        deviation(dict(ref), dict(got)).max_rel
        for ref, got in zip(reference, measured, strict=True)
    ]
    return AccuracyDrop(RELATIVE_ERROR, float(np.mean(errors)), len(errors), source)


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def quantize_model(
    model: onnx.ModelProto,
    calibration: Calibration,
    *,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> Int8Model:
    """Quantize `model` (as `partita.model.load` loaded it, so its tensor names are the
    profile's) to int8 and measure it against float32.

    Static (QDQ, activation ranges from calibration images) when the model takes images and
    `calibration` is an image mode, dynamic otherwise; the drop is measured on an
    evaluation set of other photographs (or other seeded values)."""
    from partita import runtime

    calib = sample_set(model, calibration, Split.CALIBRATION, CALIBRATION_INPUTS, seed)
    data = model.SerializeToString()
    mode: Literal["dynamic", "static"] = "static" if calib.images else "dynamic"
    try:
        if mode == "static":
            out = runtime.quantize_static(data, list(calib.feeds))
        else:
            out = runtime.quantize_dynamic(data)
    except Exception as exc:
        raise CompressionError(f"{mode} int8 quantization failed: {exc}") from exc
    evaluation = sample_set(model, calibration, Split.EVALUATION, EVALUATION_INPUTS, seed)
    fp32 = runtime.Session(data, intra_op_threads=1)
    int8 = runtime.Session(out, intra_op_threads=1)
    reference = [fp32.run(f) for f in evaluation.feeds]
    measured = [int8.run(f) for f in evaluation.feeds]
    drop = accuracy_drop(reference, measured, classifier_output(model), evaluation.source)
    speedup = _seconds(fp32, evaluation.feeds[0], clock) / _seconds(
        int8, evaluation.feeds[0], clock
    )
    quantized = onnx.load_from_string(out)
    return Int8Model(quantized, mode, drop, speedup, weight_bytes(quantized), weight_bytes(model))


def _seconds(session: Any, feeds: Mapping[str, np.ndarray], clock: Callable[[], float]) -> float:
    session.run(feeds)
    times = []
    for _ in range(TIMING_RUNS):
        start = clock()
        session.run(feeds)
        times.append(clock() - start)
    return max(float(np.median(times)), 1e-9)


# ---- what a plan's lossy levers do to the final outputs ------------------------------------


def wire_roundtrip(array: np.ndarray, codec: str) -> np.ndarray:
    """A float32 tensor as it arrives after crossing a cut encoded as `codec`, the way the
    stage servers encode it (`partita_server.protocol.compress`/`decompress`): fp16 a cast;
    int8 per tensor and per request, affine over the tensor's own range with 0 kept exact."""
    if codec == "none" or array.dtype != np.float32 or array.size == 0:
        return array
    if codec == "fp16":
        return array.astype(np.float16).astype(np.float32)
    low, high = min(float(array.min()), 0.0), max(float(array.max()), 0.0)
    scale = (high - low) / 255.0 or 1.0
    zero_point = int(np.clip(round(-128 - low / scale), -128, 127))
    quantized = np.clip(np.rint(array / scale) + zero_point, -128, 127).astype(np.int8)
    return (quantized.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)


@dataclass(frozen=True)
class ChainStage:
    """One stage of a plan as the servers run it: its boundary tensors, the encoding of its
    inputs on the wire, and whether it runs the int8 model's cut."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    codec: str = "none"
    int8: bool = False


def chain_drop(
    model: onnx.ModelProto,
    int8_model: onnx.ModelProto | None,
    stages: Sequence[ChainStage],
    calibration: Calibration,
    *,
    count: int = EVALUATION_INPUTS // 2,
    seed: int = 0,
) -> AccuracyDrop:
    """The drop of the final outputs of `stages` (cut from `model`, or from `int8_model` for
    int8 stages, their inputs encoded as on the wire) against the whole float32 model, on
    the evaluation set."""
    from partita import runtime
    from partita.model.slice import extract_stage

    sessions = []
    for stage in stages:
        source = int8_model if stage.int8 else model
        if source is None:
            raise CompressionError("an int8 stage needs the int8 model")
        piece = extract_stage(source, list(stage.inputs), list(stage.outputs))
        sessions.append(runtime.Session(piece.SerializeToString(), intra_op_threads=1))
    whole = runtime.Session(model.SerializeToString(), intra_op_threads=1)
    evaluation = sample_set(model, calibration, Split.EVALUATION, count, seed)
    finals = [o.name for o in model.graph.output]
    reference, measured = [], []
    for feeds in evaluation.feeds:
        reference.append(whole.run(feeds))
        values = dict(feeds)
        for stage, session in zip(stages, sessions, strict=True):
            sent = {n: wire_roundtrip(values[n], stage.codec) for n in stage.inputs}
            values.update(session.run(sent))
        measured.append({n: values[n] for n in finals})
    return accuracy_drop(reference, measured, classifier_output(model), evaluation.source)
