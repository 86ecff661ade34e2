from __future__ import annotations

import pytest

from model_builders import diamond, mlp
from partita.model import synthetic
from partita.model.errors import CutError, ShardingError
from partita.model.load import load_model
from partita.model.placement import ReferenceCosts, partition
from partita.model.profile import profile_model
from partita.model.shard import shard_stage
from partita.model.slice import extract_stage, split_at
from partita.model.types import GatherMode, GatherSpec

FREE = ReferenceCosts(exchange_s=0.0, lan_bytes_per_s=1e18)


def test_stage_keeps_only_its_nodes_and_weights() -> None:
    model = load_model(diamond(), {"x": [1, 3, 8, 8]})
    stage = extract_stage(model, ["ar"], ["out"])
    assert [n.name for n in stage.graph.node] == ["conv_b", "add"]
    assert [t.name for t in stage.graph.initializer] == ["wb"]


def test_split_forwards_skip_tensors() -> None:
    model = load_model(diamond(), {"x": [1, 3, 8, 8]})
    prof = profile_model(diamond(), {"x": [1, 3, 8, 8]})
    first, second, third = split_at(model, [2, 3], prof)
    assert [o.name for o in first.graph.output] == ["ar"]
    assert {o.name for o in second.graph.output} == {"ar", "b"}
    assert {i.name for i in third.graph.input} == {"ar", "b"}


def test_cut_errors_name_the_tensor() -> None:
    model = load_model(diamond(), {"x": [1, 3, 8, 8]})
    with pytest.raises(CutError, match="'nope'"):
        extract_stage(model, ["x"], ["nope"])
    with pytest.raises(CutError, match=r"'x'.*add it"):
        extract_stage(model, ["b"], ["out"])
    prof = profile_model(mlp())
    with pytest.raises(CutError, match="not made from this model"):
        split_at(model, [1], prof)


def test_cut_inside_a_subgraph_is_refused() -> None:
    model = load_model(synthetic.control_flow_model())
    with pytest.raises(CutError, match="subgraph of If node"):
        extract_stage(model, ["x"], ["gated"])


def test_partition_is_proportional_and_granular() -> None:
    assert partition(10, [1, 1]) == (5, 5)
    assert partition(384, [0.7, 0.3], 32) == (256, 128)
    assert sum(partition(1000, [3, 2, 1])) == 1000
    with pytest.raises(ValueError):
        partition(3, [1, 1, 1, 1])


def test_mlp_is_one_megatron_pair() -> None:
    stage = load_model(mlp())
    shards, layout = shard_stage(stage, [0.5, 0.5], costs=FREE)
    assert layout.strategy == "megatron"
    assert layout.gathers == (GatherSpec("y", GatherMode.SUM),)
    w = [{t.name: tuple(t.dims) for t in s.graph.initializer} for s in shards]
    # Columns of the first weight, rows of the second: no exchange between the two.
    assert w[0]["w1__rows1_0_8"] == (8, 8) and w[1]["w2__rows0_8_16"] == (8, 6)
    assert len(layout.segments) == 1
    # The second bias is added by shard 0 only.
    assert "b2" in w[0] and "b2" not in w[1]


def test_unsupported_op_in_shard_names_the_node() -> None:
    stage = load_model(synthetic.recurrent_model())
    with pytest.raises(ShardingError, match="LSTM node"):
        shard_stage(stage, [1, 1], strategy="width")


def test_old_softmax_over_flattened_channels_is_not_split() -> None:
    # Before opset 13 Softmax's default axis is 1 and it normalises every axis from there:
    # splitting channels would give each shard its own normalisation (a wrong answer).
    from onnx import helper

    from model_builders import f32, make, weight

    model = make(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1], name="conv"),
            helper.make_node("Softmax", ["c"], ["p"], name="softmax"),
        ],
        [f32("x", [1, 3, 1, 1])],
        [f32("p", [1, 8, 1, 1])],
        [weight("w", (8, 3, 1, 1))],
        opset=9,
    )
    with pytest.raises(ShardingError, match="Softmax node 'softmax'"):
        shard_stage(load_model(model), [1, 1], strategy="width", costs=FREE)
