"""Sharded ranges run in onnxruntime: the segment models, the exchanges and the gather
(`partita.model.exchange`, what the shard servers call) rebuild the range's outputs, the
exchanges move the bytes the layout says, and the layout's figures are those of the cut
shard models profiled on their own.

The property test draws ranges between the profile's cut points, shard counts and
proportions over the zoo; the named tests pin the figures the issue asks about.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_builders import attention_block, conv_stack, embedding_block, upsampler
from partita.model import zoo
from partita.model.errors import ShardingError
from partita.model.exchange import run_sharded
from partita.model.load import load_model
from partita.model.placement import ReferenceCosts
from partita.model.profile import profile_loaded
from partita.model.shard import ShardAnalysis
from partita.model.slice import extract_stage
from partita.model.types import ModelProfile, ShardLayout
from partita.runtime import Session

FREE = ReferenceCosts(exchange_s=0.0, lan_bytes_per_s=1e18)


@functools.lru_cache(maxsize=4)
def _zoo(name: str) -> tuple[onnx.ModelProto, ModelProfile, ShardAnalysis]:
    model = load_model(zoo.model_path(name), zoo.default_input_shapes(name))
    return model, profile_loaded(model), ShardAnalysis(model)


def _session(model: onnx.ModelProto) -> Session:
    return Session(model.SerializeToString(), intra_op_threads=1)


def _values_at(
    model: onnx.ModelProto, analysis: ShardAnalysis, position: int, feeds: dict
) -> dict[str, np.ndarray]:
    """The tensors crossing `position` when the model runs on `feeds`."""
    names = analysis.crossing(position)
    inputs = [i.name for i in model.graph.input]
    if position == 0:
        return {k: v for k, v in feeds.items() if k in names}
    prefix = extract_stage(model, inputs, names)
    return _session(prefix).run(feeds)


def _rel(want: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, value in want.items():
        scale = float(np.max(np.abs(value))) or 1.0
        worst = max(worst, float(np.max(np.abs(value - got[name]))) / scale)
    return worst


def _built_figures(
    segments: Sequence[Sequence[onnx.ModelProto | None]], shards: int
) -> tuple[list[int], list[int], list[int]]:
    flops, params, peak = [0] * shards, [0] * shards, [0] * shards
    for per in segments:
        for i, m in enumerate(per):
            if m is None:
                continue
            prof = profile_loaded(load_model(m))
            flops[i] += prof.total_flops
            params[i] += prof.param_bytes
            peak[i] = max(peak[i], *(n.live_bytes for n in prof.nodes))
    return flops, params, peak


def _check(
    model: onnx.ModelProto,
    analysis: ShardAnalysis,
    layout: ShardLayout,
    feeds: dict[str, np.ndarray],
) -> None:
    segments = analysis.build(layout)
    assert _built_figures(segments, layout.shards) == (
        list(layout.shard_flops),
        list(layout.shard_param_bytes),
        list(layout.shard_peak_bytes),
    )
    inputs = _values_at(model, analysis, layout.start, feeds)
    stage = extract_stage(model, analysis.crossing(layout.start), analysis.crossing(layout.end))
    want = _session(stage).run({i.name: inputs[i.name] for i in stage.graph.input})
    sessions = [[_session(m) if m else None for m in per] for per in segments]

    def run(segment: int, shard: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = sessions[segment][shard]
        assert session is not None
        return session.run(feeds)

    done = run_sharded(layout, run, inputs)
    assert _rel(want, done.result()) < 1e-4, layout.strategy
    planned = [sum(x.received_bytes[j] for x in layout.exchanges) for j in range(layout.shards)]
    assert done.received_bytes == planned
    # What a fan-out hop relays between segments (answers up, feeds down), as the arrays
    # moved measure it, is the layout's figure the planner prices.
    assert done.relayed_bytes == layout.relayed_bytes


def test_small_graphs_rebuild_their_outputs() -> None:
    for model, strategy, props in (
        (load_model(conv_stack(24, 20)), "tile", [1, 2, 1]),
        (load_model(conv_stack(24, 20)), "width", [1, 1]),
        (load_model(attention_block()), "width", [3, 1]),
        (load_model(embedding_block()), "width", [1, 2, 1]),
        (load_model(upsampler()), "tile", [2, 1, 1]),
    ):
        analysis = ShardAnalysis(model, FREE)
        layout = analysis.layout(0, len(model.graph.node), props, strategy)
        rng = np.random.default_rng(1)
        feeds = {}
        for i in model.graph.input:
            shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
            if i.type.tensor_type.elem_type == onnx.TensorProto.INT64:
                feeds[i.name] = rng.integers(0, 4096, shape).astype(np.int64)  # every shard's rows
            else:
                feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        _check(model, analysis, layout, feeds)


# Shard counts and, for each zoo model, the share of the range's FLOPs the busiest of four
# equal shards runs at most (1/4 plus halo and replicated work).
FOUR_SHARDS = {"open-nsfw": 0.32, "minilm": 0.26, "ocr-rec": 0.33, "ocr-det": 0.3}


@pytest.mark.parametrize("name", sorted(FOUR_SHARDS))
def test_four_shards_split_the_work_of_the_whole_model(name: str) -> None:
    model, profile, analysis = _zoo(name)
    layout = analysis.layout(0, len(profile.nodes), [1, 1, 1, 1])
    assert max(layout.shard_flops) <= FOUR_SHARDS[name] * profile.total_flops, layout.strategy
    _check(model, analysis, layout, zoo.sample_inputs(name, model))


PROPERTY_MODELS = ["open-nsfw", "minilm", "ocr-rec", "ocr-det", "ocr-cls", "light-squeezenet"]


@pytest.mark.parametrize("name", PROPERTY_MODELS)
@settings(
    max_examples=3,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_layouts_are_the_shards_they_cut(name: str, data: st.DataObject) -> None:
    model, profile, analysis = _zoo(name)
    n = len(profile.nodes)
    positions = sorted({0, n, *(c.position for c in profile.cut_points)})
    a, b = sorted(data.draw(st.lists(st.sampled_from(positions), min_size=2, max_size=2,
                                     unique=True)))  # fmt: skip
    k = data.draw(st.sampled_from([2, 3, 4]))
    props = data.draw(st.lists(st.floats(0.5, 2.0), min_size=k, max_size=k))
    strategy = data.draw(st.sampled_from([None, "tile", "width"]))
    try:
        layout = analysis.layout(a, b, props, strategy)
    except ShardingError as exc:
        assert " node " in str(exc) or "branch" in str(exc), exc  # the refusal names why
        return
    assert layout.start == a and layout.end == b and layout.shards == k
    _check(model, analysis, layout, zoo.sample_inputs(name, model))
