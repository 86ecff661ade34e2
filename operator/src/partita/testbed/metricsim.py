"""A metrics simulator that plays node_exporter for every simulated node, and blackbox_exporter
(ICMP RTT) and iperf3_exporter (bandwidth) for the links between pools.

It exposes the metric names and labels the real exporters use, so the PromQL the operator runs
here also works on a real cluster. One process serves every node: each series carries
`instance` and `node` = the Kubernetes Node name, and Prometheus keeps them (`honor_labels`).
Counters are integrated over real time from the current state; the state file is re-read when
it changes.

    python -m partita.testbed.metricsim --state FILE --port PORT [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from partita.testbed import simstate
from partita.testbed.errors import TestbedError
from partita.testbed.simstate import SimState

# What iperf3_exporter reports per probe: bytes received over a test of this many seconds.
IPERF3_PERIOD_S = 5.0
NETWORK_DEVICE = "eth0"
# Of a node's busy CPU time, this share is user time, the rest system time.
USER_SHARE = 0.8

Labels = tuple[tuple[str, str], ...]


@dataclass
class _Counters:
    """Per node: seconds per CPU in each mode, and bytes through the network device."""

    idle: float = 0.0
    user: float = 0.0
    system: float = 0.0
    rx: float = 0.0
    tx: float = 0.0


@dataclass
class _Family:
    name: str
    kind: str  # counter | gauge
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format(families: Iterable[_Family]) -> str:
    lines: list[str] = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {fam.help}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        for labels, value in fam.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{fam.name}{{{text}}} {float(value)!r}")
    return "\n".join(lines) + "\n"


class NodeExporterSim:
    """The simulator's core, free of HTTP: `render()` returns one scrape's exposition text.

    Thread-safe; the clock is injected so tests can step time."""

    def __init__(self, state_path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = state_path
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._state = self._read()
        self._rng = random.Random(self._state.seed)
        self._counters: dict[str, _Counters] = {}
        self._last = clock()

    @property
    def state(self) -> SimState:
        return self._state

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self._path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def _read(self) -> SimState:
        stamp = self._file_stamp()
        state = simstate.load(self._path)
        self._stamp = stamp
        return state

    def _refresh(self) -> None:
        """Pick up a changed state file; keep the last good state if the new one is broken."""
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return
        try:
            state = simstate.load(self._path)
        except TestbedError as exc:
            print(f"metricsim: keeping the previous state: {exc}", file=sys.stderr, flush=True)
            self._stamp = stamp
            return
        if state.seed != self._state.seed:
            self._rng = random.Random(state.seed)
        self._state, self._stamp = state, stamp

    def _wobble(self, value: float) -> float:
        """The value moved by up to ±jitter (uniform, from the seeded generator)."""
        j = self._state.jitter
        return value if j <= 0 else value * (1.0 + self._rng.uniform(-j, j))

    def _advance(self, now: float) -> None:
        dt = max(0.0, now - self._last)
        self._last = now
        for n in self._state.nodes:
            c = self._counters.setdefault(n.name, _Counters())
            if not n.up:
                continue
            busy = min(1.0, max(0.0, self._wobble(n.cpu_utilisation)))
            c.idle += (1.0 - busy) * dt
            c.user += busy * USER_SHARE * dt
            c.system += busy * (1.0 - USER_SHARE) * dt
            c.rx += max(0.0, self._wobble(n.rx_bytes_per_s)) * dt
            c.tx += max(0.0, self._wobble(n.tx_bytes_per_s)) * dt

    def render(self) -> str:
        with self._lock:
            now = self._clock()
            self._advance(now)  # the interval since the last scrape ran on the old state
            self._refresh()
            return _format(self._families())

    def _families(self) -> list[_Family]:
        cpu = _Family("node_cpu_seconds_total", "counter", "Seconds the CPUs spent in each mode.")
        total = _Family(
            "node_memory_MemTotal_bytes", "gauge", "Memory information field MemTotal_bytes."
        )
        avail = _Family(
            "node_memory_MemAvailable_bytes",
            "gauge",
            "Memory information field MemAvailable_bytes.",
        )
        rx = _Family(
            "node_network_receive_bytes_total", "counter", "Network device statistic receive_bytes."
        )
        tx = _Family(
            "node_network_transmit_bytes_total",
            "counter",
            "Network device statistic transmit_bytes.",
        )
        rtt = _Family("probe_icmp_duration_seconds", "gauge", "Duration of icmp request by phase.")
        success = _Family(
            "probe_success", "gauge", "Displays whether or not the probe was a success."
        )
        up = _Family("iperf3_up", "gauge", "Was the last iperf3 probe successful.")
        recv_s = _Family(
            "iperf3_received_seconds", "gauge", "Total seconds spent receiving packets."
        )
        recv_b = _Family("iperf3_received_bytes", "gauge", "Total sent bytes received.")
        sent_s = _Family("iperf3_sent_seconds", "gauge", "Total seconds spent sending packets.")
        sent_b = _Family("iperf3_sent_bytes", "gauge", "Total sent bytes.")

        state = self._state
        for n in state.nodes:
            if not n.up:
                continue
            c = self._counters.setdefault(n.name, _Counters())
            base: Labels = (("instance", n.name), ("node", n.name))
            for i in range(n.cpu):
                for mode, value in (("idle", c.idle), ("system", c.system), ("user", c.user)):
                    cpu.samples.append(((*base, ("cpu", str(i)), ("mode", mode)), value))
            total.samples.append((base, float(n.memory_bytes)))
            used = min(1.0, max(0.0, self._wobble(n.memory_used)))
            avail.samples.append((base, float(round(n.memory_bytes * (1.0 - used)))))
            dev: Labels = (*base, ("device", NETWORK_DEVICE))
            rx.samples.append((dev, c.rx))
            tx.samples.append((dev, c.tx))

        up_pools = {n.pool for n in state.nodes if n.up}
        for lk in state.links:
            reachable = lk.target in up_pools
            for n in state.nodes:
                if n.pool != lk.source or not n.up:
                    continue
                labels: Labels = (
                    ("instance", lk.target),
                    ("node", n.name),
                    ("source_node", n.name),
                    ("source_pool", lk.source),
                    ("target_pool", lk.target),
                )
                success.samples.append((labels, 1.0 if reachable else 0.0))
                up.samples.append((labels, 1.0 if reachable else 0.0))
                if not reachable:
                    continue  # a failed probe measures nothing
                rtt.samples.append(((*labels, ("phase", "rtt")), max(0.0, self._wobble(lk.rtt_s))))
                moved = max(0.0, self._wobble(lk.bandwidth_bps)) / 8.0 * IPERF3_PERIOD_S
                recv_s.samples.append((labels, IPERF3_PERIOD_S))
                recv_b.samples.append((labels, moved))
                sent_s.samples.append((labels, IPERF3_PERIOD_S))
                sent_b.samples.append((labels, moved))
        return [cpu, total, avail, rx, tx, rtt, success, up, recv_s, recv_b, sent_s, sent_b]


def make_server(
    state_path: Path,
    port: int,
    host: str = "127.0.0.1",
    *,
    clock: Callable[[], float] = time.monotonic,
) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) with `/metrics`; raises TestbedError if the port is taken
    or the host is not a loopback address."""
    try:
        loopback = ipaddress.ip_address(host if host != "localhost" else "127.0.0.1").is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise TestbedError(f"--host {host}: the simulator only listens on a loopback address")
    sim = NodeExporterSim(state_path, clock=clock)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] == "/metrics":
                body = sim.render().encode()
                ctype = "text/plain; version=0.0.4; charset=utf-8"
                status = 200
            else:
                body, ctype, status = (
                    b"partita metrics simulator: see /metrics\n",
                    "text/plain",
                    404,
                )
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # one line per scrape would only fill the log

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise TestbedError(
            f"port {port} for the metrics simulator is already taken or unusable ({exc.strerror})"
        ) from None
    server.daemon_threads = True
    return server


def serve(
    state_path: Path,
    port: int,
    host: str = "127.0.0.1",
    *,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Serve until interrupted."""
    server = make_server(state_path, port, host, clock=clock)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m partita.testbed.metricsim", description=__doc__
    )
    parser.add_argument("--state", type=Path, required=True, help="the simulator state (JSON)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    try:
        serve(args.state, args.port, args.host)
    except TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
