"""The cost model, written plainly: the reference every search result is checked against.

Per request: stage compute = Σ FLOPs / device speed of the op's class (+ a fixed cost
per graph node); a shard does its proportion of the shardable work plus all of the
rest; transfers = bytes after cut compression / bandwidth + RTT; shards add a scatter
of the stage input and a gather of its output over the pool's LAN. With a cascade,
everything after the first stage is weighted by the observed offload rate.
Throughput = 1 / the busiest stage or link. Energy = active watts × busy time of every
shard + radio watts × sending time on inter-pool links. Memory per node = parameters
+ peak live activations + runtime overhead.
"""

from __future__ import annotations

import math

from partita.model.types import CutPoint, ModelProfile, OpClass

from .errors import PlannerError
from .plan import Plan, Prediction, StagePrediction
from .request import Compression, ModelRequest, Objective
from .snapshot import ClusterSnapshot, NodeState

FLOAT_DTYPES = frozenset({"float32", "float64", "float16", "bfloat16"})
INT8_OP_CLASSES = frozenset({OpClass.CONV, OpClass.MATMUL})


def cut_at(profile: ModelProfile, position: int) -> CutPoint | None:
    for cut in profile.cut_points:
        if cut.position == position:
            return cut
    return None


def boundary_tensors(profile: ModelProfile, position: int) -> tuple[tuple[str, str, int], ...]:
    """(name, dtype, bytes) of what crosses position: inputs at 0, outputs at the end."""
    if position == 0:
        return tuple((t.name, t.dtype, t.nbytes) for t in profile.inputs)
    if position == len(profile.nodes):
        return tuple((t.name, t.dtype, t.nbytes) for t in profile.outputs)
    cut = cut_at(profile, position)
    if cut is None:
        raise PlannerError(
            f"position {position} is not a cut point of model {profile.digest[:12]}; "
            "re-plan against the current profile"
        )
    return tuple((t.name, t.dtype, t.nbytes) for t in cut.tensors)


def boundary_bytes(profile: ModelProfile, position: int, compression: Compression) -> float:
    """Bytes on the wire: fp16 halves and int8 quarters 32-bit float tensors."""
    total = 0.0
    for _name, dtype, nbytes in boundary_tensors(profile, position):
        if dtype in FLOAT_DTYPES and compression is not Compression.NONE:
            per_elem = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype]
            target = 2 if compression is Compression.FP16 else 1
            total += nbytes * min(1.0, target / per_elem)
        else:
            total += nbytes
    return total


def carries_raw_input(profile: ModelProfile, position: int) -> bool:
    if position == 0:
        return True
    names = {t.name for t in profile.inputs}
    return any(name in names for name, _d, _b in boundary_tensors(profile, position))


def range_times(
    profile: ModelProfile, node: NodeState, start: int, end: int, int8_speedup: float = 1.0
) -> tuple[float, float]:
    """(shardable, replicated) compute seconds of graph nodes [start, end) on `node`."""
    shardable = replicated = 0.0
    for op in profile.nodes[start:end]:
        t = (op.flops / _speed(node, op.op_class, int8_speedup)) if op.flops else 0.0
        if op.shardable:
            shardable += t
        else:
            replicated += t
        replicated += node.op_overhead_s
    return shardable, replicated


def _speed(node: NodeState, op_class: OpClass, int8_speedup: float) -> float:
    speed = node.speed_of(op_class)
    if op_class in INT8_OP_CLASSES:
        speed *= int8_speedup
    return speed


def range_memory(
    profile: ModelProfile,
    start: int,
    end: int,
    proportion: float,
    int8: bool,
    overhead: int,
) -> float:
    """Bytes one shard holding `proportion` of the shardable params needs."""
    shardable = sum(op.param_bytes for op in profile.nodes[start:end] if op.shardable)
    replicated = sum(op.param_bytes for op in profile.nodes[start:end] if not op.shardable)
    params = proportion * shardable + replicated
    if int8:
        params /= 4.0
    peak = max((op.live_bytes for op in profile.nodes[start:end]), default=0)
    return params + peak + overhead


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
    if node.cpu_free + 1e-9 < request.cpu:
        reasons.append(f"free cpu {node.cpu_free:g} < requested {request.cpu:g} cores")
    if request.pools and node.pool not in request.pools:
        reasons.append(f"pool {node.pool} is not in the model's allowed pools")
    return reasons


