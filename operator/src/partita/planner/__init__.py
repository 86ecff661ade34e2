"""partita.planner: pure placement of model stages and shards on edge and cloud pools.

No I/O, no clock, no Kubernetes client: every input is a frozen snapshot, every
answer a frozen plan (or `Unschedulable`) carrying its reasons.
"""

from __future__ import annotations

from .baselines import baselines
from .cost import plan_for, predict
from .errors import PlannerError
from .multi import plan_many
from .plan import (
    Action,
    Alternative,
    CascadePlacement,
    Decision,
    Exclusion,
    ExclusionKind,
    Plan,
    PlanResult,
    Prediction,
    ShardPlacement,
    ShardPrediction,
    Stage,
    StagePrediction,
    Unschedulable,
    meets_slo,
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
    same_spec,
)
from .reschedule import reschedule
from .search import plan_model
from .snapshot import ClusterSnapshot, DevicePoolState, LinkEstimate, NodeState, Taint, Tier
from .space import SearchSpace

__all__ = [
    "Action",
    "Alternative",
    "Cascade",
    "CascadePlacement",
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
    "ShardPrediction",
    "Slo",
    "Stage",
    "StagePrediction",
    "Taint",
    "Tier",
    "Toleration",
    "Unschedulable",
    "baselines",
    "meets_slo",
    "plan_for",
    "plan_many",
    "plan_model",
    "predict",
    "reschedule",
    "same_spec",
]
