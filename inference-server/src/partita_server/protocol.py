"""The Open Inference Protocol (v2) codec: JSON tensors and the binary tensor extension.

Transport-neutral: bytes in, numpy arrays out and back. Binary tensors are decoded as numpy
views over the request body (no copy). Also the boundary codec that compresses float32
tensors between stages (fp16, or int8 with a per-tensor scale and zero point), signalled in
the tensor's parameters so the receiving stage decodes it.
"""

from __future__ import annotations

import math
from array import array as typed_array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from partita_server.errors import BadGateway, InvalidInput, PayloadTooLarge
from partita_server.spec import Compression, Limits

__all__ = [
    "DATATYPES",
    "DESCRIBE_PARAMETER",
    "HEADER_LENGTH",
    "LAYOUT_ID_PARAMETER",
    "LAYOUT_PARAMETER",
    "RUN_PARAMETER",
    "SEGMENT_PARAMETER",
    "SERVER_SECONDS_HEADER",
    "TIMEOUT_HEADER",
    "InferRequest",
    "InferResponse",
    "RequestedOutput",
    "compress",
    "datatype_of",
    "decode_request",
    "decode_response",
    "decompress",
    "describes",
    "encode_request",
    "encode_request_parts",
    "encode_response",
    "needs_no_tensors",
]

HEADER_LENGTH = "inference-header-content-length"
# The server's own time for a request (REST header, gRPC trailer): the caller subtracts it
# from its round trip to get the network time of the hop.
SERVER_SECONDS_HEADER = "partita-server-seconds"
# The time left for a request, in seconds, as a stage tells the next one (REST header).
TIMEOUT_HEADER = "partita-timeout"
# A shard server's layout of its stage (all of it, as `partita.model.types.layout_to_json`
# writes it), in its answer to a request with DESCRIBE_PARAMETER set: what the fan-out hop
# before it scatters, exchanges and gathers with.
LAYOUT_PARAMETER = "partita_layout"
DESCRIBE_PARAMETER = "partita_describe"
# In every answer of a shard server: the id of its layout (`layout_id`), which the fan-out
# hop checks against the layout it drives the shards with.
LAYOUT_ID_PARAMETER = "partita_layout_id"
# Which segment of the layout a request to a shard server runs (default 0).
SEGMENT_PARAMETER = "partita_segment"
# Which request of the server driving a sharded stage a shard's call belongs to: the shard
# keeps what it holds of the request under this id between the segments it runs.
RUN_PARAMETER = "partita_run"
CODEC = "partita_codec"
SCALE = "partita_scale"
ZERO_POINT = "partita_zero_point"

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_BY_NUMPY = {dt.name: name for name, dt in DATATYPES.items()}
_NO_LIMITS = Limits(
    max_body_bytes=2**31, max_json_bytes=2**31, max_elements=1 << 31, max_batch=1 << 20
)
MAX_DIM = 2**31 - 1


