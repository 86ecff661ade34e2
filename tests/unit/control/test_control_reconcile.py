"""EdgeModel and DevicePool reconciliation as data: status, conditions, Events, backoff."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from partita.api import DevicePool, EdgeModel
from partita.api.conditions import set_condition
from partita.api.meta import ConditionStatus
from partita.control.inputs import NodeInfo, node_info
from partita.control.models import reconcile_model
from partita.control.outcome import Backoff, EventType
from partita.control.pools import reconcile_pool, status_changed
from partita.kube.fetch import ModelFetcher
from partita.model.profile import profile_model

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"


def edge_model(uri: str, sha256: str, status: dict[str, Any] | None = None) -> EdgeModel:
    body: dict[str, Any] = {
        "apiVersion": "partita.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": "tiny", "namespace": "ns", "generation": 3},
        "spec": {
            "source": {"uri": uri, "sha256": sha256},
            "inputShapes": {"x": [1, 8]},
            "dataSource": "edge-a",
        },
    }
    if status:
        body["status"] = status
    return EdgeModel.parse(body)


def conditions(outcome_status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in outcome_status["conditions"]}


def profiler(path: Path, shapes: Any) -> Any:
    return profile_model(path, shapes)


def test_model_is_fetched_verified_and_profiled(tmp_path: Path, model_file: Any):
    fetcher = ModelFetcher(tmp_path / "cache")
    out = reconcile_model(edge_model(model_file.uri, model_file.sha256), fetcher, profiler, now=T0)
    assert out.retry_after_s is None and out.permanent_error is None
    assert out.status["observedGeneration"] == 3
    # The reconciler owns these two conditions only; phase, Planned and Ready are the loop's.
    assert conditions(out.status) == {
        "ModelFetched": ("True", "DigestVerified"),
        "Profiled": ("True", "Profiled"),
    }
    assert "phase" not in out.status
    model = out.status["model"]
    assert model["digest"] == model_file.sha256
    assert model["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 8]}]
    assert model["outputs"][0]["shape"] == [1, 2]
    assert model["totalFlops"] > 0
    assert [e.reason for e in out.events] == ["DigestVerified", "Profiled"]


def test_digest_mismatch_fails_with_backoff(tmp_path: Path, model_file: Any):
    fetcher = ModelFetcher(tmp_path / "cache")
    backoff = Backoff(first_s=5, factor=2, max_s=60)
    model = edge_model(model_file.uri, "f" * 64)
    delays = [
        reconcile_model(model, fetcher, profiler, now=T0, retry=r, backoff=backoff).retry_after_s
        for r in range(6)
    ]
    assert delays == [5, 10, 20, 40, 60, 60]
    out = reconcile_model(model, fetcher, profiler, now=T0)
    assert conditions(out.status)["ModelFetched"] == ("False", "DigestMismatch")
    fetched = next(c for c in out.status["conditions"] if c["type"] == "ModelFetched")
    assert model_file.sha256 in fetched["message"] and "source.sha256" in fetched["message"]
    assert [e.type for e in out.events if e.reason == "DigestMismatch"] == [EventType.WARNING]


def test_unparseable_model_is_a_permanent_error(tmp_path: Path):
    import hashlib

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all" * 10)
    digest = hashlib.sha256(junk.read_bytes()).hexdigest()
    out = reconcile_model(
        edge_model(junk.as_uri(), digest),
        ModelFetcher(tmp_path / "cache"),
        profiler,
        now=T0,
    )
    assert out.permanent_error is not None and out.retry_after_s is None
    assert conditions(out.status)["Profiled"] == ("False", "InvalidModel")


def test_repeated_reconcile_posts_no_new_events(tmp_path: Path, model_file: Any):
    fetcher = ModelFetcher(tmp_path / "c")
    model = edge_model(model_file.uri, model_file.sha256)
    first = reconcile_model(model, fetcher, profiler, now=T0)
    again = reconcile_model(
        edge_model(model_file.uri, model_file.sha256, first.status), fetcher, profiler, now=T1
    )
    assert again.events == ()
    assert {c["lastTransitionTime"] for c in again.status["conditions"]} == {T0}


def test_condition_time_moves_only_on_status_change():
    conds = set_condition((), "Ready", ConditionStatus.TRUE, "A", "m", now=T0, generation=1)
    same = set_condition(conds, "Ready", ConditionStatus.TRUE, "B", "n", now=T1, generation=2)
    flipped = set_condition(same, "Ready", ConditionStatus.FALSE, "C", "o", now=T1, generation=2)
    assert same[0].last_transition_time == T0 and same[0].reason == "B"
    assert flipped[0].last_transition_time == T1 and len(flipped) == 1


def pool(selector: dict[str, str]) -> DevicePool:
    return DevicePool.parse(
        {
            "apiVersion": "partita.dev/v1alpha1",
            "kind": "DevicePool",
            "metadata": {"name": "edge-a", "generation": 2},
            "spec": {"tier": "edge", "nodeSelector": selector, "device": {"throughputGflops": 7}},
        }
    )


def node(name: str, pool_name: str, ready: bool = True, cordoned: bool = False) -> NodeInfo:
    return node_info(
        {
            "metadata": {"name": name, "labels": {"partita.dev/pool": pool_name}},
            "spec": {"unschedulable": cordoned},
            "status": {"conditions": [{"type": "Ready", "status": str(ready)}]},
        }
    )


def test_pool_counts_ready_matching_nodes():
    nodes = [
        node("a-0", "edge-a"),
        node("a-1", "edge-a", ready=False),
        node("a-2", "edge-a", cordoned=True),
        node("c-0", "cloud"),
    ]
    out = reconcile_pool(pool({"partita.dev/pool": "edge-a"}), nodes, now=T0)
    assert out.status["ready"] == "1/3"
    assert out.status["nodes"] == ["a-0", "a-1", "a-2"]
    assert out.status["throughputGflops"] == 7
    assert conditions(out.status)["Ready"] == ("True", "NodesReady")


def test_pool_without_nodes_says_which_labels():
    out = reconcile_pool(pool({"partita.dev/pool": "edge-z"}), [node("a-0", "edge-a")], now=T0)
    assert conditions(out.status)["Ready"] == ("False", "NoMatchingNodes")
    assert "partita.dev/pool=edge-z" in out.status["conditions"][0]["message"]
    assert out.events[0].type is EventType.WARNING


def test_status_changed_ignores_timestamps_only():
    p = pool({"partita.dev/pool": "edge-a"})
    first = reconcile_pool(p, [node("a-0", "edge-a")], now=T0).status
    later = reconcile_pool(p, [node("a-0", "edge-a")], now=T1).status
    later["conditions"][0]["lastTransitionTime"] = T1
    assert not status_changed(first, later)
    assert status_changed(first, reconcile_pool(p, [], now=T1).status)
