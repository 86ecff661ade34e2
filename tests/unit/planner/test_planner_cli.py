"""`partita plan --cluster FILE`: the cluster file format and the command's output."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import yaml
from typer.testing import CliRunner

from partita.cli.main import app, build
from partita.cli.plan import load_cluster
from partita.model import synthetic
from partita.planner import Tier, plan_model

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "cluster"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("m") / "chain.onnx"
    onnx.save(synthetic.chain_model(nodes=40, width=64), path)
    return path


def test_plan_command_prints_json_and_a_plot(tiny_model, tmp_path):
    build()
    out = tmp_path / "plan.png"
    result = CliRunner().invoke(
        app,
        [
            "plan",
            str(tiny_model),
            "--cluster",
            str(EXAMPLES / "edge-cloud.yaml"),
            "--baselines",
            "--json",
            "--plot",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kind"] == "Plan"
    assert data["stages"] and data["stages"][0]["shards"]
    assert set(data["baselines"]) == {"edge-only", "cloud-only", "neurosurgeon", "network-unaware"}
    excluded = {e["name"]: e["reason"] for e in data["exclusions"]}
    assert "not Ready" in excluded["cloud-2"]
    assert out.stat().st_size > 1000


def test_plan_command_explains_an_unschedulable_model(tiny_model, tmp_path):
    build()
    docs = list(yaml.safe_load_all((EXAMPLES / "weak-edge.yaml").read_text()))
    for doc in docs:
        if doc["kind"] == "Node":
            doc["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    cluster = tmp_path / "down.yaml"
    cluster.write_text(yaml.safe_dump_all(docs))
    result = CliRunner().invoke(app, ["plan", str(tiny_model), "--cluster", str(cluster)])
    assert result.exit_code == 1
    assert "Unschedulable" in result.output
    assert "sensor-0" in result.output and "not Ready" in result.output


def test_the_weak_edge_example_keeps_private_input_on_sharded_sensors(tiny_model):
    from partita.model.profile import profile_model
    from partita.planner import ModelRequest

    snap = load_cluster(EXAMPLES / "weak-edge.yaml", 20.0)
    profile = profile_model(tiny_model)
    plan = plan_model(profile, ModelRequest("m", "sensors", privacy=Tier.EDGE), snap)
    assert plan.stages[0].pool == "sensors"
