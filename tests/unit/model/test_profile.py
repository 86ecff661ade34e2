from __future__ import annotations

import numpy as np

from model_builders import conv_stack, diamond, mlp
from partita.model import synthetic
from partita.model.profile import (
    FRONTIER_TOLERANCE,
    clear_cache,
    peak_live_bytes,
    profile_from_dict,
    profile_model,
    profile_to_dict,
)
from partita.model.types import OpClass, ShardTable


def test_conv_and_matmul_flops_are_exact() -> None:
    prof = profile_model(diamond(), {"x": [1, 3, 8, 8]})
    conv_a, relu, conv_b, add = prof.nodes
    assert conv_a.macs == 4 * 8 * 8 * 3 * 3 * 3
    assert conv_a.flops == 2 * conv_a.macs
    assert conv_b.macs == 4 * 8 * 8 * 4
    assert relu.flops == add.flops == 4 * 8 * 8
    assert conv_a.op_class is OpClass.CONV and conv_a.shardable
    assert conv_a.param_bytes == 4 * 3 * 3 * 3 * 4
    assert prof.total_flops == sum(n.flops for n in prof.nodes)
    mlp_prof = profile_model(mlp())
    assert mlp_prof.nodes[0].macs == 2 * 8 * 16


def test_residual_cut_carries_both_branches() -> None:
    prof = profile_model(diamond(), {"x": [1, 3, 8, 8]})
    by_pos = {c.position: c for c in prof.cut_points}
    # After conv_b the skip tensor `ar` and `b` both cross: the cut is a set, not an edge.
    assert 3 in by_pos
    assert {t.name for t in by_pos[3].tensors} == {"ar", "b"}
    assert by_pos[3].nbytes == 2 * 4 * 8 * 8 * 4
    assert by_pos[3].flops_before == sum(n.flops for n in prof.nodes[:3])


def test_live_bytes_peak_over_a_range() -> None:
    prof = profile_model(diamond(), {"x": [1, 3, 8, 8]})
    act = 4 * 8 * 8 * 4
    # After conv_b: ar and b alive (x died after conv_a).
    assert prof.nodes[2].live_bytes == 2 * act
    assert peak_live_bytes(prof, 0, 4) == max(n.live_bytes for n in prof.nodes)
    assert peak_live_bytes(prof, 2, 2) == 0


def test_profile_is_cached_in_memory_and_on_disk(tmp_path) -> None:
    clear_cache()
    first = profile_model(diamond(), {"x": [1, 3, 8, 8]}, cache_dir=tmp_path)
    assert profile_model(diamond(), {"x": [1, 3, 8, 8]}) is first
    assert profile_model(diamond(), {"x": [2, 3, 8, 8]}) != first
    clear_cache()
    again = profile_model(diamond(), {"x": [1, 3, 8, 8]}, cache_dir=tmp_path)
    assert again == first and again is not first
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_shard_tables_are_cached_with_the_profile(tmp_path) -> None:
    clear_cache()
    first = profile_model(conv_stack(24, 20), cache_dir=tmp_path)
    assert {(t.shards, t.strategy) for t in first.shard_tables} >= {(2, "tile"), (4, "tile")}
    clear_cache()
    again = profile_model(conv_stack(24, 20), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    for table in first.shard_tables:
        stored = again.shard_table(table.shards, table.strategy)
        assert stored is not None
        for name in ShardTable.FIELDS:
            np.testing.assert_array_equal(getattr(stored, name), getattr(table, name))
    # Without shard counts the profile is a different entry, with no tables.
    assert profile_model(conv_stack(24, 20), shard_counts=()).shard_tables == ()


def test_profile_roundtrips_through_json() -> None:
    prof = profile_model(diamond(), {"x": [1, 3, 8, 8]})
    assert profile_from_dict(profile_to_dict(prof)) == prof


def test_control_flow_is_kept_whole_with_a_reason() -> None:
    prof = profile_model(synthetic.control_flow_model())
    assert any("(If)" in n and "kept whole" in n for n in prof.notes)
    assert any("(Loop)" in n for n in prof.notes)
    loop = next(n for n in prof.nodes if n.op_type == "Loop")
    assert loop.flops == 3 * (2 * 32 * 32 + 4 * 32)  # body x trip count
    # The Loop's outputs needed an onnxruntime pass: shape inference leaves them open.
    assert dict(prof.shape_coverage)["runtime"] >= 1


def test_frontier_keeps_cheapest_of_equal_compute_cuts() -> None:
    prof = profile_model(synthetic.chain_model(400))
    positions = [c.position for c in prof.cut_points]
    assert positions == sorted(positions)
    # 400 boundaries collapse to at most one per 0.2 % of the FLOPs...
    assert 50 <= len(positions) <= 1 / FRONTIER_TOLERANCE + 1
    # ...and block boundaries (one tensor, 64 B) beat mid-block ones (two tensors).
    assert sum(c.nbytes == 64 for c in prof.cut_points) >= 90


def test_models_of_one_file_profiled_at_once_are_analysed_once(tmp_path, monkeypatch) -> None:
    """Three EdgeModels of one file reach the operator's profiling at the same moment: one
    analysis, one set of cache files, every caller the same profile (two analyses used to
    write one temporary file, and the second rename failed)."""
    import threading

    from partita.model import profile as profiling

    clear_cache()
    analyses = []
    real = profiling.load_model_with_report

    def counted(*args, **kwargs):
        analyses.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(profiling, "load_model_with_report", counted)
    start = threading.Barrier(3)
    got, errors = [], []

    def profile() -> None:
        start.wait()
        try:
            got.append(profile_model(conv_stack(24, 20), cache_dir=tmp_path))
        except Exception as exc:  # what the test reports
            errors.append(exc)

    threads = [threading.Thread(target=profile) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(got) == 3
    assert len(analyses) == 1
    assert all(p is got[0] for p in got)
    assert [p.suffix for p in sorted(tmp_path.iterdir())] == [".json", ".npz"]  # no leftovers
