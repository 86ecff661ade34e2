"""The test bed's Prometheus configuration and command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from partita.testbed import prometheus
from partita.testbed.errors import TestbedError


def test_config_scrapes_the_simulator_keeping_its_node_labels(tmp_path: Path) -> None:
    path = prometheus.write_config(tmp_path, ["127.0.0.1:9100"], scrape_interval=0.5)
    doc = yaml.safe_load(path.read_text())
    assert doc["global"]["scrape_interval"] == "500ms"
    assert doc["global"]["query_log_file"] == prometheus.QUERY_LOG
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert jobs["partita-sim"]["honor_labels"] is True
    assert jobs["partita-sim"]["static_configs"] == [{"targets": ["127.0.0.1:9100"]}]
    (sd,) = jobs["partita-servers"]["file_sd_configs"]
    assert json.loads((tmp_path / sd["files"][0]).read_text()) == []
    assert (tmp_path / "rules").is_dir()


def test_server_targets_are_replaced_whole(tmp_path: Path) -> None:
    prometheus.write_config(tmp_path, ["127.0.0.1:9100"])
    group = prometheus.TargetGroup(("127.0.0.1:8001",), {"pod": "m-stage-0", "node": "edge-a-1"})
    path = prometheus.write_server_targets(tmp_path, [group])
    assert json.loads(path.read_text()) == [
        {"targets": ["127.0.0.1:8001"], "labels": {"pod": "m-stage-0", "node": "edge-a-1"}}
    ]
    prometheus.write_config(tmp_path, ["127.0.0.1:9100"])  # a rewrite keeps the targets
    assert json.loads(path.read_text())[0]["targets"] == ["127.0.0.1:8001"]


@pytest.mark.parametrize(
    ("seconds", "text"), [(2, "2s"), (2.0, "2s"), (0.25, "250ms"), (15, "15s")]
)
def test_duration(seconds: float, text: str) -> None:
    assert prometheus.duration(seconds) == text


def test_duration_refuses_nonsense() -> None:
    with pytest.raises(TestbedError, match="must be a positive number"):
        prometheus.duration(0)


def test_command_listens_on_loopback_only(tmp_path: Path) -> None:
    argv = prometheus.command("/usr/bin/prometheus", tmp_path / "p.yml", tmp_path / "data", 9090)
    assert argv[0] == "/usr/bin/prometheus"
    assert "--web.listen-address=127.0.0.1:9090" in argv
    assert f"--config.file={tmp_path / 'p.yml'}" in argv
    assert "--web.enable-lifecycle" in argv
    assert any(a.startswith("--storage.tsdb.retention.time=") for a in argv)
