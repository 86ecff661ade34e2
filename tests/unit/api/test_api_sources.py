"""What a model source may reach, as pure rules: paths, addresses, external-data locations."""

from __future__ import annotations

from pathlib import Path

import pytest

from partita.api.sources import (
    SourceRefused,
    check_address,
    check_external_location,
    check_host,
    confined_path,
)


def test_paths_resolve_inside_the_store_or_are_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "m").mkdir(parents=True)
    (store / "m" / "a.onnx").write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"x")
    (store / "link.onnx").symlink_to(tmp_path / "secret")
    assert confined_path(store / "m" / "a.onnx", store) == (store / "m" / "a.onnx").resolve()
    for escape in (store / ".." / "secret", store / "link.onnx", Path("/etc/passwd")):
        with pytest.raises(SourceRefused, match="outside the model store"):
            confined_path(escape, store)


@pytest.mark.parametrize(
    "address",
    ["169.254.169.254", "169.254.10.1", "fe80::1", "::ffff:169.254.169.254", "fd00:ec2::254",
     "100.100.100.200", "0.0.0.0", "::", "224.0.0.1"],
)  # fmt: skip
def test_metadata_link_local_and_unspecified_addresses_are_refused(address: str) -> None:
    with pytest.raises(SourceRefused):
        check_address(address, allow_link_local=False)


def test_allowing_link_local_lets_metadata_through_but_never_unspecified() -> None:
    check_address("169.254.169.254", allow_link_local=True)
    check_address("fe80::1%eth0", allow_link_local=True)
    with pytest.raises(SourceRefused):
        check_address("0.0.0.0", allow_link_local=True)


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.5", "192.168.1.2", "::1", "8.8.8.8"])
def test_ordinary_addresses_pass(address: str) -> None:
    check_address(address, allow_link_local=False)


def test_metadata_names_are_refused_before_resolution() -> None:
    for host in ("metadata.google.internal", "METADATA.google.internal.", "metadata"):
        with pytest.raises(SourceRefused, match="metadata"):
            check_host(host, allow_link_local=False)
    check_host("metadata.google.internal", allow_link_local=True)
    check_host("models.example", allow_link_local=False)


def test_external_data_stays_in_the_model_directory(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "escape.bin").symlink_to("/etc/passwd")
    assert check_external_location("weights.bin", "w", tmp_path) == tmp_path / "weights.bin"
    for location in ("../x.bin", "/etc/passwd", "a/../../x", "escape.bin", "C:\\x", ""):
        with pytest.raises(SourceRefused, match="inside the model's directory"):
            check_external_location(location, "w", tmp_path)
