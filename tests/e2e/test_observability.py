"""What a person watching Partita sees while a model serves on the local cluster: every query
of every panel of the generated dashboards returns series from the real Prometheus (variables
resolved and `$__rate_interval` computed the way Grafana does), the operator's series say what
the EdgeModel's status says, and the installed `kubectl partita status` prints that plan."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from e2e_loop import NAMESPACE, edge_model, entry_url, open_nsfw

from cluster_helpers import eventually, get_json

pytestmark = pytest.mark.cluster

MODEL = "watched"
SCRAPE_S = 2.0  # the test bed's scrape interval: what a user sets as the data source's
WINDOW_S = 300.0  # the time range the panels are looked at over
MAX_POINTS = 1000  # Grafana's data points for a panel about as wide as the screen


def _status(cluster: Any) -> dict[str, Any]:
    return get_json(cluster, "edgemodel", MODEL, "-n", NAMESPACE).get("status") or {}


class Traffic:
    """Requests back to back from the data source until stopped (tritonclient, binary)."""

    def __init__(self, url: str) -> None:
        self.url, self.ok, self.failed = url, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import tritonclient.http as http

        image = np.random.default_rng(3).random((1, 224, 224, 3), dtype=np.float32)
        client = http.InferenceServerClient(self.url.removeprefix("http://"), network_timeout=60)
        inp = http.InferInput("input_0", list(image.shape), "FP32")
        inp.set_data_from_numpy(image, binary_data=True)
        try:
            while not self._stop.is_set():
                try:
                    client.infer(MODEL, [inp])
                    self.ok += 1
                except Exception:  # counted; the panels show failures too
                    self.failed += 1
                    self._stop.wait(0.2)
        finally:
            client.close()

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(60)


@pytest.fixture(scope="module")
def watched(loop: Any) -> Iterator[Any]:
    """A model whose raw input stays at the edge: a relay stage on edge-a, the rest sharded
    in the cloud, so every kind of panel (hops, shards, stages) has something to show."""
    spec = {"privacy": {"rawInputTier": "edge"}, "slo": {"p95LatencySeconds": 2.0}}
    loop.kubectl("apply", "-f", "-", input=edge_model(MODEL, **spec))
    eventually(lambda: _status(loop).get("phase") == "Ready", 180, "EdgeModel Ready", interval=1)
    with Traffic(entry_url(loop, MODEL)) as traffic:
        eventually(lambda: traffic.ok >= 5, 60, "answered requests", interval=0.5)
        yield loop
    loop.kubectl("delete", "edgemodel", MODEL, "-n", NAMESPACE, "--wait=false", check=False)


# ---- Grafana's side: variables and intervals -------------------------------------------------


def rate_interval(window_s: float = WINDOW_S) -> tuple[float, float]:
    """Grafana's ($__interval, $__rate_interval) for a panel over `window_s`: the interval is
    the window over the data points, at least the data source's scrape interval; the rate
    interval is max(interval + scrape interval, 4 x scrape interval)."""
    interval = max(window_s / MAX_POINTS, SCRAPE_S)
    return interval, max(interval + SCRAPE_S, 4 * SCRAPE_S)


class QueryError(Exception):
    """Prometheus refused a query (bad PromQL after substitution)."""


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.Client(timeout=30)

    def _get(self, path: str, **params: Any) -> Any:
        r = self.client.get(f"{self.url}{path}", params=params)
        doc = r.json()
        if doc.get("status") != "success":
            raise QueryError(f"{path} {params}: {doc}")
        return doc["data"]

    def label_values(self, selector: str, label: str) -> list[str]:
        """What Grafana's `label_values(selector, label)` lists."""
        end = time.time()
        series = self._get("/api/v1/series", **{"match[]": selector, "start": end - WINDOW_S,
                                                "end": end})  # fmt: skip
        return sorted({s[label] for s in series if label in s})

    def series(self, expr: str, *, instant: bool) -> int:
        end = time.time()
        if instant:
            return len(self._get("/api/v1/query", query=expr, time=end)["result"])
        step, _ = rate_interval()
        data = self._get(
            "/api/v1/query_range", query=expr, start=end - WINDOW_S, end=end, step=step
        )
        return len(data["result"])


