"""How the test bed builds its binaries: helm stamped as helm's release build stamps it, and
kwok configured to play only the nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from partita.testbed import binaries
from partita.testbed.errors import TestbedError

HELM_GO_MOD = """module helm.sh/helm/v3

require (
\tk8s.io/api v0.37.0
\tk8s.io/client-go v0.37.0
)
"""


def test_helm_is_told_the_kubernetes_version_its_client_go_speaks() -> None:
    flags = binaries.helm_ldflags(HELM_GO_MOD).split()
    for pkg in ("helm.sh/helm/v3/pkg/chartutil", "helm.sh/helm/v3/pkg/lint/rules"):
        assert f"{pkg}.k8sVersionMajor=1" in flags
        assert f"{pkg}.k8sVersionMinor=37" in flags
    assert f"helm.sh/helm/v3/internal/version.version={binaries.HELM_VERSION}" in flags
    with pytest.raises(TestbedError, match="client-go"):
        binaries.helm_ldflags("module x\n")


def test_kwok_gets_the_node_stages_only(tmp_path: Path) -> None:
    for name, kind in (("node-initialize", "Node"), ("pod-ready", "Pod")):
        stage = {
            "kind": "Stage",
            "metadata": {"name": name},
            "spec": {"resourceRef": {"kind": kind}},
        }
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(stage))
    docs = list(yaml.safe_load_all(binaries.kwok_node_stages(tmp_path)))
    assert [d["metadata"]["name"] for d in docs] == ["node-initialize"]