def datatype_of(dtype: np.dtype[Any] | str) -> str:
    """The v2 datatype name for a numpy dtype (name), e.g. float32 → FP32."""
    name = np.dtype(dtype).name
    if name not in _BY_NUMPY:
        raise InvalidInput(f"numpy dtype {name} has no v2 datatype")
    return _BY_NUMPY[name]


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A decoded v2 request: inputs as arrays (views over the body when binary)."""

    inputs: dict[str, np.ndarray]
    input_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: tuple[RequestedOutput, ...] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    @property
    def binary_default(self) -> bool:
        """`binary_data_output` asks for every output in binary unless named otherwise."""
        return self.parameters.get("binary_data_output") is True


@dataclass(frozen=True)
class InferResponse:
    outputs: dict[str, np.ndarray]
    output_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""
    model_version: str | None = None
    id: str | None = None


def _header(body: bytes, header_length: int | None, limits: Limits) -> tuple[Any, int]:
    if header_length is None:
        header_length = len(body)
    elif not 0 < header_length <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length {header_length} does not fit the {len(body)}-byte"
            " body; send the length of the JSON header in bytes"
        )
    if header_length > limits.max_json_bytes:
        raise PayloadTooLarge(
            f"JSON part of the request is {header_length} bytes, over the server's "
            f"{limits.max_json_bytes}-byte limit for JSON; send tensors in binary"
        )
    # Every JSON number but the last of an array is followed by a comma: bound the Python
    # objects orjson would create before it creates them (a header shorter than the bound
    # cannot hold that many commas, and counting a large one costs a millisecond).
    if header_length > limits.max_elements + 4096 and (
        body.count(b",", 0, header_length) > limits.max_elements + 4096
    ):
        raise PayloadTooLarge(
            f"the JSON request holds more than the server's {limits.max_elements} elements"
        )
    try:
        return orjson.loads(memoryview(body)[:header_length]), header_length
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request header is not valid JSON: {exc}") from exc


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    return value


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or len(value) > 32
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM
                   for d in value)
    ):  # fmt: skip
        raise InvalidInput(
            f"{where}: shape must be a list of at most 32 integers in [0, {MAX_DIM}]"
        )
    return tuple(value)


def _dtype(value: Any, where: str) -> np.dtype[Any]:
    if value == "BYTES":
        raise InvalidInput(f"{where}: BYTES tensors are not supported; send numeric tensors")
    if not isinstance(value, str) or value not in DATATYPES:
        raise InvalidInput(f"{where}: datatype {value!r} unknown; use one of {sorted(DATATYPES)}")
    return DATATYPES[value]


def _json_data(data: Any, dtype: np.dtype[Any], count: int, where: str) -> np.ndarray:
    """JSON numbers (flat or nested lists) as an array of `dtype`, refusing what would not
    survive the conversion: strings, ragged lists, integers out of the type's range."""
    if dtype.kind == "f" and type(data) is list:
        # A flat list of numbers straight into a C array: no float64 array in between, and
        # `array` refuses anything but numbers (nested lists, strings) as the path below does.
        try:
            flat = typed_array("d" if dtype.itemsize == 8 else "f", data)
        except (TypeError, OverflowError):
            pass  # nested, or not numbers: the general path says which
        else:
            if len(flat) == count:
                native = np.float64 if dtype.itemsize == 8 else np.float32
                return np.frombuffer(flat, native).astype(dtype, copy=False)
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"{where}: data is not a (nested) list of numbers ({exc})") from exc
    if array.size != count:
        raise InvalidInput(f"{where}: data has {array.size} elements, its shape needs {count}")
    if array.size == 0:
        return np.empty(0, dtype)
    kind = array.dtype.kind
    if dtype.kind == "b":
        if kind != "b":
            raise InvalidInput(f"{where}: BOOL data must be true/false")
    elif kind not in "biu" and not (kind == "f" and dtype.kind == "f"):
        wanted = "numbers" if dtype.kind == "f" else "integers"
        raise InvalidInput(f"{where}: data must be {wanted} for {datatype_of(dtype)}")
    if dtype.kind in "iu" and kind in "iu":
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(
                f"{where}: data outside [{info.min}, {info.max}] of {datatype_of(dtype)}"
            )
    return array.astype(dtype, copy=False)


def _tensor(
    entry: Any, where: str, body: bytes, offset: int, end: int, budget: int
) -> tuple[str, np.ndarray, dict[str, Any], int]:
    """Decode one tensor entry; returns (name, array, parameters, next binary offset).

    `end` is where the binary section ends, `budget` the elements this tensor may hold.
    """
    if not isinstance(entry, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    name = entry.get("name")
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise InvalidInput(f"{where}: 'name' must be a non-empty string (at most 1024 chars)")
    where = f"tensor {name!r}"
    dtype = _dtype(entry.get("datatype"), where)
    shape = _shape(entry.get("shape"), where)
    params = _mapping(entry.get("parameters"), f"{where}: parameters")
    count = math.prod(shape)
    if math.prod(d or 1 for d in shape) * dtype.itemsize >= 2**62:  # numpy cannot shape it
        raise InvalidInput(f"{where}: shape {list(shape)} is too large, even if empty")
    if count > budget:
        raise PayloadTooLarge(
            f"{where}: shape {list(shape)} has {count} elements, over the {budget} the request "
            "may still hold (server limit max_elements)"
        )
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"{where}: binary_data_size must be a non-negative integer")
        if "data" in entry:
            raise InvalidInput(f"{where}: give 'data' or parameters.binary_data_size, not both")
        if size != count * dtype.itemsize:
            raise InvalidInput(
                f"{where}: binary_data_size {size} != {count} elements x {dtype.itemsize} bytes"
                f" for shape {list(shape)}"
            )
        if offset + size > end:
            raise InvalidInput(
                f"{where}: binary data runs past the end of the body ({end - offset} bytes "
                f"left, {size} declared)"
            )
        if count == 0:
            return name, np.empty(shape, dtype=dtype), params, offset
        array = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape)
        return name, array, params, offset + size
    if "data" not in entry:
        raise InvalidInput(f"{where}: give 'data' or parameters.binary_data_size")
    return name, _json_data(entry["data"], dtype, count, where).reshape(shape), params, offset


