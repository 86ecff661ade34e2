"""The planner's shard figures are the cut shards': what `predict_stages` says each shard of
a zoo model's stage runs and holds, and the exchanges it waits for, are the figures of the
shard models `ShardAnalysis` cuts for that stage, profiled on their own (`profile_loaded` of
each built model, not the tables the planner read); a stage the planner refuses names why;
every sharded stage of a plan the planner returns can be cut, by the shard servers and by
the operator's deploy-time check alike.

FLOPs, exchange points and exchange bytes are equal. Weights plus peak activations may
differ a little: the tables read peaks off the whole model's segment models (where a
tensor passing the range by stays live: over) and miss a part tensor a range's last
segment may add (a few KiB: under); the bounds are `MEMORY_SLACK` and `MEMORY_OVER`.
"""

from __future__ import annotations

import functools

import onnx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from partita.control.catalog import cut_refusal
from partita.model import zoo
from partita.model.load import load_model
from partita.model.profile import profile_loaded, with_shard_tables
from partita.model.shard import ShardAnalysis, stage_layout
from partita.model.types import ModelProfile, OpClass
from partita.planner import (
    ClusterSnapshot,
    Compression,
    DevicePoolState,
    ModelRequest,
    NodeState,
    Partitioning,
    PartitioningMode,
    Plan,
    ShardPlacement,
    Stage,
    Tier,
    plan_model,
)
from partita.planner.cost import boundary_tensors, predict_stages

MiB = 2**20
MODELS = ["open-nsfw", "minilm", "ocr-rec", "ocr-cls"]
RELAY_SLACK = 0.05
MEMORY_SLACK = 0.002  # under by at most this share (a part tensor the range end adds)
MEMORY_OVER = 1.05  # and at most this many times it


@functools.lru_cache(maxsize=4)
def _zoo(name: str) -> tuple[onnx.ModelProto, ModelProfile, ShardAnalysis]:
    model = load_model(zoo.model_path(name), zoo.default_input_shapes(name))
    profile = with_shard_tables(profile_loaded(model), model)
    return model, profile, ShardAnalysis(model)


def _edge(speeds: list[float]) -> ClusterSnapshot:
    nodes = tuple(
        NodeState(f"edge-{i}", "edge", Tier.EDGE, 4.0, 8192 * MiB, dict.fromkeys(OpClass, s))
        for i, s in enumerate(speeds)
    )
    pools = (DevicePoolState("edge", Tier.EDGE, power_active_watts=5, radio_watts=1),)
    return ClusterSnapshot(nodes=nodes, pools=pools, links=())


def _request(**kw: object) -> ModelRequest:
    return ModelRequest(name="m", data_source="edge", pools=("edge",), **kw)  # type: ignore[arg-type]


def _built(analysis: ShardAnalysis, start: int, end: int, props: list[float], strategy: str):  # type: ignore[no-untyped-def]
    """Per shard (FLOPs, weight bytes, peak activation bytes) of the cut shard models, and
    the layout they were cut from."""
    layout = analysis.layout(start, end, props, strategy)
    figures = [[0, 0, 0] for _ in props]
    for per_shard in analysis.build(layout):
        for i, m in enumerate(per_shard):
            if m is None:
                continue
            prof = profile_loaded(load_model(m))
            figures[i][0] += prof.total_flops
            figures[i][1] += prof.param_bytes
            figures[i][2] = max(figures[i][2], *(n.live_bytes for n in prof.nodes))
    return figures, layout


