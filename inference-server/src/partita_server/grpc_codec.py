"""The v2 gRPC messages to and from the data plane's `InferRequest` / `InferResponse`.

Tensors travel as `raw_input_contents` / `raw_output_contents` (what tritonclient.grpc
sends and reads: views over the message bytes, no copy) or as typed `contents`. Used by
the gRPC adapter (server side) and by the hop client (a stage calling the next one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np
import orjson

from partita_server.errors import InvalidInput, PayloadTooLarge
from partita_server.proto import open_inference_pb2 as pb
from partita_server.protocol import (
    DATATYPES,
    InferRequest,
    InferResponse,
    RequestedOutput,
    datatype_of,
    needs_no_tensors,
)
from partita_server.spec import Limits

__all__ = [
    "SERVICE",
    "decode_infer_request",
    "decode_infer_response",
    "encode_infer_request",
    "encode_infer_response",
    "http_status",
    "parameter_map",
    "status_code",
]

# The v2 service's name on the wire: method paths are /inference.GRPCInferenceService/NAME.
SERVICE = "inference.GRPCInferenceService"

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_STATUSES = {code: status for status, code in _CODES.items()}

# Typed `contents` field for each datatype (FP16 has none: raw only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def status_code(status: int) -> grpc.StatusCode:
    return _CODES.get(status, grpc.StatusCode.INTERNAL)


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status a gRPC code stands for (what the next stage's failure becomes here)."""
    return _STATUSES.get(code, 502)


def _value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def parameter_map(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {k: _value(v) for k, v in parameters.items()}


def _set_parameters(target: Any, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            slot.int64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        elif isinstance(value, str):
            slot.string_param = value
        else:  # structured values (a shard layout) travel as JSON text
            slot.string_param = orjson.dumps(value).decode()


def _tensor(
    name: str,
    datatype: str,
    shape: Any,
    contents: pb.InferTensorContents,
    raw: bytes | None,
    budget: int,
) -> np.ndarray:
    where = f"tensor {name!r}"
    if datatype not in DATATYPES:
        raise InvalidInput(
            f"{where}: datatype {datatype!r} unknown; use one of {sorted(DATATYPES)}"
        )
    dtype = DATATYPES[datatype]
    dims = tuple(int(d) for d in shape)
    if len(dims) > 32 or any(d < 0 or d > 2**31 - 1 for d in dims):
        raise InvalidInput(f"{where}: shape must be at most 32 integers in [0, 2147483647]")
    count = math.prod(dims)
    if count > budget:
        raise PayloadTooLarge(
            f"{where}: shape {list(dims)} has {count} elements, over the {budget} the request "
            "may still hold (server limit max_elements)"
        )
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"{where}: {len(raw)} raw bytes, shape {list(dims)} of {datatype} needs "
                f"{count * dtype.itemsize}"
            )
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(dims)
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidInput(f"{where}: {datatype} tensors must be sent in raw_input_contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInput(f"{where}: contents hold {len(values)} values, shape needs {count}")
    wide = np.array(values, dtype=np.int64 if dtype.kind == "i" else None)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInput(f"{where}: contents outside [{info.min}, {info.max}] of {datatype}")
    return wide.astype(dtype, copy=False).reshape(dims)


def decode_infer_request(request: pb.ModelInferRequest, limits: Limits) -> InferRequest:
    """A `ModelInferRequest` as the data plane's `InferRequest`; 4xx naming the tensor."""
    if not request.inputs and not needs_no_tensors(parameter_map(request.parameters)):
        raise InvalidInput("request 'inputs' must be a non-empty list of tensors")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, in order"
        )
    inputs: dict[str, np.ndarray] = {}
    input_parameters: dict[str, dict[str, Any]] = {}
    budget = limits.max_elements
    for i, tensor in enumerate(request.inputs):
        if not tensor.name:
            raise InvalidInput(f"inputs[{i}]: 'name' must be a non-empty string")
        if tensor.name in inputs:
            raise InvalidInput(f"tensor {tensor.name!r} is given twice")
        array = _tensor(
            tensor.name,
            tensor.datatype,
            tensor.shape,
            tensor.contents,
            raw[i] if raw else None,
            budget,
        )
        budget -= array.size
        inputs[tensor.name] = array
        if tensor.parameters:
            input_parameters[tensor.name] = parameter_map(tensor.parameters)
    outputs = None
    if request.outputs:
        names = [o.name for o in request.outputs]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise InvalidInput(f"output {twice!r} is requested twice")
        outputs = tuple(RequestedOutput(n, True) for n in names)
    return InferRequest(
        inputs,
        input_parameters,
        outputs,
        parameter_map(request.parameters),
        request.id or None,
    )


def encode_infer_response(response: InferResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version or "",
        id=response.id or "",
    )
    _set_parameters(message.parameters, response.parameters)
    for name, array in response.outputs.items():
        tensor = message.outputs.add(name=name, datatype=datatype_of(array.dtype))
        tensor.shape.extend(array.shape)
        _set_parameters(tensor.parameters, response.output_parameters.get(name, {}))
        message.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return message


def encode_infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    input_parameters: Mapping[str, Mapping[str, Any]],
    parameters: Mapping[str, Any] | None = None,
) -> pb.ModelInferRequest:
    """What a stage sends the next one over gRPC: raw tensors, all outputs wanted."""
    message = pb.ModelInferRequest(model_name=model)
    _set_parameters(message.parameters, parameters or {})
    for name, array in inputs.items():
        tensor = message.inputs.add(name=name, datatype=datatype_of(array.dtype))
        tensor.shape.extend(array.shape)
        _set_parameters(tensor.parameters, input_parameters.get(name, {}))
        message.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return message


def decode_infer_response(message: pb.ModelInferResponse) -> InferResponse:
    """The next stage's answer; malformed tensors raise `InvalidInput` (the caller makes it 502)."""
    raw = message.raw_output_contents
    if raw and len(raw) != len(message.outputs):
        raise InvalidInput(f"{len(raw)} raw outputs for {len(message.outputs)} output tensors")
    outputs: dict[str, np.ndarray] = {}
    output_parameters: dict[str, dict[str, Any]] = {}
    for i, tensor in enumerate(message.outputs):
        outputs[tensor.name] = _tensor(
            tensor.name, tensor.datatype, tensor.shape, tensor.contents,
            raw[i] if raw else None, 1 << 31,
        )  # fmt: skip
        if tensor.parameters:
            output_parameters[tensor.name] = parameter_map(tensor.parameters)
    parameters = parameter_map(message.parameters)
    return InferResponse(
        outputs, output_parameters, parameters, message.model_name, message.model_version or None
    )
