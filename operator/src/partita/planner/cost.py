"""The cost model, written plainly: the reference every search result is checked against.

Per request: stage compute = Σ FLOPs / device speed of the op's class (+ a fixed cost
per graph node); a shard does its proportion of the split work plus all of the rest
(`ranges.RangeTable` says which is which); transfers = bytes after cut compression /
bandwidth + RTT; shards add a scatter of the stage input and a gather of its output over
the pool's LAN. With a cascade, everything after the first stage is weighted by the
observed offload rate. Throughput = 1 / the busiest stage or link. Energy = active watts
× busy time of every shard + radio watts × sending time on inter-pool links. Memory per
node = parameters + peak live activations + runtime overhead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from partita.model.types import ModelProfile

from .plan import RELATIVE_TOLERANCE, Plan, Prediction, ShardPrediction, Stage, StagePrediction
from .ranges import RangeTable, boundary_bytes, boundary_tensors
from .request import Compression, ModelRequest, Objective
from .snapshot import ClusterSnapshot, NodeState

__all__ = [
    "boundary_bytes",
    "boundary_tensors",
    "carries_raw_input",
    "node_blockers",
    "objective_cost",
    "plan_for",
    "predict",
    "predict_stages",
]


def carries_raw_input(profile: ModelProfile, position: int) -> bool:
    if position == 0:
        return True
    names = {t.name for t in profile.inputs}
    return any(name in names for name, _d, _b in boundary_tensors(profile, position))


def objective_cost(
    objective: Objective, latency_s: float, bottleneck_s: float, energy_j: float
) -> float:
    if objective is Objective.THROUGHPUT:
        return bottleneck_s
    if objective is Objective.ENERGY:
        return energy_j
    return latency_s


def node_blockers(node: NodeState, request: ModelRequest) -> list[str]:
    """Why a stage of `request` may not run on `node` at all (memory aside)."""
    reasons = []
    if not node.ready:
        reasons.append("node is not Ready")
    for taint in node.taints:
        if taint.effect in ("NoSchedule", "NoExecute") and not any(
            t.tolerates(taint) for t in request.tolerations
        ):
            value = f"={taint.value}" if taint.value else ""
            reasons.append(f"taint {taint.key}{value}:{taint.effect} is not tolerated")
    if node.cpu_free * (1 + RELATIVE_TOLERANCE) < request.cpu:
        reasons.append(f"free cpu {node.cpu_free:g} < requested {request.cpu:g} cores")
    if request.pools and node.pool not in request.pools:
        reasons.append(f"pool {node.pool} is not in the model's allowed pools")
    return reasons


def predict(plan: Plan, profile: ModelProfile, snapshot: ClusterSnapshot) -> Prediction:
    """Re-predict `plan` as deployed (same cuts, nodes, proportions) under `snapshot`."""
    return predict_stages(plan.request, plan.stages, profile, snapshot)


def plan_for(
    request: ModelRequest,
    stages: Sequence[Stage],
    profile: ModelProfile,
    snapshot: ClusterSnapshot,
    revision: int = 1,
    table: RangeTable | None = None,
) -> Plan:
    """The plan deploying `stages`, with what the cost model predicts for it under `snapshot`."""
    stages = tuple(stages)
    prediction = predict_stages(request, stages, profile, snapshot, table)
    return Plan(request, stages, revision, prediction)


def predict_stages(
    request: ModelRequest,
    stages: Sequence[Stage],
    profile: ModelProfile,
    snapshot: ClusterSnapshot,
    table: RangeTable | None = None,
) -> Prediction:
    """Latency, throughput, energy, per-stage and per-shard figures of `stages` under `snapshot`.

    `table`: a range table of `profile` holding every stage boundary (built when None).
    """
    if table is None:
        table = RangeTable.build(
            profile, [0, len(profile.nodes), *(p for s in stages for p in (s.start, s.end))]
        )
    rate = request.cascade.offload_rate if request.cascade else 1.0
    speedup = request.quantization.speedup
    overhead = float(request.runtime_overhead_bytes)
    violations: list[str] = []
    lost: list[str] = []
    stage_preds: list[StagePrediction] = []
    latency = energy = bottleneck = 0.0
    prev_pool = request.data_source
    if not snapshot.has_pool(request.data_source):
        violations.append(f"data source pool {request.data_source} is not in the snapshot")
    for stage in stages:
        weight = 1.0 if stage.index == 0 else rate
        a, b = table.index(stage.start), table.index(stage.end)
        shard_preds = []
        for shard in stage.shards:
            memory = float(table.memory(a, b, shard.proportion, stage.int8, overhead))
            node = snapshot.node(shard.node)
            compute = math.inf
            if node is None or not node.ready:
                lost.append(shard.node)
                violations.append(f"stage {stage.index}: node {shard.node} is lost")
            else:
                split, whole = table.times(node, speedup if stage.int8 else 1.0)
                compute = float(shard.proportion * (split[b] - split[a]) + whole[b] - whole[a])
                for reason in node_blockers(node, request):
                    if reason != "node is not Ready":
                        violations.append(f"stage {stage.index}: node {node.name}: {reason}")
                if node.pool != stage.pool:
                    violations.append(
                        f"stage {stage.index}: node {node.name} left pool {stage.pool}"
                    )
                if memory > node.memory_free:
                    violations.append(
                        f"stage {stage.index}: node {node.name} needs {memory / 2**20:.1f} MiB, "
                        f"has {node.memory_free / 2**20:.1f} MiB free"
                    )
            shard_preds.append(ShardPrediction(shard.node, compute, math.ceil(memory)))
        if not snapshot.has_pool(stage.pool):
            violations.append(f"stage {stage.index}: pool {stage.pool} is gone")
            stage_preds.append(
                StagePrediction(math.inf, math.inf, 0.0, math.inf, tuple(shard_preds))
            )
            latency = math.inf
            continue
        pool = snapshot.pool(stage.pool)
        if (
            request.privacy is not None
            and carries_raw_input(profile, stage.start)
            and pool.tier != request.privacy
        ):
            violations.append(
                f"stage {stage.index}: raw input would leave tier {request.privacy} "
                f"for pool {pool.name}"
            )
        # Transfer into the stage.
        transfer = math.inf
        wire = 0.0
        if snapshot.has_pool(prev_pool):
            link = snapshot.link(prev_pool, stage.pool)
            if link is None:
                violations.append(f"stage {stage.index}: no link {prev_pool} -> {stage.pool}")
            else:
                wire = float(table.wire[stage.input_compression][a]) * 8.0 / link.bandwidth_bps
                transfer = wire + link.rtt_s
                if prev_pool != stage.pool:
                    energy += weight * snapshot.pool(prev_pool).radio_watts * wire
        compute = max((s.compute_s for s in shard_preds), default=math.inf)
        energy += weight * pool.power_active_watts * sum(s.compute_s for s in shard_preds)
        scatter_gather = 0.0
        k = len(stage.shards)
        if k > 1:
            lan = snapshot.link(stage.pool, stage.pool)
            assert lan is not None
            scatter, gather = table.exchange_bytes(a, b, k)
            scatter_gather = lan.transfer_s(float(scatter)) + lan.transfer_s(float(gather))
        busy = compute + scatter_gather
        stage_preds.append(
            StagePrediction(
                weight * compute,
                weight * transfer,
                weight * scatter_gather,
                weight * busy,
                tuple(shard_preds),
            )
        )
        latency += weight * (transfer + busy)
        bottleneck = max(bottleneck, weight * busy, weight * wire)
        prev_pool = stage.pool
    # Answer back to the data source.
    out_weight = 1.0 if len(stages) <= 1 else rate
    output_transfer = math.inf
    if snapshot.has_pool(prev_pool) and snapshot.has_pool(request.data_source):
        link = snapshot.link(prev_pool, request.data_source)
        if link is None:
            violations.append(f"no link {prev_pool} -> {request.data_source} for the answer")
        else:
            wire = float(table.wire[Compression.NONE][-1]) * 8.0 / link.bandwidth_bps
            # The answer returns through the chain of hops whose round trips are already
            # counted in each stage's transfer_in: only its bytes add time here.
            output_transfer = out_weight * wire
            bottleneck = max(bottleneck, out_weight * wire)
            if prev_pool != request.data_source:
                energy += out_weight * snapshot.pool(prev_pool).radio_watts * wire
    latency += output_transfer
    throughput = 1.0 / bottleneck if bottleneck > 0 else math.inf
    return Prediction(
        latency_s=latency,
        throughput_rps=throughput,
        energy_j=energy,
        cost=objective_cost(request.objective, latency, bottleneck, energy),
        stages=tuple(stage_preds),
        output_transfer_s=output_transfer,
        violations=tuple(dict.fromkeys(violations)),
        lost_nodes=tuple(dict.fromkeys(lost)),
    )
