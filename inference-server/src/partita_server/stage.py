"""Loading a stage: fetch the model, check its digest, cut out this stage or shard, cache it.

The cut piece is cached on disk under a key made of the model digest and the parts of the
spec that shape the piece, so a restarted pod (or a second replica on the node) starts
without re-slicing.

Sources are confined (`partita.api.sources`): file paths inside `$PARTITA_MODEL_STORE` when
set, ONNX external data inside the model's directory, http(s) through the server's
own fetch (`partita_server.fetch`: no metadata or link-local addresses, size-limited while
streaming).

Cut pieces are specialised to the profiled input shapes, batch 1 included. For batching,
`batched_piece` turns a piece's batch-1 leading dimension back into a free one and keeps the
result only if it computes, row for row, what the batch-1 piece computes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from partita.api import sources
from partita.model.errors import ModelError
from partita.model.load import load_model
from partita.model.shard import stage_layout
from partita.model.slice import extract_stage
from partita.model.types import ShardLayout, layout_from_json, layout_to_json
from partita.runtime import RunError, Session, TensorSpec, run_checked
from partita_server.errors import StageSpecError
from partita_server.fetch import download, from_operator
from partita_server.spec import ModelSource, OrtSizing, StageSpec

log = logging.getLogger("partita_server")
BATCH_DIM = "batch"

__all__ = [
    "LoadedStage",
    "batched_piece",
    "check_external_data",
    "fetch_model",
    "load_stage",
]


@dataclass(frozen=True)
class LoadedStage:
    """A ready-to-run stage: its session and, for a shard, the layout of the stage's shards
    and one session per segment of the layout (None where this shard has nothing to do);
    `session` is then the first segment's this shard runs."""

    path: Path
    session: Session
    layout: ShardLayout | None
    batchable: bool
    digest: str
    segments: tuple[Session | None, ...] = ()


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
        store = sources.model_store()
        if store is not None:
            try:
                path = sources.confined_path(path, store)
            except sources.SourceRefused as exc:
                raise StageSpecError(f"source.uri {source.uri}: {exc}") from exc
        if not path.is_file():
            raise StageSpecError(f"source.uri {source.uri}: no such file")
        digest = _sha256_file(path)
        if source.sha256 is not None and digest != source.sha256:
            raise StageSpecError(
                f"source.uri {source.uri}: sha256 is {digest}, the spec says {source.sha256}; "
                "fix source.sha256 or the model file"
            )
        return path
    assert source.sha256 is not None  # the spec requires it for remote sources
    path = cache_dir / "sources" / f"{source.sha256}.onnx"
    if path.is_file():
        return path
    if source.distributed:
        return from_operator(source.uri, source.sha256, path, timeout_s=timeout_s)
    return download(source.uri, source.sha256, path, timeout_s=timeout_s)


def check_external_data(path: Path) -> None:
    """Refuse a model whose external-data files lie outside its own directory."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a bad file
        raise StageSpecError(f"{path} is not an ONNX model: {exc}") from exc
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            try:
                sources.check_external_location(info.location, tensor.name, path.parent)
            except sources.SourceRefused as exc:
                raise StageSpecError(f"model {path}: {exc}") from exc


# Raised whenever what a cut writes changes (the layout file's fields), so that a newer
# server cuts again rather than reading pieces an older one left in the cache.
CUT_FORMAT = 2


def _piece_key(spec: StageSpec, digest: str) -> str:
    shaping = {
        "cut": CUT_FORMAT,
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
        raise StageSpecError(f"cannot load {source} for slicing: {exc}") from exc
    _save(model, path)
    return model


def _save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per process: several servers may share one cache directory and cut the
    # same piece at the same time; the rename makes whichever finishes last win whole.
    tmp = path.with_suffix(f".{os.getpid()}.part")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def _cut(spec: StageSpec, model: onnx.ModelProto, target: Path) -> None:
    """The stage's piece of the loaded model, saved at `target`."""
    if spec.inputs is not None and spec.outputs is not None:
        try:
            model = extract_stage(model, list(spec.inputs), list(spec.outputs))
        except ModelError as exc:
            raise StageSpecError(f"cannot cut stage {spec.stage}: {exc}") from exc
    _save(model, target)


