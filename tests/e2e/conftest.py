"""The closed loop on the local cluster: CRDs, the test bed DevicePools, and the operator
(placement included) running in-process against the cluster's real Prometheus."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_loop import NAMESPACE, ROOT


@pytest.fixture(scope="module")
def loop(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """CRDs, test bed pools, a namespace, and the operator with placement and metrics."""
    from partita.control.outcome import Backoff
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
