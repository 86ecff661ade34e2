"""How faithfully the test bed agent simulates links and slow nodes.

Run: `.venv/bin/python bench/testbed_agent.py` (with PARTITA_TESTBED_DIR=<run dir of a local
cluster whose agent runs>, also part 3). Writes bench/results/testbed_agent.json and .md.

1. Link shaping: the agent's `ShapingProxy` in front of a local HTTP server, a link of B bit/s
   and R s RTT from the client's pool to the server's; measured time of an exchange vs the
   ideal R + bytes*8/B, the same exchange through an unshaped proxy as the baseline, and
   through the byte forwarder of non-HTTP/1 entry ports (`ShapingForwarder`, gRPC's).
2. CPU quota: one onnxruntime worker (one thread) in a cgroup with the quota of a node of speed
   0.25, then 1.0 (and unconfined); the ratio of mean latency should be 1/speed.
3. The same through the agent: a served stage on a node annotated speed 1.0, then 0.25.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from partita.testbed import cgroup, simstate
from partita.testbed.netshape import (
    Endpoint,
    LinkTable,
    ShapingForwarder,
    ShapingProxy,
    Target,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MIB = 1024 * 1024


async def _origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A minimal keep-alive HTTP server: POST bodies are read and acknowledged, GET /bytes/N
    returns N bytes."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            length = next(
                (
                    int(v)
                    for k, _, v in (ln.partition(": ") for ln in lines)
                    if k == "Content-Length"
                ),
                0,
            )
            if length:
                await reader.readexactly(length)
            path = lines[0].split(" ")[1]
            body = b"x" * int(path.rsplit("/", 1)[1]) if path.startswith("/bytes/") else b"{}"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def _links(bandwidth: float, rtt: float) -> LinkTable:
    return LinkTable(
        [
            simstate.LinkState("edge", "cloud", bandwidth, rtt),
            simstate.LinkState("cloud", "edge", bandwidth, rtt),
        ]
    )


async def _shaping_case(
    bandwidth: float, rtt: float, up: int, down: int, parallel: int, repeat: int
) -> dict[str, Any]:
    server = await asyncio.start_server(_origin, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    endpoint = Endpoint("bench/origin", port, "cloud-1", "cloud")

    def resolve(_t: Target) -> list[Endpoint]:
        return [endpoint]

    shaped = ShapingProxy("bench", "edge", resolve, _links(bandwidth, rtt))
    plain = ShapingProxy("bench-plain", "edge", resolve, LinkTable())
    results = {}
    for name, proxy in (("shaped", shaped), ("baseline", plain)):
        proxy_port = await proxy.start()
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{proxy_port}", timeout=60) as c:
            url = f"http://origin.bench.svc:8000/bytes/{down}"
            await c.post(url, content=b"w")  # warm the connection
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                await asyncio.gather(*(c.post(url, content=b"u" * up) for _ in range(parallel)))
                times.append(time.perf_counter() - t0)
        await proxy.close()
        results[name] = statistics.median(times)
    service = ("bench", "origin", 8000)
    forwarder = ShapingForwarder(
        "bench-bytes", "edge", resolve, _links(bandwidth, rtt), service=service
    )
    base = f"http://127.0.0.1:{await forwarder.start()}"
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        await c.post(f"/bytes/{down}", content=b"w")  # warm the connection
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            await asyncio.gather(
                *(c.post(f"/bytes/{down}", content=b"u" * up) for _ in range(parallel))
            )
            times.append(time.perf_counter() - t0)
    await forwarder.close()
    results["bytes"] = statistics.median(times)
    server.close()
    ideal = rtt + parallel * (up + down) * 8 / bandwidth
    return {
        "bandwidth_bps": bandwidth,
        "rtt_s": rtt,
        "up_bytes": up,
        "down_bytes": down,
        "parallel": parallel,
        "expected_s": ideal,
        "measured_s": results["shaped"],
        "unshaped_s": results["baseline"],
        "error": results["shaped"] / ideal - 1,
        "forwarded_s": results["bytes"],
        "forwarded_error": results["bytes"] / ideal - 1,
    }


def shaping() -> list[dict[str, Any]]:
    cases = [
        (10e6, 0.020, MIB, 2, 1, 3),  # the brief's case: 1 MiB up over 10 Mbit/s, 20 ms
        (10e6, 0.020, 2, MIB, 1, 3),  # 1 MiB down
        (10e6, 0.020, 10, 10, 1, 10),  # latency only
        (2e6, 0.040, 100_000, 2, 1, 3),  # a tensor over a collapsed link
        (100e6, 0.020, 4 * MIB, 2, 1, 3),
        (10e6, 0.020, 512 * 1024, 2, 2, 3),  # two senders share one link
    ]
    return [asyncio.run(_shaping_case(*c)) for c in cases]


def _matmul_model(layers: int = 12, width: int = 768) -> bytes:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev = "x"
    for i in range(layers):
        w = numpy_helper.from_array(
            (rng.standard_normal((width, width)) / width**0.5).astype(np.float32), f"w{i}"
        )
        inits.append(w)
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"]))
        prev = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, width])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [16, width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


_WORKER = """
import json, sys, time, numpy as np
from partita.runtime import Session
s = Session(sys.argv[1], intra_op_threads=1)
x = {"x": np.ones((16, int(sys.argv[2])), dtype=np.float32)}
s.run(x)
sys.stdin.readline()
out = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); s.run(x); out.append(time.perf_counter() - t)
print(json.dumps(out))
"""


def cpu_quota(runs: int = 30) -> dict[str, Any]:
    limiter = cgroup.CpuLimiter(cgroup.detect(Path(tempfile.gettempdir()) / "bench-agent"))
    if limiter.backend is None:
        return {"cgroup": "none"}
    model = Path(tempfile.mkdtemp()) / "chain.onnx"
    model.write_bytes(_matmul_model())
    out: dict[str, Any] = {"cgroup": f"v{limiter.backend.version}", "period_us": cgroup.PERIOD_US}
    for label, speed in (("unconfined", None), ("speed_1.0", 1.0), ("speed_0.25", 0.25)):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(model), "768", str(runs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if speed is not None:
            limiter.place(label, proc.pid, cgroup.quota_cores(speed))
        stdout, _ = proc.communicate("go\n", timeout=600)
        samples = json.loads(stdout)
        out[label] = {
            "mean_ms": 1000 * statistics.mean(samples),
            "p50_ms": 1000 * statistics.median(samples),
        }
        limiter.remove(label)
    limiter.close()
    out["ratio_0.25_vs_1.0"] = out["speed_0.25"]["mean_ms"] / out["speed_1.0"]["mean_ms"]
    return out


def _stage_manifests(ns: str, model: Path, node: str, pool: str) -> list[dict[str, Any]]:
    labels = {"partita.dev/component": "stage-server", "partita.dev/model": "chain"}
    container = {
        "name": "server",
        "image": "partita/server:dev",
        "command": ["partita-server"],
        "args": ["--host", "0.0.0.0", "--port", "8000"],
        "env": [
            {"name": "PARTITA_STAGE_SPEC", "value": "/etc/partita/stage.json"},
            {"name": "PARTITA_CPU_LIMIT", "value": "1"},
        ],
        "ports": [{"name": "http", "containerPort": 8000}],
        "volumeMounts": [{"name": "stage", "mountPath": "/etc/partita"}],
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8000}},
        "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
    }
    spec = {"model": "chain", "source": {"uri": model.as_uri()}}
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "chain", "namespace": ns},
            "data": {"stage.json": json.dumps(spec)},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "chain", "namespace": ns},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "nodeSelector": {"kubernetes.io/hostname": node},
                        "containers": [container],
                        "volumes": [{"name": "stage", "configMap": {"name": "chain"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "chain",
                "namespace": ns,
                "annotations": {"partita.dev/data-source-pool": pool},
            },
            "spec": {"selector": labels, "ports": [{"port": 8000, "targetPort": "http"}]},
        },
    ]


def agent_cpu(run_dir: Path, runs: int = 20) -> dict[str, Any]:
    """The same ORT stage served by the agent on a node annotated speed 1.0, then 0.25 (the
    agent changes the running process's quota), timed through the entry listener."""
    import tritonclient.http as triton
    from kubernetes import client, config, utils

    from partita.testbed import cluster
    from partita.testbed.kubelet import targets

    info = cluster.load_info(run_dir)
    node = info.nodes[0]
    api = config.new_client_from_config(config_file=str(info.kubeconfig))
    core = client.CoreV1Api(api)
    ns = "bench-agent-cpu"
    model = Path(tempfile.mkdtemp()) / "chain.onnx"
    model.write_bytes(_matmul_model())
    core.create_namespace({"metadata": {"name": ns}})
    out: dict[str, Any] = {"node": node.name}
    try:
        utils.create_from_yaml(api, yaml_objects=_stage_manifests(ns, model, node.name, node.pool))
        deadline = time.monotonic() + 120
        url = None
        while time.monotonic() < deadline:
            url = targets.load_agent_info(run_dir).services.get(f"{ns}/chain")
            pods = core.list_namespaced_pod(ns).items
            if (
                url
                and pods
                and any(
                    c.type == "Ready" and c.status == "True"
                    for c in pods[0].status.conditions or []
                )
            ):
                break
            time.sleep(0.5)
        assert url, "the stage did not become Ready"
        c = triton.InferenceServerClient(url.removeprefix("http://"))
        x = np.ones((16, 768), dtype=np.float32)
        for speed in ("1.0", "0.25"):
            core.patch_node(node.name, {"metadata": {"annotations": {"partita.dev/speed": speed}}})
            time.sleep(1.0)  # the agent applies the quota on its next sync
            inp = triton.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            c.infer("chain", [inp])
            samples = []
            for _ in range(runs):
                t0 = time.perf_counter()
                c.infer("chain", [inp])
                samples.append(time.perf_counter() - t0)
            out[f"speed_{speed}"] = {
                "mean_ms": 1000 * statistics.mean(samples),
                "p50_ms": 1000 * statistics.median(samples),
            }
        c.close()
        out["ratio_0.25_vs_1.0"] = out["speed_0.25"]["mean_ms"] / out["speed_1.0"]["mean_ms"]
    finally:
        core.patch_node(
            node.name, {"metadata": {"annotations": {"partita.dev/speed": str(node.speed)}}}
        )
        core.delete_namespace(ns)
    return out


def main() -> None:
    report: dict[str, Any] = {"shaping": shaping(), "cpu_quota": cpu_quota()}
    run_dir = os.environ.get("PARTITA_TESTBED_DIR")
    if run_dir:  # a local cluster with its agent: also time a served stage
        report["agent_cpu"] = agent_cpu(Path(run_dir))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "testbed_agent.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Test bed agent: link shaping and CPU quota fidelity",
        "",
        "| link | up B | down B | parallel | expected s | measured s | error | unshaped s "
        "| bytes forwarder s | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["shaping"]:
        lines.append(
            f"| {c['bandwidth_bps'] / 1e6:g} Mbit/s, {c['rtt_s'] * 1000:g} ms | {c['up_bytes']} "
            f"| {c['down_bytes']} | {c['parallel']} | {c['expected_s']:.4f} | "
            f"{c['measured_s']:.4f} | {100 * c['error']:+.1f}% | {c['unshaped_s']:.4f} | "
            f"{c['forwarded_s']:.4f} | {100 * c['forwarded_error']:+.1f}% |"
        )
    q = report["cpu_quota"]
    lines += ["", f"CPU quota ({q.get('cgroup')}, period {q.get('period_us')} us):", ""]
    for k in ("unconfined", "speed_1.0", "speed_0.25"):
        if k in q:
            lines.append(f"- {k}: mean {q[k]['mean_ms']:.1f} ms, p50 {q[k]['p50_ms']:.1f} ms")
    if "ratio_0.25_vs_1.0" in q:
        lines.append(f"- ratio 0.25 vs 1.0: {q['ratio_0.25_vs_1.0']:.2f} (ideal 4.00)")
    if "agent_cpu" in report:
        a = report["agent_cpu"]
        lines += ["", f"Served by the agent on {a['node']} (v2 request, entry listener):", ""]
        for k in ("speed_1.0", "speed_0.25"):
            lines.append(f"- {k}: mean {a[k]['mean_ms']:.1f} ms, p50 {a[k]['p50_ms']:.1f} ms")
        lines.append(f"- ratio 0.25 vs 1.0: {a['ratio_0.25_vs_1.0']:.2f} (ideal 4.00)")
    (RESULTS / "testbed_agent.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
