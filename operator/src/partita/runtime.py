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

__all__ = ["Session", "TensorSpec", "available_providers"]


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
    """An onnxruntime session on CPU with explicit thread counts."""

    def __init__(
        self, model: str | Path | bytes, *, intra_op_threads: int = 0, inter_op_threads: int = 1
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.log_severity_level = 3
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


def _spec(arg: ort.NodeArg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or None) for d in (arg.shape or ()))
    return TensorSpec(arg.name, _ORT_TO_NUMPY.get(arg.type, arg.type), shape)