def substitute(expr: str, values: dict[str, list[str]]) -> str:
    """Variables as Grafana writes them into a Prometheus query: one value as is, several
    (or All) as a regex alternation; `$__rate_interval` as a duration."""
    _, rate = rate_interval()
    out = expr.replace("$__rate_interval", f"{int(rate * 1000)}ms")
    for name, vals in sorted(values.items(), key=lambda kv: -len(kv[0])):
        text = vals[0] if len(vals) == 1 else "(" + "|".join(map(_regex_escape, vals)) + ")"
        out = out.replace(f"${{{name}}}", text).replace(f"${name}", text)
    return out


def _regex_escape(value: str) -> str:
    """A value inside a PromQL regex string, escaped as Grafana escapes it."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


def resolve(prom: Prometheus, doc: dict[str, Any]) -> dict[str, list[str]]:
    """Every query variable of the dashboard, in order, as Grafana resolves them; for the
    model dashboard the values of this test's model, which must be among them."""
    values: dict[str, list[str]] = {}
    for var in doc["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"])
        assert m, var["query"]
        found = prom.label_values(substitute(m.group(1), values), m.group(2))
        assert found, f"variable {var['name']}: {var['query']} lists nothing"
        if var.get("multi") or var.get("includeAll"):
            values[var["name"]] = found  # All
        else:
            wanted = {"namespace": NAMESPACE, "model": MODEL}[var["name"]]
            assert wanted in found, (var["name"], found)
            values[var["name"]] = [wanted]
    return values


def empty_queries(prom: Prometheus) -> list[str]:
    """Every panel query of every generated dashboard that returns no series now."""
    from partita.dashboards import render

    empty = []
    for name, text in render().items():
        doc = json.loads(text)
        values = resolve(prom, doc)
        for panel in doc["panels"]:
            for target in panel.get("targets", []):
                expr = substitute(target["expr"], values)
                if prom.series(expr, instant=bool(target.get("instant"))) == 0:
                    empty.append(f"{name} / {panel['title']} / {target['refId']}: {expr}")
        for annotation in doc.get("annotations", {}).get("list", []):
            prom.series(substitute(annotation["expr"], values), instant=False)  # valid PromQL
    return empty


def test_every_panel_query_returns_series_while_the_model_serves(watched: Any) -> None:
    prom = Prometheus(watched.prometheus_url)
    plan = _status(watched)["plan"]
    assert plan["stageCount"] >= 2, plan  # hops exist to be shown
    last: list[str] = []

    def all_answer() -> bool:
        nonlocal last
        last = empty_queries(prom)
        return not last

    try:
        eventually(all_answer, 120, "every dashboard query answering", interval=3)
    except AssertionError:
        pytest.fail("queries without series:\n" + "\n".join(last))


def test_the_operator_series_say_what_the_status_says(watched: Any) -> None:
    prom = Prometheus(watched.prometheus_url)
    selector = f'namespace="{NAMESPACE}", model="{MODEL}"'

    def same() -> tuple[dict[str, Any], dict[str, Any]] | None:
        plan = _status(watched)["plan"]
        got = prom._get("/api/v1/query", query=f"partita_plan_revision{{{selector}}}")["result"]
        if got and float(got[0]["value"][1]) == plan["revision"]:
            return plan, got[0]
        return None

    plan, _ = eventually(same, 30, "the scraped revision matching the status")
    predicted = prom._get(
        "/api/v1/query", query=f"partita_model_predicted_latency_seconds{{{selector}}}"
    )["result"]
    assert float(predicted[0]["value"][1]) * 1000 == pytest.approx(plan["predictedP95Ms"], 1e-3)
    servers = prom._get(
        "/api/v1/query",
        query=f'partita_plan_stage_info{{{selector}, revision="{plan["revision"]}"}}',
    )["result"]
    scraped = sorted((s["metric"]["stage"], s["metric"]["node"]) for s in servers)
    assert scraped == sorted(
        (str(st["index"]), sh["node"]) for st in plan["stages"] for sh in st["shards"]
    )
    slo = prom._get("/api/v1/query", query=f"partita_model_slo_seconds{{{selector}}}")["result"]
    assert float(slo[0]["value"][1]) == 2.0


