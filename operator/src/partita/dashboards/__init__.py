"""Grafana dashboards as code: Fleet, Model, Pools and links, built with Grafana's typed
builders (grafana-foundation-sdk) and written into the chart by `partita dashboards`.

The queries read the operator's own series (`partita.control.telemetry`), the inference
servers' (`partita_server.metrics`) and the exporters the operator reads (node_exporter,
blackbox_exporter, iperf3_exporter). Generated JSON is checked in; `partita dashboards
--check` fails when it is stale.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder

from partita import generated
from partita.generated import Generated

from .fleet import fleet
from .model import model
from .pools import pools

# File name in the chart's dashboards/ -> builder.
DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "partita-fleet.json": fleet,
    "partita-model.json": model,
    "partita-pools.json": pools,
}


def as_json(builder: Dashboard) -> dict[str, Any]:
    """A dashboard as Grafana's JSON model, every panel numbered."""
    doc: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    for i, panel in enumerate(doc.get("panels") or [], start=1):
        panel["id"] = i
    for annotation in (doc.get("annotations") or {}).get("list", []):
        # Grafana's Prometheus annotation options the builders do not model.
        annotation.setdefault("titleFormat", "plan change: {{reason}}")
        annotation.setdefault("textFormat", "{{namespace}}/{{model}}")
        annotation.setdefault("tagKeys", "reason")
    return doc


def render() -> dict[str, str]:
    """File name -> the dashboard's JSON text, as written into the chart."""
    return {
        name: json.dumps(as_json(build()), indent=2, sort_keys=True) + "\n"
        for name, build in DASHBOARDS.items()
    }


def _generated() -> Generated:
    return Generated(render(), "*.json", "partita.dashboards", "partita dashboards")


def write(directory: Path) -> list[Path]:
    """Write every dashboard into `directory`, removing dashboards that are no longer built."""
    return generated.write(directory, _generated())


def stale(directory: Path) -> list[str]:
    """What differs between `directory` and freshly built dashboards (empty: up to date)."""
    return generated.stale(directory, _generated())
