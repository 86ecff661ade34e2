"""Several models sharing one cluster: by priority, refusing the lowest when short.

The answer admits the most important set of models (one higher priority outweighs any
number of lower ones), then has the lowest total cost. A model that cannot be admitted
is refused with an `Unschedulable` reason naming the models that hold the capacity
(task dropping), rather than degrading every model.

Greedy placement in priority order, each model on what the ones before it left, gives a
model its favourite nodes even when a slightly worse choice would let a later model in
or save it much more. So with up to `JOINT_MODELS` models, each model gets a pool of
candidate plans, made where it may have to live: alone, after the models before it (the
greedy walk), after all the others, and around the others' plans in the best placement
found; in each such place also its best plans without a node its plan uses, or with
less memory on such a node. An exact branch and bound then picks one candidate (or
none) per model so that all fit every node together; the placement it picks is walked
again for more candidates, until it stops improving or `JOINT_PLANS_PER_MODEL` plans
per model were made. The pool is not every plan, so this is not exact; the property
tests hold it within 5% of an exhaustive search over every plan of every model on
small instances. With more models, the greedy placement only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from partita.model.types import ModelProfile

from .plan import RELATIVE_TOLERANCE, Plan, PlanResult, Unschedulable
from .ranges import RangeTable
from .request import ModelRequest
from .search import plan_model, plan_problem
from .snapshot import ClusterSnapshot
from .space import cut_table, problem

JOINT_MODELS = 8  # up to this many models, a joint search; beyond, priority order only
JOINT_PLANS_PER_MODEL = 32  # plan_model calls the joint search may make, per model
JOINT_SQUEEZES = 3  # steps down a node's memory when pooling a model's candidates
JOINT_ROUNDS = 4  # pool candidates along the best placement found, then combine again
JOINT_COMBINATIONS = 100_000  # branches the combination may visit once it has an answer
JOINT_SLACK = 0.01  # a combination must be able to gain more than this to be explored

Score = tuple[tuple[int, ...], float]  # (admitted priorities, highest first; -total cost)


def plan_many(
    requests_with_profiles: Sequence[tuple[ModelRequest, ModelProfile]],
    snapshot: ClusterSnapshot,
) -> dict[str, PlanResult]:
    """Plans keyed by `namespace/name`: the highest priorities are admitted first."""
    models = sorted(requests_with_profiles, key=lambda rp: (-rp[0].priority, rp[0].key))
    if len(models) <= JOINT_MODELS:
        joint = _Joint(models, snapshot)
        chosen = joint.search()
        return _results(models, snapshot, chosen, joint.alone)
    return _results(models, snapshot, _greedy(models, snapshot), None)


def _score(plans: Sequence[Plan | None]) -> Score:
    admitted = [p for p in plans if p is not None]
    return (
        tuple(sorted((p.request.priority for p in admitted), reverse=True)),
        -sum(p.prediction.cost for p in admitted),
    )


def _usage(plans: Sequence[Plan | None]) -> tuple[dict[str, float], dict[str, int]]:
    """(cpu cores, memory bytes) the plans' containers take on each node."""
    cpu: dict[str, float] = {}
    mem: dict[str, int] = {}
    for plan in plans:
        if plan is None:
            continue
        small = plan.prediction.cascade
        shards = [sh for stage in plan.prediction.stages for sh in stage.shards]
        for shard in [*shards, *([small] if small is not None else [])]:
            cpu[shard.node] = cpu.get(shard.node, 0.0) + plan.request.cpu
            mem[shard.node] = mem.get(shard.node, 0) + shard.memory_bytes
    return cpu, mem


def _take(snapshot: ClusterSnapshot, plan: Plan) -> ClusterSnapshot:
    """The snapshot with `plan`'s containers added."""
    cpu, mem = _usage([plan])
    nodes = tuple(
        replace(n, cpu_used=n.cpu_used + cpu[n.name], memory_used=n.memory_used + mem[n.name])
        if n.name in cpu
        else n
        for n in snapshot.nodes
    )
    return replace(snapshot, nodes=nodes)


def _without(snapshot: ClusterSnapshot, names: tuple[str, ...]) -> ClusterSnapshot:
    return replace(snapshot, nodes=tuple(n for n in snapshot.nodes if n.name not in names))


def _squeezed(snapshot: ClusterSnapshot, name: str, free: int) -> ClusterSnapshot:
    """The snapshot with at most `free` bytes free on node `name`."""
    nodes = tuple(
        replace(n, memory_used=max(n.memory_used, n.memory_allocatable - free))
        if n.name == name
        else n
        for n in snapshot.nodes
    )
    return replace(snapshot, nodes=nodes)


def _greedy(
    models: Sequence[tuple[ModelRequest, ModelProfile]], snapshot: ClusterSnapshot
) -> list[Plan | None]:
    chosen: list[Plan | None] = []
    residual = snapshot
    tables: dict[int, RangeTable] = {}  # models sharing a profile share its range table
    for request, profile in models:
        table = tables.setdefault(id(profile), cut_table(profile))
        result = plan_problem(problem(profile, request, residual, table), explain=False)
        if isinstance(result, Plan):
            residual = _take(residual, result)
            chosen.append(result)
        else:
            chosen.append(None)
    return chosen


