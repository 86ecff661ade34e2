"""The closed loop on the local cluster as a user runs it: the chart installed with helm (its
operator pod, run by the test bed's kubelet under the chart's ServiceAccount, with a model
store claim), the test bed DevicePools, and the cluster's real Prometheus, which also scrapes
the operator pod's own metrics."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_loop import NAMESPACE, ROOT, store_models

from cluster_helpers import eventually

RELEASE_NAMESPACE = "partita-system"


@pytest.fixture(scope="module")
def loop(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The chart's operator watching NAMESPACE, the test bed's pools, a namespace."""
    from partita.testbed.release import Release

    store = tmp_path_factory.mktemp("model-store")
    for name, path in store_models().items():
        shutil.copyfile(path, store / name)
    # The namespace of the previous module may still be terminating: wait until it is gone.
    eventually(
        lambda: "Terminating" not in _namespace_phase(cluster), 180, f"namespace {NAMESPACE} gone"
    )
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    release = Release(cluster.kubeconfig, RELEASE_NAMESPACE)
    release.install(
        {
            "operator.watchNamespaces": f"{{{NAMESPACE}}}",
            "prometheus.pollInterval": "2",
        },
        model_store=store,
    )
    cluster.kubectl("apply", "-f", str(ROOT / "examples/testbed/devicepools.yaml"))
    try:
        yield cluster
    finally:
        cluster.kubectl(
            "delete", "edgemodels", "--all", "-n", NAMESPACE, "--wait=false", check=False
        )
        release.uninstall()
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        cluster.kubectl(
            "delete", "-f", str(ROOT / "examples/testbed/devicepools.yaml"), check=False
        )


def _namespace_phase(cluster: Any) -> str:
    out = cluster.kubectl(
        "get", "namespace", NAMESPACE, "-o", "jsonpath={.status.phase}", check=False
    )
    return out.stdout if out.returncode == 0 else "absent"
