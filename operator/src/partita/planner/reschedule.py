"""Whether to move a running model to a new plan: hysteresis against noisy metrics.

The current plan is re-predicted under the new snapshot and compared with the best new
plan. Losing a node of the plan, the plan no longer fitting, or a changed spec moves at
once. Otherwise a move waits for the cooldown since the last change, and then needs
either a relative gain of at least `minImprovement` (m), or, when the current plan
misses its SLO, a new plan that meets the SLO by the same margin (latency at most
(1 - m) × the p95 target, throughput at least the minimum / (1 - m)). A move by gain
away from a plan that meets its SLO must also land on a plan that meets it by m.

Why m = 0.4 stops flapping when every measured metric is within ±20% of its true value:
every predicted time term is then within [0.8, 1.25]× its true value.
- A predicted gain of 40% (new ≤ 0.6 × current) means a true gain of at least
  1 - 0.6 × 1.25 / 0.8 = 6%: each such move lowers the true cost.
- A plan predicted to miss a latency target T truly takes more than 0.8 T; one predicted
  at 0.6 T or less truly takes at most 0.75 T, and is then always predicted under
  0.94 T: it never seems to miss T again. So an SLO move lowers the true latency, and
  the plan it leaves cannot win it back by gain (that plan would have to be predicted
  at 0.6 T, truly at most 0.75 T). The same holds for a throughput minimum.
So two plans cannot alternate, and from the true optimum no move happens at all: a
plan meeting an SLO at 1.0-1.05× its planned latency stays put under such noise (the
property tests check it), where moving whenever the current plan seemed to miss the SLO
and another seemed to meet it flapped.
"""

from __future__ import annotations

import math

from partita.model.types import ModelProfile

from .cost import predict_stages
from .plan import Action, Decision, Plan, Unschedulable, meets_slo
from .request import ModelRequest, same_spec
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
    # The current plan re-predicted for the request as it is now (a measured offload rate
    # that moved is weighed here, not taken as a spec change).
    now_pred = predict_stages(request, current.stages, profile, snapshot, cascade=current.cascade)
    # Runner-up plans are worked out only for a plan that is moved to.
    best = plan_model(profile, request, snapshot, current=current, explain=False)
    best_cost = best.prediction.cost if isinstance(best, Plan) else math.inf
    cur = now_pred.cost
    improvement = (cur - best_cost) / abs(cur) if math.isfinite(cur) and cur else 0.0

    def decide(action: Action, reason: str, gain: float = improvement) -> Decision:
        plan = best
        if action is Action.MOVE and isinstance(best, Plan):
            plan = plan_model(profile, request, snapshot, current=current)
        return Decision(action, reason, plan, cur, best_cost, gain)

    if now_pred.lost_nodes:
        return decide(
            Action.MOVE, f"node(s) {', '.join(now_pred.lost_nodes)} of the current plan are lost"
        )
    if now_pred.violations:
        return decide(
            Action.MOVE, "the current plan no longer fits: " + "; ".join(now_pred.violations)
        )
    if not same_spec(request, current.request):
        return decide(Action.MOVE, "the model's spec changed")
    if isinstance(best, Unschedulable) or best.placement == current.placement:
        return decide(Action.KEEP, "the current plan is still the best", 0.0)
    wait = request.rescheduling.cooldown_s - (now - last_change)
    if wait > 0:
        return decide(Action.KEEP, f"cooldown: {wait:.0f} s left before another move")
    m = request.rescheduling.min_improvement
    slo = request.slo
    current_meets = meets_slo(now_pred, slo)
    best_clears = meets_slo(best.prediction, slo, margin=m)
    if not current_meets and best_clears:
        return decide(
            Action.MOVE,
            f"the current plan misses the SLO and the new one meets it by {m:.0%} (minImprovement)",
        )
    if improvement >= m and (best_clears or not current_meets):
        return decide(
            Action.MOVE, f"the new plan is {improvement:.0%} better (minImprovement {m:.0%})"
        )
    if not current_meets:
        return decide(
            Action.KEEP,
            f"the current plan misses the SLO, but no plan meets it by {m:.0%} or gains "
            f"that much (gain {improvement:.0%}; minImprovement {m:.0%})",
        )
    if improvement >= m:
        return decide(
            Action.KEEP,
            f"the new plan is {improvement:.0%} better but would not meet the SLO by {m:.0%}",
        )
    return decide(Action.KEEP, f"gain {improvement:.0%} is below minImprovement {m:.0%}")
