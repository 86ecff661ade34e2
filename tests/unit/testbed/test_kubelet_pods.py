"""A pod's process as the kubelet reports and keeps it: status, ServiceAccount tokens
refreshed on the injected clock, the pod's /etc/hosts, and stopping on the injected clock."""

from __future__ import annotations

import datetime as dt
import json
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from partita.testbed import processes
from partita.testbed.kubelet import pods, tokens
from partita.testbed.kubelet.podspec import PodError, Probe, TokenProjection

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
POD: dict[str, Any] = {
    "metadata": {"name": "partita-abc", "namespace": "partita-system", "uid": "u-7"},
    "spec": {
        "nodeName": "cloud-1",
        "containers": [{"name": "operator", "image": "partita/operator:0.1.0"}],
    },
}


def test_status_of_a_running_ready_pod_and_of_one_that_cannot_start() -> None:
    run = pods.new_run("partita-system/partita-abc", POD, "10.244.4.254", lambda: 4321)
    node = {"status": {"addresses": [{"type": "InternalIP", "address": "10.240.0.1"}]}}
    waiting = pods.pod_status(run, POD, node)
    assert waiting["phase"] == "Pending" and waiting["conditions"]["Ready"] == "False"
    assert waiting["containerStatuses"][0]["state"] == {"waiting": {"reason": "ContainerCreating"}}
    run.waiting_reason, run.waiting_message = "ErrImagePull", "image 'x' has no local program"
    state = pods.pod_status(run, POD, node)["containerStatuses"][0]["state"]
    assert state == {
        "waiting": {"reason": "ErrImagePull", "message": "image 'x' has no local program"}
    }
    run.pid, run.start_count, run.ready, run.started_at = 99, 1, True, "2026-01-01T00:00:00Z"
    run.restarts, run.last_exit, run.last_finished = 1, 137, "2026-01-01T00:00:00Z"
    status = pods.pod_status(run, POD, node)
    assert status["phase"] == "Running" and status["conditions"]["Ready"] == "True"
    assert status["hostIP"] == "10.240.0.1" and status["podIP"] == "10.244.4.254"
    container = status["containerStatuses"][0]
    assert container["image"] == "partita/operator:0.1.0" and container["restartCount"] == 1
    assert container["lastState"]["terminated"]["exitCode"] == 137


def test_hosts_file_names_the_kubernetes_service() -> None:
    text = pods.hosts_file(pods.KubernetesService("127.77.1.2", 443))
    line = next(x for x in text.splitlines() if x.startswith("127.77.1.2"))
    assert line.split()[1:] == list(pods.KUBERNETES_NAMES)


class FakeCore:
    """The TokenRequest endpoint: a new token per call, valid for the requested seconds."""

    def __init__(self, now: list[dt.datetime]) -> None:
        self.now, self.calls, self.fail = now, [], False

    def create_namespaced_service_account_token(
        self, name: str, namespace: str, body: dict[str, Any], _preload_content: bool
    ) -> Any:
        self.calls.append((name, namespace, body))
        if self.fail:
            raise ApiException(status=403, reason="Forbidden")
        expires = self.now[0] + dt.timedelta(seconds=body["spec"]["expirationSeconds"])
        status = {"token": f"t{len(self.calls)}", "expirationTimestamp": expires.isoformat()}
        return SimpleNamespace(data=json.dumps({"status": status}))


def test_token_is_bound_to_the_pod_and_refreshed_at_80_percent(tmp_path: Path) -> None:
    now = [T0]
    core = FakeCore(now)
    keeper = tokens.TokenKeeper(core, lambda: now[0])
    projection = TokenProjection(tmp_path / "sa" / "token", "partita", None, 3600)
    keeper.ensure(POD, [projection])
    assert projection.file.read_text() == "t1"
    name, namespace, body = core.calls[0]
    assert (name, namespace) == ("partita", "partita-system")
    assert body["spec"]["boundObjectRef"] == {
        "apiVersion": "v1", "kind": "Pod", "name": "partita-abc", "uid": "u-7"
    }  # fmt: skip
    assert body["spec"]["audiences"] == [] and body["spec"]["expirationSeconds"] == 3600
    now[0] = T0 + dt.timedelta(seconds=2879)
    keeper.ensure(POD, [projection])
    assert len(core.calls) == 1  # not yet due
    now[0] = T0 + dt.timedelta(seconds=2880)
    keeper.ensure(POD, [projection])
    assert projection.file.read_text() == "t2" and len(core.calls) == 2


