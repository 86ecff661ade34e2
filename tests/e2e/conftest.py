"""The closed loop on the local cluster as a user runs it: the chart installed with helm (its
operator pod, run by the test bed's kubelet under the chart's ServiceAccount, with a model
store claim), the test bed DevicePools, and the cluster's real Prometheus, which also scrapes
the operator pod's own metrics."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_loop import DEFAULT_LINK, E2E_LINK, NAMESPACE, ROOT, set_links, store_models

from cluster_helpers import eventually

RELEASE_NAMESPACE = "partita-system"
RELEASES: list[Any] = []  # the release of the running module, for failure reports


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed e2e test reports the end of the operator's log and the EdgeModels' status."""
    report = yield
    if report.failed and call.when == "call" and RELEASES:
        release = RELEASES[-1]
        report.sections.append(("operator log (last 150 lines)",
                                "\n".join(release.logs().splitlines()[-150:])))  # fmt: skip
        report.sections.append(
            ("EdgeModels", release.kubectl("get", "edgemodels", "-A", "-o", "yaml", check=False))
        )
    return report


@pytest.fixture(scope="module")
def model_store_files() -> dict[str, Path]:
    """The files of the chart's model store, by their name there (a module may add its own
    by overriding this fixture)."""
    return store_models()


@pytest.fixture(scope="module")
def loop(
    cluster: Any, tmp_path_factory: pytest.TempPathFactory, model_store_files: dict[str, Path]
) -> Iterator[Any]:
    """The chart's operator watching NAMESPACE, the test bed's pools, a namespace, and the
    edge-a <-> cloud link at E2E_LINK."""
    from partita.testbed.release import Release

    store = tmp_path_factory.mktemp("model-store")
    for name, path in model_store_files.items():
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
    set_links(cluster, *E2E_LINK)
    RELEASES.append(release)
    try:
        yield cluster
    finally:
        RELEASES.remove(release)
        cluster.kubectl(
            "delete", "edgemodels", "--all", "-n", NAMESPACE, "--wait=false", check=False
        )
        release.uninstall()
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        cluster.kubectl(
            "delete", "-f", str(ROOT / "examples/testbed/devicepools.yaml"), check=False
        )
        set_links(cluster, *DEFAULT_LINK)


@pytest.fixture(scope="module")
def release(loop: Any) -> Any:
    """The chart's release the module's `loop` installed (its operator pod, logs, kubectl)."""
    return RELEASES[-1]


def _namespace_phase(cluster: Any) -> str:
    out = cluster.kubectl(
        "get", "namespace", NAMESPACE, "-o", "jsonpath={.status.phase}", check=False
    )
    return out.stdout if out.returncode == 0 else "absent"
