"""Compressed cuts at 5 Mbit/s: end-to-end latency of one cut of open_nsfw with its tensors
sent as float32, fp16 and int8, side by side in one run.

Run: `.venv/bin/python bench/cuts.py [--rounds 12] [--mbps 5] [--cut 271]`. Writes
bench/results/cuts.json and cuts.md. Three `partita-server` processes run stage 0 (the input
up to the cut), one per encoding of their hop, each sending through its own shaping relay
(the test bed's `LinkPacer`: the link's bytes paced at --mbps, no added RTT) to one shared
stage-1 server (the cut to the output). Rounds interleave the three encodings in a rotating
order, one request at a time on real photographs, so machine noise falls on all of them;
the load average is recorded before and after. Each row: p50 and p99, the difference of
medians and the median of per-round differences against float32, the speedup of medians,
the bytes on the wire per request, and the largest output deviation from the whole float32
model (and whether top-1 changed) over the requests sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
INPUT, OUTPUT = "input_0", "4195"
SHAPES = {INPUT: [1, 224, 224, 3]}
CODECS = ("none", "fp16", "int8")
TOKEN = "bench-cuts"
CHUNK = 16 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"partita-server did not become ready at {url}")
        time.sleep(0.2)


@contextmanager
def _server(spec: dict[str, Any], cache: Path) -> Iterator[int]:
    port = _free_port()
    path = cache / f"stage-{port}.json"
    path.write_text(json.dumps({**spec, "cache_dir": str(cache)}))
    env = {
        **os.environ,
        "PARTITA_STAGE_SPEC": str(path),
        "PARTITA_CPU_LIMIT": "1",
        "PARTITA_INTERNAL_TOKEN": TOKEN,
    }
    script = Path(sys.executable).with_name("partita-server")
    proc = subprocess.Popen([script, "--host", "127.0.0.1", "--port", str(port)], env=env)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class Relay:
    """A TCP relay on 127.0.0.1 whose client-to-server bytes are paced at `bandwidth_bps`
    (the test bed's LinkPacer); replies go back unpaced (they are a few bytes)."""

    def __init__(self, target_port: int, bandwidth_bps: float) -> None:
        from partita.testbed.netshape import LinkPacer

        self.port = _free_port()
        self._target = target_port
        self._pacer = LinkPacer(bandwidth_bps)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, paced: bool
    ) -> None:
        try:
            while chunk := await reader.read(CHUNK):
                if paced:
                    wait = self._pacer.reserve(len(chunk), time.monotonic())
                    if wait > 0:
                        await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        await asyncio.gather(
            self._pipe(reader, up_writer, paced=True), self._pipe(up_reader, writer, paced=False)
        )

    def __enter__(self) -> Relay:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    import tritonclient.http as triton

    from partita.model.load import load_model
    from partita.model.profile import profile_model
    from partita.model.samples import Calibration, Split, sample_set
    from partita.model.zoo import model_path
    from partita.planner import Compression
    from partita.planner.cost import boundary_bytes
    from partita.runtime import Session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--mbps", type=float, default=5.0)
    parser.add_argument("--cut", type=int, default=271, help="cut point position (partita profile)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    path = model_path("open-nsfw")
    profile = profile_model(path, SHAPES)
    cut = next(c for c in profile.cut_points if c.position == args.cut)
    names = [t.name for t in cut.tensors]
    outputs = [t.name for t in profile.outputs]
    model = load_model(path, SHAPES)
    images = [
        f[INPUT]
        for split in (Split.CALIBRATION, Split.EVALUATION)
        for f in sample_set(model, Calibration.CAFFE, split, args.rounds // 2 + 1, seed=3).feeds
    ][: args.rounds]
    whole = Session(path)
    reference = [whole.run({INPUT: x})[OUTPUT] for x in images]
    wire = {c: boundary_bytes(profile, args.cut, Compression(c)) for c in CODECS}
    load_before = os.getloadavg()
    base = {"model": "nsfw", "source": {"uri": path.as_uri()}, "input_shapes": SHAPES}
    latency: dict[str, list[float]] = {c: [] for c in CODECS}
    deviation: dict[str, float] = dict.fromkeys(CODECS, 0.0)
    top1_changed: dict[str, int] = dict.fromkeys(CODECS, 0)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        cache = Path(tmp)
        tail = stack.enter_context(
            _server(
                {**base, "stage": "stage-1", "entry": False, "inputs": names, "outputs": outputs},
                cache,
            )
        )
        heads = {}
        for codec in CODECS:
            relay = stack.enter_context(Relay(tail, args.mbps * 1e6))
            hop = {
                "stage": "stage-1",
                "endpoints": [f"http://127.0.0.1:{relay.port}"],
                "compression": codec,
                "timeout_s": 120,
            }
            spec = {**base, "stage": "stage-0", "inputs": [INPUT], "outputs": names, "next": [hop]}
            heads[codec] = stack.enter_context(_server(spec, cache))
        clients = {
            c: triton.InferenceServerClient(f"127.0.0.1:{p}", network_timeout=300)
            for c, p in heads.items()
        }

        def call(codec: str, x: np.ndarray) -> tuple[float, np.ndarray]:
            tensor = triton.InferInput(INPUT, list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=True)
            start = time.perf_counter()
            result = clients[codec].infer("nsfw", [tensor])
            return time.perf_counter() - start, np.asarray(result.as_numpy(OUTPUT))

        for codec in CODECS:  # warm-up: sessions, connections, the relays
            call(codec, images[0])
        for r, (x, want) in enumerate(zip(images, reference, strict=True)):
            order = CODECS[r % 3 :] + CODECS[: r % 3]
            for codec in order:
                seconds, got = call(codec, x)
                latency[codec].append(seconds)
                deviation[codec] = max(deviation[codec], float(np.abs(got - want).max()))
                top1_changed[codec] += int(np.argmax(got) != np.argmax(want))
        for client in clients.values():
            client.close()
    load_after = os.getloadavg()
    rows = []
    fp32 = latency["none"]
    for codec in CODECS:
        samples = latency[codec]
        diffs = [a - b for a, b in zip(fp32, samples, strict=True)]
        rows.append(
            {
                "encoding": "float32" if codec == "none" else codec,
                "wire_bytes": int(wire[codec]),
                "p50_ms": 1000 * statistics.median(samples),
                "p99_ms": 1000 * _percentile(samples, 0.99),
                "median_diff_vs_fp32_ms": 1000 * statistics.median(diffs),
                "diff_of_medians_vs_fp32_ms": 1000
                * (statistics.median(fp32) - statistics.median(samples)),
                "speedup_vs_fp32": statistics.median(fp32) / statistics.median(samples),
                "max_abs_output_deviation": deviation[codec],
                "top1_changed": top1_changed[codec],
                "n": len(samples),
            }
        )
    doc = {
        "command": "python bench/cuts.py " + " ".join(sys.argv[1:]),
        "model": "open-nsfw",
        "cut": {"position": args.cut, "tensors": names},
        "link_mbps": args.mbps,
        "rounds": args.rounds,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuts.json").write_text(json.dumps(doc, indent=1))
    lines = [
        f"# Compressed cuts at {args.mbps:g} Mbit/s (open_nsfw, cut at node {args.cut})",
        "",
        f"`{doc['command']}`; {args.rounds} interleaved rounds, one request at a time; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after.",
        "",
        "| encoding | bytes on the wire | p50 ms | p99 ms | median of differences vs float32 ms "
        "| difference of medians ms | speedup | max output deviation | top-1 changed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['encoding']} | {row['wire_bytes']} | {row['p50_ms']:.0f} | "
            f"{row['p99_ms']:.0f} | {row['median_diff_vs_fp32_ms']:.0f} | "
            f"{row['diff_of_medians_vs_fp32_ms']:.0f} | {row['speedup_vs_fp32']:.2f}x | "
            f"{row['max_abs_output_deviation']:.4f} | {row['top1_changed']}/{row['n']} |"
        )
    (args.out / "cuts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
