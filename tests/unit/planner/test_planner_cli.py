"""`partita plan --cluster FILE`: the cluster file format and the command's output."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import yaml
from typer.testing import CliRunner

from partita.cli.main import app, build
from partita.model import synthetic
from partita.planner import PlannerError, Tier, plan_model
from partita.planner.manifests import snapshot_from_manifests

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "cluster"


def load(name: str):
    return snapshot_from_manifests(yaml.safe_load_all((EXAMPLES / name).read_text()))


def test_example_cluster_maps_pools_nodes_links_and_status():
    snap = load("edge-cloud.yaml")
    assert [p.name for p in snap.pools] == ["cameras", "gateway", "cloud"]
    cams = snap.nodes_in("cameras")
    assert len(cams) == 4 and all(n.tier is Tier.EDGE for n in cams)
    assert cams[0].memory_allocatable == 512 * 2**20  # capped by device.memory
    assert snap.node("cloud-2").ready is False
    assert snap.node("cloud-1").taints[0].key == "dedicated"
    assert snap.node("gw-0").memory_used == 2**30
    link = snap.link("cloud", "cameras")
    assert link is not None and link.bandwidth_bps == 8e6 and link.rtt_s == 0.04
    weak = load("weak-edge.yaml")
    # No LinkEstimate: the smaller uplink and the larger RTT of the two pools.
    default = weak.link("sensors", "cloud")
    assert default is not None and default.bandwidth_bps == 5e6 and default.rtt_s == 0.04


def test_bad_cluster_file_names_the_field():
    pool = {"kind": "DevicePool", "metadata": {"name": "x"}, "spec": {"tier": "fog"}}
    with pytest.raises(PlannerError, match=r"DevicePool x\.spec\.tier: 'fog'"):
        snapshot_from_manifests([pool])
    link = {"kind": "LinkEstimate", "spec": {"from": "a", "to": "b"}}
    good = {"kind": "DevicePool", "metadata": {"name": "a"},
            "spec": {"tier": "edge", "nodeSelector": {"p": "a"}}}  # fmt: skip
    with pytest.raises(PlannerError, match="pool 'b' is not declared"):
        snapshot_from_manifests([good, link])


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

    snap = load("weak-edge.yaml")
    profile = profile_model(tiny_model)
    plan = plan_model(profile, ModelRequest("m", "sensors", privacy=Tier.EDGE), snap)
    assert plan.stages[0].pool == "sensors"
