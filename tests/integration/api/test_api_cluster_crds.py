"""The CRDs on a real apiserver: they install, examples apply, invalid manifests are refused
with a message naming the field, and `kubectl get` shows the printer columns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_cluster import ROOT

from cluster_helpers import get_json

pytestmark = pytest.mark.cluster

INVALID = sorted((ROOT / "tests/data/invalid").glob("*.yaml"))


def expectation(path: Path) -> str:
    line = next(x for x in path.read_text().splitlines() if x.startswith("# expect:"))
    return line.split(":", 1)[1].strip()


def test_crds_are_established_with_short_names(crds: Any) -> None:
    for name, short in (("edgemodels.partita.dev", "em"), ("devicepools.partita.dev", "dp")):
        crd = get_json(crds, "crd", name)
        established = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert established["Established"] == "True"
        assert established.get("NonStructuralSchema", "False") == "False"
        assert short in crd["spec"]["names"]["shortNames"]
    resources = crds.kubectl("api-resources", "--api-group=partita.dev").stdout
    assert "em" in resources and "dp" in resources


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=str)
def test_every_example_applies(crds: Any, example: Path) -> None:
    out = crds.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", str(example))
    count = len([d for d in yaml.safe_load_all(example.read_text()) if d])
    assert out.stdout.count("(server dry run)") == count


def test_examples_are_defaulted_by_the_apiserver(crds: Any) -> None:
    out = crds.kubectl(
        "apply", "--dry-run=server", "-o", "json", "-f", str(ROOT / "examples/edgemodels.yaml")
    )
    items = json.loads(out.stdout)["items"]
    private = next(i for i in items if i["metadata"]["name"] == "open-nsfw-private")
    assert private["spec"]["rescheduling"] == {"minImprovement": 0.4, "cooldownSeconds": 120}
    assert private["spec"]["partitioning"]["maxShards"] == 4
    assert private["spec"]["partitioning"]["cutCompression"] == "none"


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_is_refused_naming_the_field(crds: Any, path: Path) -> None:
    out = crds.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", str(path), check=False
    )
    assert out.returncode != 0, f"{path.name} was accepted"
    assert expectation(path) in out.stderr, out.stderr


def test_printer_columns_show_values(pools: Any, api_namespace: str) -> None:
    """Status written as the closed loop will write it shows up in `kubectl get`."""
    cluster = pools
    manifest = yaml.safe_load((ROOT / "examples/edgemodels.yaml").read_text().split("---")[0])
    manifest["metadata"] = {"name": "columns", "namespace": api_namespace}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    status = {
        "status": {
            "phase": "Ready",
            "plan": {
                "revision": 1,
                "stageCount": 2,
                "pools": "edge-a,cloud",
                "predictedP95Ms": 41.5,
                "observedP95Ms": 44.25,
                "stages": [
                    {"index": 0, "pool": "edge-a", "nodes": ["edge-a-1"]},
                    {"index": 1, "pool": "cloud", "nodes": ["cloud-1"]},
                ],
            },
        }
    }
    cluster.kubectl(
        "patch", "edgemodel", "columns", "-n", api_namespace, "--subresource=status",
        "--type=merge", "-p", json.dumps(status),
    )  # fmt: skip
    table = cluster.kubectl("get", "em", "columns", "-n", api_namespace).stdout.splitlines()
    header = table[0].split()
    assert header[:9] == ["NAME", "PHASE", "STAGES", "POOLS", "PREDICTED", "P95", "OBSERVED",
                          "P95", "AGE"]  # fmt: skip
    row = table[1].split()
    assert row[:6] == ["columns", "Ready", "2", "edge-a,cloud", "41.5", "44.25"]
    cluster.kubectl("delete", "em", "columns", "-n", api_namespace)
