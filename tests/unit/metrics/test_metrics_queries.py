"""Queries: defaults, the chart's camelCase keys, and clear errors for a bad queries file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from partita.metrics import MetricsError, Queries
from partita.metrics.queries import DEFAULTS

CHART_VALUES = Path(__file__).parents[3] / "charts" / "partita" / "values.yaml"


def test_defaults_cover_every_purpose() -> None:
    enabled = Queries().enabled()
    assert enabled == DEFAULTS
    assert "node_cpu_seconds_total" in enabled["node_cpu_utilisation"]
    assert 'phase="rtt"' in enabled["link_rtt"]
    assert "partita_compute_seconds_sum" in enabled["stage_compute"]
    assert "partita_hop_bytes_total" in enabled["hop_bytes_rate"]
    assert 'entry="true"' in enabled["model_latency_p95"]
    assert 'decision="forward"' in enabled["cascade_offload"]


def test_the_chart_values_load_by_their_camel_case_keys() -> None:
    values = yaml.safe_load(CHART_VALUES.read_text())
    chart = values["prometheus"]["queries"]
    queries = Queries.from_mapping(chart, "values.prometheus.queries")
    dumped = queries.model_dump(by_alias=True)
    for key, promql in chart.items():
        assert dumped[key] == promql
    # keys the chart does not set keep the defaults
    assert queries.stage_compute == DEFAULTS["stage_compute"]


def test_field_names_work_too_and_empty_disables() -> None:
    queries = Queries.from_mapping({"link_bandwidth": "", "linkRttSeconds": "my_rtt"})
    enabled = queries.enabled()
    assert "link_bandwidth" not in enabled
    assert enabled["link_rtt"] == "my_rtt"


def test_an_unknown_key_names_it_and_lists_the_known_ones() -> None:
    with pytest.raises(MetricsError) as err:
        Queries.from_mapping({"cpuBsy": "x"}, "queries.yaml")
    text = str(err.value)
    assert "queries.yaml" in text and "cpuBsy" in text and "cpuBusy" in text


def test_a_non_mapping_and_a_wrong_type_are_refused() -> None:
    with pytest.raises(MetricsError, match="expected a mapping"):
        Queries.from_mapping(["cpuBusy"], "queries.yaml")  # type: ignore[call-overload, arg-type, unused-ignore]
    with pytest.raises(MetricsError, match="cpuBusy"):
        Queries.from_mapping({"cpuBusy": 3})


def test_load_reads_the_file_the_chart_mounts(tmp_path: Path) -> None:
    path = tmp_path / "queries.yaml"
    path.write_text("cpuBusy: up\n")
    assert Queries.load(path).node_cpu_utilisation == "up"
    path.write_text("")
    assert Queries.load(path) == Queries()
    with pytest.raises(MetricsError, match="cannot read"):
        Queries.load(tmp_path / "missing.yaml")
    path.write_text("cpuBusy: [unclosed\n")
    with pytest.raises(MetricsError, match="not YAML"):
        Queries.load(path)
