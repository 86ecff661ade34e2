"""The stage server's own download of an http(s) model source into its cache.

The same rules as the operator's fetch (`partita.api.sources`): no metadata or link-local
address, checked on every address the host resolves to, on the address connected to and on
each redirect's target; the size limit holds while streaming; the file enters the cache only
once its sha256 matched.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from partita.api import sources
from partita_server.errors import StageSpecError

__all__ = ["download"]

MAX_REDIRECTS = 5
DEFAULT_MAX_BYTES = 2 << 30  # the protobuf limit of one ONNX file


def _check_target(uri: str, original: str, allow_link_local: bool) -> None:
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StageSpecError(f"source.uri {original}: redirected to {uri!r}, not http(s)")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        sources.check_host(parts.hostname, allow_link_local=allow_link_local)
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
        addresses = [str(info[4][0]) for info in infos]
        sources.check_resolved(parts.hostname, addresses, allow_link_local=allow_link_local)
    except sources.SourceRefused as exc:
        raise StageSpecError(f"source.uri {original} (at {uri}): {exc}") from exc
    except OSError as exc:
        raise StageSpecError(f"source.uri {original}: cannot resolve {parts.hostname}") from exc


def _check_peer(uri: str, original: str, response: httpx.Response, allow: bool) -> None:
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    if peer:
        try:
            sources.check_address(str(peer[0]), allow_link_local=allow)
        except sources.SourceRefused as exc:
            raise StageSpecError(f"source.uri {original} (at {uri}): {exc}") from exc


def download(
    uri: str,
    sha256: str,
    target: Path,
    *,
    timeout_s: float = 300.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    allow_link_local: bool | None = None,
) -> Path:
    """`uri` streamed into `target` (atomically), refused past `max_bytes` or a wrong digest."""
    allow = sources.link_local_allowed() if allow_link_local is None else allow_link_local
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    size = 0
    url = uri
    try:
        with os.fdopen(fd, "wb") as out, httpx.Client(timeout=timeout_s) as client:
            for _ in range(MAX_REDIRECTS + 1):
                _check_target(url, uri, allow)
                with client.stream("GET", url) as reply:
                    _check_peer(url, uri, reply, allow)
                    location = reply.headers.get("location")
                    if reply.is_redirect and location:
                        url = urljoin(url, location)
                        continue
                    if reply.status_code != 200:
                        raise StageSpecError(f"source.uri {uri}: HTTP {reply.status_code}")
                    for chunk in reply.iter_bytes(1 << 20):
                        size += len(chunk)
                        if size > max_bytes:
                            raise StageSpecError(
                                f"source.uri {uri}: larger than the server's limit of "
                                f"{max_bytes} bytes"
                            )
                        digest.update(chunk)
                        out.write(chunk)
                    break
            else:
                raise StageSpecError(f"source.uri {uri}: more than {MAX_REDIRECTS} redirects")
        if digest.hexdigest() != sha256:
            raise StageSpecError(
                f"source.uri {uri}: sha256 is {digest.hexdigest()}, the spec says {sha256}; "
                "fix source.sha256 or the model file"
            )
        os.replace(tmp, target)
        return target
    except httpx.HTTPError as exc:
        raise StageSpecError(f"source.uri {uri}: download failed ({exc})") from exc
    finally:
        tmp.unlink(missing_ok=True)
