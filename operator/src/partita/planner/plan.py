"""What the planner returns: a plan with its predictions and its reasons, or a refusal."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from .request import Compression, ModelRequest, Slo

# Slack for floating-point comparisons of costs and SLO bounds (relative).
RELATIVE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class ShardPlacement:
    """One container of a stage: the node it is pinned to and its share of the stage's work."""

    node: str
    proportion: float  # of the stage's split work (1.0 when the stage is not split)


@dataclass(frozen=True)
class Stage:
    """Graph nodes [start, end) of the profile, run in one pool on one node or as shards."""

    index: int
    pool: str
    start: int
    end: int
    shards: tuple[ShardPlacement, ...]
    inputs: tuple[str, ...]  # tensors arriving at this stage
    outputs: tuple[str, ...]  # tensors this stage sends on (or the model outputs)
    input_compression: Compression  # encoding of `inputs` on the link into this stage
    int8: bool = False  # the stage runs an int8-quantized slice

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(s.node for s in self.shards)

    @property
    def proportions(self) -> tuple[float, ...]:
        return tuple(s.proportion for s in self.shards)


@dataclass(frozen=True)
class CascadePlacement:
    """Where the cascade's small model runs: one server on one node of the data source's tier."""

    pool: str
    node: str


@dataclass(frozen=True)
class ShardPrediction:
    """One container's predicted busy time per request it serves, and the memory it holds."""

    node: str
    compute_s: float  # not weighted by the cascade offload rate (inf when the node is lost)
    memory_bytes: int  # params + peak activations + runtime overhead
    # FLOPs the shard runs per request (its share of the split work, halo and replicated
    # work included): the figure of the shard model model analysis cuts for this stage.
    flops: float = 0.0


@dataclass(frozen=True)
class StagePrediction:
    """One stage's predicted times per request, weighted by the cascade offload rate."""

    compute_s: float  # the slowest shard
    transfer_in_s: float  # from the previous stage (or the data source)
    scatter_gather_s: float  # shards: fan-out, exchanges and gather on the LAN, segment calls
    busy_s: float  # what limits pipelined throughput at this stage
    shards: tuple[ShardPrediction, ...]
    wire_bytes: float = 0.0  # bytes of its inputs on the wire per request reaching it
    strategy: str = ""  # how a sharded stage splits ("tile", "width"), "" when run whole
    exchanges: int = 0  # exchange points between the stage's segments
    exchange_bytes: int = 0  # bytes the busiest shard receives in them
    relayed_bytes: int = 0  # bytes the server driving the shards relays between segments


@dataclass(frozen=True)
class Prediction:
    """A plan's predicted behaviour under some snapshot, and what (if anything) breaks it."""

    latency_s: float
    throughput_rps: float
    energy_j: float
    cost: float  # the objective: latency s, energy J, or bottleneck s (1/throughput)
    stages: tuple[StagePrediction, ...]
    output_transfer_s: float  # last stage back to the data source
    violations: tuple[str, ...] = ()
    lost_nodes: tuple[str, ...] = ()  # nodes of the plan missing or not Ready
    # The cascade's small model: every request's compute and transfer into it (not weighted).
    cascade: ShardPrediction | None = None
    cascade_transfer_s: float = 0.0

    @property
    def feasible(self) -> bool:
        return not self.violations

    @property
    def memory_per_node(self) -> Mapping[str, int]:
        out: dict[str, int] = {}
        shards = [sh for stage in self.stages for sh in stage.shards]
        for shard in [*shards, *([self.cascade] if self.cascade else [])]:
            out[shard.node] = out.get(shard.node, 0) + shard.memory_bytes
        return out

    @property
    def compute_s(self) -> float:
        small = self.cascade.compute_s if self.cascade else 0.0
        return small + sum(s.compute_s + s.scatter_gather_s for s in self.stages)

    @property
    def transfer_s(self) -> float:
        into = sum(s.transfer_in_s for s in self.stages) + self.cascade_transfer_s
        return into + self.output_transfer_s


