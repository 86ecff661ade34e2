"""Where a Service's traffic goes in the test bed (pods the agent runs, each Service port at its
container port's local port, or the loopback endpoints of the test bed's own Services), which
entry listeners a data-source Service gets, and which processes Prometheus scrapes."""

from __future__ import annotations

from typing import Any

import pytest

from partita.testbed.kubelet.podspec import LocalPorts
from partita.testbed.kubelet.serviceproxy import EntryPort, LocalPod, endpoints_for, entry_ports
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
    "m/a1": LocalPod("m/a1", "edge-a-1", "edge-a", LocalPorts(5001)),
    "m/a2": LocalPod("m/a2", "edge-a-2", "edge-a", LocalPorts(5002)),
}
GRPC = "kubernetes.io/h2c"


def test_a_service_goes_to_its_ready_pods_that_run_here() -> None:
    found = endpoints_for(Target("m", "adder", 8000, "/"), SERVICES, SLICES, LOCAL, HOST)
    assert found == [Endpoint("m/a1", 5001, "edge-a-1", "edge-a")]


def _two_ports(target_port: int | str, slice_ports: list[dict[str, Any]]) -> list[Endpoint]:
    services = {
        "m/cam": {
            "spec": {
                "ports": [
                    {"name": "http", "port": 8000, "targetPort": "http"},
                    {"name": "grpc", "port": 8081, "targetPort": target_port, "appProtocol": GRPC},
                ]
            }
        }
    }
    slices = {
        "m/cam-x": {
            "metadata": {"namespace": "m", "labels": {"kubernetes.io/service-name": "cam"}},
            "ports": slice_ports,
            "endpoints": [{"addresses": ["10.244.0.9"], "targetRef": {"kind": "Pod", "name": "r"}}],
        }
    }
    ports = LocalPorts(5001, {8000: 5001, 8081: 5002}, {"http": 8000, "grpc": 8081})
    pods = {"m/r": LocalPod("m/r", "edge-a-1", "edge-a", ports)}
    return endpoints_for(Target("m", "cam", 8081, ""), services, slices, pods, HOST)


@pytest.mark.parametrize(
    ("target_port", "slice_ports"),
    [("grpc", [{"name": "http", "port": 8000}, {"name": "grpc", "port": 8081}]),
     (8081, [{"name": "http", "port": 8000}, {"name": "grpc", "port": 8081}]),
     ("grpc", []),  # no slice port for it: the Service's targetPort, by name
     (8081, [])],  # or by number
)  # fmt: skip
def test_each_service_port_goes_to_the_local_port_of_its_container_port(
    target_port: int | str, slice_ports: list[dict[str, Any]]
) -> None:
    assert _two_ports(target_port, slice_ports) == [Endpoint("m/r", 5002, "edge-a-1", "edge-a")]


def test_every_port_of_a_data_source_service_gets_an_entry_and_http_keeps_its_key() -> None:
    svc = {
        "spec": {
            "ports": [
                {"name": "http", "port": 8000, "targetPort": "http"},
                {"name": "grpc", "port": 8081, "targetPort": "grpc", "appProtocol": GRPC},
                {"name": "admin", "port": 9000, "appProtocol": "http"},
                {"port": 7000, "appProtocol": "kubernetes.io/ws"},
            ]
        }
    }
    entries = entry_ports("m/cam", svc, "edge-a")
    assert entries == {
        "m/cam": EntryPort("m", "cam", 8000, "edge-a", raw=False),
        "m/cam:grpc": EntryPort("m", "cam", 8081, "edge-a", raw=True),
        "m/cam:admin": EntryPort("m", "cam", 9000, "edge-a", raw=False),
        "m/cam:7000": EntryPort("m", "cam", 7000, "edge-a", raw=True),
    }
    assert entries["m/cam"].address(4001) == "http://127.0.0.1:4001"
    assert entries["m/cam:grpc"].address(4002) == "127.0.0.1:4002"  # a gRPC target


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
