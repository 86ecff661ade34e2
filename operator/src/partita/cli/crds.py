"""`partita crds`: write the CRDs generated from partita.api, or check they are current."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    app.command(name="crds")(crds)


def crds(
    out: Annotated[
        list[Path], typer.Option("--out", help="Directory to write the CRDs into (repeatable).")
    ],
    chart: Annotated[
        Path | None,
        typer.Option(help="The Helm chart's crds/ directory, kept identical to --out."),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 when a directory is stale.")
    ] = False,
) -> None:
    """Generate the EdgeModel and DevicePool CRDs (and kopf's peering CRDs) from the models."""
    from partita.api import crd

    console = Console(stderr=True)
    directories = [*out, *([chart] if chart is not None else [])]
    if check:
        problems = [p for d in directories for p in crd.stale(d)]
        if problems:
            for problem in problems:
                console.print(f"[red]stale:[/red] {problem}", highlight=False)
            console.print(
                "The CRDs do not match partita.api: run `make crds` and commit the result.",
                highlight=False,
            )
            raise typer.Exit(1)
        console.print(f"CRDs up to date in {', '.join(map(str, directories))}", highlight=False)
        return
    for directory in directories:
        for path in crd.write(directory):
            console.print(f"wrote {path}", highlight=False)
