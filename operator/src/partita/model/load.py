"""Load an ONNX model and specialise it to concrete input shapes.

The planner needs the size of every tensor, so loading does three things in turn and
counts how many tensors each one resolved (see `ShapeReport`):

1. onnx shape inference with data propagation, after the declared input shapes are
   written into the graph;
2. constant folding: nodes whose inputs are all constants, and `Shape`/`Size` of
   tensors whose shape is now known, are evaluated with the onnx reference evaluator
   and replaced by initializers (Constant nodes too), then inference runs again. With
   fixed input shapes this is exact, and it turns the `Shape -> Gather -> Concat ->
   Reshape` chains exporters emit into constants, so cuts never carry shape tensors;
3. one onnxruntime pass (through `partita.runtime`) on seeded inputs exposing the
   tensors still unresolved, for ops shape inference does not know.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from partita.model.errors import ModelLoadError, ShapeError
from partita.model.graph import np_dtype, subgraphs, value_shape

ModelSource = str | Path | bytes | onnx.ModelProto

MIN_OPSET = 7
_NON_FOLDABLE = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "If",
        "Loop",
        "Scan",
        "SequenceConstruct",
        "SequenceEmpty",
        "SplitToSequence",
        # An int8 model's weights stay int8: folding their dequantization would store them
        # as float32 again (and onnx's reference evaluator lacks it below opset 19).
        "DequantizeLinear",
        "QuantizeLinear",
        "DynamicQuantizeLinear",
    }
)


@dataclass(frozen=True)
class ShapeReport:
    """How many main-graph tensors (node outputs) each loading step resolved."""

    tensors: int
    by_inference: int
    by_folding: int
    by_runtime: int
    folded_nodes: int

    @property
    def unresolved(self) -> int:
        return self.tensors - self.by_inference - self.by_folding - self.by_runtime

    def share(self) -> dict[str, float]:
        n = max(self.tensors, 1)
        return {
            "inference": self.by_inference / n,
            "folding": self.by_folding / n,
            "runtime": self.by_runtime / n,
        }


@dataclass(frozen=True)
class LoadedModel:
    model: onnx.ModelProto
    digest: str
    report: ShapeReport

    def report_items(self) -> tuple[tuple[str, int], ...]:
        r = self.report
        return (
            ("tensors", r.tensors),
            ("inference", r.by_inference),
            ("folding", r.by_folding),
            ("runtime", r.by_runtime),
        )


def model_digest(source: ModelSource) -> str:
    """sha256 of the model bytes (and of its external data files, when it has some)."""
    h = hashlib.sha256()
    if isinstance(source, onnx.ModelProto):
        h.update(source.SerializeToString())
    elif isinstance(source, bytes):
        h.update(source)
    else:
        path = Path(source)
        try:
            h.update(path.read_bytes())
        except OSError as exc:
            raise ModelLoadError(f"cannot read model file {path}: {exc.strerror}") from exc
        for location in sorted(_external_locations(path)):
            h.update(location.encode())
            try:
                h.update((path.parent / location).read_bytes())
            except OSError as exc:
                raise ModelLoadError(
                    f"external data file {location!r} of {path} cannot be read "
                    f"({exc.strerror}); keep it next to the .onnx file"
                ) from exc
    return h.hexdigest()


def _external_locations(path: Path) -> set[str]:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not an ONNX model: {exc}") from exc
    found: set[str] = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found.update(e.value for e in t.external_data if e.key == "location")
    return found


def read_model(source: ModelSource) -> onnx.ModelProto:
    """Parse a model from a path, bytes or proto (external data loaded next to the file)."""
    if isinstance(source, onnx.ModelProto):
        return copy.deepcopy(source)
    try:
        if isinstance(source, bytes):
            return onnx.load_from_string(source)
        path = Path(source)
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        return onnx.load(str(path), load_external_data=True)
    except ModelLoadError:
        raise
    except FileNotFoundError as exc:
        raise ModelLoadError(
            f"external data file missing for {source!s}: {exc.filename}; keep the data files "
            "next to the .onnx file under the names the model records"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"cannot parse ONNX model {_describe(source)}: {exc}") from exc


def _describe(source: ModelSource) -> str:
    return f"({len(source)} bytes)" if isinstance(source, bytes) else str(source)


def check_opset(model: onnx.ModelProto) -> None:
    top = onnx.defs.onnx_opset_version()
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and not MIN_OPSET <= op.version <= top:
            raise ModelLoadError(
                f"model uses ai.onnx opset {op.version}; supported are {MIN_OPSET}..{top}. "
                "Convert it with onnx.version_converter first"
            )


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse CLI `NAME=1x3x224x224` declarations."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise ModelLoadError(
                f"input shape {spec!r} is not NAME=DIMS with positive dims, e.g. x=1x3x224x224"
            )
        shapes[name] = shape
    return shapes


def _declare_inputs(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None
) -> None:
    g = model.graph
    inits = {t.name for t in g.initializer}
    # IR < 4 lists initializers as graph inputs too: they are weights, not inputs.
    real = [i for i in g.input if i.name not in inits]
    if len(real) != len(g.input):
        del g.input[:]
        g.input.extend(real)
    # Initializers that are not inputs need IR >= 4; otherwise inference ignores them.
    model.ir_version = max(model.ir_version, 4)
    given = dict(input_shapes or {})
    unknown = set(given) - {i.name for i in real}
    if unknown:
        raise ModelLoadError(
            f"input shape declared for {sorted(unknown)} but the model's inputs are "
            f"{[i.name for i in real]}"
        )
    for vi in real:
        tt = vi.type.tensor_type
        dims = list(tt.shape.dim)
        if vi.name in given:
            want = [int(d) for d in given[vi.name]]
            if len(want) != len(dims) and dims:
                raise ModelLoadError(
                    f"input {vi.name!r} has rank {len(dims)} but the declared shape "
                    f"{'x'.join(map(str, want))} has rank {len(want)}"
                )
            for d, w in zip(dims, want, strict=False):
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != w:
                    raise ModelLoadError(
                        f"input {vi.name!r} has fixed dim {d.dim_value} where the declared "
                        f"shape {'x'.join(map(str, want))} has {w}"
                    )
            tt.shape.Clear()
            for w in want:
                tt.shape.dim.add().dim_value = w
        elif value_shape(vi) is None:
            symbolic = [
                d.dim_param or "?"
                for d in dims
                if not (d.HasField("dim_value") and d.dim_value > 0)
            ]
            raise ModelLoadError(
                f"input {vi.name!r} has symbolic dims {symbolic}; declare its shape, e.g. "
                f"--input {vi.name}=" + "x".join(str(max(d.dim_value, 1)) for d in dims)
            )


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    # Keep declared graph outputs' value_info from stale symbolic dims.
    for out in model.graph.output:
        if value_shape(out) is None and out.type.tensor_type.HasField("shape"):
            out.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    try:
        return shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise ShapeError(f"onnx shape inference failed: {exc}") from exc


def _known(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    known = {t.name for t in g.initializer}
    for vi in [*g.input, *g.value_info, *g.output]:
        if value_shape(vi) is not None:
            known.add(vi.name)
    return known


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    g = model.graph
    out: dict[str, tuple[int, ...]] = {t.name: tuple(t.dims) for t in g.initializer}
    for vi in [*g.input, *g.value_info, *g.output]:
        s = value_shape(vi)
        if s is not None:
            out[vi.name] = s
    return out


def fold_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace constant-only computations by initializers; returns (model, folded nodes)."""
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    shapes = _shapes(model)
    const = {t.name for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    fold_idx: list[int] = []
    eval_nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(g.node):
        if node.domain not in ("", "ai.onnx") or node.op_type in _NON_FOLDABLE:
            continue
        if any(True for _ in subgraphs(node)) or graph_outputs & set(node.output):
            continue
        ins = [n for n in node.input if n]
        if node.op_type in ("Shape", "Size") and ins[0] in shapes:
            shape = np.array(shapes[ins[0]], dtype=np.int64)
            if node.op_type == "Size":
                value = np.array(int(np.prod(shape)), dtype=np.int64)
            else:
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                start, end = attrs.get("start", 0), attrs.get("end")
                value = shape[start:end]
            eval_nodes.append(
                helper.make_node(
                    "Constant", [], [node.output[0]], value=numpy_helper.from_array(value)
                )
            )
        elif all(n in const for n in ins):
            eval_nodes.append(node)
        else:
            continue
        fold_idx.append(i)
        const.update(o for o in node.output if o)
    if not fold_idx:
        return model, 0
    folded_outputs = {o for i in fold_idx for o in g.node[i].output if o}
    fold_set = set(fold_idx)
    needed = [
        name
        for j, node in enumerate(g.node)
        if j not in fold_set
        for name in _all_inputs(node)
        if name in folded_outputs
    ]
    needed = list(dict.fromkeys(needed))
    if needed:
        used_inits = {n for node in eval_nodes for n in node.input if n}
        sub = helper.make_graph(
            eval_nodes,
            "fold",
            [],
            [helper.make_empty_tensor_value_info(n) for n in needed],
            [t for t in g.initializer if t.name in used_inits],
        )
        sub_model = helper.make_model(sub, opset_imports=list(model.opset_import))
        sub_model.ir_version = model.ir_version
        try:
            values = ReferenceEvaluator(sub_model).run(None, {})
        except Exception as exc:
            raise ShapeError(f"constant folding failed: {exc}") from exc
        new_inits = [
            numpy_helper.from_array(np.asarray(v), name)
            for name, v in zip(needed, values, strict=True)
        ]
    else:
        new_inits = []
    out = copy.deepcopy(model)
    keep = [n for j, n in enumerate(g.node) if j not in fold_set]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    out.graph.initializer.extend(new_inits)
    _drop_unused_initializers(out)
    return out, len(fold_idx)


def _all_inputs(node: onnx.NodeProto) -> list[str]:
    from partita.model.graph import node_inputs

    return node_inputs(node)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    g = model.graph
    used = {n for node in g.node for n in _all_inputs(node)} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)


