"""The explanation: what was turned down and why, in terms a user can act on.

Runner-up plans (all in one pool, without shards, without cut compression) with their
predictions, the reason no plan exists, and what a missed SLO would have needed.
"""

from __future__ import annotations

from collections.abc import Callable

from .objective import optimize
from .plan import Alternative, Plan
from .request import Compression
from .space import Problem, SearchSpace

MAX_ALTERNATIVES = 5


def alternatives(
    prob: Problem, chosen: Plan, finish: Callable[[Plan], Plan] = lambda plan: plan
) -> tuple[Alternative, ...]:
    """Runner-up plans, each `finish`ed as the chosen one was (the cascade put ahead)."""
    candidates: list[tuple[str, Plan | None]] = [
        (f"all on {pool}", optimize(prob, SearchSpace(pools=(pool,), max_stages=1)))
        for pool in prob.pools
    ]
    if any(len(s.shards) > 1 for s in chosen.stages):
        candidates.append(("without shards", optimize(prob, SearchSpace(shards=False))))
    if any(s.input_compression is not Compression.NONE for s in chosen.stages):
        candidates.append(
            ("without cut compression", optimize(prob, SearchSpace(compression=False)))
        )
    seen = {chosen.placement}
    out = []
    for label, found in candidates:
        plan = finish(found) if found is not None else None
        if plan is None or plan.placement in seen:
            continue
        seen.add(plan.placement)
        out.append(Alternative(label, plan.describe(), plan.prediction))
    out.sort(key=lambda alt: alt.prediction.cost)
    return tuple(out[:MAX_ALTERNATIVES])


def slo_note(plan: Plan) -> str:
    slo, pred = plan.request.slo, plan.prediction
    parts = []
    if slo.p95_latency_s is not None and pred.latency_s > slo.p95_latency_s:
        parts.append(
            f"p95 latency {slo.p95_latency_s * 1e3:.1f} ms (best {pred.latency_s * 1e3:.1f} ms)"
        )
    if slo.min_throughput_rps is not None and pred.throughput_rps < slo.min_throughput_rps:
        parts.append(f"throughput {slo.min_throughput_rps:g}/s (best {pred.throughput_rps:.3g}/s)")
    return "SLO cannot be met: " + ", ".join(parts) + "; the best plan without it is used"


def diagnose(prob: Problem) -> list[str]:
    """Why no plan exists."""
    request, snapshot = prob.request, prob.snapshot
    reasons = []
    whole = float(prob.table.memory(0, prob.table.size - 1, False, request.runtime_overhead_bytes))
    biggest = max(prob.nodes, key=lambda n: n.memory_free)
    if whole > biggest.memory_free:
        reasons.append(
            f"the whole model needs {whole / 2**20:.1f} MiB on one node; the most free memory "
            f"is {biggest.memory_free / 2**20:.1f} MiB on {biggest.name}: no cut/shard layout "
            "fits either (allow partitioning, more shards, or int8 quantization)"
        )
    if request.privacy is not None and not any(
        snapshot.pool(p).tier == request.privacy for p in prob.pools
    ):
        reasons.append(
            f"privacy keeps raw input in tier {request.privacy}, and no usable pool "
            "of that tier exists"
        )
    if not any(snapshot.link(request.data_source, p) for p in prob.pools):
        reasons.append(f"no link from the data source pool {request.data_source} to a usable pool")
    if not reasons:
        reasons.append(
            "no placement satisfies memory, privacy and link constraints together; "
            "see the excluded pools and nodes"
        )
    return reasons