def predict(plan: Plan, profile: ModelProfile, snapshot: ClusterSnapshot) -> Prediction:
    """Re-predict `plan` as deployed (same cuts, nodes, proportions) under `snapshot`."""
    request = plan.request
    rate = request.cascade.offload_rate if request.cascade else 1.0
    speedup = request.quantization.speedup
    violations: list[str] = []
    lost: list[str] = []
    stage_preds: list[StagePrediction] = []
    memory: dict[str, int] = {}
    latency = energy = bottleneck = 0.0
    prev_pool = request.data_source
    if not snapshot.has_pool(request.data_source):
        violations.append(f"data source pool {request.data_source} is not in the snapshot")
    for stage in plan.stages:
        weight = 1.0 if stage.index == 0 else rate
        if not snapshot.has_pool(stage.pool):
            violations.append(f"stage {stage.index}: pool {stage.pool} is gone")
            stage_preds.append(StagePrediction(math.inf, math.inf, 0.0, math.inf))
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
                nbytes = boundary_bytes(profile, stage.start, stage.input_compression)
                wire = nbytes * 8.0 / link.bandwidth_bps
                transfer = wire + link.rtt_s
                if prev_pool != stage.pool:
                    energy += weight * snapshot.pool(prev_pool).radio_watts * wire
        # Shards.
        k = len(stage.shards)
        shard_times = []
        for shard in stage.shards:
            node = snapshot.node(shard.node)
            if node is None or not node.ready:
                lost.append(shard.node)
                violations.append(f"stage {stage.index}: node {shard.node} is lost")
                shard_times.append(math.inf)
                continue
            for reason in node_blockers(node, request):
                if reason != "node is not Ready":
                    violations.append(f"stage {stage.index}: node {node.name}: {reason}")
            if node.pool != stage.pool:
                violations.append(f"stage {stage.index}: node {node.name} left pool {stage.pool}")
            sh, rep = range_times(
                profile, node, stage.start, stage.end, speedup if stage.int8 else 1.0
            )
            t = shard.proportion * sh + rep
            shard_times.append(t)
            energy += weight * pool.power_active_watts * t
            mem = range_memory(
                profile,
                stage.start,
                stage.end,
                shard.proportion,
                stage.int8,
                request.runtime_overhead_bytes,
            )
            memory[node.name] = memory.get(node.name, 0) + math.ceil(mem)
            if mem > node.memory_free:
                violations.append(
                    f"stage {stage.index}: node {node.name} needs {mem / 2**20:.1f} MiB, "
                    f"has {node.memory_free / 2**20:.1f} MiB free"
                )
        compute = max(shard_times) if shard_times else math.inf
        scatter_gather = 0.0
        if k > 1:
            lan = snapshot.link(stage.pool, stage.pool)
            assert lan is not None
            scatter_gather = lan.transfer_s(
                (k - 1) * boundary_bytes(profile, stage.start, Compression.NONE)
            ) + lan.transfer_s((k - 1) / k * boundary_bytes(profile, stage.end, Compression.NONE))
        busy = compute + scatter_gather
        stage_preds.append(
            StagePrediction(
                weight * compute, weight * transfer, weight * scatter_gather, weight * busy
            )
        )
        latency += weight * (transfer + busy)
        bottleneck = max(bottleneck, weight * busy, weight * wire)
        prev_pool = stage.pool
    # Answer back to the data source.
    out_weight = 1.0 if len(plan.stages) <= 1 else rate
    output_transfer = math.inf
    if snapshot.has_pool(prev_pool) and snapshot.has_pool(request.data_source):
        link = snapshot.link(prev_pool, request.data_source)
        if link is None:
            violations.append(f"no link {prev_pool} -> {request.data_source} for the answer")
        else:
            nbytes = boundary_bytes(profile, len(profile.nodes), Compression.NONE)
            wire = nbytes * 8.0 / link.bandwidth_bps
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
        memory_per_node=memory,
        violations=tuple(dict.fromkeys(violations)),
        lost_nodes=tuple(dict.fromkeys(lost)),
    )
