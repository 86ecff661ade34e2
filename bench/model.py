"""Benchmark of model analysis: profile and slicing time, how well FLOPs predict time, and
what sharding splits.

Writes bench/results/model.json and bench/results/model.md. Baselines measured in the same
run: onnx shape inference alone (for profile time), a per-node-count predictor (for
FLOPs-vs-time: does counting FLOPs beat "every node of a class costs its mean time"?), the
one-segment layouts a plain fan-out of the whole stage input can serve (for sharding), and
the whole range run on one core (for the shards' measured compute).
Run: .venv/bin/python bench/model.py
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from partita import runtime
from partita.model import synthetic, zoo
from partita.model.exchange import run_sharded
from partita.model.load import load_model, seeded_inputs
from partita.model.profile import clear_cache, profile_loaded, profile_model
from partita.model.shard import ShardAnalysis
from partita.model.slice import split_at
from partita.model.types import ShardLayout
from partita.model.verify import auto_cuts

RESULTS = Path(__file__).parent / "results"


def _timed(fn, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        clear_cache()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_times() -> list[dict[str, object]]:
    rows = []
    cases = [
        ("light-densenet121", zoo.model_path("light-densenet121"), {}),
        ("open-nsfw", zoo.model_path("open-nsfw"), zoo.default_input_shapes("open-nsfw")),
        ("synthetic-chain-10k", synthetic.chain_model(10_000), {}),
    ]
    for name, source, shapes in cases:
        file_nodes = (
            len(onnx.load(str(source)).graph.node)
            if isinstance(source, Path)
            else len(source.graph.node)
        )
        proto = onnx.load(str(source)) if isinstance(source, Path) else source
        base = _timed(lambda p=proto: onnx.shape_inference.infer_shapes(p, data_prop=True))
        bare = _timed(lambda s=source, sh=shapes: profile_model(s, sh, shard_counts=()))
        total = _timed(lambda s=source, sh=shapes: profile_model(s, sh))
        with tempfile.TemporaryDirectory() as tmp:
            clear_cache()
            profile_model(source, shapes, cache_dir=Path(tmp))
            cached = _timed(
                lambda s=source, sh=shapes, d=Path(tmp): profile_model(s, sh, cache_dir=d)
            )
            stored = sum(f.stat().st_size for f in Path(tmp).iterdir())
        model = load_model(source, shapes)
        prof = profile_loaded(model)
        cuts = auto_cuts(prof)
        start = time.perf_counter()
        split_at(model, cuts, prof)
        slicing = time.perf_counter() - start
        rows.append(
            {
                "model": name,
                "file_nodes": file_nodes,
                "loaded_nodes": len(prof.nodes),
                "profile_s": round(total, 3),
                "profile_without_shard_tables_s": round(bare, 3),
                "cached_load_s": round(cached, 3),
                "cache_bytes": stored,
                "shape_inference_only_s": round(base, 3),
                "ratio_vs_shape_inference": round(total / base, 2),
                "slice_s": round(slicing, 3),
                "stages": len(cuts) + 1,
            }
        )
    return rows


def flops_vs_time(names: tuple[str, ...]) -> dict[str, object]:
    """Per op class: fit FLOPs/s on half of the nodes, predict the other half."""
    samples: list[tuple[str, int, float]] = []  # (class, flops, measured us)
    for name in names:
        model = load_model(zoo.model_path(name), zoo.default_input_shapes(name))
        for i, node in enumerate(model.graph.node):
            if not node.name:
                node.name = f"n{i}"
        prof = profile_loaded(model)
        times = runtime.profile_nodes(model.SerializeToString(), seeded_inputs(model), runs=5)
        for cost in prof.nodes:
            if cost.name in times and cost.flops > 0:
                samples.append((cost.op_class.value, cost.flops, times[cost.name]))
    rng = np.random.default_rng(0)
    per_class: dict[str, object] = {}
    for cls in sorted({s[0] for s in samples}):
        rows = [(f, t) for c, f, t in samples if c == cls]
        if len(rows) < 6:
            continue
        idx = rng.permutation(len(rows))
        fit, test = idx[: len(rows) // 2], idx[len(rows) // 2 :]
        flops = np.array([r[0] for r in rows], dtype=np.float64)
        us = np.array([r[1] for r in rows], dtype=np.float64)
        rate = flops[fit].sum() / us[fit].sum()  # FLOPs per microsecond
        mean_us = us[fit].mean()
        err_flops = np.abs(flops[test] / rate - us[test]) / us[test]
        err_count = np.abs(mean_us - us[test]) / us[test]
        total_err = abs(flops[test].sum() / rate - us[test].sum()) / us[test].sum()
        per_class[cls] = {
            "nodes": len(rows),
            "gflops_per_s": round(rate / 1e3, 2),
            "median_node_error_flops": round(float(np.median(err_flops)), 3),
            "median_node_error_count_baseline": round(float(np.median(err_count)), 3),
            "sum_error_flops": round(float(total_err), 3),
        }
    return {"models": list(names), "classes": per_class}


SHARD_MODELS = ("open-nsfw", "minilm", "ocr-rec", "ocr-det", "ocr-cls", "light-resnet50")


def _layout_row(name: str, total: int, what: str, layout: ShardLayout) -> dict[str, object]:
    received = [sum(x.received_bytes[j] for x in layout.exchanges) for j in range(layout.shards)]
    return {
        "model": name,
        "shards": layout.shards,
        "layout": what,
        "strategy": layout.strategy,
        "busiest_share": round(max(layout.shard_flops) / total, 3),
        "sum_share": round(sum(layout.shard_flops) / total, 3),
        "busiest_gflop": round(max(layout.shard_flops) / 1e9, 3),
        "param_mib": round(max(layout.shard_param_bytes) / 2**20, 2),
        "peak_mib": round(max(layout.shard_peak_bytes) / 2**20, 2),
        "segments": len(layout.segments),
        "exchanges": len(layout.exchanges),
        "received_kib": round(max(received) / 1024, 1),
        "scatter_kib": round(max(layout.scatter_bytes, default=0) / 1024, 1),
        "gather_kib": round(sum(layout.gather_bytes) / 1024, 1),
    }


def shard_layouts() -> list[dict[str, object]]:
    """Per model and shard count: the layout `ShardAnalysis.layout` picks for the whole
    model, each strategy's, and the one-segment layout (the baseline a fan-out serves)."""
    rows = []
    for name in SHARD_MODELS:
        model = load_model(zoo.model_path(name), zoo.default_input_shapes(name))
        prof = profile_loaded(model)
        analysis = ShardAnalysis(model)
        n = len(prof.nodes)
        for k in (2, 4):
            props = [1.0] * k
            for what, strategy, single in (
                ("chosen", None, False),
                ("tile", "tile", False),
                ("width", "width", False),
                ("one segment", None, True),
            ):
                try:
                    layout = analysis.layout(0, n, props, strategy, single_segment=single)
                except Exception as exc:
                    rows.append({"model": name, "shards": k, "layout": what, "refused": str(exc)})
                    continue
                rows.append(_layout_row(name, prof.total_flops, what, layout))
    return rows


