"""Which images the test bed runs as which local program: the table agrees with the project's
Dockerfiles, each listening port moves to a local port of its own, other images are refused by
name."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from partita.testbed.kubelet import images
from partita.testbed.kubelet.podspec import (
    CREATE_ERROR,
    IMAGE_ERROR,
    LocalPorts,
    PodError,
    local_ports,
)

ROOT = Path(__file__).resolve().parents[3]


def _final_stage(dockerfile: Path) -> tuple[str, list[str], list[str], dict[str, str]]:
    """(the -t name of its build comment, ENTRYPOINT, CMD, ENV) of the Dockerfile's last stage."""
    text = dockerfile.read_text()
    tag = re.search(r"docker build -f \S+ -t (\S+)", text)
    assert tag is not None
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    last = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    entrypoint: list[str] = []
    cmd: list[str] = []
    env: dict[str, str] = {}
    for line in lines[last:]:
        word, _, rest = line.partition(" ")
        if word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif word == "CMD":
            cmd = json.loads(rest)
        elif word == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(rest)))
    return tag.group(1), entrypoint, cmd, env


@pytest.mark.parametrize("dockerfile", ["Dockerfile.operator", "Dockerfile.server"])
def test_the_table_is_what_the_dockerfile_builds(dockerfile: str) -> None:
    name, entrypoint, cmd, env = _final_stage(ROOT / dockerfile)
    local = images.IMAGES[images.repository(name)]
    assert entrypoint == [f"/opt/partita/bin/{local.entrypoint}"]
    assert tuple(cmd) == local.cmd
    env.pop("PATH")  # the venv's bin directory stands for /opt/partita/bin
    assert env == dict(local.env)


@pytest.mark.parametrize(
    ("image", "repository"),
    [
        ("partita/operator:0.1.0", "partita/operator"),
        ("partita/server", "partita/server"),
        ("registry.local:5000/partita/server:dev@sha256:abc", "partita/server"),
        ("localhost/partita/operator:1", "partita/operator"),
        ("nginx:1.27", "nginx"),
    ],
)
def test_repository_drops_registry_tag_and_digest(image: str, repository: str) -> None:
    assert images.repository(image) == repository


def test_the_chart_operator_runs_the_venv_partita_on_the_agent_port(tmp_path: Path) -> None:
    (tmp_path / "partita").write_text("")
    container = {
        "name": "operator",
        "image": "partita/operator:0.1.0",
        "args": ["operator", "--all-namespaces", "--listen=0.0.0.0:8080"],
    }
    command = images.local_command(container, tmp_path, {}, LocalPorts(4321))
    assert command.argv == [
        str(tmp_path / "partita"),
        "operator",
        "--all-namespaces",
        "--listen=127.0.0.1:4321",
    ]
    assert command.image_env["PARTITA_OPERATOR_CACHE"] == "/var/cache/partita"
    # No args: the image's CMD, as a container runtime does.
    bare = images.local_command(
        {"name": "o", "image": "partita/operator"}, tmp_path, {}, LocalPorts(5)
    )
    assert bare.argv[1:] == ["operator", "--all-namespaces", "--listen=127.0.0.1:5"]
    assert images.runs_operator({"spec": {"containers": [container]}})
    assert not images.runs_operator({"spec": {"containers": [{"image": "partita/server"}]}})


def test_stage_server_command_moves_host_and_port(tmp_path: Path) -> None:
    (tmp_path / "partita-server").write_text("")
    container = {
        "name": "server",
        "image": "partita/server:0.1.0",
        "command": ["partita-server"],
        "args": ["--host", "0.0.0.0", "--port", "8000", "--log-level=$(LEVEL)"],
    }
    argv = images.local_command(container, tmp_path, {"LEVEL": "info"}, LocalPorts(4321)).argv
    assert argv == [
        str(tmp_path / "partita-server"),
        "--host",
        "127.0.0.1",
        "--port",
        "4321",
        "--log-level=info",
    ]
    assert images.host_port_flags(["--port=80", "-c", "x"], LocalPorts(5)) == [
        "--port=5",
        "-c",
        "x",
        "--host",
        "127.0.0.1",
    ]


def test_each_declared_container_port_gets_its_own_local_port_rest_and_grpc() -> None:
    free = iter([5001, 5002])
    container = {
        "ports": [{"name": "http", "containerPort": 8000}, {"name": "grpc", "containerPort": 8081}]
    }
    ports = local_ports(container, lambda: next(free))
    assert ports == LocalPorts(5001, {8000: 5001, 8081: 5002}, {"http": 8000, "grpc": 8081})
    args = ["--host", "0.0.0.0", "--port", "8000", "--grpc-port", "8081"]
    assert images.host_port_flags(args, ports) == [
        "--host", "127.0.0.1", "--port", "5001", "--grpc-port", "5002"
    ]  # fmt: skip
    assert images.host_port_flags(["--grpc-port=8081"], ports) == [
        "--grpc-port=5002", "--host", "127.0.0.1", "--port", "5001"
    ]  # fmt: skip
    assert images.host_port_flags(["--grpc-port", "0"], ports)[:2] == ["--grpc-port", "0"]
    # A Service's targetPort, by name or number; a port not declared is the primary one.
    assert [ports.local(p) for p in ("grpc", 8081, "http", 8000, 9999, "nope", None)] == [
        5002, 5002, 5001, 5001, 5001, 5001, 5001
    ]  # fmt: skip


def test_a_grpc_port_not_declared_cannot_be_moved_and_says_so() -> None:
    with pytest.raises(PodError, match=r"--grpc-port 9000: .*declare it") as err:
        images.host_port_flags(["--grpc-port", "9000"], LocalPorts(5001, {8000: 5001}))
    assert err.value.reason == CREATE_ERROR and "declared: [8000]" in str(err.value)


def test_an_image_without_a_local_program_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(PodError, match=r"image 'nginx:1.27' has no local program") as err:
        images.local_command({"name": "web", "image": "nginx:1.27"}, tmp_path, {}, LocalPorts(1))
    assert err.value.reason == IMAGE_ERROR
    assert "partita/operator -> partita" in str(err.value)


def test_a_command_not_installed_says_what_to_do(tmp_path: Path) -> None:
    container = {"name": "s", "image": "partita/server", "command": ["no-such-server-xyz"]}
    with pytest.raises(PodError, match="make install") as err:
        images.local_command(container, tmp_path, {}, LocalPorts(1))
    assert err.value.reason == CREATE_ERROR
