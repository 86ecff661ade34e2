"""`kubectl partita status [MODEL]` (the `kubectl-partita` executable the package installs) and
the same as `partita status`: an EdgeModel's plan as its status and Events tell it.

For one model: phase and why, where each stage runs (pool, nodes, shards, layers, encoding),
predicted against observed latency, the node speeds the planner uses and where they come
from, a rollout in progress, and the last plan changes with their reasons (the model's
Events). Without MODEL: one line per model. `--watch` redraws as the status changes. The
figures are the ones the operator writes into the status, which its metrics and the Grafana
dashboards show too.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from partita.api.edgemodel import EdgeModel, EdgeModelStatus, Phase, PlanStatus
from partita.api.errors import ManifestError
from partita.api.meta import GROUP, VERSION
from partita.cli.status import StatusError

MAX_EVENTS = 8
PHASE_STYLE = {
    Phase.READY: "green",
    Phase.DEPLOYING: "cyan",
    Phase.PLANNING: "cyan",
    Phase.PENDING: "yellow",
    Phase.DEGRADED: "yellow",
    Phase.UNSCHEDULABLE: "red",
    Phase.FAILED: "red",
}


@dataclass(frozen=True)
class ModelEvent:
    """One Event of an EdgeModel, newest last: what the operator did and why."""

    when: float  # Unix seconds (the Event's last time)
    type: str  # Normal or Warning
    reason: str
    message: str
    count: int = 1


@dataclass(frozen=True)
class Listed:
    """An EdgeModel as read: parsed, or why it could not be."""

    namespace: str
    name: str
    model: EdgeModel | None
    problem: str = ""


# ---- reading the cluster -------------------------------------------------------------------


class ClusterReader:
    """EdgeModels and their Events from the API server (kubeconfig, else in-cluster)."""

    def __init__(self, kubeconfig: Path | None = None, context: str | None = None) -> None:
        from kubernetes import client, config

        self._namespace = "default"
        try:
            if kubeconfig is not None or _has_kubeconfig():
                path = str(kubeconfig) if kubeconfig else None
                self._api = config.new_client_from_config(config_file=path, context=context)
                _, active = config.list_kube_config_contexts(config_file=path)
                chosen = active
                if context:
                    contexts, _ = config.list_kube_config_contexts(config_file=path)
                    chosen = next((c for c in contexts if c["name"] == context), active)
                self._namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
            else:
                config.load_incluster_config()
                self._api = client.ApiClient()
                sa = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                self._namespace = sa.read_text().strip() if sa.exists() else "default"
        except (config.ConfigException, OSError) as exc:
            raise StatusError(f"no cluster to talk to: {exc}") from None
        self._custom = client.CustomObjectsApi(self._api)
        self._core = client.CoreV1Api(self._api)

    @property
    def default_namespace(self) -> str:
        """The kubeconfig context's namespace, as kubectl uses it."""
        return self._namespace

    def close(self) -> None:
        self._api.close()

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise StatusError(f"{what}: {exc.status} {exc.reason}") from None
        except HTTPError as exc:
            raise StatusError(f"{what}: the API server did not answer ({exc})") from None

    def model(self, namespace: str, name: str) -> EdgeModel:
        body = self._call(
            f"reading EdgeModel {namespace}/{name}",
            lambda: self._custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, "edgemodels", name
            ),
        )
        if body is None:
            raise StatusError(
                f"EdgeModel {namespace}/{name} not found (kubectl get edgemodels -n {namespace})"
            )
        try:
            return EdgeModel.parse(body)
        except ManifestError as exc:
            raise StatusError(f"EdgeModel {namespace}/{name}: {exc}") from None

    def models(self, namespace: str | None) -> list[Listed]:
        """Every EdgeModel of `namespace` (None: of every namespace)."""
        if namespace is None:
            doc = self._call(
                "listing EdgeModels",
                lambda: self._custom.list_cluster_custom_object(GROUP, VERSION, "edgemodels"),
            )
        else:
            doc = self._call(
                f"listing EdgeModels in {namespace}",
                lambda: self._custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, "edgemodels"
                ),
            )
        out = []
        for body in (doc or {}).get("items", []):
            meta = body.get("metadata") or {}
            ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
            try:
                out.append(Listed(ns, name, EdgeModel.parse(body)))
            except ManifestError as exc:
                out.append(Listed(ns, name, None, str(exc)))
        return sorted(out, key=lambda m: (m.namespace, m.name))

    def events(self, namespace: str, name: str) -> list[ModelEvent]:
        """The EdgeModel's Events, oldest first."""
        selector = f"involvedObject.kind=EdgeModel,involvedObject.name={name}"
        doc = self._call(
            f"listing Events of {namespace}/{name}",
            lambda: self._core.list_namespaced_event(namespace, field_selector=selector),
        )
        out = []
        for e in doc.items if doc is not None else []:
            when = e.last_timestamp or e.event_time or e.first_timestamp
            stamp = when.timestamp() if isinstance(when, dt.datetime) else 0.0
            out.append(
                ModelEvent(stamp, e.type or "", e.reason or "", e.message or "", e.count or 1)
            )
        return sorted(out, key=lambda e: e.when)


