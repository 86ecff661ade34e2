"""Stages chained over real sockets: vertical cuts, shards, cascade, and the hop failures."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from stage_servers import CLS, CLS_OUT, GRPC, NSFW, TOKEN, Serve, free_port, host_of

from cluster_helpers import eventually
from partita.model.types import layout_from_json
from partita.runtime import Session
from partita_server.spec import StageTokens

pytestmark = pytest.mark.skipif(not NSFW.exists(), reason="model wheels not installed")

CUT_A, CUT_B = "/Relu_42_output_0", "/Relu_45_output_0"


def _hop(stage: str, *urls: str, **kw: object) -> dict[str, object]:
    return {"stage": stage, "endpoints": list(urls), **kw}


def _infer(url: str, model: str, name: str, x: np.ndarray) -> triton.InferResult:
    client = triton.InferenceServerClient(host_of(url), network_timeout=60)
    tensor = triton.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    return client.infer(model, [tensor])


SHAPES = {"input_0": [1, 224, 224, 3]}
INTERNAL = {"token": TOKEN, "entry": False, "input_shapes": SHAPES}


def _whole(x: np.ndarray) -> np.ndarray:
    return Session(NSFW, intra_op_threads=1).run({"input_0": x})["4195"]


def test_three_stage_chain_equals_the_whole_model(serve: Serve) -> None:
    s2 = serve(NSFW, "nsfw", stage="s2", inputs=[CUT_B], outputs=["4195"], **INTERNAL)
    s1 = serve(
        NSFW, "nsfw", stage="s1", inputs=[CUT_A], outputs=[CUT_B], next=[_hop("s2", s2)],
        **INTERNAL,
    )  # fmt: skip
    entry = {"token": TOKEN, "inputs": ["input_0"], "outputs": [CUT_A], "input_shapes": SHAPES}
    s0 = serve(NSFW, "nsfw", stage="s0", next=[_hop("s1", s1)], **entry)
    s0_int8 = serve(NSFW, "nsfw", stage="s0", next=[_hop("s1", s1, compression="int8")], **entry)

    x = np.random.default_rng(7).random((1, 224, 224, 3), dtype=np.float32)
    whole = _whole(x)
    chained = _infer(s0, "nsfw", "input_0", x).as_numpy("4195")
    np.testing.assert_allclose(chained, whole, rtol=1e-4, atol=1e-5)
    compressed = _infer(s0_int8, "nsfw", "input_0", x).as_numpy("4195")
    np.testing.assert_allclose(compressed, whole, atol=0.05)

    # The entry stage tells clients the chain's final outputs, and measures its hop.
    meta = triton.InferenceServerClient(host_of(s0)).get_model_metadata("nsfw")
    assert [o["name"] for o in meta["outputs"]] == ["4195"]
    plain = _hop_bytes(s0)
    assert plain > 3.5 * _hop_bytes(s0_int8) > 0  # float32 vs int8 on the wire
    # The internal stages refuse a client that skips the entry stage.
    assert httpx.post(f"{s1}/v2/models/nsfw/infer", json={"inputs": []}).status_code == 401


def _hop_bytes(url: str, stage: str | None = None) -> float:
    """Bytes the server sent on its hops (to `stage` only, when named), every endpoint."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("partita_hop_bytes_total{") and (
            stage is None or f'next_stage="{stage}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _calls(url: str) -> float:
    """Inference runs a server made (partita_compute_seconds' count)."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("partita_compute_seconds_count"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_sharded_stage_equals_the_whole_model(serve: Serve) -> None:
    """Shards and cut stages with batching on (their batch dimension freed and checked row
    for row at start-up); concurrent requests come back each with its own answer."""
    batching = {"batching": {"max_batch_size": 4}}
    s2 = serve(NSFW, "nsfw", stage="s2", inputs=[CUT_B], outputs=["4195"], **INTERNAL,
               **batching)  # fmt: skip
    shards = [
        serve(
            NSFW,
            "nsfw",
            stage="s1",
            inputs=[CUT_A],
            outputs=[CUT_B],
            shard={"index": i, "proportions": [0.6, 0.4]},
            **INTERNAL,
            **batching,
        )
        for i in range(2)
    ]
    s0 = serve(
        NSFW, "nsfw", stage="s0", token=TOKEN, inputs=["input_0"], outputs=[CUT_A],
        input_shapes=SHAPES, next=[_hop("s1", *shards, fan_out=True), _hop("s2", s2)],
        **batching,
    )  # fmt: skip
    xs = [np.random.default_rng(8 + i).random((1, 224, 224, 3), dtype=np.float32)
          for i in range(4)]  # fmt: skip
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda x: _infer(s0, "nsfw", "input_0", x).as_numpy("4195"), xs))
    for x, answer in zip(xs, answers, strict=True):
        np.testing.assert_allclose(answer, _whole(x), rtol=1e-4, atol=1e-5)
    # The stage splits in tiles that swap halo rows between two segments: s0 drove the
    # shards segment by segment, not one whole-input call each.
    meta = httpx.get(f"{shards[0]}/v2/models/nsfw", headers={"authorization": f"Bearer {TOKEN}"})
    layout = meta.json()["parameters"]["partita_layout"]
    assert layout["strategy"] == "tile" and len(layout["segments"]) == 2
    assert layout["segments"][0]["exchanges"] and not layout["whole_inputs"]
    assert _calls(shards[1]) >= 2 * len(xs)
    # The shards keep their tensors between the segments: s0 sent them their input pieces
    # and the halo rows they swap, not every tensor the second segment reads.
    sent = _hop_bytes(s0, "s1") / len(xs)
    planned = layout_from_json(layout)
    pieces = sum(sum(x.shard_bytes) for x in planned.scatter)
    rows = sum(sum(x.received_bytes) for x in planned.exchanges)
    feeds = sum(x.row_bytes * x.shape[x.axis] for x in planned.exchanges)
    assert pieces + rows <= sent < pieces + rows + 16_384 < pieces + feeds
    # A shard asked for a later segment of a request it does not hold says so (the
    # server driving it then runs the request again).
    lost = httpx.post(
        f"{shards[1]}/v2/models/nsfw/infer",
        json={"inputs": [], "parameters": {"partita_segment": 1, "partita_run": "gone"}},
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    assert lost.status_code == 409, lost.text
    assert "holds no request 'gone'" in lost.json()["error"]
    # A server in front of shards that end the chain (as the operator's gateway is when the
    # plan is one sharded stage) tells clients the stage's outputs, shaped as answered.
    [stage_in] = meta.json()["inputs"]
    assert stage_in["name"] == CUT_A
    gw = serve(NSFW, "nsfw", stage="gw", token=TOKEN, inputs=[CUT_A], outputs=[CUT_A],
               input_shapes=SHAPES, next=[_hop("s1", *shards, fan_out=True)])  # fmt: skip
    told = triton.InferenceServerClient(host_of(gw)).get_model_metadata("nsfw")
    [out] = told["outputs"]
    cut_a = np.random.default_rng(3).random(stage_in["shape"], dtype=np.float32)
    answer = _infer(gw, "nsfw", CUT_A, cut_a).as_numpy(CUT_B)
    assert out["name"] == CUT_B and answer is not None
    assert (out["datatype"], out["shape"]) == ("FP32", list(answer.shape))


def _cls_call(url: str) -> triton.InferResult:
    x = np.zeros((1, 3, 48, 192), dtype=np.float32)  # the classifier is unsure: ~0.5/0.5
    return _infer(url, "cls", "x", x)


def test_cascade_answers_locally_above_threshold_and_forwards_below(serve: Serve) -> None:
    cloud = serve(CLS, "cls", stage="cloud", token=TOKEN, entry=False)
    cascade = {"output": CLS_OUT}
    sure = serve(CLS, "cls", stage="edge", token=TOKEN, next=[_hop("cloud", cloud)],
                 cascade={**cascade, "threshold": 0.3})  # fmt: skip
    unsure = serve(CLS, "cls", stage="edge", token=TOKEN, next=[_hop("cloud", cloud)],
                   cascade={**cascade, "threshold": 0.99})  # fmt: skip

    local = _cls_call(sure)
    assert local.get_response()["parameters"]["partita_cascade"] == "local"
    forwarded = _cls_call(unsure)
    assert forwarded.get_response()["parameters"]["partita_cascade"] == "forwarded"
    np.testing.assert_allclose(local.as_numpy(CLS_OUT), forwarded.as_numpy(CLS_OUT), rtol=1e-5)
    cloud_metrics = httpx.get(f"{cloud}/metrics").text
    assert 'partita_requests_total{code="200",model="cls",stage="cloud"} 1.0' in cloud_metrics
    assert 'partita_cascade_offload_ratio{model="cls",stage="edge"} 1.0' in (
        httpx.get(f"{unsure}/metrics").text
    )
    assert 'partita_cascade_offload_ratio{model="cls",stage="edge"} 0.0' in (
        httpx.get(f"{sure}/metrics").text
    )


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A real listening socket that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_next_stage_down_retries_another_endpoint_then_503(serve: Serve) -> None:
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    cloud = serve(CLS, "cls", stage="cloud", token=TOKEN, entry=False)
    unsure = {"output": CLS_OUT, "threshold": 0.99}  # forwards its inputs to the cloud
    retried = serve(
        CLS, "cls", stage="edge", token=TOKEN, next=[_hop("cloud", dead[0], cloud)], cascade=unsure
    )
    assert _cls_call(retried).as_numpy(CLS_OUT).shape == (1, 2)
    down = serve(CLS, "cls", stage="edge", token=TOKEN, next=[_hop("cloud", *dead)], cascade=unsure)
    body = {"inputs": [{"name": "x", "shape": [1, 3, 4, 4], "datatype": "FP32",
                        "data": [0.0] * 48}]}  # fmt: skip
    reply = httpx.post(f"{down}/v2/models/cls/infer", json=body)
    assert reply.status_code == 503
    assert "'cloud'" in reply.json()["error"] and dead[1] in reply.json()["error"]


def test_next_stage_timeout_is_504_naming_the_stage(serve: Serve, silent_endpoint: str) -> None:
    edge = serve(CLS, "cls", stage="edge", next=[_hop("cloud", silent_endpoint, timeout_s=0.3)])
    body = {"inputs": [{"name": "x", "shape": [1, 3, 4, 4], "datatype": "FP32",
                        "data": [0.0] * 48}]}  # fmt: skip
    reply = httpx.post(f"{edge}/v2/models/cls/infer", json=body)
    assert reply.status_code == 504
    assert "'cloud'" in reply.json()["error"]
    # Errors further down the chain come back with their own status and stage name.
    cascade = {"output": CLS_OUT, "threshold": 0.99}  # forwards its own inputs to edge
    front = serve(CLS, "cls", stage="front", next=[_hop("edge", edge)], cascade=cascade)
    reply = httpx.post(f"{front}/v2/models/cls/infer", json=body)
    assert reply.status_code == 504 and "'cloud'" in reply.json()["error"]


def test_token_mismatch_between_stages_is_reported_not_hidden(serve: Serve) -> None:
    cloud = serve(CLS, "cls", stage="cloud", token=TOKEN, entry=False)
    edge = serve(CLS, "cls", stage="edge", token="another", next=[_hop("cloud", cloud)])
    body = {"inputs": [{"name": "x", "shape": [1, 3, 4, 4], "datatype": "FP32",
                        "data": [0.0] * 48}]}  # fmt: skip
    reply = httpx.post(f"{edge}/v2/models/cls/infer", json=body)
    assert reply.status_code == 502 and "401" in reply.json()["error"]


def _grpc(url: str) -> str:
    return f"grpc://{GRPC[url]}"


def test_hops_over_grpc_chain_and_fan_out_like_rest(serve: Serve) -> None:
    """The same three stages, the hops over gRPC: a chain, then a fan-out to two shards
    that split the stage's channels (two segments, a sum exchanged between them)."""
    s2 = serve(NSFW, "nsfw", stage="s2", inputs=[CUT_B], outputs=["4195"], **INTERNAL)
    s1 = serve(NSFW, "nsfw", stage="s1", inputs=[CUT_A], outputs=[CUT_B],
               next=[_hop("s2", _grpc(s2))], **INTERNAL)  # fmt: skip
    entry = {"token": TOKEN, "inputs": ["input_0"], "outputs": [CUT_A], "input_shapes": SHAPES}
    s0 = serve(NSFW, "nsfw", stage="s0", next=[_hop("s1", _grpc(s1), compression="fp16")],
               **entry)  # fmt: skip
    shards = [
        serve(NSFW, "nsfw", stage="s1", inputs=[CUT_A], outputs=[CUT_B],
              shard={"index": i, "proportions": [0.6, 0.4], "strategy": "width"}, **INTERNAL)
        for i in range(2)
    ]  # fmt: skip
    fan = serve(NSFW, "nsfw", stage="s0", next=[
        _hop("s1", *map(_grpc, shards), fan_out=True), _hop("s2", _grpc(s2))], **entry)  # fmt: skip
    x = np.random.default_rng(9).random((1, 224, 224, 3), dtype=np.float32)
    whole = _whole(x)
    np.testing.assert_allclose(_infer(s0, "nsfw", "input_0", x).as_numpy("4195"), whole,
                               atol=2e-3)  # fp16 on the first hop  # fmt: skip
    np.testing.assert_allclose(_infer(fan, "nsfw", "input_0", x).as_numpy("4195"), whole,
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    meta = triton.InferenceServerClient(host_of(s0)).get_model_metadata("nsfw")
    assert [o["name"] for o in meta["outputs"]] == ["4195"]  # asked over gRPC
    assert 0 < _hop_bytes(s0) < 0.6 * _hop_bytes(fan)  # fp16 vs float32 on the wire


def test_grpc_hop_errors_come_back_with_the_stage_named(serve: Serve) -> None:
    cloud = serve(CLS, "cls", stage="cloud", token=TOKEN, entry=False)
    unsure = {"output": CLS_OUT, "threshold": 0.99}
    wrong = serve(CLS, "cls", stage="edge", token="another", next=[_hop("cloud", _grpc(cloud))],
                  cascade=unsure)  # fmt: skip
    reply = httpx.post(f"{wrong}/v2/models/cls/infer", json=_small())
    assert reply.status_code == 502 and "'cloud'" in reply.json()["error"]
    assert "PARTITA_INTERNAL_TOKEN" in reply.json()["error"]
    dead = f"grpc://127.0.0.1:{free_port()}"
    down = serve(CLS, "cls", stage="edge", token=TOKEN, next=[_hop("cloud", dead)],
                 cascade=unsure)  # fmt: skip
    reply = httpx.post(f"{down}/v2/models/cls/infer", json=_small())
    assert reply.status_code == 503 and dead in reply.json()["error"]


def _small() -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": [1, 3, 4, 4], "datatype": "FP32",
                        "data": [0.0] * 48}]}  # fmt: skip


