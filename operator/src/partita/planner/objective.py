"""The objective: which shortest paths to ask for, so the plan is best for what the user chose.

- latency: one path with latency weight 1, stage/link times capped by the throughput SLO
  (dropped when nothing meets it);
- throughput: a bottleneck objective: the path whose largest stage or link time is
  smallest, then the quickest path under that cap; when that misses a reachable p95
  SLO, bisection on the cap, each step a latency path under it;
- energy: a path with energy weight 1; when it misses the p95 SLO, a Lagrangian on latency
  (weights λ, 1) searched by bisection on λ. Not exact: the best energy under a latency
  bound can lie between the plans a weighting reaches.
"""

from __future__ import annotations

import math

from .cost import plan_for
from .plan import RELATIVE_TOLERANCE, Plan, ShardPlacement, Stage
from .ranges import boundary_tensors
from .request import Objective
from .shortest_path import Path, Weights, shortest_path
from .snapshot import NodeState
from .space import Problem, SearchSpace, options

# Cap steps just under the best bottleneck before bisecting, and the most steps in all.
CAP_STEPS_NEAR = 3
CAP_STEPS_MAX = 80
LAMBDA_WIDENINGS = 40
LAMBDA_BISECTIONS = 30


def build(prob: Problem, path: Path, revision: int = 1) -> Plan:
    """The plan a path describes, shard proportions following each member's speed."""
    profile, table = prob.profile, prob.table
    stages = []
    for index, (a, b, option, comp) in enumerate(path.stages):
        start, end = int(table.positions[a]), int(table.positions[b])
        members = [prob.nodes[i] for i in option.members]
        props = [1.0]
        if len(members) > 1:
            props = proportions(prob, members, a, b, option.int8)
        stages.append(
            Stage(
                index=index,
                pool=prob.pools[option.pool],
                start=start,
                end=end,
                shards=tuple(
                    ShardPlacement(n.name, p) for n, p in zip(members, props, strict=True)
                ),
                inputs=tuple(t[0] for t in boundary_tensors(profile, start)),
                outputs=tuple(t[0] for t in boundary_tensors(profile, end)),
                input_compression=comp,
                int8=option.int8,
            )
        )
    snapshot = prob.priced_on or prob.snapshot
    return plan_for(
        prob.request, stages, profile, snapshot, revision, prob.table, cascade=prob.cascade
    )


def proportions(prob: Problem, members: list[NodeState], a: int, b: int, int8: bool) -> list[float]:
    """Shard proportions of [a, b) on `members`: each shard's share of the split work
    inversely to its time for it, under the strategy whose busiest shard finishes first
    (as `shortest_path` priced it); equal when the members are of one device kind."""
    k = len(members)
    kinds = [prob.table.kind(n, prob.speedup(int8)) for n in members]
    if len(set(kinds)) == 1:
        return [1.0 / k] * k
    best: tuple[float, list[float]] | None = None
    for sr in prob.table.sharded.get(k, ()):
        if not sr.allowed(a, b):
            continue
        mine, split = [], []
        for i, kind in enumerate(kinds):
            m_t, s_t = sr.times(kind)
            mine.append(float(m_t[b, i] - m_t[a, i]))
            split.append(float(s_t[b] - s_t[a]))
        if min(split) <= 0:
            continue
        share = 1.0 / sum(1.0 / x for x in split)
        busy = max(m - x / k for m, x in zip(mine, split, strict=True)) + share
        if best is None or busy < best[0]:
            best = (busy, [share / x for x in split])
    return best[1] if best is not None else [1.0 / k] * k


def better(a: Plan, b: Plan | None) -> bool:
    """a before b: meeting the SLO first, then the objective, then latency."""
    if b is None:
        return True
    key_a = (not a.meets_slo, a.prediction.cost, a.prediction.latency_s)
    key_b = (not b.meets_slo, b.prediction.cost, b.prediction.latency_s)
    return key_a < key_b


def optimize(prob: Problem, space: SearchSpace) -> Plan | None:
    """The best plan of `space` for the request's objective under its SLO.

    When no plan meets the SLO, the best plan without it (its `meets_slo` is False).
    """
    request = prob.request
    opts = options(prob, space)
    slo = request.slo
    cap0 = 1.0 / slo.min_throughput_rps if slo.min_throughput_rps else math.inf
    p95 = slo.p95_latency_s

    def run(weights: Weights, cap: float) -> Plan | None:
        path = shortest_path(prob, opts, space, weights, cap)
        return None if path is None else build(prob, path)

    def latency_ok(plan: Plan | None) -> bool:
        return plan is not None and (
            p95 is None or plan.prediction.latency_s <= p95 * (1 + RELATIVE_TOLERANCE)
        )

    latency_only = Weights(latency=1.0)
    if request.objective is Objective.THROUGHPUT:
        # The smallest bottleneck any plan reaches, then the quickest plan reaching it.
        floor = shortest_path(prob, opts, space, Weights(bottleneck=True), math.inf)
        if floor is None:
            return None
        best = run(latency_only, floor.cost * (1 + RELATIVE_TOLERANCE))
        assert best is not None
        if latency_ok(best):
            return best
        fastest = run(latency_only, math.inf)
        if fastest is None or not latency_ok(fastest):
            return best  # the p95 SLO is out of reach: maximise throughput alone
        # The p95 SLO binds: the lowest cap on every stage/link time under which a plan
        # still meets it. A few steps just under the best bottleneck found (usually
        # enough), then bisection between it and the floor.
        best = fastest
        lo = floor.cost
        for step in range(CAP_STEPS_MAX):
            hi = 1.0 / best.prediction.throughput_rps
            if hi - lo <= RELATIVE_TOLERANCE * hi:
                break
            mid = hi * (1 - RELATIVE_TOLERANCE) if step < CAP_STEPS_NEAR else lo + (hi - lo) / 2
            cand = run(latency_only, mid)
            if cand is not None and latency_ok(cand):
                best = cand
            else:
                lo = mid
        return best

    if request.objective is Objective.LATENCY:
        plan = run(latency_only, cap0)
        if plan is None and math.isfinite(cap0):
            plan = run(latency_only, math.inf)
        return plan

    # Energy.
    cap = cap0
    energy_only = Weights(energy=1.0)
    plan = run(energy_only, cap)
    if plan is None and math.isfinite(cap0):
        cap = math.inf
        plan = run(energy_only, cap)
    if plan is None or latency_ok(plan):
        return plan
    quickest = run(latency_only, cap)
    if quickest is None or not latency_ok(quickest):
        return plan
    lam_lo = 0.0
    lam_hi = max(plan.prediction.energy_j / max(plan.prediction.latency_s, 1e-12), 1e-12)
    best = quickest
    for _ in range(LAMBDA_WIDENINGS):
        cand = run(Weights(lam_hi, 1.0), cap)
        if latency_ok(cand):
            assert cand is not None
            best = cand
            break
        lam_lo, lam_hi = lam_hi, lam_hi * 4
    for _ in range(LAMBDA_BISECTIONS):
        mid = (lam_lo + lam_hi) / 2
        cand = run(Weights(mid, 1.0), cap)
        if latency_ok(cand):
            assert cand is not None
            lam_hi = mid
            if cand.prediction.energy_j < best.prediction.energy_j:
                best = cand
        else:
            lam_lo = mid
    return best
