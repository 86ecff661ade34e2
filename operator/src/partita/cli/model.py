"""`partita profile | split | verify`: look at a model, cut it, and prove the pieces."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from partita.model.verify import ShardRequest

Inputs = Annotated[
    list[str] | None, typer.Option("--input", "-i", help="NAME=DIMS, e.g. x=1x3x224x224")
]
Json = Annotated[bool, typer.Option("--json", help="machine-readable output")]
Strategy = Annotated[
    str | None, typer.Option(help="tile, width or branch (default: the cheapest per stage)")
]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _shards(
    spec: str | None, stages: int, strategy: str | None = None, required: bool = True
) -> dict[int, ShardRequest]:
    """`K` or `K:r1,r2..` applied to every stage."""
    from partita.model.verify import ShardRequest

    if not spec:
        return {}
    count, _, ratios = spec.partition(":")
    try:
        k = int(count)
        props = [float(r) for r in ratios.split(",")] if ratios else [1.0] * k
    except ValueError:
        _fail(f"--shards {spec!r} is not K or K:r1,r2,...")
        raise
    if len(props) != k or k < 2:
        _fail(f"--shards {spec!r}: need K >= 2 and K ratios")
    return {i: ShardRequest(tuple(props), strategy, required) for i in range(stages)}


def _plan_shards(raw: object) -> dict[int, ShardRequest]:
    """`--plan`'s "shards": {"STAGE": [r1, r2, ...] or {"proportions": [...], "strategy": S}}."""
    from partita.model.verify import ShardRequest

    if not isinstance(raw, dict):
        _fail('--plan: "shards" must map stage indexes to proportions')
        return {}
    out: dict[int, ShardRequest] = {}
    for key, value in raw.items():
        entry = value if isinstance(value, dict) else {"proportions": value}
        try:
            props = tuple(float(p) for p in entry["proportions"])
            out[int(key)] = ShardRequest(props, entry.get("strategy"))
        except (KeyError, TypeError, ValueError):
            _fail(
                f'--plan: shards["{key}"] is not a list of proportions or {{"proportions": [...]}}'
            )
    return out


