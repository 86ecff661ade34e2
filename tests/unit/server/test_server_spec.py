"""The stage spec as the operator writes it: validation, file loading, token and CPU limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from partita_server.errors import StageSpecError
from partita_server.spec import Compression, OrtSizing, StageTokens, cpu_cores, load_spec

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
        ("batching: {max_batch_size: 0}\n", "batching.max_batch_size"),
        ("limits: {max_elements: 0}\n", "limits.max_elements"),
        ("next:\n  - {stage: s1, endpoints: [ftp://a:1]}\n", "grpc://HOST:PORT"),
        ("next:\n  - {stage: s1, endpoints: [http://a:1/v2]}\n", "http://HOST:PORT"),
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
    assert StageTokens.from_env({"PARTITA_INTERNAL_TOKEN": "abc"}).current == "abc"
    from_file = StageTokens.from_env({"PARTITA_INTERNAL_TOKEN_FILE": str(tmp_path / "t")})
    assert from_file.current == "s3cret" and from_file.accepts("s3cret")
    assert not from_file.accepts("s3cre") and not from_file.accepts("")
    assert StageTokens.from_env({}).current is None and not StageTokens.from_env({})
    assert not StageTokens().accepts("")
    with pytest.raises(StageSpecError, match="PARTITA_INTERNAL_TOKEN_FILE"):
        StageTokens.from_env({"PARTITA_INTERNAL_TOKEN_FILE": str(tmp_path / "missing")})


def test_token_file_rotation_is_picked_up_without_a_restart(tmp_path: Path) -> None:
    """old -> (old, new) -> (new, old) -> new: at every step old or new callers pass."""
    now = [0.0]
    file = tmp_path / "token"
    file.write_text("old\n")
    tokens = StageTokens(file=file, recheck_s=1.0, clock=lambda: now[0])
    steps = [("old\nnew\n", "old", {"old", "new"}), ("new\nold\n", "new", {"old", "new"}),
             ("new\n", "new", {"new"})]  # fmt: skip
    for i, (text, sent, accepted) in enumerate(steps, start=1):
        file.write_text(text)
        now[0] += 0.5  # not re-read before recheck_s
        assert tokens.current == ("old" if i == 1 else steps[i - 2][1])
        now[0] += 0.6
        assert tokens.current == sent
        assert {t for t in ("old", "new", "other") if tokens.accepts(t)} == accepted
    file.unlink()  # a Secret volume swaps its files: a moment without one keeps the tokens
    now[0] += 2
    assert tokens.current == "new"


def test_cpu_cores_follow_env_then_cgroup(tmp_path: Path) -> None:
    assert cpu_cores({"PARTITA_CPU_LIMIT": "2.7"}, tmp_path) == 2.7
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert cpu_cores({}, tmp_path) == 0.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_cores({}, tmp_path) >= 1
    for bad in ("lots", "0", "-1", "nan", "inf"):
        with pytest.raises(StageSpecError, match="PARTITA_CPU_LIMIT"):
            cpu_cores({"PARTITA_CPU_LIMIT": bad}, tmp_path)


@pytest.mark.parametrize(
    ("cores", "workers", "threads"),
    [(0.25, 1, 1), (0.5, 1, 1), (1.0, 1, 1), (1.5, 2, 1), (2.0, 2, 2), (4.0, 4, 4)],
)
def test_ort_sizing_follows_the_cpu_limit(cores: float, workers: int, threads: int) -> None:
    sizing = OrtSizing.for_cores(cores)
    assert (sizing.workers, sizing.intra_op_threads, sizing.allow_spinning) == (
        workers, threads, False,
    )  # fmt: skip
