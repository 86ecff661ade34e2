"""The `partita` command. Each command group lives in its own module and registers itself."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="partita",
    help="Partita: place partitioned ONNX models on edge and cloud Kubernetes nodes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# Modules under partita.cli that define `register(app)`. Imported lazily in
# main() so that `import partita.cli.main` does no work.
COMMAND_MODULES = ("testbed", "model", "plan", "crds", "dashboards", "operator", "plugin", "demo")


def build() -> typer.Typer:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"partita.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"partita.cli.{name}":
                raise
            continue
        module.register(app)
    return app


def main() -> None:
    build()()