def register(app: typer.Typer) -> None:
    @app.command("profile")
    def profile_cmd(model: Path, input: Inputs = None, json_out: Json = False) -> None:
        """Ops, FLOPs, parameter bytes and the useful cut points of MODEL."""
        from rich.console import Console
        from rich.table import Table

        from partita.model.errors import ModelError
        from partita.model.load import parse_input_shapes
        from partita.model.profile import profile_model, profile_to_dict

        try:
            prof = profile_model(model, parse_input_shapes(input or []))
        except ModelError as exc:
            _fail(str(exc))
            return
        if json_out:
            typer.echo(json.dumps(profile_to_dict(prof)))
            return
        console = Console()
        by_op: dict[str, list[int]] = {}
        for n in prof.nodes:
            row = by_op.setdefault(n.op_type, [0, 0, 0])
            row[0] += 1
            row[1] += n.flops
            row[2] += n.param_bytes
        ops = Table(
            title=f"{model.name}: {prof.total_flops / 1e9:.3f} GFLOPs, "
            f"{prof.param_bytes / 1e6:.2f} MB parameters, {len(prof.nodes)} nodes"
        )
        for col in ("op", "count", "MFLOPs", "param MB"):
            ops.add_column(col, justify="right" if col != "op" else "left")
        for op, (count, flops, params) in sorted(by_op.items(), key=lambda kv: -kv[1][1]):
            ops.add_row(op, str(count), f"{flops / 1e6:.1f}", f"{params / 1e6:.2f}")
        console.print(ops)
        cuts = Table(title=f"cut points (input {prof.input_bytes} B)")
        for col in ("position", "tensors", "bytes", "x input", "FLOPs before"):
            cuts.add_column(col, justify="right" if col != "tensors" else "left")
        for c in prof.cut_points:
            names = ", ".join(t.name for t in c.tensors[:3]) + ("…" if len(c.tensors) > 3 else "")
            cuts.add_row(
                str(c.position),
                names,
                str(c.nbytes),
                f"{c.nbytes / max(prof.input_bytes, 1):.2f}",
                f"{c.flops_before / max(prof.total_flops, 1):.1%}",
            )
        console.print(cuts)
        if prof.shard_tables:
            shards = Table(title="the whole model in equal shards (busiest shard's share)")
            for col in ("shards", "strategy", "FLOPs", "params", "exchanges"):
                shards.add_column(col, justify="right" if col != "strategy" else "left")
            for t in prof.shard_tables:
                last = len(t.positions) - 1
                flops = t.flops(0, last).max() / max(prof.total_flops, 1)
                params = (t.param_bytes[last] - t.param_bytes[0]).max() / max(prof.param_bytes, 1)
                count = int(t.points_before[last] - t.points_upto[0])
                shards.add_row(
                    str(t.shards), t.strategy, f"{flops:.0%}", f"{params:.0%}", str(count)
                )
            console.print(shards)
        for note in prof.notes:
            console.print(f"note: {note}")

    @app.command("split")
    def split_cmd(
        model: Path,
        cuts: Annotated[str, typer.Option(help="tensor names or node positions, comma separated")],
        out: Annotated[Path, typer.Option(help="directory for the pieces")],
        input: Inputs = None,
        shards: Annotated[str | None, typer.Option(help="K or K:r1,r2,...")] = None,
        strategy: Strategy = None,
        json_out: Json = False,
    ) -> None:
        """Write the stages (and each sharded stage's segment models) of MODEL cut at CUTS,
        with a manifest holding every layout."""
        from partita.model.errors import ModelError
        from partita.model.load import load_model_with_report, parse_input_shapes
        from partita.model.profile import profile_loaded
        from partita.model.verify import build_pieces, describe, resolve_cuts

        try:
            loaded = load_model_with_report(model, parse_input_shapes(input or []))
            prof = profile_loaded(loaded.model, loaded.digest)
            positions = resolve_cuts(loaded.model, cuts.split(","))
            pieces = build_pieces(
                loaded.model, positions, prof, _shards(shards, len(positions) + 1, strategy)
            )
        except ModelError as exc:
            _fail(str(exc))
            return
        out.mkdir(parents=True, exist_ok=True)
        manifest: dict[str, object] = {"model": str(model), "cuts": positions, "stages": []}
        refused = []
        for i, piece in enumerate(pieces):
            entry: dict[str, object] = {
                "file": f"stage{i}.onnx",
                "nodes": [piece.start, piece.end],
                "inputs": [x.name for x in piece.stage.graph.input],
                "outputs": [x.name for x in piece.stage.graph.output],
            }
            (out / f"stage{i}.onnx").write_bytes(piece.stage.SerializeToString())
            if piece.layout is not None:
                files = []
                for j, per in enumerate(piece.segments):
                    names: list[str | None] = []
                    for s, shard in enumerate(per):
                        if shard is None:
                            names.append(None)
                            continue
                        name = f"stage{i}_seg{j}_shard{s}.onnx"
                        (out / name).write_bytes(shard.SerializeToString())
                        names.append(name)
                    files.append(names)
                entry["segments"] = files
                entry["layout"] = asdict(piece.layout)
            elif piece.refusal:
                entry["refusal"] = piece.refusal
                refused.append(describe(piece, i))
            manifest["stages"].append(entry)  # type: ignore[attr-defined]
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        typer.echo(json.dumps(manifest) if json_out else f"wrote {len(pieces)} stage(s) to {out}")
        for line in refused:
            typer.echo(f"error: {line}", err=True)
        if refused:
            raise typer.Exit(1)

    @app.command("verify")
    def verify_cmd(
        model: Path,
        input: Inputs = None,
        cuts: Annotated[str | None, typer.Option(help="tensor names or positions")] = None,
        plan: Annotated[
            Path | None,
            typer.Option(
                help='JSON {"cuts": [...], "shards": {"0": [r1, r2]} or '
                '{"0": {"proportions": [r1, r2], "strategy": "tile"}}}'
            ),
        ] = None,
        auto: Annotated[
            bool, typer.Option("--auto", help="pick cuts; shard the stages that can be")
        ] = False,
        shards: Annotated[str | None, typer.Option(help="K or K:r1,r2,...")] = None,
        strategy: Strategy = None,
        tolerance: float = 1e-4,
        seed: int = 0,
        inputs: Annotated[
            Path | None,
            typer.Option(
                "--inputs", help="an .npz of the model's inputs (default: seeded random values)"
            ),
        ] = None,
        json_out: Json = False,
    ) -> None:
        """Run MODEL whole and in pieces on seeded (or given) inputs; exit 1 over tolerance
        or when a stage asked to be sharded cannot be."""
        import numpy as np

        from partita.model.errors import ModelError
        from partita.model.load import load_model_with_report, parse_input_shapes, read_model
        from partita.model.profile import profile_loaded
        from partita.model.verify import auto_cuts, resolve_cuts, verify

        if sum(x is not None and x is not False for x in (cuts, plan, auto or None)) != 1:
            _fail("give exactly one of --cuts, --plan, --auto")
        try:
            loaded = load_model_with_report(model, parse_input_shapes(input or []))
            prof = profile_loaded(loaded.model, loaded.digest)
            if plan is not None:
                try:
                    spec = json.loads(plan.read_text())
                except (OSError, ValueError) as exc:
                    _fail(f"--plan {plan}: {exc}")
                    return
                positions = resolve_cuts(loaded.model, spec.get("cuts", []))
                shard_map = _plan_shards(spec.get("shards", {}))
            else:
                positions = (
                    auto_cuts(prof) if auto else resolve_cuts(loaded.model, (cuts or "").split(","))
                )
                shard_map = _shards(
                    shards or ("2" if auto else None), len(positions) + 1, strategy, not auto
                )
            feeds = None
            if inputs is not None:
                try:
                    with np.load(inputs) as stored:
                        feeds = {name: stored[name] for name in stored.files}
                except (OSError, ValueError) as exc:
                    _fail(f"--inputs {inputs}: {exc}")
            report = verify(
                loaded.model,
                prof,
                positions,
                shard_map,
                seed=seed,
                tolerance=tolerance,
                reference=read_model(model),
                feeds=feeds,
            )
        except ModelError as exc:
            _fail(str(exc))
            return
        if json_out:
            typer.echo(json.dumps({**asdict(report), "ok": report.ok}))
        else:
            for line in report.stages:
                typer.echo(line)
            for name, diff in report.max_abs.items():
                typer.echo(f"{name}: max |diff| {diff:.3g}")
            verdict = "OK" if report.ok else "FAIL"
            typer.echo(
                f"{verdict}: relative deviation {report.max_rel:.3g} (tolerance {tolerance:g})"
                + (
                    f"; {len(report.refusals)} stage(s) cannot be sharded"
                    if report.refusals
                    else ""
                )
            )
        if not report.ok:
            raise typer.Exit(1)