def _node_outputs(model: onnx.ModelProto) -> list[str]:
    return [o for n in model.graph.node for o in n.output if o]


def _runtime_shapes(model: onnx.ModelProto, names: list[str], seed: int) -> dict[str, np.ndarray]:
    from partita import runtime

    probe = copy.deepcopy(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        helper.make_empty_tensor_value_info(n) for n in names if n not in existing
    )
    feeds = seeded_inputs(model, seed)
    try:
        session = runtime.Session(probe.SerializeToString(), intra_op_threads=1)
        return session.run(feeds, names)
    except Exception as exc:
        raise ShapeError(
            f"shapes of {names[:5]} are unknown to onnx shape inference and the runtime "
            f"pass failed: {exc}"
        ) from exc


def seeded_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs of the declared shapes: normal floats, zero integers.

    Integers are zeros so index inputs (token ids, masks) stay in range for any model.
    """
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = value_shape(vi)
        if shape is None:
            raise ShapeError(f"input {vi.name!r} has no static shape; declare it")
        dtype = np_dtype(vi.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
    return feeds


def _set_shapes(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> None:
    g = model.graph
    by_name = {vi.name: vi for vi in [*g.value_info, *g.output]}
    for name, arr in values.items():
        elem = helper.np_dtype_to_tensor_dtype(arr.dtype)
        vi = by_name.get(name)
        if vi is None:
            g.value_info.append(helper.make_tensor_value_info(name, elem, arr.shape))
        else:
            vi.type.tensor_type.elem_type = elem
            vi.type.tensor_type.ClearField("shape")
            for d in arr.shape:
                vi.type.tensor_type.shape.dim.add().dim_value = int(d)


def load_model_with_report(
    source: ModelSource,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    fold: bool = True,
    runtime_fallback: bool = True,
    seed: int = 0,
) -> LoadedModel:
    """`load_model`, plus the digest and the share of shapes each step resolved."""
    digest = model_digest(source)
    model = read_model(source)
    check_opset(model)
    _declare_inputs(model, input_shapes)
    model = _infer(model)
    outputs = _node_outputs(model)
    known = _known(model)
    by_inference = sum(1 for o in outputs if o in known)
    folded = 0
    if fold:
        for _ in range(8):
            model, n = fold_constants(model)
            if n == 0:
                break
            folded += n
            model = _infer(model)
    known_after = _known(model)
    # Folded tensors became initializers or vanished with the chain that made them.
    present = set(_node_outputs(model)) | {t.name for t in model.graph.initializer}
    by_folding = sum(
        1 for o in outputs if o not in known and (o in known_after or o not in present)
    )
    missing = [o for o in _node_outputs(model) if o not in known_after]
    by_runtime = 0
    if missing and runtime_fallback:
        values = _runtime_shapes(model, missing, seed)
        _set_shapes(model, values)
        by_runtime = len(values)
    known_final = _known(model)
    still = [o for o in _node_outputs(model) if o not in known_final]
    if still:
        node = next(n for n in model.graph.node if still[0] in n.output)
        raise ShapeError(
            f"tensor {still[0]!r} (output of {node.op_type} node {node.name!r}) has no static "
            f"shape after inference and folding ({len(still)} such tensors); enable the "
            "runtime pass or declare input shapes"
        )
    report = ShapeReport(
        tensors=len(outputs),
        by_inference=by_inference,
        by_folding=by_folding,
        by_runtime=by_runtime,
        folded_nodes=folded,
    )
    return LoadedModel(model=model, digest=digest, report=report)


def load_model(
    source: ModelSource, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> onnx.ModelProto:
    """A model specialised to `input_shapes`, with a static shape for every tensor.

    Shape-only computations are folded into initializers, so the node list can be
    shorter than the file's; profiles and cut positions refer to this loaded model.
    """
    return load_model_with_report(source, input_shapes).model
