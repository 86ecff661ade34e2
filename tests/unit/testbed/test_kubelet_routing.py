"""Where a Service's traffic goes in the test bed (pods the agent runs, or the loopback
endpoints of the test bed's own Services) and which processes Prometheus scrapes."""

from __future__ import annotations

from typing import Any

import pytest

from partita.testbed.kubelet.serviceproxy import endpoints_for
from partita.testbed.kubelet.targets import ServerProcess, server_targets
from partita.testbed.netshape import Endpoint, RouteError, Target

SERVICES: dict[str, Any] = {
    "m/adder": {"spec": {"ports": [{"name": "http", "port": 8000}]}},
    "monitoring/prometheus-server": {"spec": {"ports": [{"name": "http", "port": 9090}]}},
}
SLICES: dict[str, Any] = {
    "m/adder-x": {
        "metadata": {"namespace": "m", "labels": {"kubernetes.io/service-name": "adder"}},
        "ports": [{"name": "http", "port": 8000}],
        "endpoints": [
            {"addresses": ["10.244.0.254"], "targetRef": {"kind": "Pod", "name": "a1"}},
            {
                "addresses": ["10.244.1.254"],
                "targetRef": {"kind": "Pod", "name": "a2"},
                "conditions": {"ready": False},
            },
            {"addresses": ["10.244.2.254"], "targetRef": {"kind": "Pod", "name": "elsewhere"}},
        ],
    },
    "monitoring/prometheus-server-local": {
        "metadata": {
            "namespace": "monitoring",
            "labels": {"kubernetes.io/service-name": "prometheus-server"},
        },
        "ports": [{"name": "http", "port": 41234}],
        "endpoints": [{"addresses": ["10.240.0.1"]}, {"addresses": ["192.0.2.7"]}],
    },
}
HOST = frozenset({"10.240.0.1"})  # this machine, dialled as 127.0.0.1
LOCAL = {
    "m/a1": Endpoint("m/a1", 5001, "edge-a-1", "edge-a"),
    "m/a2": Endpoint("m/a2", 5002, "edge-a-2", "edge-a"),
}


def test_a_service_goes_to_its_ready_pods_that_run_here() -> None:
    found = endpoints_for(Target("m", "adder", 8000, "/"), SERVICES, SLICES, LOCAL, HOST)
    assert found == [LOCAL["m/a1"]]


def test_a_selectorless_service_reaches_this_machine_only() -> None:
    found = endpoints_for(
        Target("monitoring", "prometheus-server", 9090, "/api/v1/query"),
        SERVICES,
        SLICES,
        LOCAL,
        HOST,
    )
    assert found == [Endpoint("monitoring/prometheus-server", 41234, "", "")]


@pytest.mark.parametrize(
    ("target", "fragment"),
    [(Target("m", "nothing", 8000, "/"), "no Service m/nothing"),
     (Target("m", "adder", 9000, "/"), "has no port 9000 (ports: 8000)")],
)  # fmt: skip
def test_unknown_services_and_ports_are_named(target: Target, fragment: str) -> None:
    with pytest.raises(RouteError) as err:
        endpoints_for(target, SERVICES, SLICES, LOCAL, HOST)
    assert err.value.status == 502 and fragment in str(err.value)


def test_only_stage_servers_are_scraped_with_their_partita_labels() -> None:
    stage = {"partita.dev/component": "stage-server", "partita.dev/model": "nsfw", "app": "x"}
    groups = server_targets(
        [
            ServerProcess("m/s0", 5001, "edge-a-1", "edge-a", stage),
            ServerProcess("partita-system/operator", 5002, "cloud-1", "cloud", {"app": "op"}),
        ]
    )
    assert [(g.targets, dict(g.labels)) for g in groups] == [
        (
            ("127.0.0.1:5001",),
            {
                "namespace": "m",
                "pod": "s0",
                "node": "edge-a-1",
                "pool": "edge-a",
                "component": "stage-server",
                "model": "nsfw",
            },
        )
    ]
