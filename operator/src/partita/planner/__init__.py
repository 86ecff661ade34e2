"""partita.planner: pure placement of model stages and shards on edge and cloud pools.

No I/O, no clock, no Kubernetes client: every input is a frozen snapshot, every
answer a frozen plan (or `Unschedulable`) carrying its reasons.
"""

from __future__ import annotations

from .baselines import baselines
from .cost import predict
from .errors import PlannerError
from .multi import plan_many
from .plan import (
    Action,
    Alternative,
    Decision,
    Exclusion,
    ExclusionKind,
    Plan,
    PlanResult,
    Prediction,
    ShardPlacement,
    Stage,
    StagePrediction,
    Unschedulable,
)
from .request import (
    Cascade,
    Compression,
    ModelRequest,
    Objective,
    Partitioning,
    PartitioningMode,
    Quantization,
    Rescheduling,
    Slo,
    Toleration,
)
from .reschedule import reschedule
from .search import SearchSpace, plan_model
from .snapshot import ClusterSnapshot, DevicePoolState, LinkEstimate, NodeState, Taint, Tier

__all__ = [
    "Action",
    "Alternative",
    "Cascade",
    "ClusterSnapshot",
    "Compression",
    "Decision",
    "DevicePoolState",
    "Exclusion",
    "ExclusionKind",
    "LinkEstimate",
    "ModelRequest",
    "NodeState",
    "Objective",
    "Partitioning",
    "PartitioningMode",
    "Plan",
    "PlanResult",
    "PlannerError",
    "Prediction",
    "Quantization",
    "Rescheduling",
    "SearchSpace",
    "ShardPlacement",
    "Slo",
    "Stage",
    "StagePrediction",
    "Taint",
    "Tier",
    "Toleration",
    "Unschedulable",
    "baselines",
    "plan_many",
    "plan_model",
    "predict",
    "reschedule",
]
