"""The confidence cascade in the planner: the measured offload rate is weighed, not taken as
a spec change, and a change in it can move the plan."""

from __future__ import annotations

from dataclasses import replace

from planner_instances import MiB, chain_profile, edge_cloud

from partita.planner import (
    Action,
    Cascade,
    ModelRequest,
    Objective,
    Plan,
    Slo,
    plan_model,
    reschedule,
    same_spec,
)

CNN = chain_profile(
    flops=[2_000_000_000, 2_000_000_000, 500_000_000, 100_000_000],
    params=[MiB, 2 * MiB, 8 * MiB, 16 * MiB],
    cut_bytes={1: 800_000, 2: 50_000, 3: 20_000},
)
SMALL = chain_profile(flops=[100_000_000], params=[1 * MiB], cut_bytes={})


def _snapshot():
    # A slow edge board (2 GFLOP/s at 5 W) and a fast cloud node (80 GFLOP/s at 400 W).
    snap = edge_cloud(edge_speed=2e9, bandwidth_bps=1e7)
    pools = tuple(
        replace(p, power_active_watts=400.0) if p.name == "cloud" else p for p in snap.pools
    )
    return replace(snap, pools=pools)


def _request(rate: float) -> ModelRequest:
    return ModelRequest(
        name="m",
        data_source="edge",
        objective=Objective.ENERGY,
        slo=Slo(min_throughput_rps=2.0),
        cascade=Cascade(0.9, rate, SMALL),
    )


def test_a_lower_offload_rate_lets_the_main_model_run_on_the_frugal_edge():
    snap = _snapshot()
    busy = plan_model(CNN, _request(0.9), snap)
    quiet = plan_model(CNN, _request(0.1), snap)
    assert isinstance(busy, Plan) and isinstance(quiet, Plan)
    # At 90% offload the edge board cannot take 2 requests/s of the main model: the cloud.
    assert {s.pool for s in busy.stages} == {"cloud"}
    # At 10% it takes 0.2/s: the edge, which spends far less energy per request.
    assert {s.pool for s in quiet.stages} == {"edge"}
    assert quiet.prediction.energy_j < busy.prediction.energy_j


def test_the_rescheduler_weighs_a_new_offload_rate_with_its_hysteresis():
    snap = _snapshot()
    current = plan_model(CNN, _request(0.9), snap)
    assert isinstance(current, Plan)
    measured = _request(0.1)
    assert same_spec(measured, current.request)  # a measurement, not a spec change
    waiting = reschedule(current, CNN, measured, snap, now=10.0, last_change=0.0)
    assert waiting.action is Action.KEEP and "cooldown" in waiting.reason
    moved = reschedule(current, CNN, measured, snap, now=1000.0, last_change=0.0)
    assert moved.action is Action.MOVE and "better" in moved.reason, moved.reason
    assert isinstance(moved.plan, Plan) and {s.pool for s in moved.plan.stages} == {"edge"}
    # The current plan was re-predicted at the new rate, not the one it was made with.
    assert moved.current_cost < current.prediction.cost
