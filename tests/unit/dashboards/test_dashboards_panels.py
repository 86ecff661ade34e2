"""The generated dashboards as Grafana reads them: the three the chart ships, every panel with
a unit, a description and the datasource variable, every window `$__rate_interval`, every
variable a panel uses defined, and the files in the chart current."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from partita.dashboards import render, stale

ROOT = Path(__file__).resolve().parents[3]
CHART_DASHBOARDS = ROOT / "charts" / "partita" / "dashboards"
DOCS = {name: json.loads(text) for name, text in render().items()}


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in doc["panels"]:
        out += [panel, *panel.get("panels", [])] if panel["type"] == "row" else [panel]
    return [p for p in out if p["type"] != "row"]


def test_fleet_model_and_pools_are_built() -> None:
    titles = {d["uid"]: d["title"] for d in DOCS.values()}
    assert titles == {
        "partita-fleet": "Partita / Fleet",
        "partita-model": "Partita / Model",
        "partita-pools": "Partita / Pools and links",
    }


@pytest.mark.parametrize("name", sorted(DOCS))
def test_every_panel_has_a_unit_a_description_and_the_datasource(name: str) -> None:
    doc = DOCS[name]
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids)) and len(ids) >= 7
    for panel in panels(doc):
        where = f"{name}: {panel['title']}"
        assert panel["description"].strip(), where
        assert panel["fieldConfig"]["defaults"].get("unit"), where
        assert panel["datasource"]["uid"] == "${datasource}", where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", where
            windows = re.findall(r"\[([^\]]*)\]", target["expr"])
            assert windows and set(windows) == {"$__rate_interval"}, (where, target["expr"])


@pytest.mark.parametrize("name", sorted(DOCS))
def test_every_variable_a_query_uses_is_defined(name: str) -> None:
    doc = DOCS[name]
    defined = {v["name"] for v in doc["templating"]["list"]}
    assert "datasource" in defined
    used: set[str] = set()
    texts = [t["expr"] for p in panels(doc) for t in p["targets"]]
    texts += [a["expr"] for a in doc.get("annotations", {}).get("list", [])]
    texts += [v.get("query", "") for v in doc["templating"]["list"] if v["type"] == "query"]
    for text in texts:
        used |= set(re.findall(r"\$(\w+)", text)) - {"__rate_interval"}
    assert used <= defined, used - defined


def test_the_model_dashboard_marks_plan_changes() -> None:
    (annotation,) = DOCS["partita-model.json"]["annotations"]["list"]
    assert "partita_reschedules_total" in annotation["expr"]
    assert annotation["titleFormat"] == "plan change: {{reason}}"


def test_the_chart_carries_the_current_dashboards() -> None:
    assert stale(CHART_DASHBOARDS) == []


def test_a_changed_or_missing_dashboard_is_reported_stale(tmp_path: Path) -> None:
    for name, text in render().items():
        (tmp_path / name).write_text(text)
    (tmp_path / "partita-fleet.json").write_text("{}\n")
    (tmp_path / "partita-pools.json").unlink()
    (tmp_path / "mine.json").write_text("{}\n")
    problems = stale(tmp_path)
    assert len(problems) == 3
    assert any("partita-fleet.json: differs" in p for p in problems)
    assert any("partita-pools.json: missing" in p for p in problems)
    assert any("mine.json: not built" in p for p in problems)
