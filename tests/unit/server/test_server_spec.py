"""The stage spec as the operator writes it: validation, file loading, token and CPU limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from partita_server.errors import StageSpecError
from partita_server.spec import Compression, cpu_limit, internal_token, load_spec

BASE = "model: resnet\nsource:\n  uri: file:///models/r.onnx\n"


def test_yaml_spec_with_hops_loads(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        BASE + "stage: s0\nnext:\n"
        "  - {stage: s1, endpoints: [http://a:1, http://b:1], fan_out: true}\n"
        "  - {stage: s2, endpoints: [http://c:1], compression: int8}\n"
    )
    spec = load_spec(path, env={})
    assert [h.stage for h in spec.next] == ["s1", "s2"]
    assert spec.next[1].compression is Compression.INT8


def test_spec_comes_from_the_environment_and_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('{"model": "a", "source": {"uri": "/m.onnx"}}')
    spec = load_spec(env={"PARTITA_STAGE_SPEC": str(path)}, overrides={"model": "b"})
    assert spec.model == "b"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("next:\n  - {stage: s1, endpoints: [http://a:1]}\n  - {stage: s2, endpoints: [http://b:1]}\n",
         "must be the last hop"),
        ("cascade: {output: p, threshold: 0.5}\n", "cascade needs a next hop"),
        ("inputs: [a]\n", "both inputs and outputs"),
        ("shard: {index: 2, proportions: [1, 1]}\n", "shard.index 2"),
        ("batching: {max_batch_size: 0, max_delay_ms: 1}\n", "batching.max_batch_size"),
        ("unknown: 1\n", "unknown"),
    ],
)  # fmt: skip
def test_bad_specs_say_which_field(tmp_path: Path, extra: str, fragment: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(BASE + extra)
    with pytest.raises(StageSpecError, match=fragment):
        load_spec(path, env={})


def test_remote_source_needs_a_digest(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("model: m\nsource: {uri: 'http://127.0.0.1:1/m.onnx'}\n")
    with pytest.raises(StageSpecError, match="sha256 is required"):
        load_spec(path, env={})


def test_token_from_env_or_file(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("s3cret\n")
    assert internal_token({"PARTITA_INTERNAL_TOKEN": "abc"}) == "abc"
    assert internal_token({"PARTITA_INTERNAL_TOKEN_FILE": str(tmp_path / "t")}) == "s3cret"
    assert internal_token({}) is None


def test_cpu_limit_follows_env_then_cgroup(tmp_path: Path) -> None:
    assert cpu_limit({"PARTITA_CPU_LIMIT": "2.7"}, tmp_path) == 2
    assert cpu_limit({"PARTITA_CPU_LIMIT": "0.5"}, tmp_path) == 1
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert cpu_limit({}, tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_limit({}, tmp_path) >= 1
    with pytest.raises(StageSpecError, match="PARTITA_CPU_LIMIT"):
        cpu_limit({"PARTITA_CPU_LIMIT": "lots"}, tmp_path)