def _has_kubeconfig() -> bool:
    import os

    env = os.environ.get("KUBECONFIG")
    return bool(env) or (Path.home() / ".kube" / "config").exists()


# ---- rendering (pure) ----------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.1f} ms"


def _age(seconds: float) -> str:
    if seconds < 0 or not math.isfinite(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _since(stamp: str, now: float) -> str:
    if not stamp:
        return "-"
    try:
        t = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return stamp
    return f"{_age(now - t.timestamp())} ago"


def _phase(status: EdgeModelStatus | None) -> Text:
    phase = status.phase if status is not None else Phase.PENDING
    return Text(phase.value, style=PHASE_STYLE.get(phase, ""))


def _latency(model: EdgeModel) -> str:
    st = model.status
    plan = st.plan if st is not None else None
    slo = model.spec.slo.p95_latency_seconds if model.spec.slo else None
    parts = []
    if plan is not None:
        parts.append(f"predicted {_ms(plan.predicted_p95_ms)}")
        parts.append(f"observed {_ms(plan.observed_p95_ms)}")
    if slo is not None:
        parts.append(f"SLO {slo * 1000:.0f} ms")
    return ", ".join(parts) or "-"


def _pools(plan: PlanStatus) -> str:
    return " → ".join(s.pool for s in plan.stages) or "-"


def stages_table(plan: PlanStatus, title: str) -> Table:
    """One row per server of the plan: stage, pool, node, its share, layers and predictions."""
    table = Table(title=title, title_justify="left", expand=False)
    for column in ("stage", "pool", "node", "share", "layers", "wire", "compute", "transfer in"):
        table.add_column(column, no_wrap=column != "layers")
    for stage in plan.stages:
        shards = stage.shards or []
        nodes = [(s.node, s.proportion) for s in shards] or [(n, 1.0) for n in stage.nodes]
        wire = stage.compression.value + (", int8 slice" if stage.int8 else "")
        for i, (node, share) in enumerate(nodes):
            first = i == 0
            table.add_row(
                str(stage.index) if first else "",
                stage.pool if first else "",
                node,
                f"{share:.0%}" if len(nodes) > 1 else "all",
                f"{stage.start}..{stage.end}" if first else "",
                wire if first else "",
                _ms(stage.predicted_compute_ms) if first else "",
                _ms(stage.predicted_transfer_ms) if first else "",
            )
    return table


def model_view(model: EdgeModel, events: Sequence[ModelEvent], now: float) -> RenderableType:
    """Everything `kubectl partita status MODEL` shows."""
    st = model.status or EdgeModelStatus.model_validate({})
    head = Text.assemble(
        (f"{model.metadata.namespace}/{model.metadata.name}", "bold"), "  ", _phase(st)
    )
    parts: list[RenderableType] = [head]
    if st.message:
        parts.append(Text(st.message))
    plan = st.plan
    if plan is not None:
        parts.append(
            Text(
                f"revision {plan.revision}, serving since {_since(plan.since, now)}; "
                f"end-to-end p95 {_latency(model)}"
            )
        )
        parts.append(stages_table(plan, f"Plan r{plan.revision}: {_pools(plan)}"))
        if plan.reasons:
            parts.append(Text("why: " + "; ".join(plan.reasons[:3]), style="dim"))
    else:
        parts.append(Text(f"no plan serving; {_latency(model)}"))
    if st.rollout is not None:
        r = st.rollout
        parts.append(
            stages_table(
                r, f"Rollout r{r.revision} (applied {_since(r.since, now)}): {_pools(r)}, "
                f"predicted {_ms(r.predicted_p95_ms)}",
            )
        )  # fmt: skip
    if st.node_speeds:
        speeds = Table(title="Node speeds the planner uses", title_justify="left")
        for column in ("node", "GFLOP/s", "from"):
            speeds.add_column(column)
        for s in st.node_speeds:
            speeds.add_row(s.node, f"{s.gflops:.2f}", s.source)
        parts.append(speeds)
    if st.conditions:
        conditions = Table(title="Conditions", title_justify="left")
        for column in ("type", "status", "reason", "message"):
            conditions.add_column(column, overflow="fold")
        for c in st.conditions:
            style = "green" if c.status == "True" else ("red" if c.status == "False" else "")
            conditions.add_row(c.type, Text(str(c.status), style=style), c.reason, c.message)
        parts.append(conditions)
    history = Table(title="Last plan changes and events (newest first)", title_justify="left")
    for column in ("age", "type", "reason", "message"):
        history.add_column(column, overflow="fold")
    for e in list(events)[-MAX_EVENTS:][::-1]:
        style = "yellow" if e.type == "Warning" else ""
        count = f" (x{e.count})" if e.count > 1 else ""
        history.add_row(_age(now - e.when), Text(e.type, style=style), e.reason, e.message + count)
    if not events:
        history.add_row("-", "", "", "no Events (they expire after an hour)")
    parts.append(history)
    return Group(*parts)


def fleet_table(models: Sequence[Listed], now: float) -> Table:
    """One row per EdgeModel: `kubectl partita status` without MODEL."""
    table = Table(title="EdgeModels", title_justify="left")
    for column in ("namespace", "model", "phase", "rev", "stages", "latency p95", "since", "why"):
        table.add_column(column, overflow="fold" if column == "why" else "ellipsis")
    for m in models:
        if m.model is None:
            table.add_row(m.namespace, m.name, Text("invalid", style="red"), "", "", "", "",
                          m.problem)  # fmt: skip
            continue
        st = m.model.status
        plan = st.plan if st is not None else None
        table.add_row(
            m.namespace,
            m.name,
            _phase(st),
            str(plan.revision) if plan else "-",
            " → ".join(s.pool for s in plan.stages) if plan else "-",
            _latency(m.model),
            _since(plan.since, now) if plan else "-",
            (st.message if st else "")[:160],
        )
    if not models:
        table.add_row("", "", "", "", "", "", "", "no EdgeModels")
    return table


# ---- the command ---------------------------------------------------------------------------


def render_status(
    reader: ClusterReader, model: str | None, namespace: str | None, now: float
) -> RenderableType:
    """What one look shows: the model's view, or the table of models (namespace None: all)."""
    if model is None:
        return fleet_table(reader.models(namespace), now)
    ns = namespace or reader.default_namespace
    return model_view(reader.model(ns, model), reader.events(ns, model), now)


def print_status(
    kubeconfig: Path | None, namespace: str, name: str, console: Console | None = None
) -> None:
    """Print `kubectl partita status -n NAMESPACE NAME` (what `partita demo` ends with)."""
    reader = ClusterReader(kubeconfig)
    try:
        (console or Console()).print(render_status(reader, name, namespace, time.time()))
    finally:
        reader.close()


def status(
    model: Annotated[str | None, typer.Argument(help="EdgeModel name; none: every model.")] = None,
    namespace: Annotated[
        str | None,
        typer.Option("--namespace", "-n", help="Namespace (default: the context's)."),
    ] = None,
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", "-A", help="Models of every namespace.")
    ] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Redraw until interrupted.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between redraws with --watch.")] = 2.0,
    kubeconfig: Annotated[
        Path | None, typer.Option(envvar="KUBECONFIG", help="Kubeconfig file.")
    ] = None,
    context: Annotated[str | None, typer.Option(help="Kubeconfig context.")] = None,
) -> None:
    """Where an EdgeModel's stages run and why: plan, shards, predicted vs observed latency,
    node speeds, and the last plan changes with their reasons."""
    err = Console(stderr=True)
    if all_namespaces and (namespace or model):
        err.print("[red]error:[/red] -A lists every model; drop -n and MODEL, or -A")
        raise typer.Exit(2)
    if interval <= 0:
        err.print("[red]error:[/red] --interval must be positive")
        raise typer.Exit(2)
    try:
        reader = ClusterReader(kubeconfig.expanduser() if kubeconfig else None, context)
    except StatusError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    scope = None if all_namespaces else (namespace or reader.default_namespace)
    console = Console()
    try:
        if not watch:
            console.print(render_status(reader, model, scope, time.time()))
            return
        from rich.live import Live

        with Live(render_status(reader, model, scope, time.time()), console=console) as live:
            while True:
                time.sleep(interval)
                live.update(render_status(reader, model, scope, time.time()))
    except StatusError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        return
    finally:
        reader.close()


def register(app: typer.Typer) -> None:
    app.command(name="status")(status)


kubectl_app = typer.Typer(
    name="kubectl partita",
    help="Partita as a kubectl plugin: `kubectl partita status [MODEL]`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
kubectl_app.command(name="status")(status)


@kubectl_app.callback()
def _plugin() -> None:
    """Keeps `status` a subcommand (typer runs a lone command without its name)."""


def kubectl_main() -> None:
    """The `kubectl-partita` executable: kubectl runs it for `kubectl partita ...`."""
    kubectl_app()
