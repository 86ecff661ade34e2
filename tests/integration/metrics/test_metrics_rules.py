"""The chart's Prometheus rules: promtool accepts them, their alerts fire when they should,
the recording rules are the reader's default queries, and the PrometheusRule the chart renders
carries exactly the checked file."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from partita.metrics import Queries
from partita.metrics.queries import DEFAULTS, RECORDING_RULES
from partita.testbed import binaries

ROOT = Path(__file__).parents[3]
CHART = ROOT / "charts" / "partita"
RULES = CHART / "files" / "prometheus-rules.yaml"
RULES_TEST = Path(__file__).with_name("rules_test.yaml")
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

pytestmark = pytest.mark.skipif(
    not Path(PROMTOOL).exists(), reason="needs the Debian prometheus package (promtool)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, check=False)


def flat(promql: str) -> str:
    return re.sub(r"\s+", " ", promql).replace("( ", "(").replace(" )", ")").strip()


def test_promtool_checks_the_rules_file() -> None:
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 17 rules found" in r.stdout


def test_the_alerts_fire_on_synthetic_series() -> None:
    r = promtool("test", "rules", str(RULES_TEST))
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_recording_rules_are_the_default_queries() -> None:
    doc = yaml.safe_load(RULES.read_text())
    recorded = {
        rule["record"]: flat(rule["expr"])
        for group in doc["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    assert recorded == {RECORDING_RULES[k]: flat(v) for k, v in DEFAULTS.items()}
    alerts = {rule["alert"] for g in doc["groups"] for rule in g["rules"] if "alert" in rule}
    assert alerts == {
        "PartitaMetricsStale",
        "PartitaStageDown",
        "PartitaLatencyOverSlo",
        "PartitaModelUnschedulable",
        "PartitaRescheduleStorm",
        "PartitaOperatorMetricsStale",
    }
    assert set(Queries.recorded().enabled().values()) == set(recorded)


def test_the_chart_default_queries_are_valid_promql(tmp_path: Path) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    queries = Queries.from_mapping(values["prometheus"]["queries"]).enabled()
    rules = {
        "groups": [
            {
                "name": "chart-queries",
                "rules": [{"record": f"check:{name}", "expr": q} for name, q in queries.items()],
            }
        ]
    }
    path = tmp_path / "queries-as-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def render(*args: str) -> list[dict[str, Any]]:
    helm = binaries.bin_dir() / "helm"
    if not helm.exists():
        pytest.skip("needs helm from `make install`")
    r = subprocess.run(
        [str(helm), "template", "t", str(CHART), "--kube-version", "1.31.0", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def test_the_chart_ships_the_checked_file_as_a_prometheus_rule(tmp_path: Path) -> None:
    assert not [d for d in render() if d["kind"] == "PrometheusRule"]  # off by default
    docs = render(
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "prometheusRule.labels.release=prometheus",
        "--api-versions",
        "monitoring.coreos.com/v1/PrometheusRule",
    )
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_chart_refuses_a_prometheus_rule_without_the_crd() -> None:
    helm = binaries.bin_dir() / "helm"
    if not helm.exists():
        pytest.skip("needs helm from `make install`")
    r = subprocess.run(
        [str(helm), "template", "t", str(CHART), "--kube-version", "1.31.0",
         "--set", "prometheusRule.enabled=true"],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert r.returncode != 0
    assert "monitoring.coreos.com/v1 PrometheusRule" in r.stderr
