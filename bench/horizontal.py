"""Horizontal partitioning benchmark: measured latency of operator-deployed sharded plans on
1, 2 and 4 edge devices, beside the planner's prediction.

On the local cluster: one edge pool of four nodes, each computing at a quarter of one core
of this machine (the test bed's agent enforces it with CPU quotas on the stage processes),
with a LAN the pool declares and the test bed shapes alike (one pacer for all of the pool's
traffic, 1 ms RTT), at each bandwidth of `PARTITA_BENCH_LAN_MBPS` (default 1000 and 10000:
the gateway of a sharded stage relays the rows shards swap between segments, so the LAN
decides whether splitting pays). For each LAN and model three EdgeModels are applied
at once, as a user writes them: `partitioning.mode: none` (one device) and `horizontal`
with `maxShards` 2 and 4, all restricted to that pool. Once all are Ready and their plans
settled, requests go from this process to each model's entry Service in interleaved rounds
(one request to each configuration per round), so load on this shared machine falls on
all of them alike; the load average is recorded.

Writes bench/results/horizontal.json and horizontal.md.
Run: `.venv/bin/python bench/horizontal.py` (or `make bench`); needs `make install` first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from partita.cli.demo import edgemodel_status, kubectl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NAMESPACE = "bench"
STORE = "/var/lib/partita/models"  # the chart's modelStore.mountPath
MODELS = ("open-nsfw", "minilm")
SHARDS = (1, 2, 4)
ROUNDS = int(os.environ.get("PARTITA_BENCH_ROUNDS", "25"))
LANS_MBPS = tuple(
    int(x) for x in os.environ.get("PARTITA_BENCH_LAN_MBPS", "1000,10000").split(",") if x
)
LAN_RTT_MS = 1
POOL = {
    "apiVersion": "partita.dev/v1alpha1",
    "kind": "DevicePool",
    "metadata": {"name": "edge-a"},
    "spec": {
        "tier": "edge",
        "nodeSelector": {"partita.dev/pool": "edge-a"},
        "device": {"kind": "cpu", "memory": "2Gi", "speedFactor": 0.25},
        "network": {
            "uplinkBandwidthMbps": 1000,
            "uplinkRttMs": 1,
            "lanBandwidthMbps": LANS_MBPS[0],
            "lanRttMs": LAN_RTT_MS,
        },
    },
}


def _name(model: str, k: int) -> str:
    return f"{model.replace('open-', '')}-k{k}"


def _edge_model(model: str, path: Path, k: int) -> dict[str, Any]:
    from partita.model import zoo

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    shapes = {n: list(s) for n, s in zoo.default_input_shapes(model).items()}
    partitioning = (
        {"mode": "none"} if k == 1 else {"mode": "horizontal", "maxStages": 1, "maxShards": k}
    )
    return {
        "apiVersion": "partita.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": _name(model, k), "namespace": NAMESPACE},
        "spec": {
            "source": {"uri": f"file://{STORE}/{path.name}", "sha256": digest},
            **({"inputShapes": shapes} if shapes else {}),
            "dataSource": "edge-a",
            "pools": ["edge-a"],
            "partitioning": partitioning,
            "rescheduling": {"minImprovement": 0.3, "cooldownSeconds": 600},
        },
    }


def _feeds(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    from partita.runtime import Session

    rng = np.random.default_rng(0)
    feeds = {}
    for t in Session(path, intra_op_threads=1).inputs:
        dims = shapes.get(t.name) or tuple(d if isinstance(d, int) else 1 for d in t.shape)
        dtype = np.dtype(t.dtype)
        if dtype.kind == "f":
            feeds[t.name] = rng.random(dims).astype(dtype)
        else:  # token ids, masks: small valid integers
            feeds[t.name] = np.ones(dims, dtype=dtype)
    return feeds


def _settled(env: dict[str, str], names: list[str], quiet_s: float = 10.0) -> dict[str, Any]:
    """Every model's status once all are Ready and no plan revision moved for quiet_s."""

    def key(statuses: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        return {
            n: ((s.get("plan") or {}).get("revision"), s.get("phase")) for n, s in statuses.items()
        }

    deadline = time.monotonic() + 600
    last: dict[str, Any] = {}
    since = time.monotonic()
    while time.monotonic() < deadline:
        now = {n: edgemodel_status(env, NAMESPACE, n) for n in names}
        if key(now) != key(last) or any(p != "Ready" for _, p in key(now).values()):
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
        time.sleep(2)
    phases = {n: s.get("phase") for n, s in last.items()}
    raise RuntimeError(f"the plans did not settle: {phases}")


def _clients(run_dir: Path, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    from tritonclient import http
    from tritonclient.utils import np_to_triton_dtype

    services = json.loads((run_dir / "services.json").read_text())
    out = {}
    for name in names:
        url = services[f"{NAMESPACE}/{name}"]
        client = http.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
        inputs = []
        for n, a in feeds.items():
            inp = http.InferInput(n, list(a.shape), np_to_triton_dtype(a.dtype))
            inp.set_data_from_numpy(a, binary_data=True)
            inputs.append(inp)
        out[name] = (client, inputs)
    return out


def _strategy(env: dict[str, str], name: str, revision: int) -> str:
    maps = json.loads(
        kubectl(env, "get", "configmap", "-n", NAMESPACE, "-l",
                f"partita.dev/model={name},partita.dev/revision={revision}", "-o", "json").stdout
    )  # fmt: skip
    for m in maps["items"]:
        spec = json.loads(m["data"]["stage.json"])
        if "shard" in spec:
            return str(spec["shard"].get("strategy", ""))
    return ""


def _segments(path: Path, model: str, plan: dict[str, Any], strategy: str) -> int:
    """How many segments the sharded stage's layout has (exchanges + 1), as its servers cut it."""
    from partita.model import zoo
    from partita.model.load import load_model
    from partita.model.shard import stage_layout

    stage = plan["stages"][0]
    if len(stage["shards"]) < 2:
        return 1
    proportions = [s["proportion"] for s in stage["shards"]]
    loaded = load_model(path, zoo.default_input_shapes(model) or None)
    _a, layout = stage_layout(loaded, stage["inputs"], stage["outputs"], proportions, strategy)
    return len(layout.segments)


def _p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))]