def describes(parameters: object) -> bool:
    """Whether request `parameters` ask a shard server for its layout (no tensors needed)."""
    return isinstance(parameters, Mapping) and parameters.get(DESCRIBE_PARAMETER) is True


def needs_no_tensors(parameters: object) -> bool:
    """Whether a request with these `parameters` may come without tensors: a shard asked
    for its layout, or for a later segment of a request its peers sent no rows for."""
    return describes(parameters) or (
        isinstance(parameters, Mapping) and RUN_PARAMETER in parameters
    )


def decode_request(
    body: bytes, header_length: int | None = None, limits: Limits | None = None
) -> InferRequest:
    """Decode a v2 infer request body (JSON, or JSON header + binary tensors).

    Every refusal is an `InvalidInput` (400) or `PayloadTooLarge` (413) naming the tensor;
    nothing is allocated beyond what `limits` allow.
    """
    limits = limits or _NO_LIMITS
    if len(body) > limits.max_body_bytes:
        raise PayloadTooLarge(
            f"request body of {len(body)} bytes exceeds the {limits.max_body_bytes}-byte limit"
        )
    header, offset = _header(body, header_length, limits)
    if not isinstance(header, dict):
        raise InvalidInput("request must be a JSON object with 'inputs'")
    empty = needs_no_tensors(header.get("parameters"))
    entries = header.get("inputs", [] if empty else None)
    if not isinstance(entries, list) or not (entries or empty):
        raise InvalidInput("request 'inputs' must be a non-empty list of tensors")
    if len(entries) > 256:
        raise InvalidInput(f"request has {len(entries)} inputs; at most 256 are accepted")
    inputs: dict[str, np.ndarray] = {}
    input_parameters: dict[str, dict[str, Any]] = {}
    budget = limits.max_elements
    for i, entry in enumerate(entries):
        name, array, params, offset = _tensor(
            entry, f"inputs[{i}]", body, offset, len(body), budget
        )
        if name in inputs:
            raise InvalidInput(f"tensor {name!r} is given twice")
        budget -= array.size
        inputs[name] = array
        if params:
            input_parameters[name] = params
    if offset != len(body):
        raise InvalidInput(
            f"binary section has {len(body) - offset} bytes no input claims; check "
            "binary_data_size of each input"
        )
    outputs = _requested_outputs(header.get("outputs"))
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("request 'id' must be a string")
    parameters = _mapping(header.get("parameters"), "request parameters")
    return InferRequest(inputs, input_parameters, outputs, parameters, request_id)