def table_accuracy(samples: int = 40) -> list[dict[str, object]]:
    """The profile's shard tables (what the planner searches with) beside the exact layouts
    of the same ranges: the busiest shard's FLOPs, 4 equal shards, seeded random ranges."""
    rows = []
    rng = np.random.default_rng(0)
    for name in ("open-nsfw", "minilm", "ocr-rec", "ocr-det"):
        model = load_model(zoo.model_path(name), zoo.default_input_shapes(name))
        prof = profile_loaded(model)
        n = len(prof.nodes)
        positions = sorted({0, n, *(c.position for c in prof.cut_points)})
        analysis = ShardAnalysis(model)
        for strategy in ("tile", "width"):
            table = analysis.table(4, strategy, positions)
            errors = []
            for _ in range(samples):
                a, b = sorted(rng.choice(len(positions), 2, replace=False))
                if not (table.starts[a] and table.ends[b]):
                    continue  # a range the planner never proposes
                try:
                    layout = analysis.layout(positions[a], positions[b], [1.0] * 4, strategy)
                except Exception:
                    continue
                exact = max(layout.shard_flops)
                errors.append(float(table.flops(a, b).max()) / exact - 1.0)
            rows.append(
                {
                    "model": name,
                    "strategy": strategy,
                    "ranges": len(errors),
                    "median": round(float(np.median(errors)), 3) if errors else None,
                    "max": round(max(errors), 3) if errors else None,
                    "min": round(min(errors), 3) if errors else None,
                    "under_estimates": sum(e < -1e-9 for e in errors),
                }
            )
    return rows


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def shard_compute_times(rounds: int = 15) -> list[dict[str, object]]:
    """Measured compute of 4 equal shards on this machine: the whole model run on one
    thread, and each shard's segment models run in turn (the exchanges' arithmetic in
    numpy included, the network not). Rounds interleave whole and sharded runs."""
    return [_shard_compute(name, rounds) for name in ("open-nsfw", "minilm", "ocr-rec")]


