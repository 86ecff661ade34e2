"""int8 as the operator measures it, for zoo models: mode, accuracy drop against float32,
speedup and weight bytes (`partita.model.compress.quantize_model`, what the operator runs
when an EdgeModel allows quantization).

Run: `.venv/bin/python bench/int8.py [--models open-nsfw,ocr-cls,minilm]`. Writes
bench/results/int8.json and int8.md. Calibration per model as an EdgeModel would ask for
it: open-nsfw `caffe` (photographs, BGR less the ImageNet mean), ocr-cls `unit`
(photographs in [0, 1]), minilm `seeded` (token ids: dynamic int8, relative output error).
The speedup is float32 over int8 time for one inference, one thread, median of 5 runs after
a warm-up, so it moves with the machine's load (recorded before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CALIBRATION = {"open-nsfw": "caffe", "ocr-cls": "unit", "minilm": "seeded"}


def main() -> None:
    from partita.model.compress import quantize_model
    from partita.model.load import load_model
    from partita.model.samples import Calibration
    from partita.model.zoo import default_input_shapes, model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CALIBRATION))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    for name in args.models.split(","):
        shapes = {k: list(v) for k, v in default_input_shapes(name).items()}
        model = load_model(model_path(name), shapes or None)
        started = time.perf_counter()
        result = quantize_model(model, Calibration(CALIBRATION[name]))
        rows.append(
            {
                "model": name,
                "calibration": CALIBRATION[name],
                "mode": result.mode,
                "metric": result.accuracy.metric,
                "drop": result.accuracy.drop,
                "inputs": result.accuracy.inputs,
                "source": result.accuracy.source,
                "speedup": result.speedup,
                "weight_bytes": result.weight_bytes,
                "float_weight_bytes": result.float_weight_bytes,
                "seconds_to_quantize_and_measure": time.perf_counter() - started,
            }
        )
    load_after = os.getloadavg()
    doc = {
        "command": "python bench/int8.py " + " ".join(sys.argv[1:]),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8.json").write_text(json.dumps(doc, indent=1))
    lines = [
        "# int8 as the operator measures it",
        "",
        f"`{doc['command']}`; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after.",
        "",
        "| model | calibration | mode | drop | metric | inputs | speedup | int8 / float32 weight "
        "bytes | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['calibration']} | {r['mode']} | {r['drop']:.4f} | "
            f"{r['metric']} | {r['inputs']} | {r['speedup']:.2f}x | "
            f"{r['weight_bytes'] / 2**20:.1f} / {r['float_weight_bytes'] / 2**20:.1f} MiB | "
            f"{r['seconds_to_quantize_and_measure']:.0f} |"
        )
    (args.out / "int8.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
