"""Observations as the planner's manifests: the snapshot the operator builds sees them."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from partita.metrics import (
    LinkObservation,
    NodeUsage,
    Observation,
    to_manifest_overlays,
    with_observation,
)
from partita.planner.manifests import snapshot_from_manifests

GI = 2**30


def pool(name: str, tier: str) -> dict[str, Any]:
    return {
        "apiVersion": "partita.dev/v1alpha1",
        "kind": "DevicePool",
        "metadata": {"name": name},
        "spec": {
            "tier": tier,
            "nodeSelector": {"partita.dev/pool": name},
            "network": {"uplinkBandwidthMbps": 100, "uplinkRttMs": 20},
        },
    }


def node(name: str, pool_name: str, cpu: str, memory: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"partita.dev/pool": pool_name},
            "annotations": {"keep": "me"},
        },
        "status": {
            "allocatable": {"cpu": cpu, "memory": memory},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


DOCS = [pool("edge-a", "edge"), pool("cloud", "cloud"), node("edge-a-1", "edge-a", "4", "4Gi"),
        node("cloud-1", "cloud", "32", "128Gi")]  # fmt: skip

OBS = Observation(
    taken_at=42.0,
    nodes={
        "edge-a-1": NodeUsage(cpu_utilisation=0.75, memory_available=1 * GI, memory_total=4 * GI),
        "cloud-1": NodeUsage(cpu_utilisation=0.1, memory_available=100 * GI, memory_total=None),
    },
    links={
        ("edge-a", "cloud"): LinkObservation(bandwidth_bps=5e6, rtt_s=0.04),
        ("edge-a", "elsewhere"): LinkObservation(bandwidth_bps=1e9, rtt_s=0.001),
        ("cloud", "edge-a"): LinkObservation(bandwidth_bps=None, rtt_s=0.04),
    },
)


def test_annotations_are_utilisation_times_allocatable_and_memory_in_use() -> None:
    annotations, links = to_manifest_overlays(OBS, [d for d in DOCS if d["kind"] == "Node"])
    assert annotations["edge-a-1"] == {
        "partita.dev/cpu-used": "3.000",
        "partita.dev/memory-used": str(3 * GI),
    }
    # no MemTotal: allocatable minus available
    assert annotations["cloud-1"]["partita.dev/memory-used"] == str(28 * GI)
    assert annotations["cloud-1"]["partita.dev/cpu-used"] == "3.200"
    # only links with both figures; without a pool list every pair is kept
    assert {(d["spec"]["from"], d["spec"]["to"]) for d in links} == {
        ("edge-a", "cloud"),
        ("edge-a", "elsewhere"),
    }


def test_the_snapshot_sees_the_observation() -> None:
    before = copy.deepcopy(DOCS)
    snap = snapshot_from_manifests(with_observation(DOCS, OBS), taken_at=OBS.taken_at)
    assert before == DOCS  # the caller's documents are not changed
    edge = snap.node("edge-a-1")
    assert edge is not None
    assert edge.cpu_used == pytest.approx(3.0)
    assert edge.memory_used == 3 * GI
    assert edge.cpu_free == pytest.approx(1.0)
    link = snap.link("edge-a", "cloud")
    assert link is not None
    assert (link.bandwidth_bps, link.rtt_s) == pytest.approx((5e6, 0.04))
    # cloud->edge-a had no bandwidth: the measured reverse direction stands in
    back = snap.link("cloud", "edge-a")
    assert back is not None and back.bandwidth_bps == pytest.approx(5e6)
    # a link to a pool nobody declared is dropped instead of failing the snapshot
    assert all(lk.dst != "elsewhere" for lk in snap.links)
    assert snap.taken_at == 42.0


def test_used_memory_never_exceeds_allocatable_nor_goes_negative() -> None:
    greedy = Observation(0.0, nodes={"edge-a-1": NodeUsage(1.7, 0.0, 64 * GI)})
    annotations, _ = to_manifest_overlays(greedy, [DOCS[2]])
    assert annotations["edge-a-1"] == {
        "partita.dev/cpu-used": "4.000",
        "partita.dev/memory-used": str(4 * GI),
    }
    roomy = Observation(0.0, nodes={"edge-a-1": NodeUsage(None, 8 * GI, None)})
    annotations, _ = to_manifest_overlays(roomy, [DOCS[2]])
    assert annotations["edge-a-1"] == {"partita.dev/memory-used": "0"}


def test_without_an_observation_the_documents_pass_through() -> None:
    assert with_observation(DOCS, None) == DOCS
    assert snapshot_from_manifests(with_observation(DOCS, None)).node("edge-a-1").cpu_used == 0.0  # type: ignore[union-attr, unused-ignore]
