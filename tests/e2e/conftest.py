"""The closed loop on the local cluster: CRDs, the test bed DevicePools, and the operator
(placement included) running in-process against the cluster's real Prometheus, which scrapes
the operator's own metrics (`partita.testbed.prometheus.write_operator_targets`)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_loop import NAMESPACE, ROOT

from cluster_helpers import eventually


@pytest.fixture(scope="module")
def loop(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """CRDs, test bed pools, a namespace, and the operator with placement and metrics."""
    from partita.control.outcome import Backoff
    from partita.handlers.registry import OperatorConfig, run
    from partita.testbed import prometheus

    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "-f", str(ROOT / "crds")
    )
    cluster.kubectl("apply", "-f", str(ROOT / "examples/testbed/devicepools.yaml"))
    # The namespace of the previous module may still be terminating: wait until it is gone.
    eventually(
        lambda: "Terminating" not in _namespace_phase(cluster), 180, f"namespace {NAMESPACE} gone"
    )
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    metrics_port = _free_port()
    config = OperatorConfig(
        cache_dir=tmp_path_factory.mktemp("operator-cache"),
        kubeconfig=cluster.kubeconfig,
        namespaces=(NAMESPACE,),
        standalone=True,
        prometheus_url=cluster.prometheus_url,
        poll_interval_s=2.0,
        backoff=Backoff(first_s=2, factor=2, max_s=30),
        metrics_address=f"127.0.0.1:{metrics_port}",
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
    targets = cluster.run_dir / "prometheus"
    operator = prometheus.TargetGroup((f"127.0.0.1:{metrics_port}",), {"pod": "partita-e2e"})
    prometheus.write_operator_targets(targets, [operator])
    try:
        yield cluster
    finally:
        prometheus.write_operator_targets(targets, [])
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _namespace_phase(cluster: Any) -> str:
    out = cluster.kubectl(
        "get", "namespace", NAMESPACE, "-o", "jsonpath={.status.phase}", check=False
    )
    return out.stdout if out.returncode == 0 else "absent"