def _set_lan(env: dict[str, str], run_dir: Path, mbps: int) -> None:
    """The pool's LAN at `mbps`: as the DevicePool declares it to the planner and as the test
    bed shapes the pool's own traffic."""
    from partita.testbed import cluster, simstate

    info = cluster.load_info(run_dir)
    pairs = {"bandwidth": f"{mbps}Mbit", "rtt": f"{LAN_RTT_MS}ms"}
    simstate.update(
        info.state_file, lambda state: simstate.apply_assignment(state, "link=edge-a:edge-a", pairs)
    )
    pool = json.loads(json.dumps(POOL))
    pool["spec"]["network"]["lanBandwidthMbps"] = mbps
    kubectl(env, "apply", "-f", "-", input=json.dumps(pool))


def _bench_model(
    env: dict[str, str], run_dir: Path, model: str, store: Path, lan_mbps: int
) -> list[dict]:
    from partita.model import zoo

    source = zoo.model_path(model)
    shutil.copyfile(source, store / source.name)
    path = store / source.name
    names = [_name(model, k) for k in SHARDS]
    for k in SHARDS:
        kubectl(env, "apply", "-f", "-", input=json.dumps(_edge_model(model, path, k)))
    statuses = _settled(env, names)
    feeds = _feeds(path, zoo.default_input_shapes(model))
    clients = _clients(run_dir, names, feeds)
    from partita.runtime import Session

    whole = Session(path, intra_op_threads=1).run(feeds)
    for name, (client, inputs) in clients.items():  # warm up, and check every answer
        for _ in range(3):
            answer = client.infer(name, inputs)
        for out, expected in whole.items():
            got = answer.as_numpy(out)
            scale = float(np.max(np.abs(expected))) or 1.0
            assert float(np.max(np.abs(got - expected))) <= 1e-4 * scale, (name, out)
    times: dict[str, list[float]] = {n: [] for n in names}
    loads = []
    for _ in range(ROUNDS):
        loads.append(os.getloadavg()[0])
        for name, (client, inputs) in clients.items():
            t0 = time.perf_counter()
            client.infer(name, inputs)
            times[name].append(time.perf_counter() - t0)
    for client, _ in clients.values():
        client.close()
    rows = []
    base = times[names[0]]
    for k, name in zip(SHARDS, names, strict=True):
        plan = statuses[name]["plan"]
        shards = max(len(s["shards"]) for s in plan["stages"])
        predicted = plan["predictedP95Ms"] / 1000
        median = statistics.median(times[name])
        strategy = _strategy(env, name, plan["revision"]) if shards > 1 else ""
        rows.append(
            {
                "model": model,
                "lan_mbps": lan_mbps,
                "max_shards": k,
                "shards": shards,
                "strategy": strategy,
                "segments": _segments(path, model, plan, strategy),
                "plan": plan["reasons"][0] if plan.get("reasons") else "",
                "predicted_s": predicted,
                "median_s": median,
                "p99_s": _p99(times[name]),
                "speedup_of_medians": statistics.median(base) / median,
                "median_of_speedups": statistics.median(
                    b / t for b, t in zip(base, times[name], strict=True)
                ),
                "median_over_predicted": median / predicted,
                "load_average": statistics.median(loads),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    for name in names:
        kubectl(env, "delete", "edgemodel", name, "-n", NAMESPACE, "--wait=true")
    return rows


def main() -> None:
    from partita.testbed import binaries, cluster
    from partita.testbed.layout import LinkSpec, parse_nodes
    from partita.testbed.release import Release

    models = sys.argv[1:] or list(MODELS)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="partita-horizontal-") as tmp:
        run_dir = Path(tmp) / "cluster"
        layout = parse_nodes("edge-a=4,cloud=1")
        lan = LinkSpec("edge-a", "edge-a", LANS_MBPS[0] * 1e6, LAN_RTT_MS / 1000)
        layout = dataclasses.replace(layout, links=(*layout.links, lan))
        info = cluster.up(run_dir, layout, log=print)
        env = {
            **os.environ,
            "KUBECONFIG": str(info.kubeconfig),
            "PATH": f"{binaries.bin_dir()}:{os.environ['PATH']}",
        }
        store = Path(tmp) / "model-store"
        store.mkdir()
        try:
            Release(info.kubeconfig).install(
                {"prometheus.url": info.prometheus_url, "prometheus.pollInterval": "2"},
                model_store=store,
            )
            kubectl(env, "apply", "-f", "-", input=json.dumps(POOL))
            kubectl(env, "create", "namespace", NAMESPACE)
            for mbps in LANS_MBPS:
                _set_lan(env, run_dir, mbps)
                for model in models:
                    rows += _bench_model(env, run_dir, model, store, mbps)
        finally:
            cluster.down(run_dir)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "horizontal.json").write_text(json.dumps({"rounds": ROUNDS, "rows": rows}, indent=2))
    lines = [
        "# Horizontal partitioning: measured latency on 1, 2 and 4 edge devices",
        "",
        "Deployed by the chart's operator from EdgeModels; edge nodes at 0.25 core each, the "
        f"pool's LAN declared and shaped alike ({LAN_RTT_MS} ms RTT), "
        f"{ROUNDS} interleaved rounds of one request per configuration, every answer checked "
        "against the whole model (1e-4 of its largest output).",
        "",
        "| LAN (Mbit/s) | model | maxShards | shards | strategy, segments | predicted (ms) | "
        "median (ms) | p99 (ms) | speedup (of medians / median of ratios) | "
        "measured / predicted | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['lan_mbps']} | {r['model']} | {r['max_shards']} | {r['shards']} | "
        f"{r['strategy'] or '-'}, "
        f"{r['segments']} | "
        f"{r['predicted_s'] * 1000:.0f} | {r['median_s'] * 1000:.0f} | {r['p99_s'] * 1000:.0f} | "
        f"{r['speedup_of_medians']:.2f} / {r['median_of_speedups']:.2f} | "
        f"{r['median_over_predicted']:.2f} | {r['load_average']:.2f} |"
        for r in rows
    ]
    (RESULTS / "horizontal.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