def test_every_hop_keeps_within_the_request_deadline(serve: Serve, silent_endpoint: str) -> None:
    """A next stage that never answers: the hop's own 30 s timeout is cut to what is left of
    the request's deadline, from the spec or from the caller."""
    grpc_silent = silent_endpoint.replace("http://", "grpc://")
    for endpoint in (silent_endpoint, grpc_silent):
        edge = serve(CLS, "cls", stage="edge", deadline_s=0.4, next=[_hop("cloud", endpoint)])
        reply = httpx.post(f"{edge}/v2/models/cls/infer", json=_small(), timeout=20)
        assert reply.status_code == 504, reply.text
        assert "'cloud'" in reply.json()["error"] and "within 0." in reply.json()["error"]
    patient = serve(CLS, "cls", stage="edge", next=[_hop("cloud", silent_endpoint)])
    reply = httpx.post(f"{patient}/v2/models/cls/infer", json=_small(),
                       headers={"partita-timeout": "0.3"}, timeout=20)  # fmt: skip
    assert reply.status_code == 504 and "within 0." in reply.json()["error"]
    bad = httpx.post(f"{patient}/v2/models/cls/infer", json=_small(),
                     headers={"partita-timeout": "soon"})  # fmt: skip
    assert bad.status_code == 400 and "partita-timeout" in bad.json()["error"]


