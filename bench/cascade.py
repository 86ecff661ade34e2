"""The confidence cascade against the main model alone, side by side in one run: open_nsfw in
float32 as the main model behind a shaped link, its int8 quantization as the small model in
front of it.

Run: `.venv/bin/python bench/cascade.py [--rounds 24] [--mbps 5] [--threshold 0.95]`.
Writes bench/results/cascade.json and cascade.md. Three `partita-server` processes: the main
model (whole, float32), reached through a relay pacing the link at --mbps (the test bed's
`LinkPacer`, no added RTT); the small model with the cascade rule and a hop to the main model
through its own relay of the same rate, exactly as the operator renders a cascade (the small
model is the entry, forwarded inputs go on as they came). The main-model-only path is the
same link straight to the main model. Each round sends one photograph (scikit-image's, as
open_nsfw takes them) to both paths in alternating order, one request at a time; load average
before and after. Reported: p50, p99 and mean latency of each path, the difference of medians
and the median of per-round differences, the measured offload ratio (the small model's own
counter) against the share of photographs whose small-model confidence is under the
threshold, and how often the cascade's answer has another top-1 than the main model's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from cuts import INPUT, OUTPUT, RESULTS, SHAPES, Relay, _percentile, _server


def main() -> None:
    import httpx
    import tritonclient.http as triton

    from partita.model.compress import quantize_model
    from partita.model.load import load_model
    from partita.model.samples import Calibration, Split, sample_set
    from partita.model.zoo import model_path
    from partita.runtime import Session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--mbps", type=float, default=5.0)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    path = model_path("open-nsfw")
    model = load_model(path, SHAPES)
    images = [
        f[INPUT]
        for split in (Split.CALIBRATION, Split.EVALUATION)
        for f in sample_set(model, Calibration.CAFFE, split, args.rounds // 2 + 1, seed=9).feeds
    ][: args.rounds]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        cache = Path(tmp)
        small_path = cache / "open_nsfw_int8.onnx"
        small_path.write_bytes(quantize_model(model, Calibration.CAFFE).model.SerializeToString())
        small = Session(small_path)
        main_session = Session(path)
        under = [float(small.run({INPUT: x})[OUTPUT].max()) < args.threshold for x in images]
        main_port = stack.enter_context(
            _server({"model": "nsfw", "source": {"uri": path.as_uri()}, "entry": True}, cache)
        )
        to_main = stack.enter_context(Relay(main_port, args.mbps * 1e6))
        alone = stack.enter_context(Relay(main_port, args.mbps * 1e6))
        hop = {"stage": "stage-0", "endpoints": [f"http://127.0.0.1:{to_main.port}"],
               "timeout_s": 120}  # fmt: skip
        front = stack.enter_context(
            _server(
                {
                    "model": "nsfw",
                    "stage": "cascade",
                    "source": {"uri": small_path.as_uri()},
                    "cascade": {"output": OUTPUT, "threshold": args.threshold},
                    "next": [hop],
                },
                cache,
            )
        )
        clients = {
            "cascade": triton.InferenceServerClient(f"127.0.0.1:{front}", network_timeout=300),
            "main-only": triton.InferenceServerClient(
                f"127.0.0.1:{alone.port}", network_timeout=300
            ),
        }

        def call(which: str, x: np.ndarray) -> tuple[float, np.ndarray, str]:
            import time

            tensor = triton.InferInput(INPUT, list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=True)
            start = time.perf_counter()
            result = clients[which].infer("nsfw", [tensor])
            seconds = time.perf_counter() - start
            where = str(result.get_response().get("parameters", {}).get("partita_cascade", ""))
            return seconds, np.asarray(result.as_numpy(OUTPUT)), where

        for which in clients:
            call(which, images[0])  # warm-up
        warm = httpx.get(f"http://127.0.0.1:{front}/metrics").text
        latency: dict[str, list[float]] = {w: [] for w in clients}
        decisions: list[str] = []
        top1_changed = 0
        for r, x in enumerate(images):
            order = list(clients) if r % 2 == 0 else list(reversed(clients))
            for which in order:
                seconds, got, where = call(which, x)
                latency[which].append(seconds)
                if which == "cascade":
                    decisions.append(where)
                    want = main_session.run({INPUT: x})[OUTPUT]
                    top1_changed += int(np.argmax(got) != np.argmax(want))
        metrics = httpx.get(f"http://127.0.0.1:{front}/metrics").text
        for client in clients.values():
            client.close()
    load_after = os.getloadavg()

    def counter(text: str, decision: str) -> float:
        for line in text.splitlines():
            if line.startswith("partita_cascade_requests_total") and f'"{decision}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    forwarded = counter(metrics, "forward") - counter(warm, "forward")
    local = counter(metrics, "local") - counter(warm, "local")
    rows = []
    for which, samples in latency.items():
        rows.append(
            {
                "path": which,
                "p50_ms": 1000 * statistics.median(samples),
                "p99_ms": 1000 * _percentile(samples, 0.99),
                "mean_ms": 1000 * statistics.fmean(samples),
                "n": len(samples),
            }
        )
    diffs = [a - b for a, b in zip(latency["main-only"], latency["cascade"], strict=True)]
    doc = {
        "command": "python bench/cascade.py " + " ".join(sys.argv[1:]),
        "link_mbps": args.mbps,
        "threshold": args.threshold,
        "rounds": args.rounds,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "rows": rows,
        "median_diff_main_only_minus_cascade_ms": 1000 * statistics.median(diffs),
        "diff_of_medians_ms": rows[1]["p50_ms"] - rows[0]["p50_ms"],
        "measured_offload_ratio": forwarded / max(forwarded + local, 1.0),
        "share_under_threshold": sum(under) / len(under),
        "decisions_match_threshold": decisions == ["forwarded" if u else "local" for u in under],
        "top1_changed_vs_main": top1_changed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cascade.json").write_text(json.dumps(doc, indent=1))
    lines = [
        f"# Confidence cascade against the main model alone at {args.mbps:g} Mbit/s",
        "",
        f"`{doc['command']}`; open_nsfw float32 behind the link, its static int8 quantization "
        f"in front (threshold {args.threshold:g}); {args.rounds} photographs, alternating "
        f"order; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after.",
        "",
        "| path | p50 ms | p99 ms | mean ms | n |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {r['path']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_ms']:.0f} "
            f"| {r['n']} |"
            for r in rows
        ),
        "",
        f"Median of per-round differences (main-only minus cascade): "
        f"{doc['median_diff_main_only_minus_cascade_ms']:.0f} ms; difference of medians "
        f"{doc['diff_of_medians_ms']:.0f} ms. Measured offload ratio "
        f"{doc['measured_offload_ratio']:.3f} (the small model's counter) against "
        f"{doc['share_under_threshold']:.3f} of the photographs under the threshold; every "
        f"decision as the threshold says: {doc['decisions_match_threshold']}; cascade answers "
        f"with another top-1 than the main model: {top1_changed}/{args.rounds}.",
    ]
    (args.out / "cascade.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