def test_a_failed_refresh_keeps_the_token_until_it_expires(tmp_path: Path) -> None:
    now = [T0]
    core = FakeCore(now)
    keeper = tokens.TokenKeeper(core, lambda: now[0])
    projection = TokenProjection(tmp_path / "token", "partita", "api", 600)
    keeper.ensure(POD, [projection])
    core.fail = True
    now[0] = T0 + dt.timedelta(seconds=500)
    keeper.ensure(POD, [projection])
    assert projection.file.read_text() == "t1"
    now[0] = T0 + dt.timedelta(seconds=600)
    with pytest.raises(PodError, match="ServiceAccount partita-system/partita: 403 Forbidden"):
        keeper.ensure(POD, [projection])


def test_stop_one_waits_out_the_grace_on_the_injected_clock(tmp_path: Path) -> None:
    """A process that ignores SIGTERM is killed once the injected clock passes the grace
    period: 30 s of grace take a fraction of a real second."""
    proc = processes.start("stubborn", ["sh", "-c", "trap '' TERM; exec sleep 60"], tmp_path)
    deadline = time.monotonic() + 5.0  # until the exec: SIGTERM is ignored from then on
    while Path(f"/proc/{proc.pid}/cmdline").read_bytes() != b"sleep\x0060\x00":
        assert time.monotonic() < deadline, "the test process did not start"
        time.sleep(0.01)
    fake = [0.0]

    def sleep(seconds: float) -> None:
        fake[0] += seconds
        time.sleep(0.001)

    started = time.monotonic()
    processes.stop_one(proc.pid, grace=30.0, clock=lambda: fake[0], sleep=sleep)
    assert not processes.alive(proc.pid)
    assert fake[0] >= 30.0 and time.monotonic() - started < 5.0
    assert processes.exit_code(proc.pid) == 128 + 9


def test_issued_token_reads_the_expiration_the_apiserver_gives() -> None:
    doc = {"status": {"token": "x", "expirationTimestamp": "2026-01-01T01:00:00Z"}}
    issued = tokens.issued(doc, T0)
    assert issued.expires_at - issued.issued_at == 3600
    assert issued.refresh_at - issued.issued_at == pytest.approx(2880)


class Immediate:
    """An executor that runs each check at once (the agent's runs them in threads)."""

    def submit(self, fn: Any, *args: Any) -> Future[bool]:
        future: Future[bool] = Future()
        future.set_result(fn(*args))
        return future


def _runner(tmp_path: Path, results: dict[str, list[bool]]) -> pods.PodRunner:
    runner = pods.PodRunner(
        tmp_path,
        core=None,
        sources=None,  # type: ignore[arg-type]
        tokens=None,  # type: ignore[arg-type]
        limiter=None,  # type: ignore[arg-type]
        proxy_url=str,
        kubernetes=pods.KubernetesService("127.77.1.2", 443),
        sandboxed=False,
        exe_dir=tmp_path,
        now=lambda: T0,
        clock=time.monotonic,
        sleep=time.sleep,
    )
    runner.prober.shutdown()
    runner.prober = Immediate()  # type: ignore[assignment]
    runner._check = lambda p, port: results[str(p.path)].pop(0)  # type: ignore[method-assign]
    return runner


def test_liveness_and_readiness_wait_for_the_startup_probe(tmp_path: Path) -> None:
    proc = processes.start("probed", ["sleep", "60"], tmp_path)
    try:
        results = {
            "/start": [False, False, True],
            "/live": [True, False, False],
            "/ready": [True] * 50,
        }
        runner = _runner(tmp_path, results)
        run = pods.new_run("m/p", POD, "10.244.0.254", lambda: 1)
        run.pid = proc.pid
        run.probes = {
            "startupProbe": pods.ProbeState(Probe("/start", period_s=1, failure_threshold=5)),
            "livenessProbe": pods.ProbeState(Probe("/live", period_s=1, failure_threshold=2)),
            "readinessProbe": pods.ProbeState(Probe("/ready", period_s=1)),
        }
        clock = iter(0.5 * i for i in range(100))

        def until(what: str) -> None:
            for now in clock:
                runner._probe(run, now)
                if what == "started":
                    assert results["/live"] == [True, False, False] and not run.ready
                if getattr(run, what):
                    return
            raise AssertionError(f"{what} never reached")

        until("started")  # after two failed startup checks, no liveness or readiness asked
        assert results["/start"] == []
        until("ready")
        until("stopping_since")  # SIGTERM after the second liveness failure in a row
        assert results["/live"] == [] and not run.ready
    finally:
        processes.stop_one(proc.pid, grace=0.0)
