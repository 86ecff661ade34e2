"""`partita operator`: run the kopf operator in this process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    app.command(name="operator")(operator_command)


def _default_cache() -> Path:
    return Path(os.environ.get("PARTITA_CACHE", Path.home() / ".cache" / "partita")) / "operator"


def operator_command(
    namespace: Annotated[
        list[str] | None,
        typer.Option("--namespace", "-n", help="Watch this namespace (repeatable)."),
    ] = None,
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", "-A", help="Watch every namespace (default).")
    ] = False,
    peering: Annotated[
        str | None,
        typer.Option(
            help="kopf peering object (ClusterKopfPeering, or KopfPeering with --namespace): "
            "a second operator with the same peering pauses. Must exist when given."
        ),
    ] = None,
    standalone: Annotated[
        bool, typer.Option("--standalone", help="No peering: act even if others run.")
    ] = False,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(envvar="KUBECONFIG", help="Kubeconfig; default: in-cluster service account."),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(envvar="PARTITA_OPERATOR_CACHE", help="Model and profile cache."),
    ] = None,
    max_model_bytes: Annotated[
        int, typer.Option(envvar="PARTITA_MAX_MODEL_BYTES", help="Refuse larger model files.")
    ] = 2 << 30,
    prometheus_url: Annotated[
        str | None, typer.Option(envvar="PARTITA_PROMETHEUS_URL", help="Prometheus base URL.")
    ] = None,
    poll_interval: Annotated[
        float,
        typer.Option(envvar="PARTITA_POLL_INTERVAL", help="Seconds between metric polls."),
    ] = 15.0,
    queries: Annotated[
        Path | None,
        typer.Option(envvar="PARTITA_QUERIES_FILE", help="YAML file of PromQL queries."),
    ] = None,
    server_image: Annotated[
        str,
        typer.Option(envvar="PARTITA_SERVER_IMAGE", help="Image of the stage servers."),
    ] = "partita-server:0.1.0",
    log_level: Annotated[
        str, typer.Option(envvar="PARTITA_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR.")
    ] = "INFO",
    listen: Annotated[
        str | None,
        typer.Option(
            envvar="PARTITA_LISTEN",
            help="Serve the operator's HTTP endpoint on HOST:PORT: /healthz (the loop runs), "
            "/metrics (its own Prometheus series) and, with --distribution-url, the verified "
            "model files stage servers fetch (/v1/models/<sha256>).",
        ),
    ] = None,
    distribution_url: Annotated[
        str | None,
        typer.Option(
            envvar="PARTITA_DISTRIBUTION_URL",
            help="The URL stage pods reach --listen at (the chart's Service): stage servers "
            "then fetch models from the operator instead of each model's source.",
        ),
    ] = None,
) -> None:
    """Watch DevicePools and EdgeModels: fetch, verify and profile models, plan their stages from
    live metrics, deploy them make-before-break and move them when the cluster changes."""
    import logging

    from partita.handlers.registry import OperatorConfig, run

    if namespace and all_namespaces:
        Console(stderr=True).print("[red]error:[/red] --namespace and --all-namespaces exclude")
        raise typer.Exit(2)
    if peering is not None and standalone:
        Console(stderr=True).print("[red]error:[/red] --peering and --standalone exclude")
        raise typer.Exit(2)
    if distribution_url is not None and listen is None:
        Console(stderr=True).print("[red]error:[/red] --distribution-url needs --listen")
        raise typer.Exit(2)
    # The key of the model tokens comes only from the environment (the chart's Secret), never
    # from the command line where `ps` shows it.
    key = os.environ.get("PARTITA_DISTRIBUTION_KEY", "").encode() or None
    level = logging.getLevelNamesMapping().get(log_level.upper())
    if level is None:
        Console(stderr=True).print(f"[red]error:[/red] --log-level {log_level!r} is not a level")
        raise typer.Exit(2)
    if listen is not None:
        from partita.control.endpoint import parse_address

        try:
            parse_address(listen)
        except ValueError as exc:
            Console(stderr=True).print(f"[red]error:[/red] --listen: {exc}")
            raise typer.Exit(2) from None
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per Prometheus query every poll drowns what the operator decides.
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
    config = OperatorConfig(
        cache_dir=cache_dir or _default_cache(),
        kubeconfig=kubeconfig.expanduser() if kubeconfig else None,
        namespaces=tuple(namespace or ()),
        peering=peering,
        standalone=standalone,
        max_model_bytes=max_model_bytes,
        prometheus_url=prometheus_url,
        poll_interval_s=poll_interval,
        queries_file=queries,
        server_image=server_image,
        listen=listen,
        distribution_url=distribution_url,
        distribution_key=key,
    )
    run(config)
