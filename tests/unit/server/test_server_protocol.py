"""The v2 codec and the boundary codec, without a server: pure bytes in, arrays out."""

from __future__ import annotations

import contextlib

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partita_server.errors import BadGateway, InvalidInput
from partita_server.protocol import (
    DATATYPES,
    InferResponse,
    compress,
    decode_request,
    decode_response,
    decompress,
    encode_request,
    encode_response,
)
from partita_server.spec import Compression


def test_binary_inputs_are_views_over_the_body() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    mask = np.array([1, 0, 1], dtype=np.int64)
    body, length = encode_request({"x": x, "mask": mask})
    decoded = decode_request(body, length)
    np.testing.assert_array_equal(decoded.inputs["x"], x)
    np.testing.assert_array_equal(decoded.inputs["mask"], mask)
    assert decoded.inputs["x"].base is not None and not decoded.inputs["x"].flags.owndata
    assert np.shares_memory(decoded.inputs["x"], np.frombuffer(body, np.uint8))
    assert decoded.binary_default


def test_json_and_mixed_requests_decode_with_their_datatypes() -> None:
    header = {
        "id": "r1",
        "inputs": [
            {"name": "a", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]},
            {"name": "b", "shape": [2], "datatype": "FP16", "parameters": {"binary_data_size": 4}},
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
    }
    head = orjson.dumps(header)
    decoded = decode_request(head + np.array([1.5, -2], np.float16).tobytes(), len(head))
    assert decoded.inputs["a"].dtype == np.int32 and decoded.inputs["a"].shape == (2, 2)
    np.testing.assert_array_equal(decoded.inputs["b"], [1.5, -2])
    assert [(o.name, o.binary) for o in decoded.outputs or ()] == [("y", True), ("z", False)]
    assert decoded.id == "r1"


@pytest.mark.parametrize(
    ("body", "length", "fragment"),
    [
        (b"[1, 2]", None, "'inputs'"),
        (b"{", None, "not valid JSON"),
        (b'{"inputs": [{"name": "t", "shape": [2], "datatype": "FP32", "data": [1]}]}', None,
         "'t'"),
        (b'{"inputs": [{"name": "t", "shape": [-1], "datatype": "FP32", "data": []}]}', None,
         r"at most 32 integers"),
        (b'{"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}', None,
         "BYTES"),
        (b'{"inputs": [{"name": "t", "shape": [1], "datatype": "INT8", "data": [999]}]}', None,
         "'t'"),
        (b'{"inputs": [{"name": "t", "shape": [2], "datatype": "FP32", '
         b'"parameters": {"binary_data_size": 8}}]}' + b"\0" * 4, 100, "past the end"),
        (b'{"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [1]}]}xx', 74,
         "2 bytes"),
        (b"{}", 99, "does not fit"),
    ],
)  # fmt: skip
def test_malformed_requests_are_invalid_input(
    body: bytes, length: int | None, fragment: str
) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        decode_request(body, length)


@settings(max_examples=40, deadline=None)
@given(
    header=st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**63 - 1)  # what JSON encoders carry
        | st.floats()
        | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=12,
    ),
    tail=st.binary(max_size=16),
)
def test_any_json_header_is_decoded_or_refused_as_invalid_input(
    header: object, tail: bytes
) -> None:
    head = orjson.dumps(header)
    for body, length in ((head, None), (head + tail, len(head))):
        with contextlib.suppress(InvalidInput):
            decode_request(body, length)


@settings(max_examples=30, deadline=None)
@given(
    datatype=st.sampled_from(sorted(DATATYPES)),
    shape=st.lists(st.integers(0, 4), max_size=3),
    binary=st.booleans(),
)
def test_responses_round_trip_in_json_and_binary(
    datatype: str, shape: list[int], binary: bool
) -> None:
    array = (np.arange(int(np.prod(shape)), dtype=np.int64) % 3).astype(DATATYPES[datatype])
    array = array.reshape(shape)
    response = InferResponse({"y": array}, model_name="m", parameters={"k": 1})
    body, length = encode_response(response, {"y": binary})
    assert (length is not None) == binary
    back = decode_response(body, length, stage="next")
    assert back.outputs["y"].dtype == array.dtype and back.outputs["y"].shape == array.shape
    np.testing.assert_array_equal(back.outputs["y"], array)
    assert back.parameters == {"k": 1}


