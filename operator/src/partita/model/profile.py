"""Profile a model: per-node cost, activation bytes, the useful frontier of cut points, and
the sharded figures of the ranges between them.

Profiles are deterministic functions of (model bytes, input shapes), so they are cached
by that key in memory and, when asked, on disk: the profile as JSON, its shard tables as
numpy arrays next to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from partita.model.cost import is_shardable, node_flops, op_class, trip_count
from partita.model.errors import ModelError
from partita.model.graph import CONTROL_FLOW_OPS, GraphView, live_bytes, node_inputs, subgraphs
from partita.model.load import ModelSource, load_model_with_report, model_digest
from partita.model.types import CutPoint, ModelProfile, NodeCost, OpClass, ShardTable, TensorInfo

CACHE_SIZE = 32
# Shard counts whose tables `profile_model` adds (the planner proposes no other).
SHARD_COUNTS = (2, 3, 4)
TABLE_STRATEGIES = ("tile", "width")
# Bumped when the analysis changes what a cached profile holds.
ANALYSIS_VERSION = 8
# Two cuts whose compute-before differs by less than this share of the total are
# interchangeable for placement: only the one with fewer bytes crossing is kept.
FRONTIER_TOLERANCE = 0.002

_cache: OrderedDict[str, ModelProfile] = OrderedDict()
_cache_lock = threading.Lock()
_key_locks: dict[str, threading.Lock] = {}  # the keys being profiled now


def cache_key(
    digest: str,
    input_shapes: Mapping[str, Sequence[int]] | None,
    shard_counts: Sequence[int] = SHARD_COUNTS,
) -> str:
    shapes = sorted((k, [int(d) for d in v]) for k, v in (input_shapes or {}).items())
    identity = [digest, shapes, sorted(shard_counts), ANALYSIS_VERSION]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def profile_model(
    source: ModelSource,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    cache_dir: Path | None = None,
    shard_counts: Sequence[int] = SHARD_COUNTS,
) -> ModelProfile:
    """The profile of `source` at `input_shapes` with the shard tables of `shard_counts`,
    from cache when already computed."""
    key = cache_key(model_digest(source), input_shapes, shard_counts)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
        key_lock = _key_locks.setdefault(key, threading.Lock())
    # One profiling per key at a time: EdgeModels of one file profiled at once wait for the
    # first instead of analysing it again and writing the same cache files.
    with key_lock:
        try:
            return _profile_once(source, input_shapes, key, cache_dir, shard_counts)
        finally:
            with _cache_lock:
                _key_locks.pop(key, None)


def _profile_once(
    source: ModelSource,
    input_shapes: Mapping[str, Sequence[int]] | None,
    key: str,
    cache_dir: Path | None,
    shard_counts: Sequence[int],
) -> ModelProfile:
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            return hit
    disk = cache_dir / f"{key}.json" if cache_dir is not None else None
    arrays = disk.with_suffix(".npz") if disk is not None else None
    if disk is not None and arrays is not None and disk.is_file() and arrays.is_file():
        profile = profile_from_dict(json.loads(disk.read_text()))
        with np.load(arrays) as stored:
            profile = dataclasses.replace(profile, shard_tables=tables_from_arrays(stored))
    else:
        loaded = load_model_with_report(source, input_shapes)
        profile = profile_loaded(loaded.model, loaded.digest, loaded.report_items())
        profile = with_shard_tables(profile, loaded.model, shard_counts)
        if disk is not None and arrays is not None:
            disk.parent.mkdir(parents=True, exist_ok=True)
            # Names of this process alone: another operator may write the same cache.
            tmp = disk.with_name(f".{key}.{os.getpid()}.tmp.npz")
            np.savez(tmp, **tables_to_arrays(profile.shard_tables))  # type: ignore[arg-type]
            tmp.replace(arrays)
            tmp = disk.with_name(f".{key}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(profile_to_dict(profile)))
            tmp.replace(disk)
    with _cache_lock:
        _cache[key] = profile
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return profile


def with_shard_tables(
    profile: ModelProfile, model: onnx.ModelProto, shard_counts: Sequence[int] = SHARD_COUNTS
) -> ModelProfile:
    """`profile` with the shard tables of `model` (the model it was made from)."""
    from partita.model.shard import ShardAnalysis

    n = len(profile.nodes)
    positions = sorted({0, *(c.position for c in profile.cut_points if 0 < c.position < n), n})
    analysis = ShardAnalysis(model)
    tables = []
    for k in shard_counts:
        for strategy in TABLE_STRATEGIES:
            try:
                tables.append(analysis.table(k, strategy, positions))
            except ModelError:
                continue  # nothing of the model splits this way: no table, never proposed
    return dataclasses.replace(profile, shard_tables=tuple(tables))


def tables_to_arrays(tables: Sequence[ShardTable]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for t in tables:
        for name in ShardTable.FIELDS:
            out[f"{t.strategy}.{t.shards}.{name}"] = getattr(t, name)
    return out


def tables_from_arrays(stored: Mapping[str, np.ndarray]) -> tuple[ShardTable, ...]:
    keys = sorted({tuple(k.split(".")[:2]) for k in stored})
    return tuple(
        ShardTable(
            shards=int(k),
            strategy=strategy,
            **{name: np.asarray(stored[f"{strategy}.{k}.{name}"]) for name in ShardTable.FIELDS},
        )
        for strategy, k in keys
    )


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def profile_loaded(
    model: onnx.ModelProto,
    digest: str = "",
    shape_coverage: tuple[tuple[str, int], ...] = (),
) -> ModelProfile:
    """Profile a model already returned by `load_model` (every shape static)."""
    view = GraphView.of(model)
    nodes_proto = list(model.graph.node)
    n = len(nodes_proto)
    shape_map = _shape_map(view)
    notes: list[str] = []
    costs: list[tuple[int, int]] = []
    param_bytes: list[int] = []
    seen_params: set[str] = set()
    for node in nodes_proto:
        costs.append(node_flops(node, shape_map, view.initializers))
        if node.op_type in CONTROL_FLOW_OPS or any(True for _ in subgraphs(node)):
            trip = trip_count(node, view.initializers)
            inner = sum(len(g.node) for g in subgraphs(node))
            notes.append(
                f"node {node.name or node.output[0]!r} ({node.op_type}) holds a subgraph of "
                f"{inner} nodes: it is kept whole in one stage, never cut into or sharded"
                + ("" if node.op_type != "Loop" or trip else "; trip count unknown, costed once")
            )
        pb = 0
        for name in node_inputs(node):
            if name in view.initializers and name not in seen_params:
                seen_params.add(name)
                pb += view.nbytes(name)
        param_bytes.append(pb)

    sizes = {name: view.nbytes(name) for name in _sized(view, nodes_proto)}
    live = live_bytes(nodes_proto, sizes, view.input_names, view.output_names, view.initializers)
    born: dict[str, int] = {name: -1 for name in view.input_names}
    for i, node in enumerate(nodes_proto):
        for o in node.output:
            if o:
                born[o] = i
    last_use: dict[str, int] = {}
    for name, users in view.consumers.items():
        if name not in view.initializers:
            last_use[name] = max(users)
    for name in view.output_names:
        last_use[name] = n

    node_costs = tuple(
        NodeCost(
            index=i,
            name=node.name or node.output[0],
            op_type=node.op_type,
            op_class=op_class(node.op_type)
            if node.op_type not in CONTROL_FLOW_OPS
            else OpClass.OTHER,
            flops=int(costs[i][0]),
            param_bytes=int(param_bytes[i]),
            output_bytes=sum(view.nbytes(o) for o in node.output if o),
            live_bytes=int(live[i]),
            shardable=is_shardable(node, view.is_constant),
            macs=int(costs[i][1]),
        )
        for i, node in enumerate(nodes_proto)
    )
    cuts = _cut_points(view, node_costs, born, last_use)
    inputs = tuple(view.info(name) for name in view.input_names)
    outputs = tuple(view.info(name) for name in view.output_names)
    return ModelProfile(
        digest=digest,
        inputs=inputs,
        outputs=outputs,
        nodes=node_costs,
        cut_points=cuts,
        total_flops=sum(c.flops for c in node_costs),
        param_bytes=sum(c.param_bytes for c in node_costs),
        notes=tuple(notes),
        shape_coverage=shape_coverage,
    )


def _shape_map(view: GraphView) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name in [*view.values, *view.initializers]:
        try:
            out[name] = view.shape(name)
        except Exception:
            continue
    return out


def _sized(view: GraphView, nodes: Sequence[onnx.NodeProto]) -> list[str]:
    names = list(view.input_names)
    for node in nodes:
        names.extend(o for o in node.output if o)
    return names


def all_boundaries(
    view: GraphView, born: Mapping[str, int], last_use: Mapping[str, int]
) -> list[list[str]]:
    """Crossing tensors at every boundary 0..n, by a sweep over lifetimes."""
    n = len(view.model.graph.node)
    start: list[list[str]] = [[] for _ in range(n + 1)]
    stop: list[list[str]] = [[] for _ in range(n + 2)]
    for name, b in born.items():
        end = last_use.get(name)
        if end is None or end <= b:
            continue
        start[b + 1].append(name)  # crosses boundaries b+1 .. end
        stop[end + 1].append(name)
    active: dict[str, None] = {}
    result: list[list[str]] = []
    for p in range(n + 1):
        for name in stop[p]:
            active.pop(name, None)
        for name in start[p]:
            active[name] = None
        result.append(list(active))
    return result


def _cut_points(
    view: GraphView,
    nodes: tuple[NodeCost, ...],
    born: Mapping[str, int],
    last_use: Mapping[str, int],
) -> tuple[CutPoint, ...]:
    n = len(nodes)
    crossing = all_boundaries(view, born, last_use)
    flops_before = np.concatenate([[0], np.cumsum([c.flops for c in nodes], dtype=np.int64)])
    params_before = np.concatenate([[0], np.cumsum([c.param_bytes for c in nodes], dtype=np.int64)])
    nbytes = [sum(view.nbytes(t) for t in crossing[p]) for p in range(n + 1)]
    total = int(flops_before[-1]) or 1
    tol = FRONTIER_TOLERANCE * total
    # Bin the compute axis; in each bin the cut with the fewest bytes (earliest on ties)
    # represents all others: they cost more bytes and save no compute worth having.
    best: dict[int, int] = {}
    for p in range(1, n):
        key = int(flops_before[p] // tol) if tol > 0 else p
        q = best.get(key)
        if q is None or nbytes[p] < nbytes[q]:
            best[key] = p
    keep = sorted(best.values())
    return tuple(
        CutPoint(
            position=p,
            tensors=tuple(view.info(t) for t in crossing[p]),
            nbytes=nbytes[p],
            flops_before=int(flops_before[p]),
            param_bytes_before=int(params_before[p]),
        )
        for p in keep
    )


def peak_live_bytes(profile: ModelProfile, start: int, end: int) -> int:
    """Peak activation memory while nodes[start:end] run (0 for an empty range)."""
    return max((c.live_bytes for c in profile.nodes[start:end]), default=0)


def profile_to_dict(profile: ModelProfile) -> dict[str, Any]:
    """The profile as JSON-able values (the shard tables are arrays, stored apart)."""
    data = dataclasses.asdict(dataclasses.replace(profile, shard_tables=()))
    del data["shard_tables"]
    return data


def profile_from_dict(data: Mapping[str, Any]) -> ModelProfile:
    def tensor(d: Mapping[str, Any]) -> TensorInfo:
        return TensorInfo(d["name"], d["dtype"], tuple(d["shape"]), d["nbytes"])

    return ModelProfile(
        digest=data["digest"],
        inputs=tuple(tensor(t) for t in data["inputs"]),
        outputs=tuple(tensor(t) for t in data["outputs"]),
        nodes=tuple(NodeCost(**{**c, "op_class": OpClass(c["op_class"])}) for c in data["nodes"]),
        cut_points=tuple(
            CutPoint(
                position=c["position"],
                tensors=tuple(tensor(t) for t in c["tensors"]),
                nbytes=c["nbytes"],
                flops_before=c["flops_before"],
                param_bytes_before=c["param_bytes_before"],
            )
            for c in data["cut_points"]
        ),
        total_flops=data["total_flops"],
        param_bytes=data["param_bytes"],
        notes=tuple(data.get("notes", ())),
        shape_coverage=tuple((k, v) for k, v in data.get("shape_coverage", ())),
    )
