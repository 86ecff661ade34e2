"""The test bed and the operator's metrics: a scrape job of its own that keeps the labels
the operator sets (its `namespace` is the model's), with a target per operator pod the kubelet
runs (at the pod's one port, which serves /metrics)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from partita.testbed import prometheus


def test_the_operator_job_honours_its_labels_and_starts_empty(tmp_path: Path) -> None:
    path = prometheus.write_config(tmp_path, ["127.0.0.1:9100"])
    jobs = {j["job_name"]: j for j in yaml.safe_load(path.read_text())["scrape_configs"]}
    job = jobs[prometheus.OPERATOR_JOB]
    assert job["honor_labels"] is True
    (sd,) = job["file_sd_configs"]
    assert json.loads((tmp_path / sd["files"][0]).read_text()) == []


def test_operator_targets_are_replaced_whole(tmp_path: Path) -> None:
    prometheus.write_config(tmp_path, ["127.0.0.1:9100"])
    group = prometheus.TargetGroup(("127.0.0.1:8081",), {"pod": "partita-operator"})
    path = prometheus.write_operator_targets(tmp_path, [group])
    assert json.loads(path.read_text()) == [
        {"targets": ["127.0.0.1:8081"], "labels": {"pod": "partita-operator"}}
    ]
    prometheus.write_operator_targets(tmp_path, [])
    assert json.loads(path.read_text()) == []


def test_each_running_operator_pod_is_a_target_at_its_one_port() -> None:
    from partita.testbed.kubelet import targets

    groups = targets.operator_targets([("partita-system/partita-6d-x", 4321)])
    assert groups == [prometheus.TargetGroup(("127.0.0.1:4321",), {"pod": "partita-6d-x"})]
