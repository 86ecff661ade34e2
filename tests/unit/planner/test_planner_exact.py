"""The DP's plan costs exactly what the best plan found by brute force costs."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from planner_instances import (
    close,
    exhaustive_best,
    random_profile,
    random_request,
    random_snapshot,
    seeds,
)

from partita.planner import Objective, Plan, Unschedulable, plan_model, predict


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seeds)
def test_plan_cost_equals_exhaustive_search(seed):
    rng = random.Random(seed)
    snapshot = random_snapshot(rng)
    request = random_request(rng, snapshot)
    profile = random_profile(rng)
    result = plan_model(profile, request, snapshot)
    best = exhaustive_best(profile, request, snapshot)
    if best is None:
        assert isinstance(result, Unschedulable), result.describe()
        assert result.reasons
        return
    assert isinstance(result, Plan), result.reasons
    pred = predict(result, profile, snapshot)
    assert pred.feasible, pred.violations
    cost = result.prediction.cost
    assert close(pred.cost, cost)
    assert close(cost, best.cost), (result.describe(), cost, best.cost)
    p95 = request.slo.p95_latency_s
    if request.objective is Objective.THROUGHPUT and p95 is not None and best.latency_s <= p95:
        assert result.prediction.latency_s <= p95 * (1 + 1e-9)
