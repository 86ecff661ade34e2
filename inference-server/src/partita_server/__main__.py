"""`partita-server`: run one stage server: v2 REST under uvicorn (uvloop + httptools, each
response in one write) and v2 gRPC on the same event loop and data plane."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["main"]

cli = typer.Typer(add_completion=False, help=__doc__)


@cli.command()
def serve(
    spec: Annotated[
        Path | None, typer.Option(help="stage spec YAML/JSON; default: $PARTITA_STAGE_SPEC")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="served model name (overrides the spec)")
    ] = None,
    source: Annotated[str | None, typer.Option(help="model URI (file://, http(s)://)")] = None,
    sha256: Annotated[str | None, typer.Option(help="digest of the model bytes")] = None,
    host: Annotated[str, typer.Option(help="address to bind")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="port of v2 REST")] = 8080,
    grpc_port: Annotated[
        int, typer.Option(help="port of v2 gRPC on HOST (e.g. 8081); 0: REST only")
    ] = 0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "warning",
) -> None:
    """Serve the stage the spec describes on HOST:PORT."""
    import uvicorn

    from partita_server.app import create_app
    from partita_server.errors import StageSpecError
    from partita_server.http_server import HttpProtocol
    from partita_server.spec import load_spec

    overrides: dict[str, object] = {"model": model}
    if source is not None:
        overrides["source"] = {"uri": source, "sha256": sha256}
    try:
        grpc_address = f"{host}:{grpc_port}" if grpc_port else None
        app = create_app(load_spec(spec, overrides=overrides), grpc_address=grpc_address)
    except StageSpecError as exc:
        typer.echo(f"partita-server: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    logging.basicConfig(level=log_level.upper())
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=HttpProtocol,
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=75,
    )


def main() -> None:
    cli(sys.argv[1:])


if __name__ == "__main__":
    main()
