"""Model sources confined, by the operator's fetch and by the stage servers' own:
file paths inside the model store, external data inside the model's directory, http(s) never
to metadata or link-local addresses (also not by a redirect), sizes limited while streaming;
the operator's distribution waited for while it restarts.

Only loopback is contacted: a refused address is refused before any connection."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from stage_servers import CLS, spec_for

from partita.kube.fetch import FetchError, FetchReason, ModelFetcher
from partita_server.errors import StageSpecError
from partita_server.fetch import download, from_operator
from partita_server.spec import ModelSource, OrtSizing
from partita_server.stage import load_stage

ONE = OrtSizing.for_cores(1)


class _Site(http.server.BaseHTTPRequestHandler):
    """/model: the classifier; /chunked: the same bytes with no Content-Length;
    /redirect-to?url=...: a 302 to that URL."""

    def do_GET(self) -> None:  # the handler's method name
        blob = CLS.read_bytes()
        if self.path == "/model":
            self.send_response(200)
            self.send_header("content-length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob)
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(0, len(blob), 1 << 16):
                part = blob[i : i + (1 << 16)]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path.startswith("/redirect-to?url="):
            self.send_response(302)
            self.send_header("location", self.path.split("=", 1)[1])
            self.send_header("content-length", "0")
            self.end_headers()
        else:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def site() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


DIGEST = hashlib.sha256(CLS.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "uri",
    ["http://169.254.169.254/latest/meta-data", "http://[fe80::1]/m.onnx",
     "http://metadata.google.internal/computeMetadata/v1/", "http://0.0.0.0:1/m.onnx"],
)  # fmt: skip
def test_metadata_and_link_local_sources_are_refused(tmp_path: Path, uri: str) -> None:
    with pytest.raises(FetchError) as caught:
        ModelFetcher(tmp_path, allow_link_local=False).fetch(uri, DIGEST)
    assert caught.value.reason is FetchReason.FORBIDDEN and "source.uri" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_a_redirect_to_a_refused_address_is_not_followed(tmp_path: Path, site: str) -> None:
    uri = f"{site}/redirect-to?url=http://169.254.169.254/latest/meta-data"
    with pytest.raises(FetchError) as caught:
        ModelFetcher(tmp_path, allow_link_local=False).fetch(uri, DIGEST)
    assert caught.value.reason is FetchReason.FORBIDDEN
    assert "169.254.169.254" in str(caught.value) and "may not reach" in str(caught.value)
    ok = ModelFetcher(tmp_path).fetch(f"{site}/redirect-to?url={site}/model", DIGEST)
    assert ok.path.read_bytes() == CLS.read_bytes()


def test_size_limit_holds_while_streaming_without_a_declared_length(
    tmp_path: Path, site: str
) -> None:
    small = ModelFetcher(tmp_path / "c", max_bytes=100_000)
    for path in ("/model", "/chunked"):  # declared too large, then found too large mid-stream
        with pytest.raises(FetchError) as caught:
            small.fetch(f"{site}{path}", DIGEST)
        assert caught.value.reason is FetchReason.TOO_LARGE
    assert [p for p in (tmp_path / "c").iterdir()] == []
    assert ModelFetcher(tmp_path / "d").fetch(f"{site}/chunked", DIGEST).size == CLS.stat().st_size


def test_file_sources_stay_inside_the_model_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "cls.onnx").write_bytes(CLS.read_bytes())
    (store / "elsewhere.onnx").symlink_to(CLS)
    fetcher = ModelFetcher(tmp_path / "cache", model_store=store)
    assert fetcher.fetch((store / "cls.onnx").as_uri(), DIGEST).size == CLS.stat().st_size
    for outside in (CLS.as_uri(), (store / "elsewhere.onnx").as_uri(),
                    f"file://{store}/../store/../{CLS.name}"):  # fmt: skip
        with pytest.raises(FetchError) as caught:
            ModelFetcher(tmp_path / "c2", model_store=store).fetch(outside, DIGEST)
        assert caught.value.reason is FetchReason.FORBIDDEN and "model store" in str(caught.value)


def test_the_stage_server_applies_the_same_rules(
    tmp_path: Path, site: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "cls.onnx").write_bytes(CLS.read_bytes())
    monkeypatch.setenv("PARTITA_MODEL_STORE", str(store))
    assert load_stage(spec_for(store / "cls.onnx", "cls", tmp_path), sizing=ONE).batchable
    with pytest.raises(StageSpecError, match="outside the model store"):
        load_stage(spec_for(CLS, "cls", tmp_path), sizing=ONE)
    spec = spec_for(CLS, "cls", tmp_path)
    redirect = f"{site}/redirect-to?url=http://169.254.169.254/"
    remote = spec.model_copy(update={"source": ModelSource(uri=redirect, sha256=DIGEST)})
    with pytest.raises(StageSpecError, match="may not reach"):
        load_stage(remote, sizing=ONE)
    for path in ("/model", "/chunked"):
        with pytest.raises(StageSpecError, match="larger than the server's limit"):
            download(f"{site}{path}", DIGEST, tmp_path / "d" / "m.onnx", max_bytes=100_000)
    assert list((tmp_path / "d").iterdir()) == []
    with pytest.raises(StageSpecError, match="sha256 is"):
        download(f"{site}/model", "0" * 64, tmp_path / "d" / "m.onnx")
    assert download(f"{site}/redirect-to?url={site}/chunked", DIGEST,
                    tmp_path / "d" / "m.onnx").read_bytes() == CLS.read_bytes()  # fmt: skip


def test_external_data_outside_the_model_directory_is_refused(tmp_path: Path) -> None:
    """A model whose weights point at ../secret.bin must not be loaded, by onnx or ORT."""
    weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    models = tmp_path / "models"
    models.mkdir()
    onnx.save(model, str(models / "inside.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="inside.bin", size_threshold=0)  # fmt: skip
    assert load_stage(spec_for(models / "inside.onnx", "ext", tmp_path), sizing=ONE).batchable
    (tmp_path / "secret.bin").write_bytes((models / "inside.bin").read_bytes())
    escaping = onnx.load(str(models / "inside.onnx"), load_external_data=False)
    for entry in escaping.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    onnx.save(escaping, str(models / "escaping.onnx"))
    with pytest.raises(StageSpecError, match=r"'w'.*inside the model's directory"):
        load_stage(spec_for(models / "escaping.onnx", "ext", tmp_path), sizing=ONE)


class _Restarting(http.server.BaseHTTPRequestHandler):
    """The operator's distribution endpoint coming back: the first GET a 503 (no ready
    endpoint yet), then the model for a good token, 403 for any other."""

    answered = 0

    def do_GET(self) -> None:  # the handler's method name
        type(self).answered += 1
        blob = CLS.read_bytes()
        if self.headers.get("authorization") != "Bearer good":
            status, body = 403, b"token refused"
        elif type(self).answered == 1:
            status, body = 503, b"no ready endpoints"
        else:
            status, body = 200, blob
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_restarting_operator_delays_the_stage_download_instead_of_failing_it(
    tmp_path: Path,
) -> None:
    """Connection refused while the operator is down, a 503 while its Service has no ready
    endpoint, then the model: the server waits (0.5 s, doubling) instead of exiting."""
    port = _free_port()
    _Restarting.answered = 0
    servers: list[http.server.ThreadingHTTPServer] = []
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the operator comes back after the first attempt
        waits.append(seconds)
        if not servers:
            servers.append(http.server.ThreadingHTTPServer(("127.0.0.1", port), _Restarting))
            threading.Thread(target=servers[0].serve_forever, daemon=True).start()

    try:
        got = from_operator(
            f"http://127.0.0.1:{port}/v1/models/{DIGEST}",
            DIGEST,
            tmp_path / "m.onnx",
            token="good",
            sleep=sleep,
        )
    finally:
        for server in servers:
            server.shutdown()
    assert hashlib.sha256(got.read_bytes()).hexdigest() == DIGEST
    assert waits == [0.5, 1.0]  # refused, then 503, then the model
    assert _Restarting.answered == 2


def test_a_refused_token_fails_the_download_at_once(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Restarting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    waits: list[float] = []
    try:
        with pytest.raises(StageSpecError, match="HTTP 403: token refused"):
            from_operator(
                f"http://127.0.0.1:{server.server_address[1]}/v1/models/{DIGEST}",
                DIGEST,
                tmp_path / "m.onnx",
                token="stale",
                sleep=waits.append,
            )
    finally:
        server.shutdown()
    assert waits == [] and not (tmp_path / "m.onnx").exists()


def test_an_operator_away_past_the_timeout_fails_the_download_saying_so(tmp_path: Path) -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(StageSpecError, match="operator was unavailable for 20 s"):
        from_operator(
            f"http://127.0.0.1:{_free_port()}/v1/models/{DIGEST}",
            DIGEST,
            tmp_path / "m.onnx",
            token="good",
            timeout_s=20,
            sleep=sleep,
            clock=lambda: now[0],
        )
    assert 15 <= now[0] <= 20  # it kept trying until the timeout, not past it
