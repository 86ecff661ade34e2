"""`partita testbed ...`: the embedded local cluster (real control plane, kwok nodes,
simulated node and link metrics scraped by a real Prometheus)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from partita.testbed.errors import TestbedError

testbed = typer.Typer(
    help="The embedded local cluster: real etcd, kube-apiserver, kube-controller-manager, "
    "kube-scheduler, kwok nodes, a metrics simulator and Prometheus, as local processes.",
    no_args_is_help=True,
)
console = Console(stderr=True)

DirOption = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="Run directory of the cluster (default: $PARTITA_TESTBED_DIR "
        "or ~/.cache/partita/testbed/default).",
    ),
]


def _run_dir(d: Path | None) -> Path:
    from partita.testbed.cluster import default_run_dir

    if d is not None:
        return d.resolve()
    env = os.environ.get("PARTITA_TESTBED_DIR")
    return Path(env).resolve() if env else default_run_dir()


def _fail(exc: TestbedError) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}", highlight=False)
    return typer.Exit(1)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@testbed.command()
def install(force: bool = typer.Option(False, help="Rebuild even when cached.")) -> None:
    """Build (or find cached) etcd, Kubernetes components, kwok and helm."""
    from partita.testbed import binaries

    try:
        b = binaries.install(log=_log, force=force)
    except TestbedError as exc:
        raise _fail(exc) from None
    _log(f"==> test bed binaries ready in {binaries.bin_dir()} (kube: {b.kube.parent.name})")


@testbed.command()
def up(
    nodes: Annotated[
        str,
        typer.Option(
            help="Pools and node counts, e.g. edge=4,cloud=2 or edge-a=2,edge-b=2,cloud=2."
        ),
    ] = "edge=4,cloud=2",
    config: Annotated[
        Path | None,
        typer.Option(help="YAML layout: pools (name, tier, nodes, cpu, memory, speed) and links."),
    ] = None,
    port: Annotated[int | None, typer.Option(help="kube-apiserver port (default: free).")] = None,
    prometheus_port: Annotated[int | None, typer.Option(help="Prometheus port.")] = None,
    run_dir: DirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print status as JSON.")] = False,
) -> None:
    """Start the local cluster and wait until its nodes are Ready and scraped."""
    from partita.testbed import cluster, layout

    try:
        lay = layout.load_layout(config) if config else layout.parse_nodes(nodes)
        info = cluster.up(
            _run_dir(run_dir), lay, apiserver_port=port, prometheus_port=prometheus_port, log=_log
        )
    except TestbedError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(info.to_json(), indent=2))
    else:
        _print_status(info.run_dir)


@testbed.command()
def down(run_dir: DirOption = None) -> None:
    """Stop every process of the local cluster."""
    from partita.testbed import cluster

    stopped = cluster.down(_run_dir(run_dir))
    _log(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@testbed.command()
def status(
    run_dir: DirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Show the kubeconfig, Prometheus URL, nodes and process memory."""
    from partita.testbed import cluster

    d = _run_dir(run_dir)
    try:
        info = cluster.load_info(d)
        nodes = cluster.node_status(d)
    except TestbedError as exc:
        raise _fail(exc) from None
    if as_json:
        doc = info.to_json()
        doc["nodes"] = nodes
        doc["rss_bytes"] = cluster.rss_by_process(d)
        print(json.dumps(doc, indent=2))
        return
    _print_status(d)


def _print_status(d: Path) -> None:
    from partita.testbed import cluster

    info = cluster.load_info(d)
    out = Console()
    out.print(f"kubeconfig:     {info.kubeconfig}")
    out.print(f"apiserver:      {info.apiserver_url}")
    out.print(f"prometheus:     {info.prometheus_url}")
    out.print(f"metrics (sim):  {info.metrics_url}")
    table = Table("node", "pool", "tier", "ready", "cpu", "memory")
    for n in cluster.node_status(d):
        table.add_row(
            n["name"],
            n["pool"],
            n["tier"],
            "yes" if n["ready"] else "[red]no[/red]",
            str(n["cpu"]),
            str(n["memory"]),
        )
    out.print(table)
    rss = cluster.rss_by_process(d)
    out.print(
        "processes: "
        + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in rss.items())
        + f" (total {sum(rss.values()) / 2**20:.0f} MiB)"
    )
    out.print(f"try: KUBECONFIG={info.kubeconfig} kubectl get nodes -L partita.dev/pool")


