from __future__ import annotations

import numpy as np
import pytest
from model_builders import diamond, mlp

from partita.model import synthetic
from partita.model.errors import CutError, ShardingError
from partita.model.load import load_model
from partita.model.profile import profile_model
from partita.model.shard import allocate, gather, shard_stage
from partita.model.slice import extract_stage, split_at
from partita.model.types import GatherMode, GatherSpec, ShardLayout


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


def test_allocate_is_proportional_and_granular() -> None:
    assert allocate(10, [1, 1]) == (5, 5)
    assert allocate(384, [0.7, 0.3], 32) == (256, 128)
    assert sum(allocate(1000, [3, 2, 1])) == 1000
    with pytest.raises(ValueError):
        allocate(3, [1, 1, 1, 1])


def test_mlp_is_one_megatron_pair() -> None:
    stage = load_model(mlp())
    shards, layout = shard_stage(stage, [0.5, 0.5])
    assert layout.strategy == "megatron"
    assert layout.gathers == (GatherSpec("y", GatherMode.SUM),)
    w1 = [{t.name: tuple(t.dims) for t in s.graph.initializer} for s in shards]
    assert w1[0]["w1__s0_1"] == (8, 8) and w1[1]["w2__s1_0"] == (8, 6)
    # The second bias is added by shard 0 only.
    assert "b2" in w1[0] and "b2" not in w1[1]


def test_unsupported_op_in_shard_names_the_node() -> None:
    stage = load_model(synthetic.recurrent_model())
    with pytest.raises(ShardingError, match="LSTM node"):
        shard_stage(stage, [1, 1], strategy="width")


def test_gather_modes() -> None:
    layout = ShardLayout(
        (1.0, 1.0),
        (
            GatherSpec("c", GatherMode.CONCAT, axis=1),
            GatherSpec("s", GatherMode.SUM),
            GatherSpec("t", GatherMode.TAKE, shard=1),
        ),
        "test",
    )
    part = GatherSpec.part_name
    a, b = np.ones((2, 1)), np.zeros((2, 3))
    out = gather(
        layout,
        [
            {part("c", 0): a, part("s", 0): np.full(3, 2.0)},
            {part("c", 1): b, part("s", 1): np.full(3, 5.0), part("t", 1): np.arange(2)},
        ],
    )
    assert out["c"].shape == (2, 4) and out["c"][:, 0].tolist() == [1, 1]
    assert out["s"].tolist() == [7, 7, 7]
    assert out["t"].tolist() == [0, 1]
    with pytest.raises(ShardingError, match="'t'"):
        gather(layout, [{part("c", 0): a, part("s", 0): a}, {part("c", 1): b, part("s", 1): a}])


def test_old_softmax_over_flattened_channels_is_not_split() -> None:
    # Before opset 13 Softmax's default axis is 1 and it normalises every axis from there:
    # splitting channels would give each shard its own normalisation (a wrong answer).
    from model_builders import f32, make, weight
    from onnx import helper

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
        shard_stage(load_model(model), [1, 1], strategy="width")
