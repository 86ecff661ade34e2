from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from model_builders import diamond, f32, make
from partita.model.errors import ModelLoadError
from partita.model.load import load_model, load_model_with_report, parse_input_shapes


def test_declared_shape_resolves_every_tensor() -> None:
    model = load_model(diamond(), {"x": [2, 3, 8, 8]})
    shapes = {
        vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in [*model.graph.value_info, *model.graph.output]
    }
    assert shapes["a"] == [2, 4, 8, 8]
    assert shapes["out"] == [2, 4, 8, 8]


def test_symbolic_input_without_shape_names_input_and_dims() -> None:
    with pytest.raises(ModelLoadError, match=r"input 'x' has symbolic dims \['batch'\]"):
        load_model(diamond())


def test_shape_of_wrong_rank_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="rank 4"):
        load_model(diamond(), {"x": [3, 8, 8]})


def test_unknown_input_name_is_refused() -> None:
    with pytest.raises(ModelLoadError, match=r"\['nope'\]"):
        load_model(diamond(), {"x": [1, 3, 8, 8], "nope": [1]})


@pytest.mark.parametrize("spec", ["x", "x=", "x=1xax3", "=1x2", "x=0x3"])
def test_bad_cli_shapes(spec: str) -> None:
    with pytest.raises(ModelLoadError, match="NAME=DIMS"):
        parse_input_shapes([spec])


def test_cli_shapes() -> None:
    assert parse_input_shapes(["x=1x3x224x224", "ids=1X128"]) == {
        "x": (1, 3, 224, 224),
        "ids": (1, 128),
    }


def test_shape_chain_is_folded_into_a_constant() -> None:
    # Reshape(x, Concat(Shape(x)[0], -1)): an exporter's dynamic flatten.
    idx = numpy_helper.from_array(np.array([0], dtype=np.int64), "i0")
    minus = numpy_helper.from_array(np.array([-1], dtype=np.int64), "m1")
    model = make(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "i0"], ["n"]),
            helper.make_node("Concat", ["n", "m1"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        [f32("x", ["b", 4, 5])],
        [f32("y", ["b", "f"])],
        [idx, minus],
    )
    loaded = load_model_with_report(model, {"x": [3, 4, 5]})
    assert [n.op_type for n in loaded.model.graph.node] == ["Reshape"]
    assert loaded.report.folded_nodes == 3
    assert loaded.report.unresolved == 0


def test_unsupported_opset_is_refused() -> None:
    model = diamond()
    model.opset_import[0].version = 99
    with pytest.raises(ModelLoadError, match="opset 99"):
        load_model(model, {"x": [1, 3, 8, 8]})


def test_external_data_is_loaded_and_digested(tmp_path) -> None:
    model = diamond()
    path = tmp_path / "m.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.data",
        size_threshold=0,
    )
    loaded = load_model_with_report(path, {"x": [1, 3, 8, 8]})
    assert {t.name for t in loaded.model.graph.initializer} == {"wa", "wb"}
    before = loaded.digest
    data = tmp_path / "m.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\1")
    assert load_model_with_report(path, {"x": [1, 3, 8, 8]}).digest != before


def test_missing_external_data_says_which_file(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(
        diamond(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="w.bin",
        size_threshold=0,
    )
    (tmp_path / "w.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"w\.bin"):
        load_model(path, {"x": [1, 3, 8, 8]})