def _requested_outputs(value: Any) -> tuple[RequestedOutput, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidInput("request 'outputs' must be a list")
    requested: dict[str, RequestedOutput] = {}
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidInput(f"outputs[{i}] must be an object with a string 'name'")
        params = _mapping(entry.get("parameters"), f"outputs[{i}].parameters")
        if entry["name"] in requested:
            raise InvalidInput(f"output {entry['name']!r} is requested twice")
        requested[entry["name"]] = RequestedOutput(entry["name"], params.get("binary_data") is True)
    return tuple(requested.values())


def _tensor_json(name: str, array: np.ndarray, params: Mapping[str, Any] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "datatype": datatype_of(array.dtype),
        "shape": list(array.shape),
    }
    if params:
        entry["parameters"] = dict(params)
    return entry


def _assemble(
    header: dict[str, Any],
    key: str,
    tensors: Mapping[str, np.ndarray],
    binary: Mapping[str, bool],
    params: Mapping[str, Mapping[str, Any]],
) -> tuple[list[bytes | memoryview], int | None]:
    """The JSON header and the tensors' bytes as they lie in memory (no copy)."""
    entries = []
    blobs: list[memoryview] = []
    for name, array in tensors.items():
        entry = _tensor_json(name, array, params.get(name))
        if binary.get(name, False):
            blob = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
            entry.setdefault("parameters", {})["binary_data_size"] = blob.nbytes
            blobs.append(blob)
        else:  # orjson writes numpy arrays natively, except float16
            flat = np.ascontiguousarray(array).ravel()
            entry["data"] = flat.astype(np.float32) if flat.dtype == np.float16 else flat
        entries.append(entry)
    header[key] = entries
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    return [head, *blobs], len(head) if blobs else None


def encode_response(
    response: InferResponse, binary: Mapping[str, bool]
) -> tuple[bytes, int | None]:
    """Encode a response; `binary[name]` picks the binary extension per output."""
    header: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        header["model_version"] = response.model_version
    if response.id is not None:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = response.parameters
    parts, header_length = _assemble(
        header, "outputs", response.outputs, binary, response.output_parameters
    )
    return b"".join(parts), header_length


def encode_request(
    inputs: Mapping[str, np.ndarray],
    *,
    input_parameters: Mapping[str, Mapping[str, Any]] | None = None,
    parameters: Mapping[str, Any] | None = None,
    outputs: Sequence[str] | None = None,
) -> tuple[bytes, int | None]:
    """Encode a binary request for the next stage, asking for binary outputs."""
    parts, header_length = encode_request_parts(
        inputs, input_parameters=input_parameters, parameters=parameters, outputs=outputs
    )
    return b"".join(parts), header_length


def encode_request_parts(
    inputs: Mapping[str, np.ndarray],
    *,
    input_parameters: Mapping[str, Mapping[str, Any]] | None = None,
    parameters: Mapping[str, Any] | None = None,
    outputs: Sequence[str] | None = None,
) -> tuple[list[bytes | memoryview], int | None]:
    """`encode_request` as its JSON header and views of the tensors' bytes, to be written
    to a socket as they are (a hop's tensor is not copied into one body first)."""
    header: dict[str, Any] = {"parameters": {**(parameters or {}), "binary_data_output": True}}
    if outputs is not None:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
    return _assemble(header, "inputs", inputs, dict.fromkeys(inputs, True), input_parameters or {})


def decode_response(body: bytes, header_length: int | None, *, stage: str) -> InferResponse:
    """Decode the next stage's response; anything malformed is that stage's fault (502)."""
    try:
        header, offset = _header(body, header_length, _NO_LIMITS)
        if not isinstance(header, dict) or not isinstance(header.get("outputs"), list):
            raise InvalidInput("response has no 'outputs' list")
        outputs: dict[str, np.ndarray] = {}
        output_parameters: dict[str, dict[str, Any]] = {}
        for i, entry in enumerate(header["outputs"]):
            name, array, params, offset = _tensor(
                entry, f"outputs[{i}]", body, offset, len(body), 1 << 31
            )
            outputs[name] = array
            if params:
                output_parameters[name] = params
        parameters = _mapping(header.get("parameters"), "response parameters")
    except (InvalidInput, PayloadTooLarge) as exc:
        raise BadGateway(f"stage {stage!r} sent an unusable response: {exc.message}") from exc
    return InferResponse(
        outputs,
        output_parameters,
        parameters,
        str(header.get("model_name", "")),
        header.get("model_version"),
        header.get("id"),
    )


def compress(array: np.ndarray, mode: Compression) -> tuple[np.ndarray, dict[str, Any]]:
    """Shrink a float32 boundary tensor for the wire; other dtypes go as they are."""
    if mode is Compression.NONE or array.dtype != np.float32 or array.size == 0:
        return array, {}
    if mode is Compression.FP16:
        return array.astype(np.float16), {CODEC: "fp16"}
    low, high = float(array.min()), float(array.max())
    low, high = min(low, 0.0), max(high, 0.0)  # keep 0 exact (ReLU activations)
    scale = (high - low) / 255.0 or 1.0
    zero_point = int(np.clip(round(-128 - low / scale), -128, 127))
    quantized = np.clip(np.rint(array / scale) + zero_point, -128, 127).astype(np.int8)
    return quantized, {CODEC: "int8", SCALE: scale, ZERO_POINT: zero_point}


def decompress(array: np.ndarray, params: Mapping[str, Any], *, name: str) -> np.ndarray:
    """Undo `compress` from the tensor's parameters; untouched when no codec is named."""
    codec = params.get(CODEC)
    if codec is None:
        return array
    if codec == "fp16" and array.dtype == np.float16:
        return array.astype(np.float32)
    if codec == "int8" and array.dtype == np.int8:
        scale, zero_point = params.get(SCALE), params.get(ZERO_POINT)
        if isinstance(scale, int | float) and isinstance(zero_point, int) and scale > 0:
            return (array.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)
        raise InvalidInput(f"tensor {name!r}: int8 codec needs a positive scale and int zero point")
    raise InvalidInput(f"tensor {name!r}: codec {codec!r} does not fit datatype {array.dtype.name}")