@dataclass
class _Joint:
    """A joint placement of a few models (see the module docstring)."""

    models: Sequence[tuple[ModelRequest, ModelProfile]]
    snapshot: ClusterSnapshot
    alone: list[PlanResult] = field(default_factory=list)  # each model on the whole cluster
    budget: int = 0
    pools: list[dict[object, Plan]] = field(default_factory=list)  # each model's candidates
    _plans: dict[tuple[object, ...], PlanResult] = field(default_factory=dict)
    _tables: dict[int, RangeTable] = field(default_factory=dict)  # per model, reused

    def search(self) -> list[Plan | None]:
        self.budget = JOINT_PLANS_PER_MODEL * len(self.models)
        self.pools = [{} for _ in self.models]
        self.alone = [self.plan(i, self.snapshot) for i in range(len(self.models))]
        greedy = self._greedy()
        fits_alone = [a if isinstance(a, Plan) else None for a in self.alone]
        if _score(greedy) >= _score(fits_alone):
            return greedy  # every model that fits alone is in, each at its best alone
        for i, own in enumerate(self.alone):
            if isinstance(own, Plan):
                self.pools[i][own.placement] = own
                self._variants(i, self.snapshot, own)
        best = self._along(None)  # the greedy placement, its candidates pooled
        for i in range(len(self.models)):
            self._last(i)
        self._around(best)
        best_score = _score(best)
        for _round in range(JOINT_ROUNDS):
            combined = _combine(self.pools, self.snapshot, best)
            if self.budget <= 0 or not _better(_score(combined), best_score):
                break
            best, best_score = combined, _score(combined)
            self._along(best)
            self._around(best)
        return self._fill(best)

    def _fill(self, placement: list[Plan | None]) -> list[Plan | None]:
        """`placement` with each model left out, in priority order, placed on what is left
        when it fits there after all."""
        left = self.snapshot
        for plan in placement:
            if plan is not None:
                left = _take(left, plan)
        filled = list(placement)
        for i, plan in enumerate(placement):
            if plan is None and isinstance(self.alone[i], Plan):
                found = self.plan(i, left)
                if isinstance(found, Plan):
                    filled[i], left = found, _take(left, found)
        return filled

    def plan(self, i: int, residual: ClusterSnapshot) -> PlanResult:
        key = (i, *((n.name, n.cpu_used, n.memory_used) for n in residual.nodes))
        if key not in self._plans:
            self.budget -= 1
            request, profile = self.models[i]
            if i not in self._tables:
                self._tables[i] = cut_table(profile)
            prob = problem(profile, request, residual, self._tables[i])
            self._plans[key] = plan_problem(prob, explain=False)
        return self._plans[key]

    def _greedy(self) -> list[Plan | None]:
        residual, chosen = self.snapshot, []
        for i in range(len(self.models)):
            plan = self.plan(i, residual)
            chosen.append(plan if isinstance(plan, Plan) else None)
            if isinstance(plan, Plan):
                residual = _take(residual, plan)
        return chosen

    def _pool(self, i: int, residual: ClusterSnapshot) -> Plan | None:
        plan = self.plan(i, residual)
        if not isinstance(plan, Plan):
            return None
        self.pools[i].setdefault(plan.placement, plan)
        return plan

    def _along(self, placement: list[Plan | None] | None) -> list[Plan | None]:
        """Walk the models in priority order, each on what the ones before it take (in
        `placement`, or greedily when None), pooling each model's candidates there."""
        residual = self.snapshot
        walked: list[Plan | None] = []
        for i in range(len(self.models)):
            first = self._pool(i, residual)
            if first is not None:
                self._variants(i, residual, first)
            taken = first if placement is None else placement[i]
            walked.append(taken)
            if taken is not None:
                residual = _take(residual, taken)
        return walked

    def _around(self, placement: list[Plan | None]) -> None:
        """Pool each model's candidates on what the others' plans in `placement` leave."""
        for i in range(len(self.models)):
            residual = self.snapshot
            for j, plan in enumerate(placement):
                if j != i and plan is not None:
                    residual = _take(residual, plan)
            first = self._pool(i, residual) if self.budget > 0 else None
            if first is not None:
                self._variants(i, residual, first)

    def _last(self, i: int) -> None:
        """Pool model i's best plan on what the others, placed greedily first, leave it."""
        residual = self.snapshot
        for j in range(len(self.models)):
            if j != i and self.budget > 0:
                plan = self._pool(j, residual)
                if plan is not None:
                    residual = _take(residual, plan)
        self._pool(i, residual)

    def _variants(self, i: int, residual: ClusterSnapshot, first: Plan) -> None:
        """Pool model i's best plans on `residual` that use less of a node `first` uses:
        none of it (then none of the next plan's nodes either, and so on), or less memory
        there, step by step down the trade-off between its cost and that node's memory."""
        for node, used in sorted(_usage([first])[1].items()):
            without = self._pool(i, _without(residual, (node,))) if self.budget > 0 else None
            for other in sorted(_usage([without])[1]) if without else ():
                avoid: tuple[str, ...] = (node, other)
                while self.budget > 0 and (plan := self._pool(i, _without(residual, avoid))):
                    avoid = (*avoid, *sorted(_usage([plan])[1]))
            squeezed, memory = residual, used
            for _step in range(JOINT_SQUEEZES):
                if self.budget <= 0 or memory <= 0:
                    break
                squeezed = _squeezed(squeezed, node, memory - 1)
                plan = self._pool(i, squeezed)
                if plan is None:
                    break
                memory = _usage([plan])[1].get(node, 0)


