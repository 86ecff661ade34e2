"""Benchmark of model analysis: profile and slicing time, and how well FLOPs predict time.

Writes bench/results/model.json and bench/results/model.md. Baselines measured in the same
run: onnx shape inference alone (for profile time) and a per-node-count predictor (for
FLOPs-vs-time: does counting FLOPs beat "every node of a class costs its mean time"?).
Run: .venv/bin/python bench/model.py
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx

from partita import runtime
from partita.model import synthetic, zoo
from partita.model.load import load_model, seeded_inputs
from partita.model.profile import clear_cache, profile_loaded, profile_model
from partita.model.slice import split_at
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
        total = _timed(lambda s=source, sh=shapes: profile_model(s, sh))
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


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "profile": profile_times(),
        "flops_vs_time": flops_vs_time(("ocr-cls", "ocr-det", "light-squeezenet", "minilm")),
    }
    (RESULTS / "model.json").write_text(json.dumps(result, indent=2))
    lines = ["# partita.model benchmark", "", "## Profile and slicing time", ""]
    lines.append(
        "| model | nodes (file/loaded) | profile s | shape-inference-only s | ratio | slice s |"
    )
    lines.append("|---|---|---|---|---|---|")
    for r in result["profile"]:
        lines.append(
            f"| {r['model']} | {r['file_nodes']}/{r['loaded_nodes']} | {r['profile_s']} | "
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
    (RESULTS / "model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
