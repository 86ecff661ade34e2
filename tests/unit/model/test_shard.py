"""Sharding layouts on small graphs: the planned figures are those of the cut shards, and
the exchange arithmetic delivers each shard what it needs.

The cut shards are profiled on their own (`profile_loaded` of each segment model after
`load_model`'s shape inference); tests/integration/model runs them in onnxruntime.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import onnx
import pytest

from model_builders import attention_block, conv_stack, embedding_block, upsampler
from partita.model import synthetic
from partita.model.errors import ShardingError
from partita.model.exchange import (
    ShardedRun,
    ShardState,
    exchange_receive,
    exchange_sends,
    gather,
    scatter,
    wire_name,
)
from partita.model.load import load_model
from partita.model.placement import ReferenceCosts
from partita.model.profile import profile_loaded
from partita.model.shard import ShardAnalysis
from partita.model.types import (
    Exchange,
    GatherMode,
    GatherSpec,
    ShardLayout,
    layout_from_json,
    layout_id,
    layout_to_json,
)

# Exchanges cost nothing: the tiny graphs here are split wherever a rule allows.
FREE = ReferenceCosts(exchange_s=0.0, lan_bytes_per_s=1e18)


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


def _check(layout: ShardLayout, analysis: ShardAnalysis) -> None:
    segments = analysis.build(layout)
    flops, params, peak = _built_figures(segments, layout.shards)
    assert list(layout.shard_flops) == flops
    assert list(layout.shard_param_bytes) == params
    assert list(layout.shard_peak_bytes) == peak


def test_conv_stack_tiles_carry_their_halo_and_reduce_the_pool() -> None:
    model = load_model(conv_stack(24, 20))
    analysis = ShardAnalysis(model, FREE)
    n = len(model.graph.node)
    layout = analysis.layout(0, n, [1, 2, 1], "tile")
    assert layout.strategy == "tile"
    # Each shard reads its rows of the image plus the rows its 3x3 windows need.
    spans = layout.scatter[0].spans
    assert spans[0] is not None and spans[0][0] == 0 and spans[-1] is not None
    assert spans[-1][1] == 24
    assert all(a is not None and b is not None and a[1] > b[0] for a, b in pairwise(spans))
    # The global pool runs on each shard's own rows; the partial means are summed. The
    # other exchanges swap only the halo rows of a tensor the next stretch needs.
    modes = {x.tensor: x.mode for x in layout.exchanges}
    assert modes.pop("g") is GatherMode.SUM
    assert set(modes.values()) <= {GatherMode.CONCAT}
    for x in layout.exchanges:
        if x.mode is GatherMode.CONCAT:
            assert 0 < max(x.received_bytes) < x.row_bytes * x.shape[x.axis] / 2
    assert layout.gathers == (GatherSpec("y", GatherMode.TAKE, shard=0),)
    whole = profile_loaded(model).total_flops
    assert all(f < 0.75 * whole for f in layout.shard_flops)
    assert sum(layout.shard_flops) > whole  # the halo is computed twice
    _check(layout, analysis)


def test_upsampling_runs_on_tiles_and_keeps_the_rows_it_owes() -> None:
    model = load_model(upsampler())
    analysis = ShardAnalysis(model, FREE)
    layout = analysis.layout(0, len(model.graph.node), [1, 1, 1], "tile")
    assert layout.strategy == "tile" and layout.gathers[0].mode is GatherMode.CONCAT
    whole = profile_loaded(model).total_flops
    assert all(f < 0.45 * whole for f in layout.shard_flops)
    _check(layout, analysis)


def test_attention_block_is_one_megatron_pair_per_half() -> None:
    model = load_model(attention_block())
    analysis = ShardAnalysis(model, FREE)
    layout = analysis.layout(0, len(model.graph.node), [1, 1], "width")
    assert layout.strategy == "megatron"
    # Heads and the MLP's columns split; one all-reduce before the second LayerNorm, the
    # second summed at the gather.
    assert [(x.tensor, x.mode) for x in layout.exchanges] == [("h1", GatherMode.SUM)]
    assert layout.gathers == (GatherSpec("y", GatherMode.SUM),)
    total = profile_loaded(model).param_bytes
    assert all(p < 0.6 * total for p in layout.shard_param_bytes)
    _check(layout, analysis)


def test_a_large_embedding_table_is_split_by_rows() -> None:
    model = load_model(embedding_block())
    analysis = ShardAnalysis(model, FREE)
    layout = analysis.layout(0, len(model.graph.node), [1, 1, 1, 1], "width")
    # Each shard looks up only the ids of its quarter of the table; the lookups are summed
    # before the LayerNorm.
    assert layout.exchanges[0].tensor == "ep" and layout.exchanges[0].mode is GatherMode.SUM
    table = 4096 * 256 * 4
    assert all(table / 4 <= p < table / 4 + 2**19 for p in layout.shard_param_bytes)
    _check(layout, analysis)


def test_uneven_proportions_follow_the_device_speed() -> None:
    model = load_model(attention_block())
    analysis = ShardAnalysis(model, FREE)
    layout = analysis.layout(0, len(model.graph.node), [3, 1], "width")
    assert layout.shard_flops[0] > 2 * layout.shard_flops[1]
    _check(layout, analysis)


def test_single_segment_layouts_read_whole_inputs_and_exchange_nothing() -> None:
    model = load_model(conv_stack(16, 16))
    analysis = ShardAnalysis(model, FREE)
    layout = analysis.layout(0, 6, [1, 1], "tile", single_segment=True)
    assert len(layout.segments) == 1 and layout.whole_inputs
    x = layout.scatter[0]
    assert all(s == (0, x.shape[x.axis]) for s in x.spans)
    _check(layout, analysis)


def test_a_range_whose_work_cannot_split_names_the_node() -> None:
    model = load_model(synthetic.recurrent_model())
    analysis = ShardAnalysis(model, FREE)
    lstm = next(i for i, n in enumerate(model.graph.node) if n.op_type == "LSTM")
    with pytest.raises(ShardingError, match="LSTM node 'y'"):
        analysis.layout(lstm, len(model.graph.node), [1, 1])
    # With the convolution front end the range splits; the LSTM runs whole on one shard.
    layout = analysis.layout(0, len(model.graph.node), [1, 1])
    lstm_flops = profile_loaded(model).nodes[lstm].flops
    assert sorted(f > lstm_flops for f in layout.shard_flops) == [False, True]


def test_a_layout_of_another_model_is_refused() -> None:
    small, big = load_model(conv_stack(16, 16)), load_model(conv_stack(24, 20))
    layout = ShardAnalysis(small, FREE).layout(0, 6, [1, 1], "tile")
    with pytest.raises(ShardingError, match="not made from this model"):
        ShardAnalysis(big, FREE).build(layout)


def test_table_of_the_whole_range_is_its_layout() -> None:
    model = load_model(conv_stack(24, 20))
    analysis = ShardAnalysis(model, FREE)
    n = len(model.graph.node)
    for strategy in ("tile", "width"):
        table = analysis.table(3, strategy, [0, n])
        layout = analysis.layout(0, n, [1, 1, 1], strategy)
        assert table.flops(0, 1).tolist() == list(layout.shard_flops)
        assert (table.param_bytes[1] - table.param_bytes[0]).tolist() == list(
            layout.shard_param_bytes
        )
        assert table.points_before[1] - table.points_upto[0] == len(layout.segments) - 1


def test_a_column_holds_every_range_ending_at_a_position() -> None:
    model = load_model(conv_stack(24, 20))
    analysis = ShardAnalysis(model, FREE)
    n = len(model.graph.node)
    positions = list(range(n + 1))
    table = analysis.table(2, "tile", positions)
    column = table.column(n)
    for a in (0, 3, n - 1):
        assert column.class_flops[a].sum(axis=-1).tolist() == table.flops(a, n).tolist()
    # The head alone (pooling and a Gemm on one shard) is no split worth proposing, and
    # the table names what keeps it whole.
    assert column.allowed[0] and not column.allowed[n - 1]
    assert model.graph.node[table.heaviest_whole(n - 1, n)].name == "head"


@pytest.mark.parametrize("builder", [conv_stack, attention_block])
def test_the_proportional_rule_bounds_every_shard(builder) -> None:  # type: ignore[no-untyped-def]
    model = load_model(builder())
    analysis = ShardAnalysis(model, FREE)
    n = len(model.graph.node)
    checked = 0
    for strategy, k in (("tile", 3), ("width", 2)):
        try:
            table = analysis.table(k, strategy, list(range(n + 1)))
        except ShardingError:
            continue  # the attention block has no rows to tile
        checked += 1
        for a, b in ((0, n), (1, n - 1), (2, 5)):
            rule = (table.split_flops[b] - table.split_flops[a]).sum() / k + (
                table.shared_flops[b] - table.shared_flops[a]
            ).sum()
            busiest = table.flops(a, b).max()
            assert busiest <= rule <= 1.5 * busiest + 1, (strategy, a, b)
    assert checked


def test_width_ranges_start_only_where_nothing_is_split() -> None:
    model = load_model(attention_block())
    analysis = ShardAnalysis(model, FREE)
    n = len(model.graph.node)
    table = analysis.table(2, "width", list(range(n + 1)))
    ln2 = next(i for i, node in enumerate(model.graph.node) if node.name == "ln2")
    q_heads = next(i for i, node in enumerate(model.graph.node) if node.name == "q_heads")
    assert table.starts[0] and table.starts[ln2]
    assert not table.starts[q_heads]  # the projections are split there


def _rows(whole: np.ndarray, span: tuple[int, int] | None) -> np.ndarray | None:
    return None if span is None else whole[:, span[0] : span[1]]


@pytest.mark.parametrize("mode", [GatherMode.CONCAT, GatherMode.SUM, GatherMode.MAX])
def test_exchanges_deliver_each_shard_the_rows_it_needs(mode: GatherMode) -> None:
    rng = np.random.default_rng(0)
    whole = rng.standard_normal((2, 10, 3)).astype(np.float32)
    owned = ((0, 3), (3, 7), (7, 10))
    needs = ((0, 4), None, (2, 10))
    if mode is GatherMode.CONCAT:
        parts = [whole[:, a:b] for a, b in owned]
        spans: tuple[tuple[int, int] | None, ...] = owned
        expect = whole
    else:
        parts = [rng.standard_normal(whole.shape).astype(np.float32) for _ in owned]
        spans = ((0, 10),) * 3
        expect = sum(parts) if mode is GatherMode.SUM else np.maximum.reduce(parts)
    x = Exchange("t", mode, 1, whole.shape, "float32", spans, needs)
    sends = [exchange_sends(x, i, parts[i]) for i in range(3)]
    for j in range(3):
        got = exchange_receive(x, j, parts[j], {i: sends[i][j] for i in range(3) if j in sends[i]})
        want = _rows(expect, needs[j])
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    moved = [sum(int(s[j].nbytes) for s in sends if j in s) for j in range(3)]
    assert moved == list(x.received_bytes)


def test_gather_rebuilds_outputs_and_names_a_missing_part() -> None:
    layout = ShardLayout(
        (1.0, 1.0),
        (
            GatherSpec("c", GatherMode.CONCAT, axis=1),
            GatherSpec("s", GatherMode.SUM),
            GatherSpec("m", GatherMode.MAX),
            GatherSpec("t", GatherMode.TAKE, shard=1),
        ),
        "test",
    )
    part = GatherSpec.part_name
    a, b = np.ones((2, 1)), np.zeros((2, 3))
    out = gather(
        layout,
        [
            {part("c", 0): a, part("s", 0): np.full(3, 2.0), part("m", 0): np.array([1.0, 5.0])},
            {
                part("c", 1): b,
                part("s", 1): np.full(3, 5.0),
                part("m", 1): np.array([4.0, 2.0]),
                part("t", 1): np.arange(2),
            },
        ],
    )
    assert out["c"].shape == (2, 4) and out["c"][:, 0].tolist() == [1, 1]
    assert out["s"].tolist() == [7, 7, 7]
    assert out["m"].tolist() == [4, 5]
    assert out["t"].tolist() == [0, 1]
    with pytest.raises(ShardingError, match="'s'"):
        gather(layout, [{part("c", 0): a}, {part("c", 1): b}])


@pytest.mark.parametrize(
    ("builder", "strategy"),
    [(lambda: conv_stack(24, 20), "tile"), (attention_block, "width"), (embedding_block, "width")],
)
def test_a_layout_travels_as_json_whole(builder, strategy: str) -> None:  # type: ignore[no-untyped-def]
    """What a shard server tells the fan-out hop before it is the layout itself."""
    model = load_model(builder())
    layout = ShardAnalysis(model, FREE).layout(0, len(model.graph.node), [2, 1], strategy)
    sent = json.loads(json.dumps(layout_to_json(layout)))
    assert layout_from_json(sent) == layout
    assert layout_id(layout_from_json(sent)) == layout_id(layout)
    other = ShardAnalysis(model, FREE).layout(0, len(model.graph.node), [1, 2], strategy)
    assert layout_id(other) != layout_id(layout)


def test_a_bad_layout_document_is_refused() -> None:
    model = load_model(conv_stack(16, 16))
    raw = layout_to_json(ShardAnalysis(model, FREE).layout(0, 6, [1, 1], "tile"))
    for broken in ({**raw, "segments": "x"}, {**raw, "gathers": [{"output": "y"}]}, []):
        with pytest.raises((KeyError, ValueError, TypeError)):
            layout_from_json(broken)


def test_a_sharded_run_stepped_by_hand_names_the_shard_that_did_not_answer() -> None:
    model = load_model(attention_block())
    layout = ShardAnalysis(model, FREE).layout(0, len(model.graph.node), [1, 1], "width")
    x = layout.scatter[0]
    steps = ShardedRun(layout, {x.tensor: np.zeros(x.shape, dtype=x.dtype)})
    assert sorted(steps.feeds(0)) == [0, 1]
    with pytest.raises(ShardingError, match="shard 1 did not answer"):
        steps.take(0, {0: {}})


def _part(x: Exchange, shard: int, fill: float) -> np.ndarray:
    span = x.parts[shard]
    assert span is not None
    shape = list(x.shape)
    shape[x.axis] = span[1] - span[0]
    return np.full(shape, fill, dtype=x.dtype)


def test_a_shard_keeps_its_tensors_and_answers_only_the_rows_its_peers_need() -> None:
    """Between segments a shard answers the rows of each exchange its peers read, no
    more; the next call brings it its peers' rows. A stray tensor, or a segment asked for
    twice, is refused with the tensor or the segment named."""
    model = load_model(conv_stack(16, 16))
    layout = ShardAnalysis(model, FREE).layout(0, len(model.graph.node), [1, 1], "tile")
    assert len(layout.segments) >= 2 and layout.segments[0].exchanges
    states = [ShardState(layout, i) for i in range(2)]
    inputs = {x.tensor: np.ones(x.shape, dtype=x.dtype) for x in layout.scatter}
    answers = []
    for i, state in enumerate(states):
        feeds = state.feeds(0, scatter(layout, i, inputs))
        assert set(feeds) == set(layout.segments[0].inputs[i])
        outputs = {
            GatherSpec.part_name(x.tensor, i): _part(x, i, 1.0 + i)
            for x in layout.segments[0].exchanges
        }
        answers.append(states[i].answer(0, outputs))
    for i, answer in enumerate(answers):
        sent = sum(int(a.nbytes) for a in answer.values())
        assert sent == sum(x.sent_bytes[i] for x in layout.segments[0].exchanges)
        assert sent < sum(int(_part(x, i, 0).nbytes) for x in layout.segments[0].exchanges)
    for j, state in enumerate(states):
        names = {wire_name(x.tensor, 1 - j, j) for x in layout.segments[0].exchanges}
        mine = {n: a for n, a in answers[1 - j].items() if n in names}
        feeds = state.feeds(1, mine)
        for x in layout.segments[0].exchanges:
            need = x.needs[j]
            if x.tensor in feeds and need is not None:
                got = feeds[x.tensor]
                assert got.shape[x.axis] == need[1] - need[0]
                # Its own rows and its peer's, in order: 1.0 from shard 0, 2.0 from shard 1.
                assert set(np.unique(got)) <= {1.0, 2.0} and len(np.unique(got)) == 2
    with pytest.raises(ShardingError, match="segment 0 of this request already"):
        states[0].feeds(0, {})
    stray = wire_name("nope", 1, 0)
    with pytest.raises(ShardingError, match="nope"):
        ShardState(layout, 0).feeds(0, {**scatter(layout, 0, inputs), stray: np.zeros(1)})


def test_tiles_of_a_batch_are_cut_row_for_row() -> None:
    """A batch of requests is scattered like one: the tile rows of every request."""
    model = load_model(conv_stack(16, 16))
    layout = ShardAnalysis(model, FREE).layout(0, 6, [1, 1], "tile")
    x = layout.scatter[0]
    one = np.random.default_rng(0).random(x.shape).astype(x.dtype)
    batch = np.concatenate([one, 2 * one])
    for shard in range(2):
        piece = scatter(layout, shard, {x.tensor: batch})[x.tensor]
        alone = scatter(layout, shard, {x.tensor: one})[x.tensor]
        np.testing.assert_array_equal(piece[:1], alone)
        np.testing.assert_array_equal(piece[1:], 2 * alone)
    with pytest.raises(ShardingError, match="has shape"):
        scatter(layout, 0, {x.tensor: batch[..., :3]})
