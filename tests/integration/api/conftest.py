"""Fixtures for the API tests on the local cluster: CRDs installed once, a namespace of
their own, and the operator running in-process in a thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from api_cluster import NAMESPACE, ROOT


@pytest.fixture(scope="session")
def crds(cluster: Any) -> Any:
    """The CRDs of crds/, applied server-side and Established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "-f", str(ROOT / "crds")
    )
    return cluster


@pytest.fixture(scope="session")
def api_namespace(crds: Any) -> Iterator[str]:
    crds.kubectl("create", "namespace", NAMESPACE)
    try:
        yield NAMESPACE
    finally:
        crds.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


@pytest.fixture(scope="session")
def pools(crds: Any) -> Iterator[Any]:
    """The example DevicePools (edge-a, edge-b, cloud), removed at the end."""
    crds.kubectl("apply", "-f", str(ROOT / "examples/devicepools.yaml"))
    try:
        yield crds
    finally:
        crds.kubectl("delete", "-f", str(ROOT / "examples/devicepools.yaml"), check=False)


@pytest.fixture(scope="session")
def operator(
    crds: Any, api_namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """`partita.handlers.registry.run` in a thread, watching the test namespace."""
    from partita.control.outcome import Backoff
    from partita.handlers.registry import OperatorConfig, run

    config = OperatorConfig(
        cache_dir=tmp_path_factory.mktemp("operator-cache"),
        kubeconfig=crds.kubeconfig,
        namespaces=(api_namespace,),
        standalone=True,
        backoff=Backoff(first_s=2, factor=2, max_s=30),
    )
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run(config, stop_flag=stop, ready_flag=ready)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=target, name="partita-operator", daemon=True)
    thread.start()
    assert ready.wait(60), f"operator not ready: {errors}"
    try:
        yield crds
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert not thread.is_alive(), "operator thread did not stop"
