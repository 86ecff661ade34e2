"""`partita dashboards`: write the Grafana dashboards built in partita.dashboards into the
chart, or check they are current."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    app.command(name="dashboards")(dashboards)


def dashboards(
    out: Annotated[
        Path, typer.Option("--out", help="Directory of the dashboards' JSON files.")
    ] = Path("charts/partita/dashboards"),
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 when the directory is stale.")
    ] = False,
) -> None:
    """Build the Fleet, Model and Pools-and-links dashboards (the chart ships them as
    ConfigMaps for Grafana's dashboard sidecar)."""
    console = Console(stderr=True)
    try:
        from partita import dashboards as boards
    except ImportError as exc:
        console.print(
            f"[red]error:[/red] {exc}: install the dashboards extra (partita[dashboards])",
            highlight=False,
        )
        raise typer.Exit(2) from None
    if check:
        problems = boards.stale(out)
        if problems:
            for problem in problems:
                console.print(f"[red]stale:[/red] {problem}", highlight=False)
            console.print(
                "The dashboards do not match partita.dashboards: run `make dashboards` and "
                "commit the result.",
                highlight=False,
            )
            raise typer.Exit(1)
        console.print(f"dashboards up to date in {out}", highlight=False)
        return
    for path in boards.write(out):
        console.print(f"wrote {path}", highlight=False)