def test_garbage_from_the_next_stage_is_a_bad_gateway_naming_it() -> None:
    with pytest.raises(BadGateway, match="'s2'"):
        decode_response(b'{"outputs": 3}', None, stage="s2")


def test_boundary_codecs_shrink_float32_and_decode_close() -> None:
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    x[0, :8] = 0.0
    half, p16 = compress(x, Compression.FP16)
    assert half.dtype == np.float16
    np.testing.assert_allclose(decompress(half, p16, name="x"), x, atol=2e-3)
    q, p8 = compress(x, Compression.INT8)
    assert q.dtype == np.int8 and q.nbytes == x.nbytes // 4
    back = decompress(q, p8, name="x")
    assert back.dtype == np.float32
    assert np.max(np.abs(back - x)) <= p8["partita_scale"] / 2 + 1e-6
    assert np.all(back[0, :8] == 0.0)  # zero stays exact (ReLU activations)
    ints = np.arange(4)
    assert compress(ints, Compression.INT8) == (ints, {})
    with pytest.raises(InvalidInput, match="'x'"):
        decompress(q, {"partita_codec": "int8", "partita_scale": -1.0}, name="x")


def test_limits_refuse_before_the_json_becomes_python_objects() -> None:
    from partita_server.errors import PayloadTooLarge
    from partita_server.spec import Limits

    limits = Limits(max_elements=1000, max_json_bytes=1 << 20)
    bomb = b'{"inputs":[{"name":"t","shape":[1],"datatype":"FP32","data":[' + b"0," * 6000
    with pytest.raises(PayloadTooLarge, match="1000 elements"):
        decode_request(bomb + b"0]}]}", None, limits)
    big = orjson.dumps({"inputs": [{"name": "t", "shape": [2000], "datatype": "FP32",
                                    "parameters": {"binary_data_size": 8000}}]})  # fmt: skip
    with pytest.raises(PayloadTooLarge, match="'t'"):
        decode_request(big + b"\0" * 8000, len(big), limits)
    two = orjson.dumps(
        {
            "inputs": [
                {"name": n, "shape": [600], "datatype": "FP32", "data": [0.0] * 600} for n in "ab"
            ]
        }
    )
    with pytest.raises(PayloadTooLarge, match="'b'"):  # the budget is for all inputs together
        decode_request(two, None, limits)
    with pytest.raises(PayloadTooLarge, match="JSON"):
        decode_request(two, None, Limits(max_json_bytes=1024))


_tensor_entries = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["a", "b", ""]),
        "datatype": st.sampled_from([*sorted(DATATYPES), "BYTES", "FP8"]),
        "shape": st.lists(st.integers(-1, 2**31), max_size=4),
    },
    optional={
        "data": st.recursive(
            st.integers(-300, 300) | st.floats() | st.booleans() | st.text(max_size=2),
            lambda inner: st.lists(inner, max_size=5), max_leaves=20),
        "parameters": st.fixed_dictionaries({}, optional={
            "binary_data_size": st.integers(-1, 64) | st.booleans() | st.text(max_size=2)}),
    },
)  # fmt: skip


