"""What a model source may reach: the rules the operator's fetch and the stage servers' fetch
both apply before reading a byte.

- A `file://` path is resolved (symlinks and `..` included) and must stay inside the model
  store, the directory the operator or server was given for model files.
- An `http(s)://` host must not be a cloud metadata service or a link-local address (where
  metadata services and node-local agents listen), unless the installation allows it: a
  model source is written by whoever may create an EdgeModel, and the fetch runs with the
  operator's network position. Every address the name resolves to is checked, and again the
  address actually connected to, and each redirect's target.
- ONNX external data (weights in files next to the model) must be plain relative paths
  inside the model's own directory.

Pure: no network, no file reads except `resolve()`; callers resolve names and pass the
addresses (`check_resolved`).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path, PurePosixPath

__all__ = [
    "ALLOW_LINK_LOCAL_ENV",
    "MODEL_STORE_ENV",
    "SourceRefused",
    "check_address",
    "check_external_location",
    "check_host",
    "check_resolved",
    "confined_path",
    "link_local_allowed",
    "model_store",
]

MODEL_STORE_ENV = "PARTITA_MODEL_STORE"
ALLOW_LINK_LOCAL_ENV = "PARTITA_ALLOW_LINK_LOCAL_SOURCES"

# Metadata services that do not sit in 169.254.0.0/16 (those are refused as link-local).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("100.100.100.200", "fd00:ec2::254", "fd00:ec2::23", "169.254.169.254")
)
METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog"})


class SourceRefused(ValueError):
    """The source points somewhere a model source may not reach; the message says where."""


def model_store(env: dict[str, str] | None = None) -> Path | None:
    """The model store from `$PARTITA_MODEL_STORE`, or None when the installation set none."""
    value = (os.environ if env is None else env).get(MODEL_STORE_ENV, "").strip()
    return Path(value) if value else None


def link_local_allowed(env: dict[str, str] | None = None) -> bool:
    value = (os.environ if env is None else env).get(ALLOW_LINK_LOCAL_ENV, "")
    return value.strip().lower() in ("1", "true", "yes")


def confined_path(path: Path, store: Path) -> Path:
    """`path` resolved, if it lies inside `store` (also resolved); else `SourceRefused`."""
    root = store.resolve()
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise SourceRefused(
            f"{path} resolves to {resolved}, outside the model store {root}; put the model in "
            "the store (chart value modelStore) or serve it over http(s)"
        )
    return resolved


def check_host(host: str, *, allow_link_local: bool) -> None:
    """Refuse metadata-service names before anything is resolved."""
    name = host.strip("[]").rstrip(".").lower()
    if not allow_link_local and name in METADATA_NAMES:
        raise SourceRefused(
            f"host {host!r} is a cloud metadata service; a model source may not reach it "
            "(PARTITA_ALLOW_LINK_LOCAL_SOURCES=true on the operator and the servers allows it)"
        )


def check_address(address: str, *, allow_link_local: bool) -> None:
    """Refuse unspecified, multicast, metadata and (unless allowed) link-local addresses."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        raise SourceRefused(f"address {ip} cannot be a model source")
    if allow_link_local:
        return
    if ip in METADATA_ADDRESSES:
        raise SourceRefused(
            f"address {ip} is a cloud metadata service; a model source may not reach it "
            "(PARTITA_ALLOW_LINK_LOCAL_SOURCES=true on the operator and the servers allows it)"
        )
    if ip.is_link_local:
        raise SourceRefused(
            f"address {ip} is link-local (where metadata services and node agents listen); a "
            "model source may not reach it (PARTITA_ALLOW_LINK_LOCAL_SOURCES=true on the "
            "operator and the servers allows it)"
        )


def check_resolved(host: str, addresses: list[str], *, allow_link_local: bool) -> None:
    """`host` and every address it resolved to may be reached by a model source."""
    check_host(host, allow_link_local=allow_link_local)
    if not addresses:
        raise SourceRefused(f"host {host!r} resolves to no address")
    for address in addresses:
        check_address(address, allow_link_local=allow_link_local)


def check_external_location(location: str, tensor: str, model_dir: Path) -> Path:
    """The file of an ONNX external-data entry, if it stays inside `model_dir`."""
    pure = PurePosixPath(location.replace("\\", "/"))
    resolved = (model_dir / pure).resolve()
    if (
        not location
        or pure.is_absolute()
        or ".." in pure.parts
        or ":" in location
        or not resolved.is_relative_to(model_dir.resolve())
    ):
        raise SourceRefused(
            f"initializer {tensor!r}: external data location {location!r} must be a relative "
            f"path inside the model's directory {model_dir}"
        )
    return resolved