def meets_slo(prediction: Prediction, slo: Slo, margin: float = 0.0) -> bool:
    """Whether a feasible prediction keeps the p95 latency and minimum throughput asked for.

    With `margin` m, by that relative margin: latency at most (1 - m) × the p95 target,
    throughput at least the minimum / (1 - m).
    """
    keep = 1.0 - margin
    return (
        prediction.feasible
        and (
            slo.p95_latency_s is None
            or prediction.latency_s <= keep * slo.p95_latency_s * (1 + RELATIVE_TOLERANCE)
        )
        and (
            slo.min_throughput_rps is None
            or keep * prediction.throughput_rps >= slo.min_throughput_rps * (1 - RELATIVE_TOLERANCE)
        )
    )


@dataclass(frozen=True)
class Alternative:
    """A runner-up plan and its prediction, so users see what was turned down."""

    label: str
    summary: str
    prediction: Prediction


class ExclusionKind(StrEnum):
    POOL = "pool"
    NODE = "node"


@dataclass(frozen=True)
class Exclusion:
    kind: ExclusionKind
    name: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """Stages to deploy and what the cost model predicts for them under the snapshot planned on."""

    request: ModelRequest
    stages: tuple[Stage, ...]
    revision: int
    prediction: Prediction
    alternatives: tuple[Alternative, ...] = ()
    exclusions: tuple[Exclusion, ...] = ()
    notes: tuple[str, ...] = ()
    cascade: CascadePlacement | None = None  # the small model, ahead of `stages`

    @property
    def placement(self) -> tuple[tuple[str, int, int, tuple[str, ...], str, bool], ...]:
        """What would be deployed; two plans with the same placement are the same plan."""
        small = (
            ((self.cascade.pool, -1, -1, (self.cascade.node,), "none", False),)
            if self.cascade
            else ()
        )
        return small + tuple(
            (s.pool, s.start, s.end, s.nodes, s.input_compression.value, s.int8)
            for s in self.stages
        )

    @property
    def meets_slo(self) -> bool:
        return meets_slo(self.prediction, self.request.slo)

    def describe(self) -> str:
        parts = [f"cascade {self.cascade.pool}:{self.cascade.node}"] if self.cascade else []
        for s in self.stages:
            where = s.nodes[0] if len(s.shards) == 1 else f"{len(s.shards)} shards"
            extra = " int8" if s.int8 else ""
            comp = "" if s.input_compression is Compression.NONE else f" [{s.input_compression}]"
            parts.append(f"{s.pool}:{where} nodes {s.start}..{s.end}{extra}{comp}")
        return " -> ".join(parts)


@dataclass(frozen=True)
class Unschedulable:
    """No plan satisfies the constraints; `reasons` say which and what would help."""

    request: ModelRequest
    reasons: tuple[str, ...]
    exclusions: tuple[Exclusion, ...] = ()


PlanResult = Plan | Unschedulable


class Action(StrEnum):
    KEEP = "keep"
    MOVE = "move"


@dataclass(frozen=True)
class Decision:
    """The rescheduler's verdict: keep the current plan or move to `plan`, and why."""

    action: Action
    reason: str
    plan: PlanResult | None  # the plan to deploy when moving; the best candidate otherwise
    current_cost: float
    best_cost: float
    improvement: float  # (current - best) / |current|; 0 when not comparable


def _plain(value: object) -> object:
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    return value


def result_to_dict(result: PlanResult) -> dict[str, object]:
    """JSON-ready form of a plan or refusal (for `--json` and the EdgeModel status)."""
    out = _plain(result)
    assert isinstance(out, dict)
    out["kind"] = type(result).__name__
    if isinstance(result, Plan):
        out["memory_per_node"] = dict(result.prediction.memory_per_node)
        out["meets_slo"] = result.meets_slo
        out["summary"] = result.describe()
    return out
