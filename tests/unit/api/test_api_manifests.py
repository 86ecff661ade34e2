"""Manifests through the pydantic models: every invalid one is refused naming its field
(the integration tests send the same files to the real apiserver), the examples pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from partita.api import DevicePool, EdgeModel, ManifestError
from partita.api.edgemodel import Compression, Objective, PartitioningMode
from partita.api.meta import Tier

ROOT = Path(__file__).resolve().parents[3]
INVALID = sorted((ROOT / "tests/data/invalid").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def expectation(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# expect:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{path} has no '# expect:' line")


def parse(doc: dict[str, Any]) -> EdgeModel | DevicePool:
    return EdgeModel.parse(doc) if doc["kind"] == "EdgeModel" else DevicePool.parse(doc)


def test_corpus_is_large_enough() -> None:
    assert len(INVALID) >= 30


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_is_refused_naming_the_field(path: Path) -> None:
    with pytest.raises(ManifestError) as caught:
        parse(yaml.safe_load(path.read_text()))
    assert expectation(path) in str(caught.value)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_parse(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        parse(doc)


def test_examples_have_two_edge_pools_and_a_cloud_pool() -> None:
    docs = list(yaml.safe_load_all((ROOT / "examples/devicepools.yaml").read_text()))
    tiers = sorted(DevicePool.parse(d).spec.tier.value for d in docs)
    assert tiers == ["cloud", "edge", "edge"]


def test_defaults_fill_what_the_user_left_out() -> None:
    model = EdgeModel.parse(
        {
            "apiVersion": "partita.dev/v1alpha1",
            "kind": "EdgeModel",
            "metadata": {"name": "m", "namespace": "ns"},
            "spec": {
                "source": {"uri": "file:///m.onnx", "sha256": "0" * 64},
                "dataSource": "edge-a",
            },
        }
    )
    spec = model.spec
    assert spec.partitioning.mode is PartitioningMode.AUTO
    assert spec.partitioning.max_stages == 4 and spec.partitioning.max_shards == 4
    assert spec.objective is Objective.LATENCY
    assert spec.rescheduling.cooldown_seconds == 120
    assert spec.quantization.allowed is False
    assert spec.pools == [] and spec.tiers == []


def test_api_enums_match_the_planner() -> None:
    """The lead's mapping from EdgeModelSpec to ModelRequest relies on equal values."""
    planner = pytest.importorskip("partita.planner.request")
    snapshot = pytest.importorskip("partita.planner.snapshot")
    for ours, theirs in (
        (PartitioningMode, planner.PartitioningMode),
        (Objective, planner.Objective),
        (Compression, planner.Compression),
        (Tier, snapshot.Tier),
    ):
        assert {m.value for m in ours} == {m.value for m in theirs}
