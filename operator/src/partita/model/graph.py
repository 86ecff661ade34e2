"""Small read-only views of an ONNX graph: producers, consumers, tensor shapes and dtypes.

Kept apart from profiling and slicing because both walk the graph the same way and
must agree on what a "constant" tensor is (an initializer: weights never cross a cut).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from partita.model.errors import ShapeError
from partita.model.types import TensorInfo

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})


def np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def value_shape(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """The static shape of a value, or None when any dim is symbolic or missing."""
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    dims = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value") or d.dim_value < 0:
            return None
        dims.append(d.dim_value)
    return tuple(dims)


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scope (implicit inputs)."""
    local: set[str] = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        for name in node.input:
            if name and name not in local:
                used.add(name)
        for sub in subgraphs(node):
            used |= outer_names(sub) - local
        local.update(o for o in node.output if o)
    return used


def live_bytes(
    nodes: Sequence[onnx.NodeProto],
    sizes: Mapping[str, int],
    inputs: Sequence[str],
    outputs: Sequence[str],
    constants: Container[str],
) -> np.ndarray:
    """Activation bytes alive right after each node ran (graph inputs included).

    A tensor lives from its producer to its last consumer (graph inputs from before the
    first node, graph outputs to the end; a dead output only right after its node).
    """
    n = len(nodes)
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node_inputs(node):
            if name not in constants:
                last_use[name] = i
    for name in outputs:
        last_use[name] = n
    born: dict[str, int] = {name: -1 for name in inputs}
    for i, node in enumerate(nodes):
        for o in node.output:
            if o:
                born[o] = i
    delta = np.zeros(n + 2, dtype=np.int64)
    for name, b in born.items():
        end = last_use.get(name, b)
        size = sizes[name]
        delta[b + 1] += size
        delta[end + 1 if end >= b + 1 else b + 2] -= size
    return np.cumsum(delta)[1 : n + 1]


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs plus the outer-scope names its subgraphs capture."""
    names = [n for n in node.input if n]
    for sub in subgraphs(node):
        names.extend(sorted(outer_names(sub)))
    return names


@dataclass(frozen=True)
class GraphView:
    """Index of a shape-resolved model's main graph (built once, read many times)."""

    model: onnx.ModelProto
    initializers: dict[str, onnx.TensorProto]
    values: dict[str, onnx.ValueInfoProto]
    producer: dict[str, int]
    consumers: dict[str, tuple[int, ...]]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @staticmethod
    def of(model: onnx.ModelProto) -> GraphView:
        g = model.graph
        inits = {t.name: t for t in g.initializer}
        values: dict[str, onnx.ValueInfoProto] = {}
        for vi in [*g.input, *g.value_info, *g.output]:
            values[vi.name] = vi
        producer: dict[str, int] = {}
        consumers: dict[str, list[int]] = {}
        for i, node in enumerate(g.node):
            for o in node.output:
                if o:
                    producer[o] = i
            for name in dict.fromkeys(node_inputs(node)):
                consumers.setdefault(name, []).append(i)
        return GraphView(
            model=model,
            initializers=inits,
            values=values,
            producer=producer,
            consumers={k: tuple(v) for k, v in consumers.items()},
            input_names=tuple(i.name for i in g.input if i.name not in inits),
            output_names=tuple(o.name for o in g.output),
        )

    @property
    def nodes(self) -> Iterable[onnx.NodeProto]:
        return self.model.graph.node

    def is_constant(self, name: str) -> bool:
        return name in self.initializers

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.initializers:
            return tuple(int(d) for d in self.initializers[name].dims)
        vi = self.values.get(name)
        shape = value_shape(vi) if vi is not None else None
        if shape is None:
            raise ShapeError(
                f"tensor {name!r} has no static shape; load the model with "
                "partita.model.load.load_model and declare every input's shape"
            )
        return shape

    def dtype(self, name: str) -> np.dtype:
        if name in self.initializers:
            return np_dtype(self.initializers[name].data_type)
        vi = self.values.get(name)
        if vi is None or not vi.type.HasField("tensor_type"):
            raise ShapeError(f"tensor {name!r} has no tensor type in the model")
        return np_dtype(vi.type.tensor_type.elem_type)

    def info(self, name: str) -> TensorInfo:
        shape = self.shape(name)
        dtype = self.dtype(name)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return TensorInfo(name=name, dtype=dtype.name, shape=shape, nbytes=nbytes)

    def nbytes(self, name: str) -> int:
        shape = self.shape(name)
        return int(np.prod(shape, dtype=np.int64)) * self.dtype(name).itemsize