def _combine(
    pools: Sequence[dict[object, Plan]],
    snapshot: ClusterSnapshot,
    incumbent: list[Plan | None],
) -> list[Plan | None]:
    """The best combination of one pooled plan (or none) per model that fits together,
    `incumbent` (such a combination) unless one beats it.

    Branch and bound over the models in priority order, cheapest plans first; a model's
    plans that another of its plans beats on cost and on every node's use are left out,
    and a branch that cannot gain more than `JOINT_SLACK` on the best found is cut.
    """
    names = [n.name for n in snapshot.nodes]
    capacity = [x for n in snapshot.nodes for x in (n.cpu_free, float(n.memory_free))]
    capacity = [c * (1 + RELATIVE_TOLERANCE) for c in capacity]
    options: list[list[tuple[tuple[float, ...], float, Plan]]] = []
    for pool in pools:
        kept: list[tuple[tuple[float, ...], float, Plan]] = []
        for plan in sorted(pool.values(), key=lambda p: p.prediction.cost):
            cpu, mem = _usage([plan])
            use = tuple(x for n in names for x in (cpu.get(n, 0.0), float(mem.get(n, 0))))
            if not any(all(a <= b for a, b in zip(u, use, strict=True)) for u, _c, _p in kept):
                kept.append((use, plan.prediction.cost, plan))
        options.append(kept)
    # What the models from i on cost at the least, and the priorities they could add.
    rest = [0.0] * (len(options) + 1)
    for i in range(len(options) - 1, -1, -1):
        rest[i] = rest[i + 1] + (options[i][0][1] if options[i] else 0.0)
    priority = [opts[0][2].request.priority if opts else None for opts in options]
    best: list[Plan | None] = list(incumbent)
    best_score: list[Score | None] = [_score(incumbent)]
    visits = [0]

    def branch(i: int, use: list[float], chosen: list[Plan | None], cost: float) -> None:
        visits[0] += 1
        found = best_score[0]
        if found is not None:
            if visits[0] > JOINT_COMBINATIONS:
                return
            admitted = [p.request.priority for p in chosen if p is not None]
            possible = [p for p in priority[i:] if p is not None]
            ceiling = tuple(sorted(admitted + possible, reverse=True))
            if ceiling < found[0] or (
                ceiling == found[0] and cost + rest[i] >= -found[1] * (1 - JOINT_SLACK)
            ):
                return
        if i == len(options):
            best_score[0], best[:] = _score(chosen), chosen
            return
        for need, plan_cost, plan in options[i]:
            more = [a + b for a, b in zip(use, need, strict=True)]
            if all(m <= c for m, c in zip(more, capacity, strict=True)):
                branch(i + 1, more, [*chosen, plan], cost + plan_cost)
        branch(i + 1, use, [*chosen, None], cost)

    branch(0, [0.0] * len(capacity), [], 0.0)
    return best


def _better(a: Score, b: Score) -> bool:
    if a[0] != b[0]:
        return a[0] > b[0]
    return -a[1] < -b[1] * (1 - RELATIVE_TOLERANCE)


def _results(
    models: Sequence[tuple[ModelRequest, ModelProfile]],
    snapshot: ClusterSnapshot,
    chosen: Sequence[Plan | None],
    alone: Sequence[PlanResult] | None,
) -> dict[str, PlanResult]:
    """The chosen plans, and for each model left out why: its own reasons when it fits
    no empty cluster, else that the admitted models hold what it needs."""
    holders = [p.request.key for p in chosen if p is not None]
    left = snapshot
    for plan in chosen:
        if plan is not None:
            left = _take(left, plan)
    out: dict[str, PlanResult] = {}
    for i, ((request, profile), picked) in enumerate(zip(models, chosen, strict=True)):
        if picked is not None:
            out[request.key] = picked
            continue
        own = alone[i] if alone else plan_model(profile, request, snapshot, explain=False)
        if isinstance(own, Unschedulable):
            out[request.key] = own
            continue
        # What stops it on what the admitted models leave (free cpu, memory...).
        there = plan_model(profile, request, left, explain=False)
        why = there.reasons if isinstance(there, Unschedulable) else ()
        out[request.key] = Unschedulable(
            request,
            (
                "capacity is short: the models admitted ("
                + (", ".join(holders) or "none")
                + ") hold what it needs; it fits an empty cluster, so it is dropped rather "
                "than degrading models of its priority or higher",
                *why,
            ),
            there.exclusions,
        )
    return out
