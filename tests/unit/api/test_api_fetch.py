"""Model fetching from files and ConfigMap bodies: digest, size limit, cache by digest."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from partita.kube.fetch import FetchError, FetchReason, ModelFetcher


def test_file_is_verified_then_served_from_the_cache(tmp_path: Path, model_file: Any):
    fetcher = ModelFetcher(tmp_path / "cache")
    first = fetcher.fetch(model_file.uri, model_file.sha256)
    assert not first.cached and first.size == model_file.size
    assert first.path.read_bytes() == model_file.path.read_bytes()
    model_file.path.unlink()  # the cache, keyed by digest, no longer needs the source
    again = fetcher.fetch(model_file.uri, model_file.sha256)
    assert again.cached and again.path == first.path


def test_wrong_digest_is_refused_and_not_cached(tmp_path: Path, model_file: Any):
    fetcher = ModelFetcher(tmp_path / "cache")
    wrong = "0" * 64
    with pytest.raises(FetchError) as caught:
        fetcher.fetch(model_file.uri, wrong)
    assert caught.value.reason is FetchReason.DIGEST_MISMATCH
    assert model_file.sha256 in str(caught.value) and "source.sha256" in str(caught.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_size_limit(tmp_path: Path, model_file: Any):
    fetcher = ModelFetcher(tmp_path / "cache", max_bytes=model_file.size - 1)
    with pytest.raises(FetchError) as caught:
        fetcher.fetch(model_file.uri, model_file.sha256)
    assert caught.value.reason is FetchReason.TOO_LARGE
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("file:///does/not/exist.onnx", FetchReason.NOT_FOUND),
        ("file://host/x.onnx", FetchReason.BAD_SOURCE),
        ("s3://bucket/x.onnx", FetchReason.BAD_SOURCE),
        ("configmap://ns/only-name", FetchReason.BAD_SOURCE),
    ],
)
def test_bad_sources_name_the_problem(tmp_path: Path, uri: str, reason: FetchReason):
    with pytest.raises(FetchError) as caught:
        ModelFetcher(tmp_path).fetch(uri, "0" * 64, namespace="ns")
    assert caught.value.reason is reason
    assert "source.uri" in str(caught.value)


def test_configmap_binary_data(tmp_path: Path, model_file: Any):
    blob = model_file.path.read_bytes()
    bodies = {("ns", "models"): {"binaryData": {"tiny.onnx": base64.b64encode(blob).decode()}}}
    fetcher = ModelFetcher(tmp_path, read_configmap=lambda ns, name: bodies[(ns, name)])
    got = fetcher.fetch("configmap://ns/models/tiny.onnx", model_file.sha256, namespace="ns")
    assert got.path.read_bytes() == blob


def test_configmap_missing_key_lists_keys(tmp_path: Path):
    fetcher = ModelFetcher(tmp_path, read_configmap=lambda ns, name: {"data": {"a": "x"}})
    with pytest.raises(FetchError) as caught:
        fetcher.fetch("configmap://ns/models/b.onnx", "0" * 64, namespace="ns")
    assert caught.value.reason is FetchReason.NOT_FOUND
    assert "keys: a" in str(caught.value)


def test_configmap_of_another_namespace_is_forbidden(tmp_path: Path):
    fetcher = ModelFetcher(tmp_path, read_configmap=lambda ns, name: {"data": {"k": "v"}})
    with pytest.raises(FetchError) as caught:
        fetcher.fetch("configmap://other/models/k", "0" * 64, namespace="mine")
    assert caught.value.reason is FetchReason.FORBIDDEN