@testbed.command()
def node(
    name: str,
    down_: Annotated[bool, typer.Option("--down", help="Make the node NotReady.")] = False,
    up_: Annotated[bool, typer.Option("--up", help="Make the node Ready again.")] = False,
    run_dir: DirOption = None,
) -> None:
    """Take a simulated node down (NotReady) or bring it back."""
    from partita.testbed import cluster

    if down_ == up_:
        raise _fail(TestbedError("give exactly one of --down or --up"))
    try:
        cluster.set_node_ready(_run_dir(run_dir), name, ready=up_)
    except TestbedError as exc:
        raise _fail(exc) from None
    _log(f"node {name}: {'Ready' if up_ else 'NotReady'} requested")


@testbed.command()
def prometheus(
    stop: Annotated[bool, typer.Option("--stop", help="Stop Prometheus.")] = False,
    start: Annotated[bool, typer.Option("--start", help="Start it again.")] = False,
    run_dir: DirOption = None,
) -> None:
    """Stop or restart the cluster's Prometheus (to see how the operator copes)."""
    from partita.testbed import cluster

    if stop == start:
        raise _fail(TestbedError("give exactly one of --stop or --start"))
    try:
        cluster.set_prometheus(_run_dir(run_dir), running=start)
    except TestbedError as exc:
        raise _fail(exc) from None
    _log(f"Prometheus {'started' if start else 'stopped'}")


@testbed.command("set")
def set_(
    target: Annotated[str, typer.Argument(help="node=NAME or link=SOURCE_POOL:TARGET_POOL")],
    values: Annotated[
        list[str], typer.Argument(help="KEY=VALUE, e.g. cpu=0.9, bandwidth=5Mbit rtt=40ms")
    ],
    run_dir: DirOption = None,
) -> None:
    """Change a node's load or a link's bandwidth/RTT as the metrics simulator reports them."""
    from partita.testbed import cluster, simstate

    try:
        info = cluster.load_info(_run_dir(run_dir))
        pairs = dict(_split_kv(v) for v in values)
        simstate.update(
            info.state_file, lambda state: simstate.apply_assignment(state, target, pairs)
        )
    except TestbedError as exc:
        raise _fail(exc) from None
    _log(f"{target}: {' '.join(values)}")


def _split_kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise TestbedError(f"{text!r} is not KEY=VALUE")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


@testbed.command()
def apiserver(
    restart: Annotated[bool, typer.Option("--restart", help="Stop and start it again.")] = False,
    run_dir: DirOption = None,
) -> None:
    """Restart the kube-apiserver (same flags, port and etcd), as an upgrade or a crash does."""
    from partita.testbed import cluster

    if not restart:
        raise _fail(TestbedError("give --restart"))
    try:
        cluster.restart_apiserver(_run_dir(run_dir))
    except TestbedError as exc:
        raise _fail(exc) from None
    _log("kube-apiserver restarted")


@testbed.command()
def scenario(
    path: Path,
    run_dir: DirOption = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="NAMESPACE/NAME of the EdgeModel whose plan roles (plan:first-node...) mean."
        ),
    ] = None,
) -> None:
    """Play a YAML scenario of timed steps (link and node changes, nodes going down)."""
    from partita.cli.status import StatusError, fetch_model, node_for_role
    from partita.testbed import cluster
    from partita.testbed import scenario as sc

    d = _run_dir(run_dir)
    try:
        info = cluster.load_info(d)
        plan = sc.Scenario.load(path)
        resolve = None
        if model is not None:
            namespace, _, name = model.rpartition("/")

            def resolve(role: str) -> str:
                found = fetch_model(info.kubeconfig, namespace or "default", name)
                try:
                    return node_for_role(found.status if found else None, role)
                except StatusError as exc:
                    raise TestbedError(f"--model {model}: {exc}") from None

        sc.run(
            plan,
            info.state_file,
            clock=time.monotonic,
            sleep=time.sleep,
            on_node=lambda name, is_up: cluster.set_node_ready(d, name, is_up),
            log=_log,
            resolve=resolve,
        )
    except TestbedError as exc:
        raise _fail(exc) from None


@testbed.command()
def env(run_dir: DirOption = None) -> None:
    """Print shell exports (PATH with kubectl/helm, KUBECONFIG): eval "$(partita testbed env)"."""
    from partita.testbed import binaries, cluster

    print(f'export PATH="{binaries.bin_dir()}:$PATH"')
    try:
        info = cluster.load_info(_run_dir(run_dir))
    except TestbedError:
        return
    print(f'export KUBECONFIG="{info.kubeconfig}"')
    print(f'export PARTITA_PROMETHEUS_URL="{info.prometheus_url}"')


def register(app: typer.Typer) -> None:
    app.add_typer(testbed, name="testbed")
