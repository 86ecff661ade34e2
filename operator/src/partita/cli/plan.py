"""`partita plan MODEL --cluster FILE`: where Partita would run MODEL, and why."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from partita.control.inputs import CLUSTER_FILE_FORMAT as CLUSTER_FORMAT

if TYPE_CHECKING:
    from partita.model.types import ModelProfile
    from partita.planner import ClusterSnapshot, Plan, PlanResult


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def load_profile(model: str, inputs: list[str]) -> ModelProfile:
    """Profile a model file, or a model of the built-in zoo by name (open-nsfw, minilm...)."""
    from partita.model import zoo
    from partita.model.load import parse_input_shapes
    from partita.model.profile import profile_model

    shapes = parse_input_shapes(inputs)
    path = Path(model)
    if not path.exists():
        if model not in zoo.names():
            _fail(f"{model}: no such file, and not a zoo model ({', '.join(zoo.names())})")
        path = zoo.model_path(model)
        shapes = shapes or zoo.default_input_shapes(model)
    return profile_model(path, shapes or None)


def load_cluster(path: Path, reference_gflops: float) -> ClusterSnapshot:
    import yaml

    from partita.control.inputs import (
        InputError,
        apply_observation,
        cluster_from_documents,
        snapshot_from_pools,
    )

    try:
        docs = list(yaml.safe_load_all(path.read_text()))
        pools, nodes, observation = cluster_from_documents(docs)
    except (OSError, yaml.YAMLError, InputError) as exc:
        _fail(f"--cluster {path}: {exc}")
        raise
    snapshot = snapshot_from_pools(pools, nodes, reference_gflops=reference_gflops)
    return apply_observation(snapshot, observation)


def draw_timeline(plan: Plan, out: Path, title: str = "") -> None:
    """One request through the plan: transfers and compute per stage, on a time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * (len(plan.stages) + 1)))
    t = 0.0
    rows = []
    pred = plan.prediction
    for stage, sp in zip(plan.stages, pred.stages, strict=True):
        label = f"{stage.index}: {stage.pool} ({len(stage.shards)}x)"
        rows.append(label)
        y = len(rows) - 1
        for width, color, hatch in (
            (sp.transfer_in_s, "#9ecae1", "//"),
            (sp.scatter_gather_s / 2, "#fdae6b", ".."),
            (sp.compute_s, "#31a354", ""),
            (sp.scatter_gather_s / 2, "#fdae6b", ".."),
        ):
            if width > 0:
                ax.barh(y, width * 1e3, left=t * 1e3, color=color, hatch=hatch, edgecolor="k")
                t += width
    rows.append("answer")
    ax.barh(len(rows) - 1, pred.output_transfer_s * 1e3, left=t * 1e3, color="#9ecae1",
            hatch="//", edgecolor="k")  # fmt: skip
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlabel("ms (blue: transfer, orange: shard scatter/gather, green: compute)")
    ax.set_title(title or f"{plan.request.name}: {pred.latency_s * 1e3:.1f} ms predicted")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _print(result: PlanResult, profile: ModelProfile, base: dict[str, PlanResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    from partita.planner import Plan

    console = Console()
    if not isinstance(result, Plan):
        console.print(f"[bold red]Unschedulable[/]: {result.request.name}")
        for reason in result.reasons:
            console.print(f"  - {reason}")
    else:
        table = Table(title=f"plan r{result.revision} for {result.request.name} "
                      f"({result.request.objective})")  # fmt: skip
        for col in ("stage", "pool", "nodes (share)", "graph nodes", "in", "transfer ms",
                    "compute ms", "memory MiB"):  # fmt: skip
            table.add_column(col)
        pred = result.prediction
        for s, sp in zip(result.stages, pred.stages, strict=True):
            shards = ", ".join(f"{sh.node} ({sh.proportion:.0%})" for sh in s.shards)
            nbytes = _boundary_bytes(profile, s.start)
            comp = "" if s.input_compression == "none" else f" {s.input_compression}"
            table.add_row(
                str(s.index) + (" int8" if s.int8 else ""),
                s.pool,
                shards,
                f"{s.start}..{s.end}",
                f"{nbytes / 1e3:.1f} kB{comp}",
                f"{sp.transfer_in_s * 1e3:.2f}",
                f"{(sp.compute_s + sp.scatter_gather_s) * 1e3:.2f}",
                f"{max(sh.memory_bytes for sh in sp.shards) / 2**20:.0f}",
            )
        console.print(table)
        console.print(
            f"latency {pred.latency_s * 1e3:.2f} ms (compute {pred.compute_s * 1e3:.2f}, "
            f"transfer {pred.transfer_s * 1e3:.2f}, answer {pred.output_transfer_s * 1e3:.2f})"
            f", throughput {pred.throughput_rps:.2f}/s, energy {pred.energy_j:.3g} J/request"
            + ("" if result.meets_slo else " [red](SLO missed)[/]")
        )
        for note in result.notes:
            console.print(f"note: {note}")
        if result.alternatives:
            alt = Table(title="runner-up plans")
            for col in ("why not", "plan", "latency ms", "throughput/s", "cost ratio"):
                alt.add_column(col)
            for a in result.alternatives:
                ap = a.prediction
                alt.add_row(a.label, a.summary, f"{ap.latency_s * 1e3:.2f}",
                            f"{ap.throughput_rps:.2f}", f"{ap.cost / pred.cost:.2f}x")  # fmt: skip
            console.print(alt)
    exclusions = result.exclusions
    if exclusions:
        ex = Table(title="excluded")
        ex.add_column("kind")
        ex.add_column("name")
        ex.add_column("reason")
        for e in exclusions:
            ex.add_row(str(e.kind), e.name, e.reason)
        console.print(ex)
    if base:
        bt = Table(title="baselines (same cost model)")
        for col in ("baseline", "plan", "latency ms", "throughput/s", "Partita speed-up"):
            bt.add_column(col)
        for name, b in base.items():
            if isinstance(b, Plan):
                bp = b.prediction
                ratio = bp.cost / result.prediction.cost if isinstance(result, Plan) else math.nan
                bt.add_row(name, b.describe(), f"{bp.latency_s * 1e3:.2f}",
                           f"{bp.throughput_rps:.2f}", f"{ratio:.2f}x")  # fmt: skip
            else:
                bt.add_row(name, "unschedulable: " + b.reasons[0], "-", "-", "-")
        console.print(bt)


def _boundary_bytes(profile: ModelProfile, position: int) -> float:
    from partita.planner.cost import boundary_bytes
    from partita.planner.request import Compression

    return boundary_bytes(profile, position, Compression.NONE)


def register(app: typer.Typer) -> None:
    @app.command("plan", help=__doc__ + "\n\nThe --cluster file:\n\n" + (CLUSTER_FORMAT or ""))
    def plan_cmd(
        model: Annotated[str, typer.Argument(help="ONNX file, or a zoo model name")],
        cluster: Annotated[Path, typer.Option("--cluster", help="multi-document YAML")],
        objective: Annotated[str, typer.Option(help="latency | throughput | energy")] = "latency",
        data_source: Annotated[
            str | None, typer.Option(help="pool where requests enter (default: first edge pool)")
        ] = None,
        mode: Annotated[str, typer.Option(help="auto | none | vertical | horizontal")] = "auto",
        max_stages: int = 4,
        max_shards: int = 4,
        cut_compression: Annotated[str, typer.Option(help="none | fp16 | int8")] = "none",
        privacy: Annotated[str | None, typer.Option(help="tier raw input stays in")] = None,
        p95_ms: Annotated[float | None, typer.Option(help="latency SLO, ms")] = None,
        min_rps: Annotated[float | None, typer.Option(help="throughput SLO, requests/s")] = None,
        reference_gflops: Annotated[
            float, typer.Option(help="speed of speedFactor 1.0, GFLOP/s")
        ] = 20.0,
        show_baselines: Annotated[bool, typer.Option("--baselines")] = False,
        json_out: Annotated[bool, typer.Option("--json")] = False,
        plot: Annotated[Path | None, typer.Option(help="write a timeline PNG")] = None,
        input: Annotated[list[str] | None, typer.Option("--input", "-i", help="NAME=DIMS")] = None,
    ) -> None:
        from partita.model.errors import ModelError
        from partita.planner import (
            Compression,
            ModelRequest,
            Objective,
            Partitioning,
            PartitioningMode,
            Plan,
            PlannerError,
            Slo,
            Tier,
            baselines,
            plan_model,
        )
        from partita.planner.plan import result_to_dict

        try:
            snapshot = load_cluster(cluster, reference_gflops)
            source = data_source or next(
                (p.name for p in snapshot.pools if p.tier is Tier.EDGE), snapshot.pools[0].name
            )
            request = ModelRequest(
                name=Path(model).stem,
                data_source=source,
                objective=Objective(objective),
                partitioning=Partitioning(
                    PartitioningMode(mode), max_stages, max_shards, Compression(cut_compression)
                ),
                privacy=Tier(privacy) if privacy else None,
                slo=Slo(p95_ms / 1e3 if p95_ms else None, min_rps),
            )
            profile = load_profile(model, input or [])
            result = plan_model(profile, request, snapshot)
            base = baselines(profile, request, snapshot) if show_baselines else {}
        except (PlannerError, ModelError, ValueError) as exc:
            _fail(str(exc))
            return
        if plot is not None and isinstance(result, Plan):
            draw_timeline(result, plot)
        if json_out:
            out = result_to_dict(result)
            if base:
                out["baselines"] = {k: result_to_dict(v) for k, v in base.items()}
            typer.echo(json.dumps(out, allow_nan=False, default=str))
        else:
            _print(result, profile, base)
        if not isinstance(result, Plan):
            raise typer.Exit(1)
