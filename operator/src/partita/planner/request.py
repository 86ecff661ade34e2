"""What a user asked for: the planner's view of an EdgeModel spec.

Field names follow the EdgeModel API (`partita.api.edgemodel`): `dataSource`, `pools`,
`partitioning`, `objective`, `slo`, `privacy`, `cascade`, `quantization`,
`priority`, `rescheduling`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from partita.model.types import ModelProfile

from .snapshot import Taint, Tier


class Objective(StrEnum):
    LATENCY = "latency"
    THROUGHPUT = "throughput"
    ENERGY = "energy"


class PartitioningMode(StrEnum):
    AUTO = "auto"  # cuts across pools and shards within a pool
    NONE = "none"  # the whole model on one node
    VERTICAL = "vertical"  # cuts only
    HORIZONTAL = "horizontal"  # one stage, possibly sharded


class Compression(StrEnum):
    """Encoding of the tensors crossing a cut, in increasing compression."""

    NONE = "none"
    FP16 = "fp16"
    INT8 = "int8"


COMPRESSION_ORDER = (Compression.NONE, Compression.FP16, Compression.INT8)


@dataclass(frozen=True)
class Partitioning:
    mode: PartitioningMode = PartitioningMode.AUTO
    max_stages: int = 4
    max_shards: int = 4
    # The most aggressive encoding allowed at a cut (each one costs some accuracy).
    cut_compression: Compression = Compression.NONE


@dataclass(frozen=True)
class Slo:
    p95_latency_s: float | None = None
    min_throughput_rps: float | None = None


@dataclass(frozen=True)
class Cascade:
    """Confidence cascade: a small model (`profile`) answers every request first, in the
    data source's tier; `offload_rate` of them go on to the main model's stages.

    `speed_ratio` is the small model's measured speed (FLOP/s on the profiling reference)
    over the main model's, so the node speeds of the snapshot (the main model's) price it.
    """

    threshold: float
    offload_rate: float  # share of requests the small model forwards (measured, else declared)
    profile: ModelProfile
    speed_ratio: float = 1.0


@dataclass(frozen=True)
class Quantization:
    allowed: bool = False
    max_accuracy_drop: float = 0.0
    # Measured drop of the int8 model (partita.model.compress); None = not measured, never used.
    measured_accuracy_drop: float | None = None
    # int8 speed over float32 for conv and matmul, fitted so the whole model's predicted
    # int8 time is its measured one (partita.control.quantization).
    speedup: float = 1.5
    weight_factor: float = 0.25  # int8 weight bytes over float32's, measured on the model

    @property
    def usable(self) -> bool:
        return (
            self.allowed
            and self.measured_accuracy_drop is not None
            and self.measured_accuracy_drop <= self.max_accuracy_drop
        )


@dataclass(frozen=True)
class Rescheduling:
    # Relative cost gain needed to move. 0.4 is the smallest round value that makes
    # flapping impossible when every metric is within ±20% of its true value (see
    # partita.planner.reschedule).
    min_improvement: float = 0.4
    cooldown_s: float = 120.0


@dataclass(frozen=True)
class Toleration:
    key: str
    value: str | None = None  # None: tolerate any value of `key`
    effect: str | None = None  # None: every effect

    def tolerates(self, taint: Taint) -> bool:
        return (
            self.key == taint.key
            and (self.value is None or self.value == taint.value)
            and (self.effect is None or self.effect == taint.effect)
        )


@dataclass(frozen=True)
class ModelRequest:
    name: str
    data_source: str  # pool where requests enter and answers return
    namespace: str = "default"
    priority: int = 0
    pools: tuple[str, ...] = ()  # allowed pools; empty = all
    tiers: tuple[Tier, ...] = ()  # allowed tiers; empty = all
    partitioning: Partitioning = field(default_factory=Partitioning)
    objective: Objective = Objective.LATENCY
    slo: Slo = field(default_factory=Slo)
    privacy: Tier | None = None  # raw input never leaves this tier
    cascade: Cascade | None = None
    quantization: Quantization = field(default_factory=Quantization)
    rescheduling: Rescheduling = field(default_factory=Rescheduling)
    tolerations: tuple[Toleration, ...] = ()
    cpu: float = 1.0  # cores requested by each stage or shard container
    runtime_overhead_bytes: int = 32 * 2**20  # per container, on top of params and activations

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def same_spec(a: ModelRequest, b: ModelRequest) -> bool:
    """Whether two requests ask for the same plan. The cascade's offload rate is a
    measurement, not part of what the user asked for (a change in it is re-predicted and
    weighed by the rescheduler), and the rescheduling knobs say when a better plan is worth
    a move, not what a plan must be: a change in either is no reason to move."""
    return _spec_only(a) == _spec_only(b)


def _spec_only(request: ModelRequest) -> ModelRequest:
    request = replace(request, rescheduling=Rescheduling())
    if request.cascade is None:
        return request
    return replace(request, cascade=replace(request.cascade, offload_rate=0.0))
