"""The planner's inputs from what the cluster holds and what Prometheus measured, typed all
the way: DevicePools (`partita.api`), Nodes (`NodeInfo`) and an `Observation`
(`partita.metrics`) become a `ClusterSnapshot`, an EdgeModel becomes a `ModelRequest`.

The operator and `partita plan --cluster FILE` both come through here: the operator with the
objects its indexes hold and the last poll, the CLI with the documents of a cluster file
(`cluster_from_documents`). Every default is the API's (pydantic field defaults), written once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from partita.api import edgemodel as api
from partita.api.devicepool import DevicePool, NetworkDefaults
from partita.api.errors import ManifestError
from partita.api.quantity import QuantityError, byte_count, cpu_cores
from partita.metrics.observation import LinkObservation, NodeUsage, Observation
from partita.model.types import ModelProfile, OpClass
from partita.planner import (
    Cascade,
    ClusterSnapshot,
    Compression,
    DevicePoolState,
    LinkEstimate,
    ModelRequest,
    NodeState,
    Objective,
    Partitioning,
    PartitioningMode,
    Quantization,
    Rescheduling,
    Slo,
    Taint,
    Tier,
    Toleration,
)

MBPS = 1e6  # bit/s in one Mbit/s
MS = 1e-3  # seconds in one millisecond
UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"
# What a node without `status.allocatable` is assumed to offer (a kwok node always has it).
DEFAULT_CPU = 1.0
DEFAULT_MEMORY = 4 * 2**30


class InputError(ValueError):
    """A document cannot become a planner input; the message names the object and field."""


@dataclass(frozen=True)
class NodeInfo:
    """The part of a Kubernetes Node that Partita reads (what the node index holds)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    cpu_allocatable: float = DEFAULT_CPU  # cores
    memory_allocatable: int = DEFAULT_MEMORY  # bytes
    ready: bool = True  # the kubelet's Ready condition is True
    schedulable: bool = True  # not cordoned

    def matches(self, selector: Mapping[str, str]) -> bool:
        return all(self.labels.get(k) == v for k, v in selector.items())


