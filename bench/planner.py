"""Planner benchmark: planning time at scale, and Partita's plans against the baselines.

Run: `.venv/bin/python bench/planner.py [--against REV]` (or `make bench`). Writes
bench/results/planner.json, planner.md and planner_*.png. Latencies and throughputs
here are the planner's *predictions* under its cost model, for clusters built from one
measured figure: the speed of one core of this machine running open-nsfw in onnxruntime
(single thread). The cloud node is 8 such cores; edge devices are 8x, 80x and 400x
slower than the cloud. Planning times are wall-clock on this (shared, noisy) machine;
`--against REV` times the planner of a git revision beside the current one.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from partita.model import synthetic, zoo
from partita.model.profile import profile_model
from partita.model.types import ModelProfile, OpClass
from partita.planner import (
    ClusterSnapshot,
    Compression,
    ModelRequest,
    NodeState,
    Objective,
    Plan,
    Tier,
    baselines,
    plan_model,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODELS = ("open-nsfw", "ocr-det", "ocr-rec", "minilm")
IMAGE_MODELS = ("open-nsfw", "ocr-det", "ocr-rec")
RATIOS = (8, 80, 400)
BANDWIDTHS_MBPS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
RTT_S = 0.02
MiB = 2**20
BASELINES = ("edge-only", "cloud-only", "neurosurgeon", "network-unaware")


def core_gflops() -> float:
    """GFLOP/s of one core here: open-nsfw FLOPs / its single-thread ORT time (median of 5)."""
    from partita.model.load import load_model_with_report
    from partita.runtime import Session

    path = zoo.model_path("open-nsfw")
    shapes = zoo.default_input_shapes("open-nsfw")
    profile = profile_model(path, shapes)
    session = Session(path, intra_op_threads=1)
    del load_model_with_report
    feeds = {
        name: np.random.default_rng(0).random(shape, dtype=np.float32)
        for name, shape in shapes.items()
    }
    session.run(feeds)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        session.run(feeds)
        times.append(time.perf_counter() - t)
    return profile.total_flops / statistics.median(times) / 1e9


def cluster(
    edge_gflops: float,
    cloud_gflops: float,
    bandwidth_mbps: float,
    edge_devices: int = 1,
    edge_memory: int = 4096 * MiB,
    api: Any = None,
) -> ClusterSnapshot:
    """One edge pool and one cloud node; `api`: the planner package whose types to build."""
    import partita.planner

    api = api or partita.planner
    pools = (
        api.DevicePoolState("edge", api.Tier.EDGE, 1.0, 5.0, 1.5, 1.0 / 8, 1e9, 0.0005),
        api.DevicePoolState("cloud", api.Tier.CLOUD, 60.0, 250.0, 0.0, 1.0, 1e10, 0.0002),
    )
    edge_speed = {c: edge_gflops * 1e9 for c in OpClass}
    nodes = [
        api.NodeState(f"edge-{i}", "edge", api.Tier.EDGE, 4.0, edge_memory, edge_speed)
        for i in range(edge_devices)
    ]
    cloud_speed = {c: cloud_gflops * 1e9 for c in OpClass}
    nodes.append(
        api.NodeState("cloud-0", "cloud", api.Tier.CLOUD, 32.0, 64 * 1024 * MiB, cloud_speed)
    )
    link = api.LinkEstimate("edge", "cloud", bandwidth_mbps * 1e6, RTT_S)
    return api.ClusterSnapshot(nodes=tuple(nodes), pools=pools, links=(link,))


def request(objective: Objective, api: Any = None, **kw: Any) -> ModelRequest:
    import partita.planner

    api = api or partita.planner
    return api.ModelRequest(
        name="m",
        data_source="edge",
        objective=api.Objective(objective.value),
        partitioning=api.Partitioning(cut_compression=api.Compression.FP16),
        **kw,
    )


def _fig(res: Any) -> dict[str, Any] | None:
    if not isinstance(res, Plan):
        return None
    return {
        "latency_s": res.prediction.latency_s,
        "throughput_rps": res.prediction.throughput_rps,
        "plan": res.describe(),
        "stages": len(res.stages),
        "pools": [s.pool for s in res.stages],
        "max_shards": max(len(s.shards) for s in res.stages),
        "compressed": any(s.input_compression != "none" for s in res.stages),
    }


def sweep(
    profiles: dict[str, ModelProfile], cloud: float, reference: Any = None
) -> list[dict[str, Any]]:
    """Every model x edge slowness x bandwidth x edge devices, both objectives; with
    `reference`, the reference planner's plan cost on the same instance beside Partita's."""
    rows = []
    for name, profile in profiles.items():
        for ratio in RATIOS:
            edge = cloud / ratio
            for bw in BANDWIDTHS_MBPS:
                for devices in (1, 4):
                    snap = cluster(edge, cloud, bw, edge_devices=devices)
                    row: dict[str, Any] = {
                        "model": name,
                        "ratio": ratio,
                        "bandwidth_mbps": bw,
                        "edge_devices": devices,
                    }
                    for objective in (Objective.LATENCY, Objective.THROUGHPUT):
                        req = request(objective)
                        plan = plan_model(profile, req, snap, explain=False)
                        row[f"partita_{objective}"] = _fig(plan)
                        base = baselines(profile, req, snap)
                        row[f"baselines_{objective}"] = {k: _fig(v) for k, v in base.items()}
                        if reference is not None:
                            old = reference.plan_model(
                                profile,
                                request(objective, api=reference),
                                cluster(edge, cloud, bw, edge_devices=devices, api=reference),
                                explain=False,
                            )
                            row[f"reference_cost_{objective}"] = (
                                _cost(old) if hasattr(old, "stages") else None
                            )
                    rows.append(row)
    return rows


def weak_edge(profiles: dict[str, ModelProfile], cloud: float) -> list[dict[str, Any]]:
    """Edge only (privacy): four weak devices on a 1 Gbit/s LAN against one of them."""
    out = []
    for name, profile in profiles.items():
        for ratio in RATIOS:
            edge = cloud / ratio
            req = request(Objective.LATENCY, privacy=Tier.EDGE, pools=("edge",))
            one = plan_model(profile, req, cluster(edge, cloud, 10, 1), explain=False)
            four = plan_model(profile, req, cluster(edge, cloud, 10, 4), explain=False)
            out.append(
                {
                    "model": name,
                    "ratio": ratio,
                    "one_device": _fig(one),
                    "four_devices": _fig(four),
                    "speedup": one.prediction.latency_s / four.prediction.latency_s
                    if isinstance(one, Plan) and isinstance(four, Plan)
                    else None,
                }
            )
    return out


def memory_bound(profile: ModelProfile, cloud: float) -> dict[str, Any]:
    """minilm on 96 MiB edge devices, raw text kept at the edge: no single device holds it."""
    snap = cluster(cloud / 80, cloud, 10, edge_devices=4, edge_memory=96 * MiB)
    req = request(Objective.LATENCY, privacy=Tier.EDGE)
    plan = plan_model(profile, req, snap)
    base = baselines(profile, req, snap)
    return {
        "edge_memory_mib": 96,
        "partita": _fig(plan),
        "partita_reasons": list(getattr(plan, "reasons", ())),
        "baselines": {
            k: _fig(v) if isinstance(v, Plan) else {"unschedulable": list(v.reasons)}
            for k, v in base.items()
        },
    }


def big_cluster(nodes: int, seed: int = 0, api: Any = None) -> Any:
    """`nodes` nodes in 4 pools (3 edge, 1 cloud), 2 device kinds per pool, random load.

    `api` is the planner package whose snapshot types to build (the reference planner of
    `--against` has its own).
    """
    import partita.planner

    api = api or partita.planner
    rng = random.Random(seed)
    spec = [
        ("cams", api.Tier.EDGE, 0.4, (1.0, 2.0)),
        ("shop", api.Tier.EDGE, 0.3, (5.0, 8.0)),
        ("gw", api.Tier.EDGE, 0.1, (20.0, 30.0)),
        ("cloud", api.Tier.CLOUD, 0.2, (100.0, 160.0)),
    ]
    pools = tuple(api.DevicePoolState(n, t, 1.0, 10.0, 1.0) for n, t, _s, _k in spec)
    out = []
    for name, tier, share, kinds in spec:
        for i in range(max(1, int(nodes * share))):
            g = kinds[i % 2] * 1e9
            out.append(
                api.NodeState(
                    f"{name}-{i}",
                    name,
                    tier,
                    8.0,
                    16 * 1024 * MiB,
                    {c: g for c in OpClass},
                    cpu_used=rng.choice([0.0, 1.0, 2.0]),
                    memory_used=rng.randint(0, 8 * 1024) * MiB,
                )
            )
    links = tuple(
        api.LinkEstimate(*link)
        for link in (
            ("cams", "shop", 1e8, 0.002),
            ("cams", "gw", 5e7, 0.005),
            ("cams", "cloud", 1e7, 0.04),
            ("shop", "gw", 1e8, 0.003),
            ("shop", "cloud", 2e7, 0.03),
            ("gw", "cloud", 1e8, 0.02),
        )
    )
    return api.ClusterSnapshot(nodes=tuple(out), pools=pools, links=links)


def reference_planner(revision: str) -> Any:
    """The planner package as of git `revision`, importable beside the current one.

    Its files are copied into a temporary package (`partita_reference.planner`); it
    imports the current `partita.model`, so the revision must share the model types.
    """
    import importlib
    import subprocess
    import sys
    import tempfile

    folder = "operator/src/partita/planner"
    names = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{revision}:{folder}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    root = Path(tempfile.mkdtemp(prefix="partita-reference-"))
    package = root / "partita_reference" / "planner"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{revision}:{folder}/{name}"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            (package / name).write_text(text)
    sys.path.insert(0, str(root))
    return importlib.import_module("partita_reference.planner")


def timed(fn: Any, repeat: int) -> tuple[float, Any]:
    """Median wall-clock seconds of `repeat` calls, and the last result."""
    seconds, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - t)
    return statistics.median(seconds), result


def _cost(result: Any) -> float:
    """A plan's objective cost, from either planner's Plan shape."""
    return float(getattr(result, "prediction", result).cost)


def _summary(xs: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(xs),
        "p99": float(np.percentile(xs, 99)),
        "min": min(xs),
        "max": max(xs),
    }


def planning_times(
    profiles: dict[str, ModelProfile], reference: Any = None, rounds: int = 15
) -> dict[str, Any]:
    """Wall-clock planning time per case, and (with `reference`) the reference planner's
    on the same inputs, rounds interleaved and their order alternated."""
    import os

    import partita.planner

    apis = {"current": partita.planner}
    if reference is not None:
        apis["reference"] = reference
    reals = list(profiles.values())
    rng = random.Random(1)
    priorities = [rng.randint(0, 5) for _ in range(200)]
    cases: list[tuple[str, int, dict[str, Any], dict[str, Any]]] = []
    for ops, nodes, n_rounds in ((1_000, 100, rounds), (10_000, 1_000, max(3, rounds // 3))):
        profile = profile_model(synthetic.chain_model(ops))
        calls: dict[str, Any] = {}
        for label, api in apis.items():
            req = api.ModelRequest(name="m", data_source="cams")
            snap = big_cluster(nodes, api=api)
            calls[label] = lambda p=profile, r=req, s=snap, a=api: a.plan_model(p, r, s)
        info = {"ops": len(profile.nodes), "cut_points": len(profile.cut_points), "nodes": nodes}
        cases.append((f"{ops}_ops_x_{nodes}_nodes", n_rounds, calls, info))
    calls = {}
    for label, api in apis.items():
        req = api.ModelRequest(name="m", data_source="cams")
        snap = big_cluster(1_000, api=api)
        many = [
            (replace(req, name=f"m{i:03d}", priority=priorities[i]), reals[i % len(reals)])
            for i in range(200)
        ]
        calls[label] = lambda m=many, s=snap, a=api: a.plan_many(m, s)
    cases.append(("200_models_x_1000_nodes", max(3, rounds // 5), calls, {}))
    # Eight real models competing for seven nodes of 256 MiB: the joint search.
    calls = {}
    for label, api in apis.items():
        req = api.ModelRequest(name="m", data_source="cams")
        snap = big_cluster(8, api=api)
        small = replace(
            snap,
            nodes=tuple(
                replace(n, memory_allocatable=256 * MiB, memory_used=0) for n in snap.nodes
            ),
        )
        few = [
            (replace(req, name=f"m{i}", priority=priorities[i]), reals[i % len(reals)])
            for i in range(8)
        ]
        calls[label] = lambda m=few, s=small, a=api: a.plan_many(m, s)
    cases.append(("8_models_x_7_nodes_256MiB", max(3, rounds // 3), calls, {}))
    out: dict[str, Any] = {}
    for name, n_rounds, calls, info in cases:
        labels = list(calls)
        seconds: dict[str, list[float]] = {label: [] for label in labels}
        results: dict[str, Any] = {}
        load_before = os.getloadavg()
        for r in range(n_rounds):
            for label in labels if r % 2 == 0 else labels[::-1]:
                t = time.perf_counter()
                results[label] = calls[label]()
                seconds[label].append(time.perf_counter() - t)
        entry: dict[str, Any] = {
            **info,
            "rounds": n_rounds,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        }
        for label in labels:
            res = results[label]
            entry[label] = {"seconds": _summary(seconds[label])}
            if isinstance(res, dict):
                plans = [x for x in res.values() if hasattr(x, "stages")]
                entry[label]["admitted"] = len(plans)
                entry[label]["total_cost"] = sum(_cost(x) for x in plans)
            else:
                entry[label]["plan"] = res.describe()
                entry[label]["cost"] = _cost(res)
        if "reference" in seconds:
            cur, ref = seconds["current"], seconds["reference"]
            entry["difference_of_medians_s"] = statistics.median(ref) - statistics.median(cur)
            entry["median_of_differences_s"] = statistics.median(
                [b - a for a, b in zip(cur, ref, strict=True)]
            )
            entry["speedup_of_medians"] = statistics.median(ref) / statistics.median(cur)
        out[name] = entry
    return out


def _in_api(value: Any, api: Any) -> Any:
    """`value` (built from the current planner's types) rebuilt from `api`'s types of the
    same names; the reference planner of `--against` has its own classes."""
    import dataclasses
    from enum import Enum

    name = type(value).__name__
    if isinstance(value, Enum) and hasattr(api, name):
        return getattr(api, name)(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and hasattr(api, name):
        fields = {f.name: _in_api(getattr(value, f.name), api) for f in dataclasses.fields(value)}
        return getattr(api, name)(**fields)
    if isinstance(value, tuple):
        return tuple(_in_api(v, api) for v in value)
    if isinstance(value, dict):
        return {k: _in_api(v, api) for k, v in value.items()}
    return value


def joint_vs_exhaustive(reference: Any, instances: int = 300) -> dict[str, Any]:
    """plan_many against an exhaustive search over every plan of every model, on random
    small instances of 5-8 models competing for at most four nodes (the property test's
    generator and oracle, from tests/unit/planner/planner_instances.py)."""
    import sys

    import partita.planner

    sys.path.insert(0, str(ROOT / "tests" / "unit" / "planner"))
    from planner_instances import competing_models, exhaustive_joint

    apis = {"current": partita.planner}
    if reference is not None:
        apis["reference"] = reference
    out: dict[str, Any] = {"instances": instances, "models": "5-8", "seeds": f"0..{instances - 1}"}
    tallies: dict[str, dict[str, Any]] = {
        label: {
            "refused_a_model_that_fits": 0,
            "over_5_percent_worse": 0,
            "worst_ratio": 1.0,
            "seconds": [],
        }
        for label in apis
    }
    for seed in range(instances):
        models, snapshot = competing_models(seed, 5 + seed % 4)
        best_admitted, best_cost = exhaustive_joint(models, snapshot)
        for label, api in apis.items():
            t = time.perf_counter()
            results = api.plan_many(
                [(_in_api(r, api), p) for r, p in models], _in_api(snapshot, api)
            )
            tallies[label]["seconds"].append(time.perf_counter() - t)
            plans = [r for r in results.values() if hasattr(r, "stages")]
            admitted = tuple(sorted((p.request.priority for p in plans), reverse=True))
            ratio = sum(_cost(p) for p in plans) / max(-best_cost, 1e-12)
            if admitted < best_admitted:
                tallies[label]["refused_a_model_that_fits"] += 1
            elif ratio > 1.05:
                tallies[label]["over_5_percent_worse"] += 1
                tallies[label]["worst_ratio"] = max(tallies[label]["worst_ratio"], ratio)
    for label, tally in tallies.items():
        seconds = tally.pop("seconds")
        out[label] = {**tally, "seconds": _summary(seconds)}
    return out


def dp_vs_exhaustive(profiles_cache: dict[str, ModelProfile], cloud_speed: float) -> dict[str, Any]:
    """The same-run baseline for planning time: brute force on a small instance."""
    import itertools

    from partita.planner import plan_for

    profile = profiles_cache["ocr-rec"]
    # Keep 12 cut points so brute force finishes: 4 edge devices + cloud, 3 stages max.
    cuts = profile.cut_points[:: max(1, len(profile.cut_points) // 12)][:12]
    small = replace(profile, cut_points=cuts)
    snap = cluster(cloud_speed / 80, cloud_speed, 10, edge_devices=4)
    req = request(Objective.LATENCY)
    dp_s, plan = timed(lambda: plan_model(small, req, snap, explain=False), 3)
    t = time.perf_counter()
    count, best = 0, float("inf")
    n = len(small.nodes)
    edge = [x for x in snap.nodes if x.pool == "edge"]
    from partita.planner import ShardPlacement, Stage

    def split_seconds(node: NodeState, start: int, end: int) -> float:
        ops = small.nodes[start:end]
        return sum(op.flops / node.speed_of(op.op_class) for op in ops if op.shardable)

    for m in (1, 2):
        for cut in itertools.combinations([c.position for c in cuts], m - 1):
            bounds = [0, *cut, n]
            for pools in itertools.combinations(["edge", "cloud"], m):
                groups = {
                    "edge": [g for k in range(1, 5) for g in itertools.combinations(edge, k)],
                    "cloud": [(snap.nodes[-1],)],
                }
                for choice in itertools.product(*(groups[p] for p in pools)):
                    for comp in itertools.product(list(Compression), repeat=m - 1):
                        stages = []
                        for i, g in enumerate(choice):
                            s = [split_seconds(x, bounds[i], bounds[i + 1]) for x in g]
                            inv = [1 / v if v > 0 else 1.0 for v in s]
                            stages.append(
                                Stage(
                                    i,
                                    pools[i],
                                    bounds[i],
                                    bounds[i + 1],
                                    tuple(
                                        ShardPlacement(x.name, w / sum(inv))
                                        for x, w in zip(g, inv, strict=True)
                                    ),
                                    (),
                                    (),
                                    Compression.NONE if i == 0 else comp[i - 1],
                                )
                            )
                        pred = plan_for(req, stages, small, snap).prediction
                        count += 1
                        if pred.feasible:
                            best = min(best, pred.cost)
    brute_s = time.perf_counter() - t
    assert isinstance(plan, Plan)
    return {
        "cut_points": len(cuts),
        "plans_enumerated": count,
        "dp_seconds": dp_s,
        "exhaustive_seconds": brute_s,
        "speedup": brute_s / dp_s,
        "same_cost": abs(plan.prediction.cost - best) <= 1e-9 * best,
    }


def plots(rows: list[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for model in MODELS:
        fig, axes = plt.subplots(1, len(RATIOS), figsize=(13, 3.6), sharey=True)
        for ax, ratio in zip(axes, RATIOS, strict=True):
            sel = [
                r
                for r in rows
                if r["model"] == model and r["ratio"] == ratio and r["edge_devices"] == 1
            ]
            bws = [r["bandwidth_mbps"] for r in sel]
            for label, get, style in (
                ("Partita", lambda r: r["partita_latency"], "k-o"),
                *(
                    (b, lambda r, b=b: r["baselines_latency"][b], s)
                    for b, s in zip(BASELINES, ("g--", "b--", "m:", "r-."), strict=True)
                ),
            ):
                ys = [(get(r) or {}).get("latency_s", np.nan) * 1e3 for r in sel]
                ax.plot(bws, ys, style, label=label, ms=3)
            four = [
                (r["partita_latency"] or {}).get("latency_s", np.nan) * 1e3
                for r in rows
                if r["model"] == model and r["ratio"] == ratio and r["edge_devices"] == 4
            ]
            ax.plot(bws, four, "k:", label="Partita, 4 edge devices")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{model}: edge {ratio}x slower than cloud")
            ax.set_xlabel("edge-cloud Mbit/s (RTT 20 ms)")
        axes[0].set_ylabel("predicted latency, ms")
        axes[-1].legend(fontsize=7)
        fig.tight_layout()
        path = RESULTS / f"planner_{model}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path.name)
    return files


def summarise(rows: list[dict[str, Any]], weak: list[dict[str, Any]]) -> dict[str, Any]:
    def lat(fig: dict[str, Any] | None) -> float:
        return fig["latency_s"] if fig else float("inf")

    def thr(fig: dict[str, Any] | None) -> float:
        return fig["throughput_rps"] if fig else 0.0

    ratios: dict[str, Any] = {}
    for model in MODELS:
        for devices in (1, 4):
            sel = [r for r in rows if r["model"] == model and r["edge_devices"] == devices]
            entry = {}
            for b in BASELINES:
                lr = [lat(r["baselines_latency"][b]) / lat(r["partita_latency"]) for r in sel]
                tr = [
                    thr(r["partita_throughput"]) / max(thr(r["baselines_throughput"][b]), 1e-12)
                    for r in sel
                ]
                entry[b] = {
                    "latency_min": min(lr),
                    "latency_median": statistics.median(lr),
                    "latency_max": max(lr),
                    "throughput_min": min(tr),
                    "throughput_max": max(tr),
                }
            ratios[f"{model}/{devices}dev"] = entry
    # Aims.
    # Pipelining: plans using both tiers, against edge-only (the aim's wording) and against
    # the best single tier (what pipelining itself adds).
    pipe = [
        (
            thr(r["partita_throughput"]) / max(thr(r["baselines_throughput"]["edge-only"]), 1e-12),
            thr(r["partita_throughput"])
            / max(
                thr(r["baselines_throughput"]["edge-only"]),
                thr(r["baselines_throughput"]["cloud-only"]),
                1e-12,
            ),
            r,
        )
        for r in rows
        if r["partita_throughput"] and set(r["partita_throughput"]["pools"]) == {"edge", "cloud"}
    ]
    best_pipe = max(pipe, key=lambda x: x[1]) if pipe else (0.0, 0.0, None)
    pipe_one = [x for x in pipe if x[2]["edge_devices"] == 1]
    best_one = max(pipe_one, key=lambda x: x[1]) if pipe_one else (0.0, 0.0, None)
    tier80 = [
        (
            min(lat(r["baselines_latency"]["edge-only"]), lat(r["baselines_latency"]["cloud-only"]))
            / lat(r["partita_latency"]),
            r,
        )
        for r in rows
        if r["ratio"] == 80
    ]
    tier80_single = [x for x in tier80 if x[1]["edge_devices"] == 1]
    unaware = [
        lat(r["baselines_latency"]["network-unaware"]) / lat(r["partita_latency"])
        for r in rows
        if r["model"] in IMAGE_MODELS and r["bandwidth_mbps"] <= 10
    ]
    wins = [
        r
        for r in rows
        if r["partita_latency"]
        and (r["partita_latency"]["stages"] > 1 or r["partita_latency"]["max_shards"] > 1)
    ]

    def where(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        return (
            f"{r['model']}, edge {r['ratio']}x, {r['bandwidth_mbps']} Mbit/s, "
            f"{r['edge_devices']} edge device(s)"
        )

    same: dict[str, Any] = {}
    for objective in ("latency", "throughput"):
        pairs = [
            (r[f"partita_{objective}"], r[f"reference_cost_{objective}"], r)
            for r in rows
            if f"reference_cost_{objective}" in r
        ]
        if not pairs:
            continue
        costs = {"latency": "latency_s", "throughput": "throughput_rps"}
        ratios_ref = []
        differ = 0
        for fig, ref_cost, _r in pairs:
            if fig is None or ref_cost is None:
                differ += (fig is None) != (ref_cost is None)
                continue
            cost = fig[costs[objective]] if objective == "latency" else 1 / fig["throughput_rps"]
            ratios_ref.append(cost / ref_cost)
            differ += abs(cost / ref_cost - 1) > 1e-6
        same[objective] = {
            "configs": len(pairs),
            "differing_cost": differ,
            "max_cost_ratio": max(ratios_ref, default=1.0),
            "min_cost_ratio": min(ratios_ref, default=1.0),
        }
    return {
        "same_plans_as_reference": same,
        "ratios": ratios,
        "aims": {
            "pipelining_throughput": {
                "aim_vs_edge_only": 1.8,
                "best_vs_edge_only": max((x[0] for x in pipe), default=0.0),
                "best_vs_best_single_tier": best_pipe[1],
                "where": where(best_pipe[2]),
                "plan": best_pipe[2]["partita_throughput"]["plan"] if best_pipe[2] else None,
                "vs_edge_only_at_that_config": best_pipe[0],
                "one_device_best_vs_best_single_tier": best_one[1],
                "one_device_where": where(best_one[2]),
            },
            "latency_vs_best_single_tier_edge_80x": {
                "aim": 1.3,
                "best_one_device": max(x[0] for x in tier80_single),
                "where_one_device": where(max(tier80_single, key=lambda x: x[0])[1]),
                "best_any": max(x[0] for x in tier80),
                "where_any": where(max(tier80, key=lambda x: x[0])[1]),
            },
            "latency_vs_network_unaware_images_le_10mbps": {
                "aim": 10.0,
                "min": min(unaware),
                "median": statistics.median(unaware),
                "max": max(unaware),
            },
            "four_weak_devices_vs_one": {
                "aim": 3.0,
                "by_model": {f"{w['model']}@{w['ratio']}x": w["speedup"] for w in weak},
            },
        },
        "configs": len(rows),
        "configs_where_partitioning_was_chosen": len(wins),
    }


def write_md(result: dict[str, Any]) -> str:
    s = result["summary"]
    a = s["aims"]
    lines = [
        "# Planner benchmark",
        "",
        f"Command: `{result['command']}`. One core here runs open-nsfw at "
        f"{result['core_gflops']:.1f} GFLOP/s (ORT, 1 thread, measured); cloud node = 8 cores "
        f"= {result['cloud_gflops']:.0f} GFLOP/s; edge = cloud / 8, 80, 400. RTT 20 ms, "
        "LAN 1 Gbit/s, fp16 cut compression allowed. Latency/throughput are the planner's "
        "predictions, not measurements.",
        "",
        "## Planning time (wall clock, shared 2-core machine)",
        "",
    ]
    pt = result["planning_time"]
    against = result.get("against")
    if against:
        lines += [
            f"Side by side with the planner of `{against}` (reference), on the same inputs, "
            "rounds interleaved and their order alternated; load average (1, 5, 15 min) "
            "before and after each case.",
            "",
            "| case | rounds | median s | p99 s | reference median s | reference p99 s | "
            "difference of medians s | median of differences s | speed-up | load | aim |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines += ["| case | rounds | median s | p99 s | load | aim |", "|---|---|---|---|---|---|"]
    for key, aim in (
        ("1000_ops_x_100_nodes", 0.1),
        ("10000_ops_x_1000_nodes", 1.0),
        ("200_models_x_1000_nodes", 10.0),
        ("8_models_x_7_nodes_256MiB", math.nan),
    ):
        v = pt[key]
        extra = f" ({v['cut_points']} cut points)" if "cut_points" in v else ""
        cur = v["current"]["seconds"]
        load = (
            "/".join(f"{x:.2f}" for x in v["load_average_before"])
            + " → "
            + "/".join(f"{x:.2f}" for x in v["load_average_after"])
        )
        row = f"| {key}{extra} | {v['rounds']} | {cur['median']:.3f} | {cur['p99']:.3f} |"
        if against:
            ref = v["reference"]["seconds"]
            row += (
                f" {ref['median']:.3f} | {ref['p99']:.3f} | {v['difference_of_medians_s']:.3f} |"
                f" {v['median_of_differences_s']:.3f} | {v['speedup_of_medians']:.2f}x |"
            )
        lines.append(row + f" {load} | " + ("-" if math.isnan(aim) else f"<= {aim}") + " |")
    lines.append("")
    for key in ("200_models_x_1000_nodes", "8_models_x_7_nodes_256MiB"):
        many = pt[key]
        admitted = (
            f"{many['current']['admitted']} admitted, total cost "
            f"{many['current']['total_cost']:.4f}"
        )
        if against:
            admitted += (
                f" (reference: {many['reference']['admitted']} admitted, total cost "
                f"{many['reference']['total_cost']:.4f})"
            )
        lines.append(f"- {key}: {admitted}.")
    lines.append("")
    for objective, v in s.get("same_plans_as_reference", {}).items():
        lines.append(
            f"Plan cost against the reference planner over the sweep ({objective}): "
            f"{v['differing_cost']} of {v['configs']} configurations differ by more than "
            f"1e-6 (cost ratio {v['min_cost_ratio']:.9f} to {v['max_cost_ratio']:.9f})."
        )
    j = result["joint_vs_exhaustive"]
    lines += [
        f"Joint planning against exhaustive search, {j['instances']} random instances of "
        f"{j['models']} models on at most four nodes (seeds {j['seeds']}):",
        "",
        "| planner | refused a model that fits | over 5% worse | worst ratio | median s | p99 s |",
        "|---|---|---|---|---|---|",
    ]
    for label in ("current", "reference"):
        if label in j:
            v = j[label]
            lines.append(
                f"| {label} | {v['refused_a_model_that_fits']} | {v['over_5_percent_worse']} "
                f"| {v['worst_ratio']:.2f} | {v['seconds']['median']:.3f} | "
                f"{v['seconds']['p99']:.3f} |"
            )
    lines.append("")
    d = result["dp_vs_exhaustive"]
    lines += [
        "",
        f"Same-run baseline: brute force over {d['plans_enumerated']} plans "
        f"({d['cut_points']} cut points, 4 edge devices + cloud) took "
        f"{d['exhaustive_seconds']:.2f} s, the DP {d['dp_seconds'] * 1e3:.1f} ms "
        f"({d['speedup']:.0f}x), same cost: {d['same_cost']}.",
        "",
        "## Partita vs baselines (ratio = baseline latency / Partita latency; throughput: "
        "Partita / baseline)",
        "",
        "| model / edge devices | baseline | latency min | median | max | throughput max |",
        "|---|---|---|---|---|---|",
    ]
    for key, entry in s["ratios"].items():
        for b, v in entry.items():
            lines.append(
                f"| {key} | {b} | {v['latency_min']:.2f} | {v['latency_median']:.2f} | "
                f"{v['latency_max']:.2f} | {v['throughput_max']:.2f} |"
            )
    p = a["pipelining_throughput"]
    t = a["latency_vs_best_single_tier_edge_80x"]
    u = a["latency_vs_network_unaware_images_le_10mbps"]
    w = a["four_weak_devices_vs_one"]["by_model"]
    mem = result["memory_bound"]
    lines += [
        "",
        "## Aims",
        "",
        f"- Throughput by pipelining edge+cloud (aim >= 1.8x edge-only): over plans using "
        f"both tiers, up to {p['best_vs_edge_only']:.2f}x edge-only (mostly by moving work "
        f"to the cloud); the pipelining gain itself, against the best single tier, is at most "
        f"{p['best_vs_best_single_tier']:.2f}x ({p['where']}: {p['plan']}, "
        f"{p['vs_edge_only_at_that_config']:.2f}x edge-only there); with one edge device "
        f"(pure edge+cloud pipelining) {p['one_device_best_vs_best_single_tier']:.2f}x "
        f"({p['one_device_where']}).",
        f"- Latency vs best single tier, edge 80x slower (aim >= 1.3x): one edge device "
        f"{t['best_one_device']:.2f}x ({t['where_one_device']}); with 4 edge devices "
        f"{t['best_any']:.2f}x ({t['where_any']}).",
        f"- Latency vs network-unaware, image models <= 10 Mbit/s (aim >= 10x): min "
        f"{u['min']:.2f}x, median {u['median']:.2f}x, max {u['max']:.2f}x.",
        "- Four weak edge devices on a 1 Gbit/s LAN vs one (aim >= 3x): "
        + ", ".join(f"{k} {v:.2f}x" if v else f"{k} n/a" for k, v in w.items()),
        f"- Memory-bound: minilm on 96 MiB edge devices, raw text kept at the edge: Partita "
        f"{(mem['partita'] or {}).get('plan', 'unschedulable')}; baselines: "
        + "; ".join(
            f"{k}: {'unschedulable' if 'unschedulable' in v else v['plan']}"
            for k, v in mem["baselines"].items()
        ),
        "",
        f"Partitioning (cuts or shards) was chosen in {s['configs_where_partitioning_was_chosen']}"
        f" of {s['configs']} configurations. Plots: "
        + ", ".join(f"`{f}`" for f in result["plots"]),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--against",
        metavar="REV",
        help="also time the planner of this git revision, side by side",
    )
    parser.add_argument(
        "--joint-instances",
        type=int,
        default=300,
        metavar="N",
        help="random instances for joint planning against exhaustive search (seeds 0..N-1)",
    )
    args = parser.parse_args()
    reference = reference_planner(args.against) if args.against else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    profiles_cache: dict[str, ModelProfile] = {}
    core = core_gflops()
    cloud_speed = 8 * core
    for name in MODELS:
        profiles_cache[name] = profile_model(zoo.model_path(name), zoo.default_input_shapes(name))
    t0 = time.perf_counter()
    rows = sweep(profiles_cache, cloud_speed, reference)
    weak = weak_edge(profiles_cache, cloud_speed)
    result: dict[str, Any] = {
        "command": ".venv/bin/python bench/planner.py"
        + (f" --against {args.against}" if args.against else "")
        + (f" --joint-instances {args.joint_instances}" if args.joint_instances != 300 else ""),
        "against": args.against,
        "core_gflops": core,
        "cloud_gflops": cloud_speed,
        "planning_time": planning_times(profiles_cache, reference),
        "dp_vs_exhaustive": dp_vs_exhaustive(profiles_cache, cloud_speed),
        "joint_vs_exhaustive": joint_vs_exhaustive(reference, args.joint_instances),
        "memory_bound": memory_bound(profiles_cache["minilm"], cloud_speed),
        "sweep": rows,
        "weak_edge": weak,
    }
    result["summary"] = summarise(rows, weak)
    result["plots"] = plots(rows)
    result["bench_seconds"] = time.perf_counter() - t0
    (RESULTS / "planner.json").write_text(json.dumps(result, indent=1, default=str))
    md = write_md(result)
    (RESULTS / "planner.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
