"""A model's entry router on real sockets: it relays to the serving stage, holds a request
(REST or gRPC) while no stage answers and delivers it once one does (inference is idempotent),
passes a client's own mistakes straight back, and gives up at its deadline naming the stage."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as http
from prometheus_client.parser import text_string_to_metric_families
from stage_servers import CLS, CLS_OUT, GRPC, free_port, host_of, running

from partita_server.app import create_app, create_dataplane
from partita_server.spec import StageSpec, StageTokens


def router(upstream: str, tmp: Path, deadline_s: float = 20.0) -> StageSpec:
    return StageSpec.model_validate(
        {
            "model": "cls",
            "stage": "entry",
            "router": True,
            "deadline_s": deadline_s,
            "cache_dir": tmp,
            "next": [{"stage": "serving", "endpoints": [upstream], "retry": True}],
        }
    )


def serve_router(stack: ExitStack, upstream: str, tmp: Path, deadline_s: float = 20.0) -> str:
    """The router's REST base URL; `GRPC[url]` is its gRPC target (it relays to REST)."""
    plane = create_dataplane(router(upstream, tmp, deadline_s), tokens=StageTokens(()))
    app = create_app(dataplane=plane, grpc_address="127.0.0.1:0")
    url = str(stack.enter_context(running(app)))
    GRPC[url] = f"127.0.0.1:{app.state.grpc_port}"
    return url


def stage(tmp: Path) -> StageSpec:
    return StageSpec.model_validate({"model": "cls", "source": {"uri": CLS.as_uri()},
                                     "cache_dir": tmp})  # fmt: skip


def infer(url: str, x: np.ndarray, timeout: float = 60, name: str = "x") -> np.ndarray:
    client = http.InferenceServerClient(host_of(url), network_timeout=timeout)
    try:
        inp = http.InferInput(name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        return np.asarray(client.infer("cls", [inp]).as_numpy(CLS_OUT))
    finally:
        client.close()


def infer_grpc(target: str, x: np.ndarray, timeout: float = 60, name: str = "x") -> np.ndarray:
    client = grpcclient.InferenceServerClient(target)
    try:
        inp = grpcclient.InferInput(name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return np.asarray(client.infer("cls", [inp], client_timeout=timeout).as_numpy(CLS_OUT))
    finally:
        client.close()


def retries(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "partita_hop_retries"
        for s in f.samples
    )


X = np.random.default_rng(5).random((1, 3, 48, 192), dtype=np.float32)


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_a_request_waits_for_the_stage_that_replaces_a_lost_one(
    tmp_path: Path, transport: str
) -> None:
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    with ExitStack() as stack:
        entry = serve_router(stack, upstream, tmp_path)
        direct = stack.enter_context(running(create_app(stage(tmp_path / "a"), tokens=None)))
        want = infer(direct, X)
        got: list[np.ndarray] = []
        errors: list[BaseException] = []

        def call() -> None:
            try:
                if transport == "grpc":
                    got.append(infer_grpc(GRPC[entry], X))
                else:
                    got.append(infer(entry, X))
            except BaseException as exc:  # the assertion below shows it
                errors.append(exc)

        # Nothing serves yet (the lost stage's replacement is still loading): the router
        # keeps the request and retries.
        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 10
        plane_seen = False
        while time.monotonic() < deadline and not plane_seen:
            import httpx
            from prometheus_client.parser import text_string_to_metric_families

            text = httpx.get(f"{entry}/metrics", timeout=5).text
            plane_seen = any(
                s.value > 0
                for f in text_string_to_metric_families(text)
                if f.name == "partita_hop_retries"
                for s in f.samples
            )
            time.sleep(0.05)
        assert plane_seen, "the router did not retry"
        stack.enter_context(running(create_app(stage(tmp_path / "b"), tokens=None), port))
        caller.join(60)
        assert not errors, errors
        np.testing.assert_allclose(got[0], want, rtol=1e-5)


def test_a_clients_mistake_is_not_retried_and_a_lost_cause_ends_at_the_deadline(
    tmp_path: Path,
) -> None:
    with ExitStack() as stack:
        upstream = stack.enter_context(running(create_app(stage(tmp_path), tokens=None)))
        entry = serve_router(stack, upstream, tmp_path)
        started = time.monotonic()
        with pytest.raises(http.InferenceServerException, match="'y' is not an input") as bad:
            infer(entry, X, name="y")
        assert bad.value.status() == "400" and time.monotonic() - started < 5
        with pytest.raises(grpcclient.InferenceServerException, match="'y' is not an input") as g:
            infer_grpc(GRPC[entry], X, name="y")
        assert g.value.status() == "StatusCode.INVALID_ARGUMENT"
        nowhere = f"http://127.0.0.1:{free_port()}"
        gone = serve_router(stack, nowhere, tmp_path, 1.5)
        with pytest.raises(http.InferenceServerException, match="serving") as lost:
            infer(gone, X)
        assert lost.value.status() in ("503", "504")