def _kubectl_plugin(cluster: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubectl partita ...` as a user runs it: kubectl finds the installed plugin on PATH."""
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "kubectl-partita").exists(), "the package installs kubectl-partita"
    env = {**cluster.env(), "PATH": f"{cluster.bin_dir}:{venv_bin}:{os.environ['PATH']}",
           "COLUMNS": "200"}  # fmt: skip
    return subprocess.run(
        [str(cluster.bin_dir / "kubectl"), "partita", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_kubectl_partita_status_prints_the_plan_of_the_status(watched: Any) -> None:
    plan = _status(watched)["plan"]
    out = _kubectl_plugin(watched, "status", "-n", NAMESPACE, MODEL)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"{NAMESPACE}/{MODEL}" in text and "Ready" in text
    assert f"Plan r{plan['revision']}: " + " → ".join(s["pool"] for s in plan["stages"]) in text
    for stage in plan["stages"]:
        for shard in stage["shards"]:
            assert shard["node"] in text
    assert f"predicted {plan['predictedP95Ms']:.1f} ms" in text
    assert "Planned" in text  # the first plan's Event, in the history
    listing = _kubectl_plugin(watched, "status", "-A")
    assert listing.returncode == 0, listing.stderr
    assert MODEL in listing.stdout and NAMESPACE in listing.stdout
    missing = _kubectl_plugin(watched, "status", "-n", NAMESPACE, "nope")
    assert missing.returncode == 1 and "EdgeModel partita-e2e/nope not found" in missing.stderr


def test_a_sharded_plan_answers_what_the_whole_model_answers(loop: Any) -> None:
    """An EdgeModel split across the two devices of its data source's pool: the operator
    rendered the shards' specs with the split its plan priced, the shard servers cut their
    segments from it and the gateway drove the exchanges between the segments; a client
    gets the whole model's answer.

    Sharding has to pay for it to be planned, whatever speed this machine profiles at:
    each of the tiles' five segments costs a call to every shard (priced at 2.5 ms of a
    core, `SEGMENT_CALL_CORE_S`), so the model takes a batch of four images, and the pool
    declares a 10 Gbit/s LAN for the 8.6 MB its two tiles then move per request."""
    import tritonclient.http as http

    from partita.runtime import Session

    name = "split"
    _pool_lan(loop, "edge-a", 10_000)
    spec = {
        "pools": ["edge-a"],
        "partitioning": {"mode": "horizontal", "maxShards": 2},
        "inputShapes": {"input_0": [4, 224, 224, 3]},
    }
    try:
        loop.kubectl("apply", "-f", "-", input=edge_model(name, **spec))

        def ready() -> dict[str, Any] | None:
            st = get_json(loop, "edgemodel", name, "-n", NAMESPACE).get("status") or {}
            return st if st.get("phase") == "Ready" else None

        plan = eventually(ready, 240, "the sharded EdgeModel Ready", interval=1)["plan"]
        assert [len(st["shards"]) for st in plan["stages"]] == [2], plan
        maps = get_json(
            loop, "configmap", "-n", NAMESPACE,
            "-l", f"partita.dev/model={name},partita.dev/revision={plan['revision']}",
        )  # fmt: skip
        specs = [json.loads(m["data"]["stage.json"]) for m in maps["items"]]
        shards = [s["shard"] for s in specs if "shard" in s]
        assert len(shards) == 2 and all(s.get("strategy") in ("tile", "width") for s in shards)

        image = np.random.default_rng(11).random((4, 224, 224, 3), dtype=np.float32)
        whole = Session(open_nsfw()[0], intra_op_threads=1).run({"input_0": image})
        url = entry_url(loop, name)
        client = http.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
        tensor = http.InferInput("input_0", list(image.shape), "FP32")
        tensor.set_data_from_numpy(image, binary_data=True)
        answer = client.infer(name, [tensor])
        for output, expected in whole.items():
            np.testing.assert_allclose(answer.as_numpy(output), expected, rtol=1e-4, atol=1e-5)
        # The gateway tells clients the model's outputs, not the inputs it passes on.
        told = client.get_model_metadata(name)
        assert [o["name"] for o in told["outputs"]] == list(whole)
    finally:
        loop.kubectl("delete", "edgemodel", name, "-n", NAMESPACE, "--wait=false", check=False)
        _pool_lan(loop, "edge-a", 1000)


def _pool_lan(cluster: Any, pool: str, mbps: int) -> None:
    """Declare `pool`'s LAN bandwidth and wait until the operator has seen it."""
    patch = json.dumps({"spec": {"network": {"lanBandwidthMbps": mbps}}})
    cluster.kubectl("patch", "devicepool", pool, "--type=merge", "-p", patch)

    def seen() -> bool:
        body = get_json(cluster, "devicepool", pool)
        observed = (body.get("status") or {}).get("observedGeneration")
        return bool(observed == body["metadata"]["generation"])

    eventually(seen, 60, f"the operator seeing DevicePool {pool}'s LAN at {mbps} Mbit/s")
