"""`plan_model`: one model's plan, through the planner's phases.

space (pools, nodes, exclusions, shard groups) → objective (which shortest paths to ask
for) → shortest_path (the exact search) → explain (runner-ups, diagnosis, SLO note).
"""

from __future__ import annotations

from dataclasses import replace

from partita.model.types import ModelProfile

from .cost import plan_for
from .explain import alternatives, diagnose, slo_note
from .objective import better, optimize
from .plan import RELATIVE_TOLERANCE, CascadePlacement, Plan, PlanResult, Unschedulable
from .request import ModelRequest
from .snapshot import ClusterSnapshot
from .space import Problem, SearchSpace, cascade_busy_s, place_cascade, problem


def plan_model(
    profile: ModelProfile,
    request: ModelRequest,
    snapshot: ClusterSnapshot,
    current: Plan | None = None,
    *,
    explain: bool = True,
) -> PlanResult:
    """The best plan for one model, or `Unschedulable` with the reasons.

    `explain=False` skips the runner-up plans (for bulk planning and benchmarks).

    int8 stages are tried only when allowed (measured drop within the limit) and
    needed: when no fp32 plan fits or meets the SLO. With `current`, an equally good
    current placement is kept (same revision), so re-planning does not churn.
    """
    return plan_problem(problem(profile, request, snapshot), current, explain=explain)


def plan_problem(prob: Problem, current: Plan | None = None, *, explain: bool = True) -> PlanResult:
    """`plan_model` on a search space already built (see `space.problem`).

    With a cascade, its small model takes a node of the data source's pool first, and the
    main model's stages are searched on what it leaves.
    """
    profile, request, snapshot = prob.profile, prob.request, prob.snapshot
    if not snapshot.has_pool(request.data_source):
        return Unschedulable(
            request,
            (
                f"dataSource pool {request.data_source!r} does not exist; create that "
                "DevicePool or fix spec.dataSource",
            ),
        )
    exclusions = tuple(prob.exclusions)
    if not prob.pools:
        return Unschedulable(
            request,
            ("no allowed pool has a Ready node the model tolerates with enough free cpu",),
            exclusions,
        )
    if request.cascade is not None:
        placed = place_cascade(request, snapshot)
        if not isinstance(placed, CascadePlacement):
            return Unschedulable(request, placed, exclusions)
        searched = request
        slo = request.slo
        if slo.min_throughput_rps is not None and (
            cascade_busy_s(request, snapshot, placed, profile.input_bytes) * slo.min_throughput_rps
            > 1.0
        ):
            # The small model alone cannot keep the throughput asked for: no placement of the
            # main model meets it, so the search does without it (the plan says it misses).
            searched = replace(request, slo=replace(slo, min_throughput_rps=None))
        prob = problem(profile, searched, snapshot, prob.table, cascade=placed)
        if not prob.pools:
            return Unschedulable(
                request,
                ("no allowed pool has room for the main model beside the cascade's small model",),
                exclusions,
            )

    def finish(plan: Plan) -> Plan:
        """The plan priced for the request as asked (the search may have left out a
        throughput the small model cannot keep)."""
        if plan.request is request:
            return plan
        return replace(
            plan_for(request, plan.stages, profile, snapshot, plan.revision, cascade=plan.cascade),
            notes=plan.notes,
        )

    plan = optimize(prob, SearchSpace())
    notes: list[str] = []
    if (plan is None or not finish(plan).meets_slo) and request.quantization.usable:
        quantized = optimize(prob, SearchSpace(int8=True))
        if quantized is not None and (plan is None or better(finish(quantized), finish(plan))):
            if any(s.int8 for s in quantized.stages):
                notes.append("int8 stages used: no fp32 plan fits or meets the SLO")
            plan = quantized
    if plan is None:
        return Unschedulable(request, tuple(diagnose(prob)), exclusions)
    plan = finish(plan)
    if not plan.meets_slo:
        notes.append(slo_note(plan))
    runner_ups = alternatives(prob, plan, finish) if explain else ()
    revision = 1
    if current is not None:
        revision = current.revision + 1
        kept = plan_for(
            request, current.stages, profile, snapshot, current.revision, cascade=current.cascade
        )
        if kept.placement == plan.placement or (
            kept.prediction.feasible
            and kept.meets_slo >= plan.meets_slo
            and kept.prediction.cost <= plan.prediction.cost * (1 + RELATIVE_TOLERANCE)
        ):
            plan, revision = kept, current.revision
    return replace(
        plan,
        revision=revision,
        alternatives=runner_ups,
        exclusions=exclusions,
        notes=tuple(notes),
    )
