"""What the chart ships for observability, as `helm template` renders it: one dashboard
ConfigMap per generated dashboard for Grafana's sidecar (label and folder as configured), the
operator's one HTTP port (health, metrics, model files) behind a Service, a ServiceMonitor and
a NetworkPolicy that let Prometheus and the stage servers in; and every dashboard query is
PromQL promtool accepts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from partita.dashboards import render
from partita.testbed import binaries

ROOT = Path(__file__).parents[3]
CHART = ROOT / "charts" / "partita"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def helm_template(*args: str) -> list[dict[str, Any]]:
    helm = binaries.bin_dir() / "helm"
    if not helm.exists():
        pytest.skip("needs helm from `make install`")
    r = subprocess.run(
        [str(helm), "template", "t", str(CHART), "-n", "obs", "--kube-version", "1.31.0", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_each_dashboard_is_a_configmap_for_the_grafana_sidecar() -> None:
    maps = [
        d
        for d in of_kind(helm_template(), "ConfigMap")
        if d["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    assert {m["metadata"]["name"] for m in maps} == {"t-partita-fleet", "t-partita-model",
                                                      "t-partita-pools"}  # fmt: skip
    wanted = render()
    for m in maps:
        assert m["metadata"]["namespace"] == "obs"
        assert m["metadata"]["annotations"] == {"grafana_folder": "Partita"}
        ((key, text),) = m["data"].items()
        assert json.loads(text) == json.loads(wanted[key])


def test_the_sidecar_label_folder_and_namespace_are_configurable() -> None:
    docs = helm_template(
        "--set", "dashboards.label=my_dashboards", "--set", "dashboards.labelValue=yes",
        "--set", "dashboards.folderAnnotation=k8s-sidecar-target-directory",
        "--set", "dashboards.folder=/tmp/dashboards/Partita",
        "--set", "dashboards.namespace=monitoring",
    )  # fmt: skip
    maps = [d for d in of_kind(docs, "ConfigMap") if "my_dashboards" in d["metadata"]["labels"]]
    assert len(maps) == 3
    for m in maps:
        assert m["metadata"]["labels"]["my_dashboards"] == "yes"
        assert m["metadata"]["namespace"] == "monitoring"
        assert m["metadata"]["annotations"] == {
            "k8s-sidecar-target-directory": "/tmp/dashboards/Partita"
        }
    docs = helm_template("--set", "dashboards.folderAnnotation=")
    maps = [d for d in of_kind(docs, "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]
    assert maps and all("annotations" not in m["metadata"] for m in maps)
    off = helm_template("--set", "dashboards.enabled=false")
    assert not [
        d for d in of_kind(off, "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]
    ]


def test_the_operator_serves_metrics_that_prometheus_may_scrape() -> None:
    docs = helm_template(
        "--set", "serviceMonitor.enabled=true", "--set", "service.port=9400",
        "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor",
    )  # fmt: skip
    (deployment,) = of_kind(docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--listen=0.0.0.0:9400" in container["args"]
    assert container["ports"] == [{"name": "http", "containerPort": 9400, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PARTITA_DISTRIBUTION_URL"] == "http://t-partita.obs.svc:9400"
    (service,) = of_kind(docs, "Service")
    assert service["metadata"]["name"] == "t-partita"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 9400, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    monitors = {m["metadata"]["name"]: m for m in of_kind(docs, "ServiceMonitor")}
    operator = monitors["t-partita-operator"]["spec"]
    assert operator["endpoints"][0]["port"] == "http"
    assert operator["endpoints"][0]["path"] == "/metrics"
    assert operator["endpoints"][0]["honorLabels"] is True  # the models' namespace label
    assert operator["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert operator["namespaceSelector"] == {"matchNames": ["obs"]}
    stages = monitors["t-partita-stages"]["spec"]["endpoints"][0]["relabelings"]
    assert {r["targetLabel"] for r in stages} == {"node", "revision", "stage", "shard", "entry"}
    (policy,) = of_kind(docs, "NetworkPolicy")
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}] and "from" not in rule
    scoped = helm_template(
        "--set-json",
        'networkPolicy.metricsFrom=[{"namespaceSelector": {"matchLabels": '
        '{"kubernetes.io/metadata.name": "monitoring"}}}]',
    )
    (policy,) = of_kind(scoped, "NetworkPolicy")
    (rule,) = policy["spec"]["ingress"]
    monitoring, stage_servers = rule["from"]
    assert monitoring["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    # Stage servers of every namespace still fetch their models from the same port.
    assert stage_servers == {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"partita.dev/component": "stage-server"}},
    }


@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="needs promtool (Debian prometheus)")
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    rules = []
    for name, text in render().items():
        doc = json.loads(text)
        exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
        exprs += [a["expr"] for a in doc.get("annotations", {}).get("list", [])]
        for i, expr in enumerate(exprs):
            promql = expr.replace("$__rate_interval", "1m")
            promql = re.sub(r"\$(\w+)", "x", promql)
            rules.append({"record": f"check:{name.removesuffix('.json').replace('-', '_')}_{i}",
                          "expr": promql})  # fmt: skip
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    r = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