def _check(profile, analysis, a, b, k) -> bool:  # type: ignore[no-untyped-def]
    """Whether the planner shards [a, b) k ways; if so, asserts its figures are the cut ones."""
    stage = Stage(
        index=0,
        pool="edge",
        start=a,
        end=b,
        shards=tuple(ShardPlacement(f"edge-{i}", 1.0 / k) for i in range(k)),
        inputs=tuple(t[0] for t in boundary_tensors(profile, a)),
        outputs=tuple(t[0] for t in boundary_tensors(profile, b)),
        input_compression=Compression.NONE,
    )
    request = _request(runtime_overhead_bytes=0)
    prediction = predict_stages(request, [stage], profile, _edge([1e9] * k))
    refused = [v for v in prediction.violations if "cannot be cut" in v]
    if refused:
        assert any(w in refused[0] for w in (" node ", "inside a split", "no gather")), refused
        return False
    pred = prediction.stages[0]
    figures, layout = _built(analysis, a, b, [1.0] * k, pred.strategy)
    assert [s.flops for s in pred.shards] == [f[0] for f in figures]
    for shard, (_f, params, peak) in zip(pred.shards, figures, strict=True):
        built = params + peak
        assert (1 - MEMORY_SLACK) * built <= shard.memory_bytes <= MEMORY_OVER * built
    assert pred.exchanges == len(layout.segments) - 1
    assert pred.exchange_bytes == max(
        (sum(x.received_bytes[j] for x in layout.exchanges) for j in range(k)), default=0
    )
    # The table's relay at each exchange point is the whole model's placement's; a range
    # starting or ending inside a segment cuts those segments, and their kept tensors, a
    # little differently.
    assert abs(pred.relayed_bytes - layout.relayed_bytes) <= RELAY_SLACK * layout.relayed_bytes
    return True


@pytest.mark.parametrize("name", MODELS)
def test_the_whole_model_in_k_shards_is_priced_as_cut(name: str) -> None:
    _model, profile, analysis = _zoo(name)
    n = len(profile.nodes)
    assert any([_check(profile, analysis, 0, n, k) for k in (2, 3, 4)])


@pytest.mark.parametrize("name", MODELS)
@settings(
    max_examples=4,
    phases=(Phase.generate,),  # a failing draw is reported as drawn: no shrinking
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_the_planners_shard_figures_are_the_cut_shards(name: str, data: st.DataObject) -> None:
    _model, profile, analysis = _zoo(name)
    n = len(profile.nodes)
    positions = sorted({0, n, *(c.position for c in profile.cut_points)})
    a, b = sorted(data.draw(st.lists(st.sampled_from(positions), min_size=2, max_size=2,
                                     unique=True)))  # fmt: skip
    k = data.draw(st.sampled_from([2, 3, 4]))
    _check(profile, analysis, a, b, k)


@pytest.mark.parametrize("name", MODELS)
def test_every_sharded_plan_the_planner_returns_can_be_cut(name: str) -> None:
    model, profile, analysis = _zoo(name)
    horizontal = _request(partitioning=Partitioning(mode=PartitioningMode.HORIZONTAL, max_shards=4))
    sharded = 0
    # Devices weak enough that splitting even ocr-cls's small model pays for what the
    # driving server relays between the segments.
    for speeds in ([3e8] * 4, [3e8, 3e8, 6e8, 1.5e8], [3e8] * 3):
        plan = plan_model(profile, horizontal, _edge(speeds))
        assert isinstance(plan, Plan), plan.reasons
        for stage, pred in zip(plan.stages, plan.prediction.stages, strict=True):
            if len(stage.shards) < 2:
                continue
            sharded += 1
            figures, layout = _built(
                analysis, stage.start, stage.end, list(stage.proportions), pred.strategy
            )
            assert len(figures) == len(stage.shards)
            # What a shard server cuts from its spec (the stage's tensors, the plan's
            # strategy) is the layout the planner priced.
            _a, served = stage_layout(
                model, stage.inputs, stage.outputs, stage.proportions, pred.strategy
            )
            assert (served.start, served.end) == (stage.start, stage.end)
            assert served.shard_flops == layout.shard_flops
            assert len(served.segments) == len(layout.segments) == pred.exchanges + 1
        # The operator's deploy-time check, on the model file, has nothing to refuse.
        assert cut_refusal(zoo.model_path(name), zoo.default_input_shapes(name), plan) is None
    assert sharded  # every zoo model here splits on equal weak devices