def _shard_compute(name: str, rounds: int) -> dict[str, object]:
    model = load_model(zoo.model_path(name), zoo.default_input_shapes(name))
    analysis = ShardAnalysis(model)
    layout = analysis.layout(0, len(model.graph.node), [1.0] * 4)
    sessions = [
        [runtime.Session(m.SerializeToString(), intra_op_threads=1) if m else None for m in per]
        for per in analysis.build(layout)
    ]
    whole = runtime.Session(model.SerializeToString(), intra_op_threads=1)
    feeds = zoo.sample_inputs(name, model)
    busy = [0.0] * 4

    def run(segment: int, shard: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = sessions[segment][shard]
        assert session is not None
        start = time.perf_counter()
        out = session.run(inputs)
        busy[shard] += time.perf_counter() - start
        return out

    run_sharded(layout, run, feeds)  # warm up both
    whole.run(feeds)
    whole_ms, shard_ms, ratios, loads = [], [], [], []
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        start = time.perf_counter()
        whole.run(feeds)
        w = (time.perf_counter() - start) * 1e3
        busy[:] = [0.0] * 4
        run_sharded(layout, run, feeds)
        b = max(busy) * 1e3
        whole_ms.append(w)
        shard_ms.append(b)
        ratios.append(b / w)
    return {
        "model": name,
        "strategy": layout.strategy,
        "segments": len(layout.segments),
        "planned_busiest_share": round(
            max(layout.shard_flops) / profile_loaded(model).total_flops, 3
        ),
        "whole_ms_p50": round(statistics.median(whole_ms), 2),
        "whole_ms_p99": round(_pct(whole_ms, 99), 2),
        "busiest_shard_ms_p50": round(statistics.median(shard_ms), 2),
        "busiest_shard_ms_p99": round(_pct(shard_ms, 99), 2),
        "ratio_of_medians": round(statistics.median(shard_ms) / statistics.median(whole_ms), 3),
        "median_of_ratios": round(statistics.median(ratios), 3),
        "load_avg_1m": [round(min(loads), 2), round(max(loads), 2)],
        "rounds": rounds,
    }


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "profile": profile_times(),
        "flops_vs_time": flops_vs_time(("ocr-cls", "ocr-det", "light-squeezenet", "minilm")),
        "shard_layouts": shard_layouts(),
        "shard_tables_vs_layouts": table_accuracy(),
        "shard_compute": shard_compute_times(),
    }
    (RESULTS / "model.json").write_text(json.dumps(result, indent=2))
    lines = ["# partita.model benchmark", "", "## Profile and slicing time", ""]
    lines.append(
        "| model | nodes (file/loaded) | profile s | without shard tables s | cached load s "
        "| cache KiB | shape-inference-only s | ratio | slice s |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in result["profile"]:
        lines.append(
            f"| {r['model']} | {r['file_nodes']}/{r['loaded_nodes']} | {r['profile_s']} | "
            f"{r['profile_without_shard_tables_s']} | {r['cached_load_s']} | "
            f"{r['cache_bytes'] // 1024} | "  # type: ignore[operator]
            f"{r['shape_inference_only_s']} | {r['ratio_vs_shape_inference']} | {r['slice_s']} |"
        )
    lines += ["", "## FLOPs vs measured ORT kernel time (1 thread), held-out half of nodes", ""]
    lines.append(
        "| class | nodes | GFLOP/s | median node error (FLOPs) | (node-count baseline) "
        "| error of summed time |"
    )
    lines.append("|---|---|---|---|---|---|")
    for cls, r in result["flops_vs_time"]["classes"].items():  # type: ignore[union-attr]
        lines.append(
            f"| {cls} | {r['nodes']} | {r['gflops_per_s']} | {r['median_node_error_flops']:.0%} | "
            f"{r['median_node_error_count_baseline']:.0%} | {r['sum_error_flops']:.0%} |"
        )
    lines += [
        "",
        "## Sharded layouts of the whole model (equal shards)",
        "",
        "Shares are of the whole model's FLOPs; busiest = the shard with the most work, sum =",
        "all shards together (above 1: halo and replicated work). MiB and KiB per shard, the",
        "largest; received = bytes a shard receives in exchanges (peer to peer, only the rows",
        "it needs); one segment = what a fan-out of the whole stage input can serve.",
        "",
        "| model | k | layout | strategy | busiest | sum | busiest GFLOP | params MiB "
        "| peak MiB | segments | exchanges | received KiB | scatter KiB | gather KiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["shard_layouts"]:  # type: ignore[union-attr]
        if "refused" in r:
            lines.append(f"| {r['model']} | {r['shards']} | {r['layout']} | refused: "
                         f"{str(r['refused'])[:90]} |||||||||||")  # fmt: skip
            continue
        lines.append(
            f"| {r['model']} | {r['shards']} | {r['layout']} | {r['strategy']} | "
            f"{r['busiest_share']} | {r['sum_share']} | {r['busiest_gflop']} | "
            f"{r['param_mib']} | {r['peak_mib']} | {r['segments']} | {r['exchanges']} | "
            f"{r['received_kib']} | {r['scatter_kib']} | {r['gather_kib']} |"
        )
    lines += [
        "",
        "## Shard tables (the planner's search) beside the exact layouts, 4 equal shards",
        "",
        "table / exact - 1 of the busiest shard's FLOPs over seeded random ranges that may start",
        "and end where they do (the ranges the planner may propose); positive = the table",
        "overestimates.",
        "",
        "| model | strategy | ranges | median | max | min | under-estimates |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["shard_tables_vs_layouts"]:  # type: ignore[union-attr]
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['ranges']} | {r['median']} | {r['max']} | "
            f"{r['min']} | {r['under_estimates']} |"
        )
    lines += [
        "",
        "## Measured compute of 4 equal shards (this machine, 1 thread each, no network)",
        "",
        "| model | strategy | segments | planned busiest share | whole ms p50/p99 "
        "| busiest shard ms p50/p99 | ratio of medians | median of ratios | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["shard_compute"]:  # type: ignore[union-attr]
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['segments']} | {r['planned_busiest_share']} | "
            f"{r['whole_ms_p50']}/{r['whole_ms_p99']} | "
            f"{r['busiest_shard_ms_p50']}/{r['busiest_shard_ms_p99']} | "
            f"{r['ratio_of_medians']} | {r['median_of_ratios']} | {r['load_avg_1m']} |"
        )
    (RESULTS / "model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