def node_info(body: Mapping[str, Any]) -> NodeInfo:
    """A NodeInfo of a Node object (a dict, a kopf Body or a cluster-file document)."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    name = str(meta.get("name") or "")
    if not name:
        raise InputError("a Node without metadata.name")
    alloc = status.get("allocatable") or {}
    try:
        cpu = (
            cpu_cores(alloc["cpu"], f"Node {name}.status.allocatable.cpu")
            if "cpu" in alloc
            else DEFAULT_CPU
        )
        memory = (
            byte_count(alloc["memory"], f"Node {name}.status.allocatable.memory")
            if "memory" in alloc
            else DEFAULT_MEMORY
        )
    except QuantityError as exc:
        raise InputError(str(exc)) from None
    conditions = status.get("conditions")
    # A node that reports no conditions at all (a cluster-file sketch) counts as Ready.
    ready = not conditions or any(
        c.get("type") == "Ready" and str(c.get("status")) == "True" for c in conditions
    )
    taints = tuple(
        Taint(str(t["key"]), str(t.get("value") or ""), str(t.get("effect") or "NoSchedule"))
        for t in spec.get("taints") or []
    )
    return NodeInfo(
        name=name,
        labels=dict(meta.get("labels") or {}),
        taints=taints,
        cpu_allocatable=cpu,
        memory_allocatable=memory,
        ready=ready,
        schedulable=not bool(spec.get("unschedulable")),
    )


def pool_members(pools: Sequence[DevicePool], nodes: Iterable[NodeInfo]) -> dict[str, str]:
    """node name -> the pool it belongs to: the first pool, by name, whose nodeSelector it
    carries (a node in two pools would otherwise be planned twice)."""
    ordered = sorted(pools, key=lambda p: p.metadata.name)
    out: dict[str, str] = {}
    for node in nodes:
        for pool in ordered:
            if node.matches(pool.spec.node_selector):
                out[node.name] = pool.metadata.name
                break
    return out


def pool_state(pool: DevicePool) -> DevicePoolState:
    spec = pool.spec
    return DevicePoolState(
        name=pool.metadata.name,
        tier=Tier(spec.tier.value),
        power_idle_watts=spec.power.idle_watts,
        power_active_watts=spec.power.active_watts,
        radio_watts=spec.power.radio_watts,
        speed_factor=spec.device.speed_factor,
        lan_bandwidth_bps=spec.network.lan_bandwidth_mbps * MBPS,
        lan_rtt_s=spec.network.lan_rtt_ms * MS,
    )


# What one segment of a sharded stage costs beyond onnxruntime, in seconds of one core of
# the CPU the reference speed is measured on: the shard server's call (HTTP, tensor codec,
# queueing) and the gateway's part in driving it. A node at a fraction of that speed pays
# it divided by the fraction. Measured by bench/shard_calls.py (bench/results/
# shard_calls.md): 2.2-3.1 ms of a core per segment for open-nsfw in 2-4 tiles.
SEGMENT_CALL_CORE_S = 2.5e-3


def pool_speed(pool: DevicePool, reference_gflops: float) -> float:
    """FLOP/s of one stage container in `pool`: declared, else the reference x speedFactor."""
    device = pool.spec.device
    if device.throughput_gflops is not None:
        return device.throughput_gflops * 1e9
    return reference_gflops * 1e9 * device.speed_factor


def default_link(a: NetworkDefaults, b: NetworkDefaults) -> tuple[float, float]:
    """(bit/s, s) between two pools nothing measured: the narrower uplink, the longer RTT."""
    bandwidth = min(a.uplink_bandwidth_mbps, b.uplink_bandwidth_mbps) * MBPS
    rtt = max(a.uplink_rtt_ms, b.uplink_rtt_ms) * MS
    return bandwidth, rtt


def snapshot_from_pools(
    pools: Sequence[DevicePool],
    nodes: Sequence[NodeInfo],
    *,
    reference_gflops: float,
    taken_at: float = 0.0,
) -> ClusterSnapshot:
    """The cluster as declared: every node of a pool, the pools' own speeds and network
    defaults. `apply_observation` lays what was measured over it."""
    by_name = {p.metadata.name: p for p in pools}
    members = pool_members(pools, nodes)
    states: list[NodeState] = []
    for node in nodes:
        pool_name = members.get(node.name)
        if pool_name is None:
            continue
        pool = by_name[pool_name]
        memory = node.memory_allocatable
        if pool.spec.device.memory is not None:
            memory = min(memory, byte_count(pool.spec.device.memory))
        taints = node.taints
        if not node.schedulable:
            taints += (Taint(UNSCHEDULABLE_TAINT, "", "NoSchedule"),)
        speed = pool_speed(pool, reference_gflops)
        states.append(
            NodeState(
                name=node.name,
                pool=pool_name,
                tier=Tier(pool.spec.tier.value),
                cpu_allocatable=node.cpu_allocatable,
                memory_allocatable=memory,
                speed={c: speed for c in OpClass},
                call_s=SEGMENT_CALL_CORE_S * reference_gflops * 1e9 / max(speed, 1.0),
                ready=node.ready,
                taints=taints,
                labels=dict(node.labels),
            )
        )
    ordered = sorted(pools, key=lambda p: p.metadata.name)
    links = []
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            bandwidth, rtt = default_link(a.spec.network, b.spec.network)
            links.append(LinkEstimate(a.metadata.name, b.metadata.name, bandwidth, rtt))
    return ClusterSnapshot(
        nodes=tuple(states),
        pools=tuple(pool_state(p) for p in ordered),
        links=tuple(links),
        taken_at=taken_at,
    )


def _usage(node: NodeState, usage: NodeUsage) -> NodeState:
    cpu_used = node.cpu_used
    if usage.cpu_utilisation is not None:
        cpu_used = min(max(usage.cpu_utilisation, 0.0), 1.0) * node.cpu_allocatable
    memory_used = node.memory_used
    if usage.memory_available is not None:
        # What the node's processes hold (a noisy neighbour counts too): MemTotal minus
        # MemAvailable where the total is known. A pool's device.memory caps what a stage
        # may use (memory_allocatable), so only what the node's use leaves below the cap
        # counts: free = min(cap, MemAvailable).
        total = usage.memory_total if usage.memory_total is not None else node.memory_allocatable
        held = max(total - usage.memory_available, 0.0)
        beyond_cap = max(total - node.memory_allocatable, 0.0)
        memory_used = int(min(max(held - beyond_cap, 0.0), node.memory_allocatable))
    return replace(node, cpu_used=cpu_used, memory_used=memory_used)


def apply_observation(
    snapshot: ClusterSnapshot, observation: Observation | None
) -> ClusterSnapshot:
    """The snapshot with what one poll measured: node CPU and memory in use, and the
    bandwidth and RTT of every link measured both ways between known pools (one measured
    direction stands for both when the other is missing)."""
    if observation is None:
        return snapshot
    nodes = tuple(
        _usage(n, observation.nodes[n.name]) if n.name in observation.nodes else n
        for n in snapshot.nodes
    )
    known = {p.name for p in snapshot.pools}
    measured: dict[tuple[str, str], LinkEstimate] = {}
    for (src, dst), seen in sorted(observation.links.items()):
        if src not in known or dst not in known or src == dst:
            continue
        if seen.bandwidth_bps is None or seen.bandwidth_bps <= 0 or seen.rtt_s is None:
            continue
        measured[(src, dst)] = LinkEstimate(src, dst, seen.bandwidth_bps, seen.rtt_s)
    links = list(measured.values())
    for link in snapshot.links:
        if (link.src, link.dst) not in measured and (link.dst, link.src) not in measured:
            links.append(link)
    return replace(snapshot, nodes=nodes, links=tuple(links), taken_at=observation.taken_at)


def model_request(
    model: api.EdgeModel,
    *,
    offload_rate: float | None = None,
    small: tuple[ModelProfile, float] | None = None,
    quantization: Quantization | None = None,
) -> ModelRequest:
    """The planner's view of an EdgeModel spec. `offload_rate` replaces the declared
    cascade offload rate once the servers have measured it; `small` is the cascade's small
    model (its profile and its speed over the main model's); `quantization` what was
    measured of int8 (`partita.control.quantization.planner_quantization`)."""
    s = model.spec
    cascade = None
    if s.cascade is not None:
        if small is None:
            raise InputError(
                f"EdgeModel {model.metadata.name}: the cascade's small model is not profiled yet"
            )
        rate = s.cascade.expected_offload_rate if offload_rate is None else offload_rate
        cascade = Cascade(
            threshold=s.cascade.threshold,
            offload_rate=min(max(rate, 0.0), 1.0),
            profile=small[0],
            speed_ratio=small[1],
        )
    if quantization is None:
        quantization = Quantization(
            allowed=s.quantization.allowed, max_accuracy_drop=s.quantization.max_accuracy_drop
        )
    return ModelRequest(
        name=model.metadata.name,
        namespace=model.metadata.namespace or "default",
        data_source=s.data_source,
        priority=s.priority,
        pools=tuple(s.pools),
        tiers=tuple(Tier(t.value) for t in s.tiers),
        partitioning=Partitioning(
            mode=PartitioningMode(s.partitioning.mode.value),
            max_stages=s.partitioning.max_stages,
            max_shards=s.partitioning.max_shards,
            cut_compression=Compression(s.partitioning.cut_compression.value),
        ),
        objective=Objective(s.objective.value),
        slo=Slo(
            p95_latency_s=s.slo.p95_latency_seconds if s.slo else None,
            min_throughput_rps=s.slo.min_throughput_rps if s.slo else None,
        ),
        privacy=Tier(s.privacy.raw_input_tier.value) if s.privacy else None,
        cascade=cascade,
        quantization=quantization,
        rescheduling=Rescheduling(
            min_improvement=s.rescheduling.min_improvement,
            cooldown_s=s.rescheduling.cooldown_seconds,
        ),
        tolerations=tuple(_toleration(t) for t in s.tolerations),
        cpu=s.resources.cpu,
    )


def _toleration(t: api.Toleration) -> Toleration:
    value = None if t.operator is api.TolerationOperator.EXISTS else (t.value or "")
    return Toleration(t.key, value, t.effect.value if t.effect else None)


# ---- the cluster file of `partita plan --cluster` ---------------------------------------------

CLUSTER_FILE_FORMAT = """\
The cluster file is multi-document YAML of the objects a cluster holds (DevicePool and Node,
exactly as `kubectl get -o yaml` shows them), plus two file-only kinds for what Prometheus
would report:

    apiVersion: partita.dev/v1alpha1
    kind: LinkEstimate                 # a measured link between two pools (one direction
    spec: {from: cameras, to: cloud, bandwidthMbps: 8, rttMs: 40}   # stands for both)
    ---
    apiVersion: partita.dev/v1alpha1
    kind: NodeUsage                    # what node_exporter says is in use on a node
    spec: {node: gw-0, cpuUtilisation: 0.25, memoryAvailable: 7Gi}

Between two pools without a LinkEstimate the link is the narrower uplink of the two
DevicePools and the longer RTT. A node belongs to the first pool, by name, whose nodeSelector
labels it carries. Other kinds are ignored."""


def _float(spec: Mapping[str, Any], key: str, where: str) -> float | None:
    value = spec.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}.spec.{key}: {value!r} is not a number") from None


def cluster_from_documents(
    docs: Iterable[Any],
) -> tuple[list[DevicePool], list[NodeInfo], Observation]:
    """DevicePools (validated by the API models), Nodes and what was measured, from the
    documents of a cluster file."""
    pools: list[DevicePool] = []
    nodes: list[NodeInfo] = []
    links: dict[tuple[str, str], LinkObservation] = {}
    usage: dict[str, NodeUsage] = {}
    for i, doc in enumerate(docs):
        if not isinstance(doc, Mapping):
            continue
        kind = doc.get("kind")
        spec = doc.get("spec") or {}
        if kind == "DevicePool":
            try:
                pools.append(DevicePool.parse(doc))
            except ManifestError as exc:
                raise InputError(f"document {i} (DevicePool): {exc}") from None
        elif kind == "Node":
            nodes.append(node_info(doc))
        elif kind == "LinkEstimate":
            where = f"document {i} (LinkEstimate)"
            src, dst = spec.get("from"), spec.get("to")
            if not src or not dst:
                raise InputError(f"{where}: spec.from and spec.to name two DevicePools")
            mbps, rtt_ms = _float(spec, "bandwidthMbps", where), _float(spec, "rttMs", where)
            if mbps is None or rtt_ms is None:
                raise InputError(f"{where}: spec.bandwidthMbps and spec.rttMs are both needed")
            links[(str(src), str(dst))] = LinkObservation(mbps * MBPS, rtt_ms * MS)
        elif kind == "NodeUsage":
            where = f"document {i} (NodeUsage)"
            name = spec.get("node")
            if not name:
                raise InputError(f"{where}: spec.node names the Node")
            available = spec.get("memoryAvailable")
            try:
                memory = None if available is None else float(byte_count(available, where))
            except QuantityError as exc:
                raise InputError(str(exc)) from None
            usage[str(name)] = NodeUsage(_float(spec, "cpuUtilisation", where), memory)
    if not pools:
        raise InputError("the cluster file declares no DevicePool; add at least one")
    declared = {p.metadata.name for p in pools}
    for src, dst in links:
        for end in (src, dst):
            if end not in declared:
                raise InputError(
                    f"LinkEstimate {src}->{dst}: pool {end!r} is not declared; "
                    f"pools: {', '.join(sorted(declared))}"
                )
    return pools, nodes, Observation(taken_at=0.0, nodes=usage, links=links)
