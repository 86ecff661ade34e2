"""DevicePool (cluster-scoped): a set of nodes of one tier that Partita may place stages on."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from partita.api.meta import (
    CONDITIONS,
    LABEL_KEY,
    OBJECT,
    Condition,
    LabelValue,
    ObjectMeta,
    Tier,
    is_label_key,
)
from partita.api.quantity import BYTES_PATTERN, byte_count
from partita.api.rules import ApiModel, CelRule, StatusModel, parse_manifest


class DeviceKind(StrEnum):
    CPU = "cpu"
    GPU = "gpu"
    NPU = "npu"


class DeviceHints(ApiModel):
    """What the nodes of the pool are, when the node object does not say it well enough."""

    kind: DeviceKind = DeviceKind.CPU
    """The onnxruntime execution provider of the pool's stage servers: cpu
    (CPUExecutionProvider). gpu and npu are refused: the stage server image carries only
    onnxruntime's CPU provider."""
    memory: str | None = Field(None, max_length=32, pattern=BYTES_PATTERN)
    """Memory a stage may use on one node (a quantity, e.g. 2Gi); default: the node's
    allocatable memory."""
    throughput_gflops: float | None = Field(None, gt=0, le=1e7)
    """Declared speed of one stage container in GFLOP/s; when absent Partita profiles it."""
    speed_factor: float = Field(1.0, gt=0, le=1000)
    """Speed relative to the profiling reference (0.25 = four times slower)."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.kind == 'cpu'",
            message="device.kind: only cpu is supported: Partita's stage servers run "
            "onnxruntime's CPU execution provider (no GPU or NPU provider is installed)",
            holds=lambda d: d.kind == DeviceKind.CPU,
            field_path=".kind",
        ),
        CelRule(
            rule="!has(self.memory) || !self.memory.matches('^0+([.]0+)?[A-Za-z]*$')",
            message="device.memory must be more than zero bytes (e.g. 2Gi)",
            holds=lambda d: d.memory is None or byte_count(d.memory) > 0,
            field_path=".memory",
        ),
    )


class NetworkDefaults(ApiModel):
    """Link figures used while Prometheus has no measurement for this pool."""

    uplink_bandwidth_mbps: float = Field(100.0, gt=0, le=1e6)
    """Bandwidth from this pool towards other pools, in Mbit/s."""
    uplink_rtt_ms: float = Field(20.0, ge=0, le=60000)
    """Round-trip time towards other pools, in milliseconds."""
    lan_bandwidth_mbps: float = Field(1000.0, gt=0, le=1e6)
    """Bandwidth between nodes of this pool (shard scatter/gather), in Mbit/s."""
    lan_rtt_ms: float = Field(0.5, ge=0, le=60000)
    """Round-trip time between nodes of this pool, in milliseconds."""


class Power(ApiModel):
    """Power draw of one node, for the energy objective: a request costs what it adds to the
    idle draw, (activeWatts - idleWatts) x compute time, plus radioWatts x sending time."""

    idle_watts: float = Field(0.0, ge=0, le=1e5)
    """Draw of an idle node, in watts (paid with or without requests)."""
    active_watts: float = Field(0.0, ge=0, le=1e5)
    """Draw of a node busy computing, in watts."""
    radio_watts: float = Field(0.0, ge=0, le=1e5)
    """Extra draw while sending over an inter-pool link, in watts."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.activeWatts >= self.idleWatts",
            message="power.activeWatts must be at least power.idleWatts",
            holds=lambda p: p.active_watts >= p.idle_watts,
            field_path=".activeWatts",
        ),
    )


class DevicePoolSpec(ApiModel):
    """Which nodes form the pool and what Partita should assume about them."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule=f"self.nodeSelector.all(k, k.matches('{LABEL_KEY}') && (k.indexOf('/') <= 253))",
            message="nodeSelector keys must be label keys: an optional DNS-subdomain prefix "
            "and '/', then at most 63 letters, digits, '-', '_' or '.' starting and ending "
            "with a letter or digit (e.g. partita.dev/pool)",
            holds=lambda s: all(is_label_key(k) for k in s.node_selector),
            field_path=".nodeSelector",
        ),
    )

    tier: Tier
    """edge or cloud: stages that keep raw input private stay in their tier."""
    node_selector: dict[str, LabelValue] = Field(min_length=1, max_length=16)
    """Labels a node must carry, all of them, to belong to the pool
    (e.g. partita.dev/pool: edge-a)."""
    device: DeviceHints = Field(
        default_factory=lambda: DeviceHints.model_validate({}), json_schema_extra=OBJECT
    )
    """Device hints; the defaults describe a plain CPU node."""
    network: NetworkDefaults = Field(
        default_factory=lambda: NetworkDefaults.model_validate({}), json_schema_extra=OBJECT
    )
    """Network defaults, used until metrics arrive."""
    power: Power = Field(default_factory=lambda: Power.model_validate({}), json_schema_extra=OBJECT)
    """Power figures for the energy objective."""


class DevicePoolStatus(StatusModel):
    """What the operator observed about the pool."""

    observed_generation: int = Field(0, ge=0)
    """The `metadata.generation` this status describes."""
    ready_nodes: int = Field(0, ge=0)
    """Nodes matching the selector that are Ready and schedulable."""
    total_nodes: int = Field(0, ge=0)
    """Nodes matching the selector."""
    ready: str = Field("", max_length=32)
    """ready/total, for `kubectl get`."""
    nodes: list[str] = Field(default_factory=list, max_length=1000)
    """Names of the matching nodes."""
    throughput_gflops: float | None = Field(None, ge=0)
    """Declared speed of one stage container in GFLOP/s (spec.device.throughputGflops); a
    pool without one is profiled per model (see each EdgeModel's status.nodeSpeeds)."""
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, json_schema_extra=CONDITIONS
    )
    """Ready: the pool has at least one Ready node."""


class DevicePool(BaseModel):
    """A whole DevicePool object as the apiserver returns it."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    api_version: Literal["partita.dev/v1alpha1"] = Field("partita.dev/v1alpha1", alias="apiVersion")
    kind: Literal["DevicePool"] = "DevicePool"
    metadata: ObjectMeta
    spec: DevicePoolSpec
    status: DevicePoolStatus | None = None

    @classmethod
    def parse(cls, body: Any) -> DevicePool:
        """Parse a manifest or a kopf body; raises `ManifestError` naming the field."""
        return parse_manifest(cls, body)
