"""The stage server's own download of a model into its cache: from the operator, which
distributes every model it verified (`from_operator`), or from an http(s) source (`download`).

A source URL is the user's, so it gets the same rules as the operator's fetch
(`partita.api.sources`): no metadata or link-local address, checked on every address the host
resolves to, on the address connected to and on each redirect's target. The operator's URL is
the operator's own Service, reached like any Service (through the cluster's proxy where there
is one), with the model's token. Either way the size limit holds while streaming and the file
enters the cache only once its sha256 matched.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from partita.api import sources
from partita_server.errors import StageSpecError

__all__ = ["download", "from_operator"]

log = logging.getLogger(__name__)

TOKEN_ENV = "PARTITA_MODEL_TOKEN"  # the model's token for the operator's distribution

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


# Answers of a distribution endpoint that is restarting or not yet behind its Service.
UNAVAILABLE = frozenset({429, 502, 503, 504})
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0


class _Unavailable(Exception):
    """The operator could not answer this time (down, restarting, no ready endpoint)."""


def from_operator(
    uri: str,
    sha256: str,
    target: Path,
    *,
    timeout_s: float = 300.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    token: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Path:
    """The model with digest `sha256` from the operator's distribution endpoint `uri`.

    While the operator is unavailable (connection refused or reset, 429/502/503/504) the
    download is tried again, waiting 0.5 s and doubling up to 5 s, until `timeout_s` has
    passed: the server stays up and unready meanwhile, instead of exiting into the kubelet's
    crash-loop back-off, and loads within seconds of the operator's return. Any other answer
    (a refused token, an unknown digest, a wrong digest) fails at once."""
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    if not token:
        raise StageSpecError(
            f"source.uri {uri}: the operator distributes this model; set {TOKEN_ENV} (the "
            "revision's Secret holds it)"
        )
    headers = {"Authorization": f"Bearer {token}"}
    deadline, wait = clock() + timeout_s, RETRY_FIRST_S
    while True:
        try:
            return _from_operator_once(uri, sha256, target, headers, timeout_s, max_bytes)
        except _Unavailable as exc:
            if clock() + wait > deadline:
                raise StageSpecError(
                    f"source.uri {uri}: the operator was unavailable for {timeout_s:.0f} s "
                    f"(last: {exc})"
                ) from exc
            log.warning("source.uri %s: %s; trying again in %.1f s", uri, exc, wait)
            sleep(wait)
            wait = min(2 * wait, RETRY_MAX_S)


def _from_operator_once(
    uri: str,
    sha256: str,
    target: Path,
    headers: dict[str, str],
    timeout_s: float,
    max_bytes: int,
) -> Path:
    with _Download(target, sha256, uri, max_bytes) as out:
        try:
            with (
                httpx.Client(timeout=timeout_s, headers=headers) as client,
                client.stream("GET", uri) as reply,
            ):
                if reply.status_code in UNAVAILABLE:
                    body = reply.read()[:300].decode(errors="replace")
                    raise _Unavailable(f"HTTP {reply.status_code}: {body}")
                if reply.status_code != 200:
                    raise StageSpecError(
                        f"source.uri {uri}: the operator answered HTTP {reply.status_code}: "
                        f"{reply.read()[:300].decode(errors='replace')}"
                    )
                for chunk in reply.iter_bytes(1 << 20):
                    out.write(chunk)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise _Unavailable(f"{type(exc).__name__}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise StageSpecError(f"source.uri {uri}: download failed ({exc})") from exc
    return target


class _Download:
    """A file being downloaded: size-limited, digest-checked, in place only when it matched."""

    def __init__(self, target: Path, sha256: str, uri: str, max_bytes: int) -> None:
        self.target, self.sha256, self.uri, self.max_bytes = target, sha256, uri, max_bytes
        self.digest = hashlib.sha256()
        self.size = 0

    def __enter__(self) -> _Download:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.target.parent, suffix=".part")
        self.tmp = Path(name)
        self.out = os.fdopen(fd, "wb")
        return self

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise StageSpecError(
                f"source.uri {self.uri}: larger than the server's limit of {self.max_bytes} bytes"
            )
        self.digest.update(chunk)
        self.out.write(chunk)

    def __exit__(self, kind: object, *_: object) -> None:
        self.out.close()
        try:
            if kind is None:
                if self.digest.hexdigest() != self.sha256:
                    raise StageSpecError(
                        f"source.uri {self.uri}: sha256 is {self.digest.hexdigest()}, the spec "
                        f"says {self.sha256}; fix source.sha256 or the model file"
                    )
                os.replace(self.tmp, self.target)
        finally:
            self.tmp.unlink(missing_ok=True)


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
    url = uri
    with _Download(target, sha256, uri, max_bytes) as out:
        try:
            with httpx.Client(timeout=timeout_s) as client:
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
                            out.write(chunk)
                        break
                else:
                    raise StageSpecError(f"source.uri {uri}: more than {MAX_REDIRECTS} redirects")
        except httpx.HTTPError as exc:
            raise StageSpecError(f"source.uri {uri}: download failed ({exc})") from exc
    return target
