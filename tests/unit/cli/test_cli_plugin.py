"""`kubectl partita status` as a person reads it: the stages of the serving plan with their
pools, nodes and shares, predicted against observed latency and the SLO, the rollout, node
speeds and where they come from, and the plan changes newest first."""

from __future__ import annotations

from rich.console import Console

from partita.api.edgemodel import EdgeModel
from partita.cli.plugin import Listed, ModelEvent, fleet_table, model_view

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
STATUS = {
    "phase": "Ready",
    "message": "revision 3 serving; the current plan is still the best",
    "conditions": [
        {"type": "Ready", "status": "True", "reason": "Serving", "message": "revision 3 serves"},
        {"type": "MetricsFresh", "status": "False", "reason": "Stale", "message": "no data"},
    ],
    "plan": {
        "revision": 3,
        "since": "2027-01-15T07:55:00Z",
        "stageCount": 2,
        "pools": "edge-a,cloud",
        "stages": [
            {"index": 0, "pool": "edge-a", "start": 0, "end": 40, "nodes": ["edge-a-1", "edge-a-2"],
             "shards": [{"node": "edge-a-1", "proportion": 0.6},
                        {"node": "edge-a-2", "proportion": 0.4}],
             "predictedComputeMs": 41.5, "predictedTransferMs": 0.5},
            {"index": 1, "pool": "cloud", "start": 40, "end": 120, "nodes": ["cloud-1"],
             "shards": [{"node": "cloud-1", "proportion": 1.0}], "compression": "fp16",
             "predictedComputeMs": 12.25, "predictedTransferMs": 9.75},
        ],
        "predictedP95Ms": 70.0,
        "observedP95Ms": 83.4,
        "reasons": ["edge-a:2 shards nodes 0..40 -> cloud:cloud-1 nodes 40..120 [fp16]"],
    },
    "rollout": {
        "revision": 4, "since": "2027-01-15T07:59:30Z", "pools": "cloud",
        "stages": [{"index": 0, "pool": "cloud", "start": 0, "end": 120, "nodes": ["cloud-2"],
                    "shards": [{"node": "cloud-2", "proportion": 1.0}]}],
        "predictedP95Ms": 40.0,
    },
    "nodeSpeeds": [
        {"node": "cloud-1", "gflops": 20.5, "source": "learned"},
        {"node": "edge-a-1", "gflops": 2.0, "source": "declared"},
    ],
}  # fmt: skip


def edge_model(name: str = "nsfw", status: dict | None = STATUS) -> EdgeModel:
    body = {
        "apiVersion": "partita.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {
            "source": {"uri": "file:///m.onnx", "sha256": "a" * 64},
            "dataSource": "edge-a",
            "slo": {"p95LatencySeconds": 0.1},
        },
    }
    if status is not None:
        body["status"] = status
    return EdgeModel.parse(body)


def text(renderable: object) -> str:
    console = Console(record=True, width=200, color_system=None)
    console.print(renderable)
    return console.export_text()


EVENTS = [
    ModelEvent(NOW - 3600, "Normal", "Planned", "revision 1: edge-a:edge-a-1 nodes 0..120"),
    ModelEvent(NOW - 600, "Normal", "Rescheduled", "revision 3 serves; because node(s) lost"),
    ModelEvent(NOW - 30, "Normal", "Rescheduling", "revision 4: cloud; because 45% better", 2),
]


def test_one_model_shows_its_plan_latency_speeds_and_history() -> None:
    out = text(model_view(edge_model(), EVENTS, NOW))
    assert "demo/nsfw" in out and "Ready" in out
    assert "revision 3, serving since 5m ago" in out
    assert "predicted 70.0 ms, observed 83.4 ms, SLO 100 ms" in out
    lines = out.splitlines()
    shard_rows = [line for line in lines if "edge-a-1" in line and "60%" in line]
    assert shard_rows and "0..40" in shard_rows[0] and "41.5 ms" in shard_rows[0]
    assert any("edge-a-2" in line and "40%" in line for line in lines)
    assert any("cloud-1" in line and "fp16" in line and "9.8 ms" in line for line in lines)
    assert "Rollout r4 (applied 30s ago): cloud, predicted 40.0 ms" in out
    assert "Plan r3: edge-a → cloud" in out
    assert any("cloud-1" in line and "20.50" in line and "learned" in line for line in lines)
    assert any("MetricsFresh" in line and "Stale" in line for line in lines)
    # Plan changes newest first, with repeats counted.
    order = [out.index(r) for r in ("Rescheduling", "Rescheduled", "Planned")]
    assert order == sorted(order)
    assert "because 45% better (x2)" in out


def test_a_model_without_a_plan_says_so() -> None:
    model = edge_model(status={"phase": "Unschedulable", "message": "cpu: edge-b has 1 free"})
    out = text(model_view(model, [], NOW))
    assert "Unschedulable" in out and "cpu: edge-b has 1 free" in out
    assert "no plan serving; SLO 100 ms" in out
    assert "no Events" in out


def test_the_fleet_table_has_one_row_per_model() -> None:
    rows = [
        Listed("demo", "nsfw", edge_model()),
        Listed("demo", "fresh", edge_model("fresh", status=None)),
        Listed("demo", "broken", None, "spec.dataSource: field required"),
    ]
    lines = text(fleet_table(rows, NOW)).splitlines()
    nsfw = next(line for line in lines if "nsfw" in line)
    assert "Ready" in nsfw and "edge-a → cloud" in nsfw and "predicted 70.0 ms" in nsfw
    assert any("fresh" in line and "Pending" in line for line in lines)
    assert any("broken" in line and "invalid" in line and "dataSource" in line for line in lines)