def _segment_path(target: Path, segment: int) -> Path:
    return target.with_suffix(f".seg{segment}.onnx")


def _cut_shard(spec: StageSpec, model: onnx.ModelProto, target: Path) -> ShardLayout:
    """This shard's segment models of the stage's layout, saved beside `target`, and the
    layout written last (its file says the cut is complete)."""
    assert spec.shard is not None
    shard = spec.shard
    try:
        analysis, layout = stage_layout(
            model, spec.inputs, spec.outputs, list(shard.proportions), shard.strategy
        )
        pieces = analysis.build(layout, shard=shard.index)
    except ModelError as exc:
        raise StageSpecError(f"cannot shard stage {spec.stage}: {exc}") from exc
    mine = [per_shard[shard.index] for per_shard in pieces]
    if all(m is None for m in mine):
        raise StageSpecError(
            f"cannot shard stage {spec.stage}: shard {shard.index} would have nothing to do; "
            "use fewer shards"
        )
    for j, piece in enumerate(mine):
        if piece is not None:
            _save(piece, _segment_path(target, j))
    done = _layout_path(target)
    tmp = done.with_suffix(f".{os.getpid()}.part")
    tmp.write_text(json.dumps(layout_to_json(layout)))
    os.replace(tmp, done)
    return layout


def _layout_path(target: Path) -> Path:
    return target.with_suffix(".layout.json")


def _free_batch(shape: tuple[int | str | None, ...]) -> bool:
    return bool(shape) and not isinstance(shape[0], int)


def batched_piece(piece: onnx.ModelProto) -> onnx.ModelProto | None:
    """`piece` with its batch-1 leading dimension free again, or None when it has none.

    Graph inputs and outputs get a symbolic leading dim; Reshape targets that fixed the
    batch at 1 get -1 there. Other ops that bake the batch in are caught by the caller's
    row-for-row check, not here.
    """
    model = copy.deepcopy(piece)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    for value in (*[i for i in graph.input if i.name not in inits], *graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].dim_value != 1:
            return None
        dims[0].dim_param = BATCH_DIM
    shapes = {v.name: v for v in (*graph.value_info, *graph.output)}
    constants = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        target = numpy_helper.to_array(constants[node.input[1]]).astype(np.int64)
        if target.ndim != 1 or not target.size or target[0] != 1:
            continue
        target = target.copy()
        if -1 in target[1:]:
            known = shapes.get(node.output[0])
            dims = known.type.tensor_type.shape.dim if known is not None else []
            if len(dims) != target.size or not all(d.dim_value > 0 for d in dims[1:]):
                return None
            target[1:] = [d.dim_value for d in dims[1:]]
        target[0] = -1
        name = f"{node.input[1]}__batched_{len(graph.initializer)}"
        graph.initializer.append(numpy_helper.from_array(target, name))
        node.input[1] = name
    del graph.value_info[:]
    return model


def _seeded(spec: TensorSpec, rows: int, rng: np.random.Generator) -> np.ndarray:
    dims = [rows, *(d if isinstance(d, int) else 1 for d in spec.shape[1:])]
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return rng.standard_normal(dims).astype(dtype)
    if dtype.kind == "b":
        return rng.random(dims) < 0.5
    return rng.integers(0, 2, dims).astype(dtype)


def _same_rows(single: Session, batched: Session) -> str | None:
    """None when `batched` on 3 seeded rows equals `single` row by row, else why not."""
    rng = np.random.default_rng(0)
    feeds = {t.name: _seeded(t, 3, rng) for t in single.inputs}
    try:
        merged = run_checked(batched, feeds)
        for row in range(3):
            one = run_checked(single, {n: a[row : row + 1] for n, a in feeds.items()})
            for name, value in one.items():
                np.testing.assert_allclose(merged[name][row : row + 1], value, rtol=1e-4, atol=1e-4)
    except (RunError, AssertionError, KeyError, IndexError, ValueError) as exc:
        return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return None


