"""What the planner knows about the cluster: a frozen, already-measured snapshot.

The operator builds it from DevicePool and Node objects plus Prometheus metrics
(`partita.metrics`); the CLI builds it from a cluster file. The planner never reads
a clock: `taken_at` is the time the metrics were read, passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from partita.model.types import OpClass

from .errors import PlannerError


class Tier(StrEnum):
    EDGE = "edge"
    CLOUD = "cloud"


@dataclass(frozen=True)
class Taint:
    """A Kubernetes node taint; NoSchedule and NoExecute keep untolerating stages off."""

    key: str
    value: str = ""
    effect: str = "NoSchedule"


@dataclass(frozen=True)
class NodeState:
    """One Kubernetes node as the planner sees it.

    `speed` is FLOP/s per op class for one stage container with `ModelRequest.cpu`
    cores (profiled per pool, refined online by `partita.planner.calibration`).
    Op classes missing from `speed` fall back to `OpClass.OTHER`.
    """

    name: str
    pool: str
    tier: Tier
    cpu_allocatable: float  # cores
    memory_allocatable: int  # bytes
    speed: Mapping[OpClass, float]
    cpu_used: float = 0.0
    memory_used: int = 0
    ready: bool = True
    taints: tuple[Taint, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    op_overhead_s: float = 0.0  # fixed cost per graph node (kernel launch, dispatch)
    # What one call to a stage server here costs beyond onnxruntime (HTTP, tensor codec,
    # queueing, the gateway's share of driving it): each segment of a sharded stage pays it.
    call_s: float = 0.0

    @property
    def cpu_free(self) -> float:
        return self.cpu_allocatable - self.cpu_used

    @property
    def memory_free(self) -> int:
        return self.memory_allocatable - self.memory_used

    def speed_of(self, op_class: OpClass) -> float:
        value = self.speed.get(op_class)
        if value is None:
            value = self.speed.get(OpClass.OTHER, 0.0)
        return value


@dataclass(frozen=True)
class DevicePoolState:
    """A DevicePool: its tier, power figures for the energy objective and its LAN."""

    name: str
    tier: Tier
    power_idle_watts: float = 0.0
    power_active_watts: float = 0.0
    radio_watts: float = 0.0  # while sending over an inter-pool link
    speed_factor: float = 1.0  # declared slowdown/speedup vs the profiling reference
    lan_bandwidth_bps: float = 1e9  # between nodes of this pool (shard scatter/gather)
    lan_rtt_s: float = 0.0005

    @property
    def compute_watts(self) -> float:
        """What computing adds to the idle draw: the energy a request costs per busy second."""
        return max(self.power_active_watts - self.power_idle_watts, 0.0)


@dataclass(frozen=True)
class LinkEstimate:
    """Available bandwidth and round-trip time between two pools, `src` to `dst`."""

    src: str
    dst: str
    bandwidth_bps: float
    rtt_s: float

    def transfer_s(self, nbytes: float) -> float:
        return nbytes * 8.0 / self.bandwidth_bps + self.rtt_s


@dataclass(frozen=True)
class ClusterSnapshot:
    nodes: tuple[NodeState, ...]
    pools: tuple[DevicePoolState, ...]
    links: tuple[LinkEstimate, ...] = ()
    taken_at: float = 0.0  # when the metrics behind it were read (seconds, caller's clock)

    def pool(self, name: str) -> DevicePoolState:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise PlannerError(
            f"pool {name!r} is not in the cluster snapshot (pools: "
            f"{', '.join(p.name for p in self.pools) or 'none'}); "
            f"declare a DevicePool named {name!r}"
        )

    def has_pool(self, name: str) -> bool:
        return any(p.name == name for p in self.pools)

    def node(self, name: str) -> NodeState | None:
        for node in self.nodes:
            if node.name == name:
                return node
        return None

    def nodes_in(self, pool: str) -> tuple[NodeState, ...]:
        return tuple(n for n in self.nodes if n.pool == pool)

    def link(self, src: str, dst: str) -> LinkEstimate | None:
        """The link from pool `src` to pool `dst`; the reverse one if only that is known.

        Within one pool the pool's LAN figures apply.
        """
        if src == dst:
            pool = self.pool(src)
            return LinkEstimate(src, dst, pool.lan_bandwidth_bps, pool.lan_rtt_s)
        reverse = None
        for link in self.links:
            if link.src == src and link.dst == dst:
                return link
            if link.src == dst and link.dst == src:
                reverse = link
        if reverse is not None:
            return LinkEstimate(src, dst, reverse.bandwidth_bps, reverse.rtt_s)
        return None
