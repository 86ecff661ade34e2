"""The one module that imports onnxruntime (see STYLE.md and the import-linter contracts).

Everything that runs a model (the verify CLI, quantization, the inference server)
goes through here, so ORT settings live in one place. Add functions here rather
than importing onnxruntime elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

__all__ = ["RunError", "Session", "TensorSpec", "available_providers", "run_checked"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str | None, ...]


_ORT_TO_NUMPY = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(bool)": "bool",
    "tensor(string)": "object",
}


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


class Session:
    """An onnxruntime session on CPU with explicit thread counts.

    `allow_spinning` is ORT's `session.intra_op.allow_spinning`: with it on, the intra-op
    threads busy-wait after each run for the next one. Under a CPU quota that spin is quota
    the next request needs, so servers turn it off; ORT's own default is on.

    Several threads may call `run` at once on one session (ORT releases the GIL); they share
    the session's intra-op thread pool.
    """

    def __init__(
        self,
        model: str | Path | bytes,
        *,
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        allow_spinning: bool = True,
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.log_severity_level = 3
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if allow_spinning else "0"
        )
        options.add_session_config_entry(
            "session.inter_op.allow_spinning", "1" if allow_spinning else "0"
        )
        source = str(model) if isinstance(model, Path) else model
        self._session = ort.InferenceSession(
            source, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.inputs = tuple(_spec(i) for i in self._session.get_inputs())
        self.outputs = tuple(_spec(o) for o in self._session.get_outputs())

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = list(output_names) if output_names is not None else [o.name for o in self.outputs]
        values = self._session.run(names, dict(feeds))
        return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}


class RunError(RuntimeError):
    """onnxruntime refused to run these feeds (a shape or value it cannot take), with its reason.

    Callers that validated names, dtypes and ranks can treat it as the caller's fault.
    """


def run_checked(
    session: Session, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """`Session.run`, with ORT's own exception types turned into `RunError`.

    ORT's pybind exceptions are not importable without onnxruntime, so this is the one
    place that can tell "ORT rejected the input" from a bug in the caller.
    """
    try:
        return session.run(feeds, output_names)
    except (
        ort.capi.onnxruntime_pybind11_state.InvalidArgument,
        ort.capi.onnxruntime_pybind11_state.Fail,
        ort.capi.onnxruntime_pybind11_state.RuntimeException,
    ) as exc:
        raise RunError(str(exc)) from exc


def _spec(arg: ort.NodeArg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or None) for d in (arg.shape or ()))
    return TensorSpec(arg.name, _ORT_TO_NUMPY.get(arg.type, arg.type), shape)


def quantize_dynamic(model: bytes) -> bytes:
    """int8 weights, activations quantized on the fly (onnxruntime.quantization)."""
    import tempfile

    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as _dynamic

    with tempfile.TemporaryDirectory(prefix="partita-q") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(model)
        _dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return dst.read_bytes()


def quantize_static(model: bytes, calibration: Sequence[Mapping[str, np.ndarray]]) -> bytes:
    """int8 weights and activations, activation ranges from the calibration feeds (QDQ)."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as _static

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([dict(f) for f in calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory(prefix="partita-q") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(model)
        _static(
            str(src),
            str(dst),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        return dst.read_bytes()


def profile_nodes(
    model: bytes, feeds: Mapping[str, np.ndarray], runs: int = 5, *, intra_op_threads: int = 1
) -> dict[str, float]:
    """Mean kernel time per node name in microseconds, from onnxruntime's own profiler.

    Graph optimizations are off so node names match the model's; the first (warm-up)
    run of every node is dropped.
    """
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="partita-prof") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "p")
        session = ort.InferenceSession(
            model, sess_options=options, providers=["CPUExecutionProvider"]
        )
        for _ in range(runs + 1):
            session.run(None, dict(feeds))
        events = json.loads(Path(session.end_profiling()).read_text())
    durations: dict[str, list[float]] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") == "Node" and name.endswith("_kernel_time"):
            durations.setdefault(name[: -len("_kernel_time")], []).append(float(e["dur"]))
    return {n: float(np.mean(d[1:] or d)) for n, d in durations.items()}
