"""Whether to move a running model to a new plan: hysteresis against noisy metrics.

The current plan is re-predicted under the new snapshot and compared with the best
new plan. A move needs a relative gain of at least `minImprovement` and the cooldown
to have passed since the last change; losing a node of the plan (or the plan no
longer fitting) moves at once.

Why the default `minImprovement` of 0.4 stops flapping: if every measured metric is
within ±20% of its true value, every predicted time term is within [0.8, 1.25]× its
true value, so a predicted gain of 40% (new ≤ 0.6 × current) means a true gain of at
least 1 - 0.6 × 1.25 / 0.8 = 6%. Each move then lowers the true cost, so plans
cannot alternate, and from the true optimum no move happens at all.
"""

from __future__ import annotations

import math

from partita.model.types import ModelProfile

from .cost import predict
from .plan import Action, Decision, Plan, Unschedulable, meets_slo
from .request import ModelRequest
from .search import plan_model
from .snapshot import ClusterSnapshot


def reschedule(
    current: Plan,
    profile: ModelProfile,
    request: ModelRequest,
    snapshot: ClusterSnapshot,
    now: float,
    last_change: float,
) -> Decision:
    now_pred = predict(current, profile, snapshot)
    best = plan_model(profile, request, snapshot, current=current)
    best_cost = best.prediction.cost if isinstance(best, Plan) else math.inf
    cur = now_pred.cost
    improvement = (cur - best_cost) / abs(cur) if math.isfinite(cur) and cur else 0.0
    if now_pred.lost_nodes:
        return Decision(
            Action.MOVE,
            f"node(s) {', '.join(now_pred.lost_nodes)} of the current plan are lost",
            best,
            cur,
            best_cost,
            improvement,
        )
    if now_pred.violations:
        return Decision(
            Action.MOVE,
            "the current plan no longer fits: " + "; ".join(now_pred.violations),
            best,
            cur,
            best_cost,
            improvement,
        )
    if request != current.request:
        return Decision(Action.MOVE, "the model's spec changed", best, cur, best_cost, improvement)
    if isinstance(best, Unschedulable) or best.placement == current.placement:
        return Decision(
            Action.KEEP, "the current plan is still the best", best, cur, best_cost, 0.0
        )
    wait = request.rescheduling.cooldown_s - (now - last_change)
    if wait > 0:
        return Decision(
            Action.KEEP,
            f"cooldown: {wait:.0f} s left before another move",
            best,
            cur,
            best_cost,
            improvement,
        )
    if best.meets_slo and not meets_slo(now_pred, request.slo):
        return Decision(
            Action.MOVE,
            "the current plan misses the SLO and the new one meets it",
            best,
            cur,
            best_cost,
            improvement,
        )
    threshold = request.rescheduling.min_improvement
    if improvement >= threshold:
        return Decision(
            Action.MOVE,
            f"the new plan is {improvement:.0%} better (minImprovement {threshold:.0%})",
            best,
            cur,
            best_cost,
            improvement,
        )
    return Decision(
        Action.KEEP,
        f"gain {improvement:.0%} is below minImprovement {threshold:.0%}",
        best,
        cur,
        best_cost,
        improvement,
    )