@settings(max_examples=120, deadline=None)
@given(
    entries=st.lists(_tensor_entries, min_size=1, max_size=3),
    tail=st.binary(max_size=64),
    lie=st.integers(-8, 8),
)
def test_structured_requests_decode_to_their_shapes_or_a_4xx(
    entries: list[dict[str, object]], tail: bytes, lie: int
) -> None:
    """Near-valid requests with lying sizes, shapes and datatypes: either every tensor has the
    shape it declared within the element limit, or the refusal is a 4xx, nothing else."""
    from partita_server.errors import PayloadTooLarge
    from partita_server.spec import Limits

    limits = Limits(max_elements=4096, max_json_bytes=1 << 16)
    head = orjson.dumps({"inputs": entries})
    for body, length in ((head, None), (head + tail, len(head) + lie)):
        try:
            decoded = decode_request(body, length, limits)
        except (InvalidInput, PayloadTooLarge):
            continue
        total = 0
        for entry in entries:
            array = decoded.inputs[str(entry["name"])]
            assert list(array.shape) == entry["shape"]
            assert array.dtype == DATATYPES[str(entry["datatype"])]
            total += array.size
        assert total <= limits.max_elements


@settings(max_examples=300, deadline=None)
@given(
    entries=st.lists(
        st.tuples(st.sampled_from(["a", "b", ""]), st.sampled_from([*DATATYPES, "BYTES"]),
                  st.lists(st.integers(0, 2**31), max_size=3), st.binary(max_size=24) | st.none(),
                  st.lists(st.integers(-(2**31), 2**31 - 1), max_size=6)),
        min_size=0, max_size=3),
    extra_raw=st.booleans(),
)  # fmt: skip
def test_grpc_requests_decode_to_their_shapes_or_a_4xx(
    entries: list[tuple[str, str, list[int], bytes | None, list[int]]], extra_raw: bool
) -> None:
    from partita_server.errors import PayloadTooLarge
    from partita_server.grpc_codec import decode_infer_request
    from partita_server.proto import open_inference_pb2 as pb
    from partita_server.spec import Limits

    request = pb.ModelInferRequest(model_name="m")
    raws = [raw for *_, raw, _ in entries if raw is not None]
    for name, datatype, shape, _, ints in entries:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        tensor.contents.int_contents.extend(ints)
    if len(raws) == len(entries) or extra_raw:
        request.raw_input_contents.extend(raws)
    try:
        decoded = decode_infer_request(request, Limits(max_elements=4096))
    except (InvalidInput, PayloadTooLarge):
        return
    for name, datatype, shape, *_ in entries:
        assert list(decoded.inputs[name].shape) == shape
        assert decoded.inputs[name].dtype == DATATYPES[datatype]


def test_json_floats_decode_flat_or_nested_and_anything_else_is_refused_by_name() -> None:
    def body(data: object, datatype: str = "FP32", shape: list[int] | None = None) -> bytes:
        tensor = {"name": "x", "datatype": datatype, "shape": shape or [2, 2], "data": data}
        return orjson.dumps({"inputs": [tensor]})

    values = [0.5, -1, 3.25, True]
    flat = decode_request(body(values)).inputs["x"]
    nested = decode_request(body([[0.5, -1], [3.25, True]])).inputs["x"]
    for array in (flat, nested):
        assert array.dtype == np.float32 and array.shape == (2, 2)
        np.testing.assert_array_equal(array, np.array([[0.5, -1], [3.25, 1]], np.float32))
    half = decode_request(body(values, "FP16")).inputs["x"]
    assert half.dtype == np.float16 and half.tolist() == [[0.5, -1], [3.25, 1]]
    for bad in ([0.5, "1", 2.0, 3.0], [0.5, None, 2.0, 3.0], [1.0, 2.0, 3.0], [[1.0], 2.0, 3, 4]):
        with pytest.raises(InvalidInput, match="'x'"):
            decode_request(body(bad))


def test_a_shape_numpy_cannot_hold_is_refused_even_when_empty() -> None:
    entry = {"name": "x", "datatype": "FP32", "shape": [0, 2**31 - 1, 2**31 - 1], "data": []}
    with pytest.raises(InvalidInput, match="too large"):
        decode_request(orjson.dumps({"inputs": [entry]}))
