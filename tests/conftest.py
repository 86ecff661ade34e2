"""Session-wide fixtures: one local cluster for every test that asks for it.

The cluster runs in a temporary directory of its own, so it never touches a cluster the
developer brought up with `partita testbed up`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class Cluster:
    run_dir: Path
    kubeconfig: Path
    prometheus_url: str
    metrics_url: str
    state_file: Path
    bin_dir: Path
    nodes: tuple[Any, ...]

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}:{os.environ['PATH']}",
            "PARTITA_TESTBED_DIR": str(self.run_dir),
        }

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin_dir / "kubectl"), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            check=check,
            input=input,
            timeout=120,
        )

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin_dir / "helm"), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            check=check,
            timeout=300,
        )

    def partita(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        exe = Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin" / "partita"
        if not exe.exists():
            exe = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "partita"
        return subprocess.run(
            [str(exe), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            check=check,
            timeout=300,
        )


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A running local cluster: pools edge-a (2 nodes), edge-b (2), cloud (2)."""
    from partita.testbed import binaries
    from partita.testbed import cluster as tb
    from partita.testbed.layout import parse_nodes

    run_dir = tmp_path_factory.mktemp("testbed")
    info = tb.up(run_dir, parse_nodes("edge-a=2,edge-b=2,cloud=2"), log=lambda m: None)
    try:
        yield Cluster(
            run_dir,
            info.kubeconfig,
            info.prometheus_url,
            info.metrics_url,
            info.state_file,
            binaries.bin_dir(),
            info.nodes,
        )
    finally:
        tb.down(run_dir)


@pytest.fixture(scope="session")
def kube_client(cluster: Cluster) -> Any:
    """A kubernetes.client.ApiClient for the local cluster."""
    from kubernetes import config

    return config.new_client_from_config(config_file=str(cluster.kubeconfig))
