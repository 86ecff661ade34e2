"""A ClusterSnapshot from the manifests a user applies: the `partita plan --cluster` file.

The file is multi-document YAML of the same objects a cluster holds, plus one
file-only kind for measured links (what Prometheus would report):

    apiVersion: partita.dev/v1alpha1
    kind: DevicePool                      # one per pool, fields as in the CRD
    metadata: {name: cameras}
    spec:
      tier: edge                          # edge | cloud
      nodeSelector: {partita.dev/pool: cameras}
      device:
        memory: 512Mi                     # per-stage memory cap (default: node allocatable)
        throughputGflops: 2.5             # FLOP/s of one stage container, /1e9; or
        speedFactor: 0.125                # x the reference speed (--reference-gflops)
      network:                            # defaults until measured
        uplinkBandwidthMbps: 20           # towards other pools
        uplinkRttMs: 30
        lanBandwidthMbps: 1000            # between nodes of this pool (shards)
        lanRttMs: 0.5
      power: {idleWatts: 2, activeWatts: 6, radioWatts: 1.5}
    ---
    apiVersion: v1
    kind: Node                            # a Kubernetes Node
    metadata:
      name: cam-1
      labels: {partita.dev/pool: cameras}
      annotations:                        # optional: what metrics say is in use
        partita.dev/cpu-used: "0.5"
        partita.dev/memory-used: 128Mi
    spec: {taints: [{key: dedicated, value: vision, effect: NoSchedule}]}
    status:
      allocatable: {cpu: "4", memory: 2Gi}
      conditions: [{type: Ready, status: "True"}]
    ---
    apiVersion: partita.dev/v1alpha1
    kind: LinkEstimate                    # optional, overrides the pools' uplink defaults
    spec: {from: cameras, to: cloud, bandwidthMbps: 8, rttMs: 40}

Between two pools without a LinkEstimate the link is the smaller uplink bandwidth
of the two and the larger RTT. A node belongs to the first pool (in file order)
whose nodeSelector labels it carries.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from partita.model.types import OpClass

from .errors import PlannerError
from .snapshot import ClusterSnapshot, DevicePoolState, LinkEstimate, NodeState, Taint, Tier

_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20,
          "Gi": 2**30, "Ti": 2**40, "m": 1e-3}  # fmt: skip


def quantity(value: object, where: str) -> float:
    """A Kubernetes quantity (`4Gi`, `500m`, `2`) as a number."""
    text = str(value).strip()
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)", text)
    if match is None or match.group(2) not in _UNITS:
        raise PlannerError(f"{where}: {text!r} is not a quantity such as 4Gi, 512Mi or 500m")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _get(doc: Mapping[str, Any], path: str, default: Any = None) -> Any:
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return default
        cur = cur[part]
    return cur


def snapshot_from_manifests(
    docs: Iterable[Mapping[str, Any]],
    reference_gflops: float = 20.0,
    taken_at: float = 0.0,
) -> ClusterSnapshot:
    """Map DevicePool, Node and LinkEstimate documents to a snapshot (others are ignored)."""
    pools: list[tuple[dict[str, Any], DevicePoolState, float, dict[str, float]]] = []
    node_docs: list[Mapping[str, Any]] = []
    link_docs: list[Mapping[str, Any]] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, Mapping):
            continue
        kind = doc.get("kind")
        if kind == "DevicePool":
            pools.append(_pool(doc, i, reference_gflops))
        elif kind == "Node":
            node_docs.append(doc)
        elif kind == "LinkEstimate":
            link_docs.append(doc)
    if not pools:
        raise PlannerError("the cluster file declares no DevicePool; add at least one")
    nodes = []
    for doc in node_docs:
        name = _get(doc, "metadata.name")
        where = f"Node {name}"
        labels = _get(doc, "metadata.labels", {}) or {}
        member = next((p for p in pools if all(labels.get(k) == v for k, v in p[0].items())), None)
        if member is None:
            continue
        _selector, pool, flops, net = member
        alloc = _get(doc, "status.allocatable", {}) or {}
        memory = quantity(alloc.get("memory", "4Gi"), f"{where}.status.allocatable.memory")
        if net.get("memory"):
            memory = min(memory, net["memory"])
        ann = _get(doc, "metadata.annotations", {}) or {}
        ready = any(
            c.get("type") == "Ready" and str(c.get("status")) == "True"
            for c in _get(doc, "status.conditions", []) or []
        ) or not _get(doc, "status.conditions")
        taints = tuple(
            Taint(str(t["key"]), str(t.get("value", "")), str(t.get("effect", "NoSchedule")))
            for t in _get(doc, "spec.taints", []) or []
        )
        if _get(doc, "spec.unschedulable", False):
            taints += (Taint("node.kubernetes.io/unschedulable", "", "NoSchedule"),)
        nodes.append(
            NodeState(
                name=str(name),
                pool=pool.name,
                tier=pool.tier,
                cpu_allocatable=quantity(alloc.get("cpu", "1"), f"{where}.status.allocatable.cpu"),
                memory_allocatable=int(memory),
                speed={c: flops for c in OpClass},
                cpu_used=quantity(ann.get("partita.dev/cpu-used", "0"), f"{where} cpu-used"),
                memory_used=int(
                    quantity(ann.get("partita.dev/memory-used", "0"), f"{where} memory-used")
                ),
                ready=ready,
                taints=taints,
                labels=dict(labels),
            )
        )
    links = []
    declared = {p[1].name for p in pools}
    for doc in link_docs:
        src, dst = _get(doc, "spec.from"), _get(doc, "spec.to")
        for end in (src, dst):
            if end not in declared:
                raise PlannerError(
                    f"LinkEstimate {src}->{dst}: pool {end!r} is not declared; "
                    f"pools: {', '.join(sorted(declared))}"
                )
        links.append(
            LinkEstimate(
                str(src),
                str(dst),
                float(_get(doc, "spec.bandwidthMbps", 100.0)) * 1e6,
                float(_get(doc, "spec.rttMs", 20.0)) / 1e3,
            )
        )
    known = {(link.src, link.dst) for link in links} | {(link.dst, link.src) for link in links}
    for a in pools:
        for b in pools:
            name_a, name_b = a[1].name, b[1].name
            if name_a < name_b and (name_a, name_b) not in known:
                links.append(
                    LinkEstimate(
                        name_a,
                        name_b,
                        min(a[3]["uplink_bps"], b[3]["uplink_bps"]),
                        max(a[3]["uplink_rtt_s"], b[3]["uplink_rtt_s"]),
                    )
                )
    return ClusterSnapshot(
        nodes=tuple(nodes),
        pools=tuple(p[1] for p in pools),
        links=tuple(links),
        taken_at=taken_at,
    )


def _pool(
    doc: Mapping[str, Any], index: int, reference_gflops: float
) -> tuple[dict[str, Any], DevicePoolState, float, dict[str, float]]:
    name = _get(doc, "metadata.name")
    if not name:
        raise PlannerError(f"document {index}: DevicePool without metadata.name")
    where = f"DevicePool {name}"
    tier_text = _get(doc, "spec.tier")
    try:
        tier = Tier(tier_text)
    except ValueError:
        raise PlannerError(f"{where}.spec.tier: {tier_text!r} is not edge or cloud") from None
    selector = _get(doc, "spec.nodeSelector") or {}
    if not selector:
        raise PlannerError(f"{where}.spec.nodeSelector is empty; give the labels of its nodes")
    factor = float(_get(doc, "spec.device.speedFactor", 1.0))
    gflops = _get(doc, "spec.device.throughputGflops")
    flops = float(gflops) * 1e9 if gflops is not None else reference_gflops * 1e9 * factor
    net = {
        "uplink_bps": float(_get(doc, "spec.network.uplinkBandwidthMbps", 100.0)) * 1e6,
        "uplink_rtt_s": float(_get(doc, "spec.network.uplinkRttMs", 20.0)) / 1e3,
    }
    memory = _get(doc, "spec.device.memory")
    if memory is not None:
        net["memory"] = quantity(memory, f"{where}.spec.device.memory")
    pool = DevicePoolState(
        name=str(name),
        tier=tier,
        power_idle_watts=float(_get(doc, "spec.power.idleWatts", 0.0)),
        power_active_watts=float(_get(doc, "spec.power.activeWatts", 0.0)),
        radio_watts=float(_get(doc, "spec.power.radioWatts", 0.0)),
        speed_factor=factor,
        lan_bandwidth_bps=float(_get(doc, "spec.network.lanBandwidthMbps", 1000.0)) * 1e6,
        lan_rtt_s=float(_get(doc, "spec.network.lanRttMs", 0.5)) / 1e3,
    )
    return dict(selector), pool, flops, net
