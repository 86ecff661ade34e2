"""Loading a stage: fetch the model, check its digest, cut out this stage or shard, cache it.

The cut piece is cached on disk under a key made of the model digest and the parts of the
spec that shape the piece, so a restarted pod (or a second replica on the node) starts
without re-slicing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import onnx

from partita.model.errors import ModelError
from partita.model.load import load_model
from partita.model.shard import shard_stage
from partita.model.slice import extract_stage
from partita.model.types import GatherMode, GatherSpec, ShardLayout
from partita.runtime import Session
from partita_server.errors import StageSpecError
from partita_server.spec import ModelSource, StageSpec

__all__ = ["LoadedStage", "fetch_model", "layout_from_json", "layout_to_json", "load_stage"]


@dataclass(frozen=True)
class LoadedStage:
    """A ready-to-run stage: its session and, for a shard, how the shards' parts gather."""

    path: Path
    session: Session
    layout: ShardLayout | None
    batchable: bool
    digest: str


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_model(source: ModelSource, cache_dir: Path, *, timeout_s: float = 300.0) -> Path:
    """A local path to the model bytes, downloaded into the cache when remote, digest checked."""
    url = urlparse(source.uri)
    if url.scheme in ("", "file"):
        path = Path(unquote(url.path))
        if not path.is_file():
            raise StageSpecError(f"source.uri {source.uri}: no such file")
    else:
        assert source.sha256 is not None  # the spec requires it for remote sources
        path = cache_dir / "sources" / f"{source.sha256}.onnx"
        if not path.is_file():
            _download(source.uri, path, timeout_s)
    digest = _sha256_file(path)
    if source.sha256 is not None and digest != source.sha256:
        if url.scheme not in ("", "file"):
            path.unlink(missing_ok=True)
        raise StageSpecError(
            f"source.uri {source.uri}: sha256 is {digest}, the spec says {source.sha256}; "
            "fix source.sha256 or the model file"
        )
    return path


def _download(uri: str, path: Path, timeout_s: float) -> None:
    import httpx

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".part") as tmp:
        try:
            with httpx.stream("GET", uri, timeout=timeout_s, follow_redirects=True) as reply:
                if reply.status_code != 200:
                    raise StageSpecError(f"source.uri {uri}: HTTP {reply.status_code}")
                for chunk in reply.iter_bytes(1 << 20):
                    tmp.write(chunk)
        except httpx.HTTPError as exc:
            Path(tmp.name).unlink(missing_ok=True)
            raise StageSpecError(f"source.uri {uri}: download failed ({exc})") from exc
        except BaseException:
            Path(tmp.name).unlink(missing_ok=True)
            raise
    os.replace(tmp.name, path)


def layout_to_json(layout: ShardLayout) -> dict[str, object]:
    return {
        "proportions": list(layout.proportions),
        "strategy": layout.strategy,
        "gathers": [
            {"output": g.output, "mode": g.mode.value, "axis": g.axis, "shard": g.shard}
            for g in layout.gathers
        ],
    }


def layout_from_json(raw: object) -> ShardLayout:
    """Rebuild a layout sent by a shard server; raises ValueError/KeyError/TypeError if bad."""
    if not isinstance(raw, dict):
        raise TypeError("layout must be an object")
    return ShardLayout(
        proportions=tuple(float(p) for p in raw["proportions"]),
        strategy=str(raw["strategy"]),
        gathers=tuple(
            GatherSpec(str(g["output"]), GatherMode(g["mode"]), int(g["axis"]), int(g["shard"]))
            for g in raw["gathers"]
        ),
    )


def _piece_key(spec: StageSpec, digest: str) -> str:
    shaping = {
        "digest": digest,
        "input_shapes": {k: list(v) for k, v in sorted(spec.input_shapes.items())},
        "inputs": spec.inputs,
        "outputs": spec.outputs,
        "shard": spec.shard.model_dump(mode="json") if spec.shard else None,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:24]


def _loaded(spec: StageSpec, source: Path, cache_dir: Path, digest: str) -> onnx.ModelProto:
    """The model specialised to the spec's input shapes, as the planner profiled it.

    Cut names refer to this loaded model (folding drops shape-only nodes), so the server
    loads the way `partita.model` does; the result is cached for the other stages.
    """
    shapes = {k: list(v) for k, v in sorted(spec.input_shapes.items())}
    key = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    path = cache_dir / "loaded" / f"{digest[:16]}-{key}.onnx"
    if path.is_file():
        return onnx.load(str(path))
    try:
        model = load_model(source, spec.input_shapes or None)
    except ModelError as exc:
        raise StageSpecError(f"cannot load {spec.source.uri} for slicing: {exc}") from exc
    _save(model, path)
    return model


def _save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per process: several servers may share one cache directory and cut the
    # same piece at the same time; the rename makes whichever finishes last win whole.
    tmp = path.with_suffix(f".{os.getpid()}.part")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def _cut(spec: StageSpec, model: onnx.ModelProto, target: Path) -> ShardLayout | None:
    if spec.inputs is not None and spec.outputs is not None:
        try:
            model = extract_stage(model, list(spec.inputs), list(spec.outputs))
        except ModelError as exc:
            raise StageSpecError(f"cannot cut stage {spec.stage}: {exc}") from exc
    layout = None
    if spec.shard is not None:
        try:
            parts, layout = shard_stage(model, list(spec.shard.proportions))
        except ModelError as exc:
            raise StageSpecError(f"cannot shard stage {spec.stage}: {exc}") from exc
        model = parts[spec.shard.index]
    _save(model, target)
    if layout is not None:
        target.with_suffix(".layout.json").write_text(json.dumps(layout_to_json(layout)))
    return layout


def load_stage(spec: StageSpec, *, intra_op_threads: int) -> LoadedStage:
    """Fetch, check, cut (or reuse the cached piece) and open an ORT session on it."""
    cache_dir = spec.cache_dir.expanduser()
    source = fetch_model(spec.source, cache_dir)
    digest = spec.source.sha256 or _sha256_file(source)
    whole = spec.inputs is None and spec.shard is None
    layout: ShardLayout | None = None
    if whole:
        path = source
    else:
        path = cache_dir / "pieces" / f"{digest[:16]}-{_piece_key(spec, digest)}.onnx"
        if path.is_file():
            sidecar = path.with_suffix(".layout.json")
            layout = layout_from_json(json.loads(sidecar.read_text())) if sidecar.exists() else None
        else:
            layout = _cut(spec, _loaded(spec, source, cache_dir, digest), path)
    try:
        session = Session(path, intra_op_threads=intra_op_threads)
    except Exception as exc:  # ORT's load errors are not importable here
        raise StageSpecError(f"onnxruntime cannot load {path}: {exc}") from exc
    batchable = all(
        t.shape and not isinstance(t.shape[0], int) for t in (*session.inputs, *session.outputs)
    )
    if spec.batching is not None and not batchable:
        raise StageSpecError(
            f"batching is set but stage {spec.stage} has no symbolic batch dimension on every "
            "input and output; remove spec.batching"
        )
    return LoadedStage(path, session, layout, batchable, digest)