def test_tokens_rotate_under_load_without_a_failed_request(serve: Serve, tmp_path: Path) -> None:
    """Both stages read their token file; a client keeps calling the entry stage while the
    file goes old -> old,new -> new,old -> new. Every request succeeds."""
    files = {name: tmp_path / name for name in ("edge", "cloud")}
    for file in files.values():
        file.write_text("old\n")
    tokens = {n: StageTokens(file=f, recheck_s=0.05) for n, f in files.items()}
    cloud = serve(CLS, "cls", stage="cloud", tokens=tokens["cloud"], entry=False)
    edge = serve(CLS, "cls", stage="edge", tokens=tokens["edge"], next=[_hop("cloud", cloud)],
                 cascade={"output": CLS_OUT, "threshold": 0.99})  # fmt: skip
    codes: list[int] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                codes.append(http.post(f"{edge}/v2/models/cls/infer", json=_small()).status_code)

    worker = threading.Thread(target=client)
    worker.start()
    try:
        for text, sent in (("old\nnew\n", "old"), ("new\nold\n", "new"), ("new\n", "new")):
            for file in (files["cloud"], files["edge"]):  # receivers learn first
                file.write_text(text)
            seen = len(codes)
            _eventually(
                lambda s=sent, t=text: all(
                    k.current == s and k.accepts("new") and k.accepts("old") == ("old" in t)
                    for k in tokens.values()
                )
            )
            _eventually(lambda s=seen: len(codes) > s + 5)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert len(codes) > 15 and set(codes) == {200}, sorted(set(codes))
    assert not tokens["cloud"].accepts("old")


def _eventually(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    eventually(condition, timeout_s, "condition", interval=0.01)
