"""The cost model, written plainly: the reference every search result is checked against.

Per request: stage compute = Σ FLOPs / device speed of the op's class (+ a fixed cost
per graph node); a shard runs what the shard model model analysis cuts for it runs
(`ranges.ShardedRanges`), the strategy being the one whose busiest shard finishes first,
and every segment of it costs a stage-server call on its slowest node (`NodeState.call_s`);
transfers = bytes after cut compression / bandwidth + RTT; shards add the stage inputs
sent to them, the rows the server driving them relays between their segments (what each
shard sends its peers, up and down) and the gather of their output parts over the pool's LAN, one
round trip each. With a cascade, everything after the first stage is weighted by the
observed offload rate, and the cascade's small model (ahead of the stages) runs for every
request. Throughput = 1 / the busiest stage or link. Energy =
(active - idle watts) × busy time of every shard (what a request adds to the idle draw) +
radio watts × sending time on inter-pool links. Memory per node = parameters (int8 ones
scaled by the measured weight factor) + peak live activations + runtime overhead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from partita.model.types import ModelProfile

from .cascade import small_compute_s, small_memory, small_table
from .plan import (
    RELATIVE_TOLERANCE,
    CascadePlacement,
    Plan,
    Prediction,
    ShardPrediction,
    Stage,
    StagePrediction,
)
from .ranges import RangeTable, ShardedRanges, boundary_bytes, boundary_tensors, device_kind
from .request import Compression, ModelRequest, Objective, Quantization
from .snapshot import ClusterSnapshot, LinkEstimate, NodeState

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


@dataclass(frozen=True)
class ShardFigures:
    """A sharded stage as the strategy chosen for it would cut it."""

    strategy: str
    shards: tuple[ShardPrediction, ...]
    exchange_s: float  # inputs to the shards, relays, output parts on the LAN; segment calls
    exchanges: int
    exchange_bytes: int
    relayed_bytes: int


def shard_figures(
    profile: ModelProfile,
    table: RangeTable,
    stage: Stage,
    a: int,
    b: int,
    nodes: Sequence[NodeState | None],
    quantization: Quantization,
    overhead: float,
    lan: LinkEstimate,
) -> ShardFigures | str:
    """The figures of `stage` ([a, b) of `table`) cut in its shards by the strategy whose
    busiest shard finishes first on `nodes`; a refusal naming why when none may cut it.
    An int8 stage runs `quantization.speedup` faster on conv/matmul and holds its weights
    scaled by `quantization.weight_factor`."""
    k = len(stage.shards)
    found: list[tuple[float, ShardFigures]] = []
    refusals = []
    for sr in table.sharded.get(k, ()):
        if not sr.allowed(a, b):
            refusals.append(sr.refusal(profile, a, b))
            continue
        found.append(_shard_figures(sr, stage, a, b, nodes, quantization, overhead, lan))
    if not found:
        start, end = stage.start, stage.end
        why = "; ".join(refusals) or "model analysis found no way to split the model so"
        return f"nodes [{start}, {end}) cannot be cut in {k} shards ({why})"
    return min(found, key=lambda f: f[0])[1]


def _shard_figures(
    sr: ShardedRanges,
    stage: Stage,
    a: int,
    b: int,
    nodes: Sequence[NodeState | None],
    quantization: Quantization,
    overhead: float,
    lan: LinkEstimate,
) -> tuple[float, ShardFigures]:
    k = sr.shards
    split_flops = float((sr.split_flops[b] - sr.split_flops[a]).sum())
    speedup = quantization.speedup if stage.int8 else 1.0
    factor = quantization.weight_factor
    preds = []
    for i, (shard, node) in enumerate(zip(stage.shards, nodes, strict=True)):
        extra = shard.proportion - 1.0 / k
        compute = math.inf
        if node is not None and node.ready:
            mine, split = sr.times(device_kind(node, speedup))
            compute = float(mine[b, i] - mine[a, i] + extra * (split[b] - split[a]))
        flops = float(sr.flops[b, i] - sr.flops[a, i]) + extra * split_flops
        memory = float(sr.memory(a, b, i, shard.proportion, stage.int8, overhead, factor))
        preds.append(ShardPrediction(shard.node, compute, math.ceil(memory), flops))
    call_s = max((n.call_s for n in nodes if n is not None), default=0.0)
    exchange_s = float(sr.exchange_s(a, b, lan, call_s))
    count = int(sr.points_before[b] - sr.points_upto[a])
    received = int((sr.bytes_before[b] - sr.bytes_upto[a]).max())
    relayed = int(sr.relayed(a, b))
    busy = max(p.compute_s for p in preds) + exchange_s
    return busy, ShardFigures(sr.strategy, tuple(preds), exchange_s, count, received, relayed)


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
    if request.tiers and node.tier not in request.tiers:
        reasons.append(f"tier {node.tier} is not in spec.tiers")
    return reasons


def predict(plan: Plan, profile: ModelProfile, snapshot: ClusterSnapshot) -> Prediction:
    """Re-predict `plan` as deployed (same cuts, nodes, proportions) under `snapshot`."""
    return predict_stages(plan.request, plan.stages, profile, snapshot, cascade=plan.cascade)


def plan_for(
    request: ModelRequest,
    stages: Sequence[Stage],
    profile: ModelProfile,
    snapshot: ClusterSnapshot,
    revision: int = 1,
    table: RangeTable | None = None,
    cascade: CascadePlacement | None = None,
) -> Plan:
    """The plan deploying `stages` (behind the cascade's small model on `cascade`), with what
    the cost model predicts for it under `snapshot`."""
    stages = tuple(stages)
    prediction = predict_stages(request, stages, profile, snapshot, table, cascade)
    return Plan(request, stages, revision, prediction, cascade=cascade)


def predict_stages(
    request: ModelRequest,
    stages: Sequence[Stage],
    profile: ModelProfile,
    snapshot: ClusterSnapshot,
    table: RangeTable | None = None,
    cascade: CascadePlacement | None = None,
) -> Prediction:
    """Latency, throughput, energy, per-stage and per-shard figures of `stages` under `snapshot`.

    `table`: a range table of `profile` holding every stage boundary (built when None).
    With `request.cascade`, `cascade` is where its small model runs; with a cascade the
    latency and energy are means over requests (the small model's, then the offload rate
    times the main model's).
    """
    if table is None:
        table = RangeTable.build(
            profile, [0, len(profile.nodes), *(p for s in stages for p in (s.start, s.end))]
        )
    rate = request.cascade.offload_rate if request.cascade else 1.0
    quantization = request.quantization
    overhead = float(request.runtime_overhead_bytes)
    violations: list[str] = []
    lost: list[str] = []
    stage_preds: list[StagePrediction] = []
    latency = energy = bottleneck = 0.0
    prev_pool = request.data_source
    if not snapshot.has_pool(request.data_source):
        violations.append(f"data source pool {request.data_source} is not in the snapshot")
    if request.cascade is not None and cascade is not None:
        prev_pool = cascade.pool  # the small model runs ahead of the stages
    for stage in stages:
        weight = rate
        a, b = table.index(stage.start), table.index(stage.end)
        k = len(stage.shards)
        nodes = [snapshot.node(s.node) for s in stage.shards]
        for shard, node in zip(stage.shards, nodes, strict=True):
            if node is None or not node.ready:
                lost.append(shard.node)
                violations.append(f"stage {stage.index}: node {shard.node} is lost")
                continue
            for reason in node_blockers(node, request):
                if reason != "node is not Ready":
                    violations.append(f"stage {stage.index}: node {node.name}: {reason}")
            if node.pool != stage.pool:
                violations.append(f"stage {stage.index}: node {node.name} left pool {stage.pool}")
        lan = snapshot.link(stage.pool, stage.pool) if k > 1 else None
        sharded = None
        if k > 1:
            if lan is None:
                violations.append(f"stage {stage.index}: no link inside pool {stage.pool}")
            else:
                sharded = shard_figures(
                    profile, table, stage, a, b, nodes, quantization, overhead, lan
                )
                if isinstance(sharded, str):
                    violations.append(f"stage {stage.index}: {sharded}")
        speedup = quantization.speedup if stage.int8 else 1.0
        shard_preds = []
        if k == 1 or not isinstance(sharded, ShardFigures):
            for shard, node in zip(stage.shards, nodes, strict=True):
                memory = float(table.memory(a, b, stage.int8, overhead, quantization.weight_factor))
                compute = flops = math.inf if k > 1 else table.range_flops(a, b)
                if node is not None and node.ready and k == 1:
                    seconds = table.times(node, speedup)
                    compute = float(seconds[b] - seconds[a])
                shard_preds.append(ShardPrediction(shard.node, compute, math.ceil(memory), flops))
        else:
            shard_preds = list(sharded.shards)
        for pred, node in zip(shard_preds, nodes, strict=True):
            if node is not None and pred.memory_bytes > node.memory_free:
                violations.append(
                    f"stage {stage.index}: node {node.name} needs "
                    f"{pred.memory_bytes / 2**20:.1f} MiB, has {node.memory_free / 2**20:.1f} "
                    "MiB free"
                )
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
        energy += weight * pool.compute_watts * sum(s.compute_s for s in shard_preds)
        scatter_gather = 0.0
        if k > 1:
            scatter_gather = sharded.exchange_s if isinstance(sharded, ShardFigures) else math.inf
        busy = compute + scatter_gather
        stage_preds.append(
            StagePrediction(
                weight * compute,
                weight * transfer,
                weight * scatter_gather,
                weight * busy,
                tuple(shard_preds),
                float(table.wire[stage.input_compression][a]),
                *(
                    (
                        sharded.strategy,
                        sharded.exchanges,
                        sharded.exchange_bytes,
                        sharded.relayed_bytes,
                    )
                    if isinstance(sharded, ShardFigures)
                    else ()
                ),
            )
        )
        latency += weight * (transfer + busy)
        bottleneck = max(bottleneck, weight * busy, weight * wire)
        prev_pool = stage.pool
    small, small_in = None, 0.0
    if request.cascade is not None:
        small, small_in, small_energy, small_busy = _predict_cascade(
            request, cascade, table, snapshot, stage_preds, violations, lost
        )
        latency += small_in + small.compute_s
        energy += small_energy
        bottleneck = max(bottleneck, small_busy)
    # Answer back to the data source (for the share of requests the main model answers).
    out_weight = rate
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
        cascade=small,
        cascade_transfer_s=small_in,
        latency_s=latency,
        throughput_rps=throughput,
        energy_j=energy,
        cost=objective_cost(request.objective, latency, bottleneck, energy),
        stages=tuple(stage_preds),
        output_transfer_s=output_transfer,
        violations=tuple(dict.fromkeys(violations)),
        lost_nodes=tuple(dict.fromkeys(lost)),
    )


def _predict_cascade(
    request: ModelRequest,
    cascade: CascadePlacement | None,
    table: RangeTable,
    snapshot: ClusterSnapshot,
    stages: Sequence[StagePrediction],
    violations: list[str],
    lost: list[str],
) -> tuple[ShardPrediction, float, float, float]:
    """(the small model's prediction, transfer of the raw input to it, its energy, its busy
    time) for every request; what does not fit goes into `violations`."""
    if cascade is None:
        violations.append("the cascade's small model has no node")
        return ShardPrediction("", math.inf, 0), math.inf, 0.0, math.inf
    small = small_table(request)
    memory = small_memory(small, request)
    node = snapshot.node(cascade.node)
    if node is None or not node.ready:
        lost.append(cascade.node)
        violations.append(f"cascade: node {cascade.node} is lost")
        return ShardPrediction(cascade.node, math.inf, memory), math.inf, 0.0, math.inf
    compute = small_compute_s(small, node, request)
    for reason in node_blockers(node, request):
        violations.append(f"cascade: node {node.name}: {reason}")
    if node.pool != cascade.pool:
        violations.append(f"cascade: node {node.name} left pool {cascade.pool}")
    # The small model shares its node with any shard of `stages` (as predicted) placed there.
    beside = [sh.memory_bytes for s in stages for sh in s.shards if sh.node == cascade.node]
    if memory + sum(beside) > node.memory_free:
        violations.append(
            f"cascade: node {node.name} needs {(memory + sum(beside)) / 2**20:.1f} MiB with "
            f"the stages beside it, has {node.memory_free / 2**20:.1f} MiB free"
        )
    if beside and node.cpu_free * (1 + RELATIVE_TOLERANCE) < request.cpu * (1 + len(beside)):
        violations.append(
            f"cascade: node {node.name} has {node.cpu_free:g} cores free for "
            f"{1 + len(beside)} servers of {request.cpu:g}"
        )
    pool = snapshot.pool(cascade.pool)
    if request.privacy is not None and pool.tier != request.privacy:
        violations.append(
            f"cascade: raw input would leave tier {request.privacy} for pool {pool.name}"
        )
    transfer, wire, energy = math.inf, 0.0, 0.0
    link = snapshot.link(request.data_source, cascade.pool)
    if link is None:
        violations.append(f"cascade: no link {request.data_source} -> {cascade.pool}")
    else:
        wire = float(table.wire[Compression.NONE][0]) * 8.0 / link.bandwidth_bps
        transfer = wire + link.rtt_s
        if cascade.pool != request.data_source:
            energy += snapshot.pool(request.data_source).radio_watts * wire
    energy += pool.compute_watts * compute
    return ShardPrediction(cascade.node, compute, memory), transfer, energy, max(compute, wire)
