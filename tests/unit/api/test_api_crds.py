"""The generated CRDs are structural, complete and current."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from partita.api import crd

ROOT = Path(__file__).resolve().parents[3]


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _schemas():
    return {k.kind: crd.crd(k)["spec"]["versions"][0] for k in crd.KINDS}


@pytest.mark.parametrize("kind", ["EdgeModel", "DevicePool"])
def test_schema_is_structural(kind: str) -> None:
    schema = _schemas()[kind]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node, path
        assert "title" not in node, path
        assert "anyOf" not in node and "oneOf" not in node, path
        assert node.get("type") != "null", path
        assert "uniqueItems" not in node, path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
    props = schema["properties"]
    for section in ("spec", "status"):
        for path, node in _walk(props[section], section):
            if path.endswith("/properties") or "x-kubernetes-validations" in path:
                continue
            if path.split("/")[-1] in ("default", "enum", "required"):
                continue
            if isinstance(node, dict) and ("properties" in node or "items" in node):
                assert "type" in node, path


def test_every_spec_field_is_described() -> None:
    for kind, version in _schemas().items():
        spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
        for path, node in _walk(spec):
            if path.endswith("/properties"):
                for name, sub in node.items():
                    assert sub.get("description"), f"{kind} spec{path}/{name} has no description"


def test_printer_columns_point_at_schema_fields() -> None:
    for kind, version in _schemas().items():
        root = version["schema"]["openAPIV3Schema"]
        for column in version["additionalPrinterColumns"]:
            parts = column["jsonPath"].lstrip(".").split(".")
            if parts[0] == "metadata":
                continue
            node = root
            for part in parts:
                node = node["properties"][part]
            expected = {"integer": "integer", "number": "number", "string": None}[column["type"]]
            if expected:
                assert node["type"] == expected, (kind, column)
        assert version["subresources"] == {"status": {}}


def test_columns_and_short_names_as_documented() -> None:
    names = {k.kind: [c["name"] for c in k.columns if "priority" not in c] for k in crd.KINDS}
    assert names["EdgeModel"] == [
        "Phase",
        "Stages",
        "Pools",
        "Predicted p95",
        "Observed p95",
        "Age",
    ]
    assert names["DevicePool"] == ["Tier", "Ready", "Throughput", "Age"]
    assert {k.kind: k.short_names for k in crd.KINDS} == {
        "EdgeModel": ("em",),
        "DevicePool": ("dp",),
    }


def test_cross_field_rules_are_exported_as_cel() -> None:
    schema = crd.crd(crd.EDGE_MODEL)["spec"]["versions"][0]["schema"]
    rules = [
        f"{r['rule']} fieldPath: {r.get('fieldPath', '')}"
        for _, node in _walk(schema)
        for r in node.get("x-kubernetes-validations", [])
    ]
    text = "\n".join(rules)
    for fragment in (
        "self.privacy.rawInputTier in self.tiers",
        "self.mode != 'vertical' || self.maxStages >= 2",
        "self.sha256.matches(",
        "!self.allowed || self.maxAccuracyDrop > 0.0",
        "size(self.metadata.name) <= 40",
        "fieldPath: .partitioning.cutCompression",
    ):
        assert fragment in text


def test_rendering_is_deterministic() -> None:
    assert crd.rendered() == crd.rendered()


@pytest.mark.parametrize("directory", ["crds", "charts/partita/crds"])
def test_checked_in_crds_are_current(directory: str) -> None:
    assert crd.stale(ROOT / directory) == [], "run `make crds`"


def test_stale_detects_edits_and_strays(tmp_path: Path) -> None:
    crd.write(tmp_path)
    assert crd.stale(tmp_path) == []
    target = tmp_path / "partita.dev_edgemodels.yaml"
    target.write_text(target.read_text().replace("maxStages", "maxStagez", 1))
    (tmp_path / "extra.yaml").write_text("kind: ConfigMap\n")
    problems = crd.stale(tmp_path)
    assert any("edgemodels" in p and "differs" in p for p in problems)
    assert any("extra.yaml" in p for p in problems)