def _batchable_session(
    spec: StageSpec, path: Path, session: Session, sizing: OrtSizing
) -> tuple[Session, bool]:
    """The session to serve with and whether it batches: the piece itself when its batch
    dimension is free, else its `batched_piece` if that passes the row-for-row check."""
    if all(_free_batch(t.shape) for t in (*session.inputs, *session.outputs)):
        return session, True
    if spec.batching is None:
        return session, False
    target = path.with_suffix(".batched.onnx")
    refusal = path.with_suffix(".nobatch.txt")
    if refusal.is_file():
        reason = refusal.read_text()
    else:
        reason = "its inputs or outputs have no batch-1 leading dimension"
        if not target.is_file():
            rebuilt = batched_piece(onnx.load(str(path)))
            if rebuilt is not None:
                _save(rebuilt, target)
        if target.is_file():
            batched = _session(target, sizing)
            why = _same_rows(session, batched)
            if why is None:
                return batched, True
            reason = f"with a free batch dimension it computes other values ({why})"
            target.unlink(missing_ok=True)
        refusal.write_text(reason)
    raise StageSpecError(
        f"batching is set but stage {spec.stage} cannot batch: {reason}; remove spec.batching"
    )


def _session(path: Path, sizing: OrtSizing) -> Session:
    try:
        return Session(
            path,
            intra_op_threads=sizing.intra_op_threads,
            allow_spinning=sizing.allow_spinning,
        )
    except Exception as exc:  # ORT's load errors are not importable here
        raise StageSpecError(f"onnxruntime cannot load {path}: {exc}") from exc


def load_stage(spec: StageSpec, *, sizing: OrtSizing) -> LoadedStage:
    """Fetch, check, cut (or reuse the cached piece) and open an ORT session on it."""
    if spec.source is None:
        raise StageSpecError(f"stage {spec.stage}: no source, no model to load (a router?)")
    cache_dir = spec.cache_dir.expanduser()
    source = fetch_model(spec.source, cache_dir)
    check_external_data(source)
    digest = spec.source.sha256 or _sha256_file(source)
    if spec.shard is not None:
        return _load_shard(spec, source, cache_dir, digest, sizing)
    whole = spec.inputs is None
    if whole:
        path = source
    else:
        path = cache_dir / "pieces" / f"{digest[:16]}-{_piece_key(spec, digest)}.onnx"
        if not path.is_file():
            _cut(spec, _loaded(spec, source, cache_dir, digest), path)
    session = _session(path, sizing)
    if whole:
        batchable = all(_free_batch(t.shape) for t in (*session.inputs, *session.outputs))
        if spec.batching is not None and not batchable:
            raise StageSpecError(
                f"batching is set but stage {spec.stage} has no free batch dimension on every "
                "input and output; remove spec.batching"
            )
    else:
        session, batchable = _batchable_session(spec, path, session, sizing)
    return LoadedStage(path, session, None, batchable, digest)


def _load_shard(
    spec: StageSpec, source: Path, cache_dir: Path, digest: str, sizing: OrtSizing
) -> LoadedStage:
    """A shard: the stage's layout and a session on each segment model this shard runs."""
    assert spec.shard is not None
    target = cache_dir / "pieces" / f"{digest[:16]}-{_piece_key(spec, digest)}.onnx"
    if _layout_path(target).is_file():
        layout = layout_from_json(json.loads(_layout_path(target).read_text()))
    else:
        layout = _cut_shard(spec, _loaded(spec, source, cache_dir, digest), target)
    sessions: list[Session | None] = []
    batchable = True
    for j, segment in enumerate(layout.segments):
        if not segment.active[spec.shard.index]:
            sessions.append(None)
            continue
        path = _segment_path(target, j)
        session, ok = _batchable_session(spec, path, _session(path, sizing), sizing)
        sessions.append(session)
        batchable = batchable and ok
    first = next(s for s in sessions if s is not None)
    return LoadedStage(target, first, layout, batchable, digest, tuple(sessions))
