"""Vertical slicing: cut a model into consecutive stages by tensor names.

A stage keeps exactly the nodes between its input and output tensors and the
initializers those nodes read. Tensors that a later stage (or the final output) needs
but that were produced before a stage's start are passed through that stage unchanged,
so stage i+1 can always run on stage i's outputs alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import helper

from partita.model.errors import CutError
from partita.model.graph import GraphView, node_inputs, outer_names, subgraphs
from partita.model.types import ModelProfile


def _subgraph_owner(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    def defines(graph: onnx.GraphProto) -> bool:
        for node in graph.node:
            if name in node.output:
                return True
            if any(defines(g) for g in subgraphs(node)):
                return True
        return False

    for node in model.graph.node:
        if any(defines(g) for g in subgraphs(node)):
            return node
    return None


def _check_known(view: GraphView, names: Sequence[str], what: str) -> None:
    for name in names:
        if name in view.producer or name in view.input_names or name in view.initializers:
            continue
        owner = _subgraph_owner(view.model, name)
        if owner is not None:
            raise CutError(
                f"{what} tensor {name!r} lives inside the subgraph of {owner.op_type} node "
                f"{owner.name!r}; control flow is kept whole, cut before or after that node"
            )
        raise CutError(f"{what} tensor {name!r} is not in the model's main graph")


def extract_stage(
    model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str]
) -> onnx.ModelProto:
    """The standalone model computing `outputs` from `inputs` (names of `model`'s tensors).

    `model` must have static shapes (see `load_model`). Outputs that are also inputs
    are passed through.
    """
    view = GraphView.of(model)
    _check_known(view, inputs, "stage input")
    _check_known(view, outputs, "stage output")
    input_set = set(inputs)
    needed: set[int] = set()
    stack = [o for o in outputs if o not in input_set]
    seen: set[str] = set(stack)
    while stack:
        name = stack.pop()
        if name in view.initializers:
            continue
        idx = view.producer.get(name)
        if idx is None:
            raise CutError(
                f"the stage needs tensor {name!r}, a model input not among the stage inputs "
                f"{list(inputs)}; add it to the stage inputs"
            )
        if idx in needed:
            continue
        needed.add(idx)
        for src in node_inputs(model.graph.node[idx]):
            if src not in input_set and src not in seen:
                seen.add(src)
                stack.append(src)
    nodes = [model.graph.node[i] for i in sorted(needed)]
    used = {n for node in nodes for n in node_inputs(node)}
    initializers = [t for t in model.graph.initializer if t.name in used]
    produced = {o for node in nodes for o in node.output if o}
    value_info = [
        view.values[name]
        for name in sorted(produced - set(outputs))
        if name in view.values and name not in view.output_names
    ]
    graph = helper.make_graph(
        nodes,
        f"{model.graph.name or 'model'}_stage",
        [_value(view, n) for n in inputs],
        [_value(view, n) for n in outputs],
        initializers,
        value_info=value_info,
    )
    stage = helper.make_model(
        graph, opset_imports=list(model.opset_import), producer_name="partita"
    )
    stage.ir_version = model.ir_version
    stage.functions.extend(model.functions)
    return stage


def _value(view: GraphView, name: str) -> onnx.ValueInfoProto:
    info = view.info(name)
    elem = helper.np_dtype_to_tensor_dtype(view.dtype(name))
    return helper.make_tensor_value_info(name, elem, info.shape)


def boundaries(model: onnx.ModelProto) -> list[list[str]]:
    """Tensors crossing each topological boundary 0..len(nodes) of `model`."""
    from partita.model.profile import all_boundaries

    view = GraphView.of(model)
    n = len(model.graph.node)
    last_use = {k: max(v) for k, v in view.consumers.items() if k not in view.initializers}
    for name in view.output_names:
        last_use[name] = n
    born = {name: -1 for name in view.input_names}
    for i, node in enumerate(model.graph.node):
        for o in node.output:
            if o:
                born[o] = i
    return all_boundaries(view, born, last_use)


def check_profile_matches(model: onnx.ModelProto, profile: ModelProfile) -> None:
    nodes = model.graph.node
    if len(nodes) != len(profile.nodes) or any(
        a.op_type != b.op_type for a, b in zip(nodes, profile.nodes, strict=True)
    ):
        raise CutError(
            f"the profile ({len(profile.nodes)} nodes) was not made from this model "
            f"({len(nodes)} nodes); slice the model returned by load_model with the same "
            "input shapes"
        )


def split_at(
    model: onnx.ModelProto, cut_positions: Sequence[int], profile: ModelProfile
) -> list[onnx.ModelProto]:
    """Stages between consecutive cut positions (node indices of the profile's order).

    Stage i reads the tensors crossing boundary i (the model inputs for i = 0) and
    produces those crossing boundary i+1 (the model outputs for the last stage).
    """
    check_profile_matches(model, profile)
    n = len(model.graph.node)
    cuts = list(cut_positions)
    if any(not 0 < p < n for p in cuts) or cuts != sorted(set(cuts)):
        raise CutError(
            f"cut positions {cuts} must be strictly increasing node indices in 1..{n - 1}"
        )
    crossing = boundaries(model)
    view = GraphView.of(model)
    edges = [list(view.input_names), *(crossing[p] for p in cuts), list(view.output_names)]
    for p, names in zip(cuts, edges[1:-1], strict=True):
        bad = [t for t in names if t not in view.values and t not in view.initializers]
        if bad:
            raise CutError(f"cut at position {p} crosses tensors without a type: {bad}")
    return [extract_stage(model, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def stage_inputs_outputs(stage: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [i.name for i in stage.graph.input], [o.name for o in stage.graph.output]


__all__ = [
    "boundaries",
    "check_profile_matches",
    "extract_stage",
    "outer_names",
    "split_at",
    "stage_inputs_outputs",
]
