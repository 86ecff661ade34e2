"""Fetch a model file named by an EdgeModel's `source`, verify its sha256, cache it by digest.

Sources: `file:///PATH` (inside the model store), `http(s)://HOST/PATH` (streamed,
size-limited, never to metadata or link-local addresses unless allowed, see
`partita.api.sources`) and `configmap://NAMESPACE/NAME/KEY` (a `binaryData` or `data` key).
The cache is content-addressed, so a model fetched once is never fetched again whatever URI
names it, and a file only enters the cache after its digest matched.

The stage servers apply the same rules in their own fetch (`partita_server.fetch`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from partita.api import sources

CHUNK = 1 << 20
DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB: the protobuf limit of a single ONNX file
MAX_REDIRECTS = 5


class FetchReason(StrEnum):
    """Why a fetch failed, as the `reason` of the ModelFetched condition."""

    BAD_SOURCE = "BadSource"
    NOT_FOUND = "NotFound"
    UNREACHABLE = "Unreachable"
    FORBIDDEN = "Forbidden"
    TOO_LARGE = "TooLarge"
    DIGEST_MISMATCH = "DigestMismatch"


class FetchError(Exception):
    """A model could not be fetched; `reason` is a `FetchReason`, the message says what to do."""

    def __init__(self, reason: FetchReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class FetchedModel:
    """A verified model file in the cache."""

    path: Path
    sha256: str
    size: int
    cached: bool  # True when no bytes were read from the source this time


# Reads a ConfigMap: (namespace, name) -> its body as a dict (data / binaryData).
ConfigMapReader = Callable[[str, str], dict[str, Any]]


class ModelFetcher:
    """Fetches models into `cache_dir/<sha256>.onnx`.

    `read_configmap` is injected so the fetcher holds no Kubernetes client of its own;
    `namespace_of_request` limits ConfigMap sources to the EdgeModel's namespace (the
    operator must not read other tenants' ConfigMaps on anyone's behalf). `model_store`
    (default `$PARTITA_MODEL_STORE`) confines file sources; `allow_link_local` (default
    `$PARTITA_ALLOW_LINK_LOCAL_SOURCES`) lets http(s) sources reach link-local and
    metadata addresses; `env` stands in for the process environment.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout_s: float = 60.0,
        read_configmap: ConfigMapReader | None = None,
        model_store: Path | None = None,
        allow_link_local: bool | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.read_configmap = read_configmap
        self.model_store = model_store if model_store is not None else sources.model_store(env)
        self.allow_link_local = (
            sources.link_local_allowed(env) if allow_link_local is None else allow_link_local
        )

    def cached(self, sha256: str) -> Path:
        return self.cache_dir / f"{sha256}.onnx"

    def fetch(self, uri: str, sha256: str, *, namespace: str | None = None) -> FetchedModel:
        """The verified file for `uri`; raises `FetchError` with a reason a person can act on."""
        sha256 = sha256.lower()
        path = self.cached(sha256)
        if path.is_file():
            return FetchedModel(path, sha256, path.stat().st_size, cached=True)
        scheme = urlsplit(uri).scheme
        if scheme == "file":
            chunks = self._file_chunks(uri)
        elif scheme in ("http", "https"):
            chunks = self._http_chunks(uri)
        elif scheme == "configmap":
            chunks = self._configmap_chunks(uri, namespace)
        else:
            raise FetchError(
                FetchReason.BAD_SOURCE,
                f"source.uri {uri!r}: scheme {scheme!r} is not file, http, https or configmap",
            )
        return self._store(uri, sha256, chunks)

    def _store(self, uri: str, sha256: str, chunks: Iterator[bytes]) -> FetchedModel:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.cache_dir, suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise FetchError(
                            FetchReason.TOO_LARGE,
                            f"source.uri {uri!r} is larger than the operator's limit of "
                            f"{self.max_bytes} bytes; raise the chart value "
                            "operator.maxModelBytes or use a smaller model",
                        )
                    digest.update(chunk)
                    out.write(chunk)
            actual = digest.hexdigest()
            if actual != sha256:
                raise FetchError(
                    FetchReason.DIGEST_MISMATCH,
                    f"source.sha256 is {sha256} but {uri!r} has sha256 {actual} "
                    f"({size} bytes); fix source.sha256 or the file",
                )
            final = self.cached(sha256)
            tmp.replace(final)
            return FetchedModel(final, sha256, size, cached=False)
        finally:
            tmp.unlink(missing_ok=True)

    def _file_chunks(self, uri: str) -> Iterator[bytes]:
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise FetchError(
                FetchReason.BAD_SOURCE,
                f"source.uri {uri!r}: file URIs name a local path, file:///PATH",
            )
        path = Path(unquote(parts.path))
        if self.model_store is not None:
            try:
                path = sources.confined_path(path, self.model_store)
            except sources.SourceRefused as exc:
                raise FetchError(FetchReason.FORBIDDEN, f"source.uri {uri!r}: {exc}") from None
        if not path.is_file():
            raise FetchError(
                FetchReason.NOT_FOUND,
                f"source.uri {uri!r}: {path} is not a file on the operator's filesystem; "
                "mount it into the operator (chart value modelStore) or use http(s)://",
            )
        try:
            handle = path.open("rb")
        except OSError as exc:
            raise FetchError(
                FetchReason.FORBIDDEN, f"source.uri {uri!r}: cannot read {path}: {exc}"
            ) from None

        def chunks() -> Iterator[bytes]:
            with handle:
                while block := handle.read(CHUNK):
                    yield block

        return chunks()

    def _check_target(self, uri: str) -> None:
        """Refuse a URL whose host is, or resolves to, an address sources may not reach."""
        import socket

        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(FetchReason.BAD_SOURCE, f"source.uri {uri!r}: not an http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            sources.check_host(parts.hostname, allow_link_local=self.allow_link_local)
            infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
            addresses = [str(info[4][0]) for info in infos]
            sources.check_resolved(
                parts.hostname, addresses, allow_link_local=self.allow_link_local
            )
        except sources.SourceRefused as exc:
            raise FetchError(
                FetchReason.FORBIDDEN, f"source.uri (or its redirect) {uri!r}: {exc}"
            ) from None
        except (OSError, ValueError) as exc:
            raise FetchError(
                FetchReason.UNREACHABLE, f"source.uri {uri!r}: cannot resolve the host ({exc})"
            ) from None

    def _check_peer(self, uri: str, response: Any) -> None:
        """The address actually connected to passes the same check (no DNS rebinding)."""
        stream = response.extensions.get("network_stream")
        peer = stream.get_extra_info("server_addr") if stream is not None else None
        if peer:
            try:
                sources.check_address(str(peer[0]), allow_link_local=self.allow_link_local)
            except sources.SourceRefused as exc:
                raise FetchError(FetchReason.FORBIDDEN, f"source.uri {uri!r}: {exc}") from None

    def _http_chunks(self, uri: str) -> Iterator[bytes]:
        import httpx

        def chunks() -> Iterator[bytes]:
            url = uri
            try:
                with httpx.Client(timeout=self.timeout_s, follow_redirects=False) as client:
                    for _ in range(MAX_REDIRECTS + 1):
                        self._check_target(url)
                        with client.stream("GET", url) as response:
                            self._check_peer(url, response)
                            location = response.headers.get("location")
                            if response.is_redirect and location:
                                url = urljoin(url, location)
                                continue
                            yield from self._body(uri, response)
                            return
                    raise FetchError(
                        FetchReason.UNREACHABLE,
                        f"source.uri {uri!r}: more than {MAX_REDIRECTS} redirects",
                    )
            except httpx.HTTPError as exc:
                raise FetchError(
                    FetchReason.UNREACHABLE,
                    f"source.uri {uri!r}: {type(exc).__name__}: {exc}; check the URL and "
                    "that the operator's pod may reach it (NetworkPolicy egress)",
                ) from None

        return chunks()

    def _body(self, uri: str, response: Any) -> Iterator[bytes]:
        if response.status_code == 404:
            raise FetchError(FetchReason.NOT_FOUND, f"source.uri {uri!r}: HTTP 404")
        if response.status_code in (401, 403):
            raise FetchError(
                FetchReason.FORBIDDEN,
                f"source.uri {uri!r}: HTTP {response.status_code}; the operator "
                "sends no credentials, serve the file without them",
            )
        if response.status_code >= 300:
            raise FetchError(
                FetchReason.UNREACHABLE, f"source.uri {uri!r}: HTTP {response.status_code}"
            )
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise FetchError(
                FetchReason.TOO_LARGE,
                f"source.uri {uri!r} declares {declared} bytes, more than the "
                f"operator's limit of {self.max_bytes}",
            )
        yield from response.iter_bytes(CHUNK)

    def _configmap_chunks(self, uri: str, namespace: str | None) -> Iterator[bytes]:
        parts = urlsplit(uri)
        segments = [parts.netloc, *parts.path.strip("/").split("/")]
        if len(segments) != 3 or not all(segments):
            raise FetchError(
                FetchReason.BAD_SOURCE,
                f"source.uri {uri!r}: expected configmap://NAMESPACE/NAME/KEY",
            )
        cm_namespace, name, key = segments
        if namespace is not None and cm_namespace != namespace:
            raise FetchError(
                FetchReason.FORBIDDEN,
                f"source.uri {uri!r}: the ConfigMap must be in the EdgeModel's namespace "
                f"{namespace!r}, not {cm_namespace!r}",
            )
        if self.read_configmap is None:
            raise FetchError(
                FetchReason.BAD_SOURCE, f"source.uri {uri!r}: no Kubernetes access to read it"
            )
        body = self.read_configmap(cm_namespace, name)
        binary = body.get("binaryData") or {}
        data = body.get("data") or {}
        if key in binary:
            blob = base64.b64decode(binary[key])
        elif key in data:
            blob = str(data[key]).encode()
        else:
            keys = sorted([*binary, *data])
            raise FetchError(
                FetchReason.NOT_FOUND,
                f"source.uri {uri!r}: ConfigMap {cm_namespace}/{name} has no key {key!r} "
                f"(keys: {', '.join(keys) or 'none'})",
            )
        return iter([blob[i : i + CHUNK] for i in range(0, len(blob), CHUNK)] or [b""])


def kube_configmap_reader(core_v1: Any) -> ConfigMapReader:
    """A `ConfigMapReader` backed by kubernetes' CoreV1Api, mapping API errors to reasons."""

    def read(namespace: str, name: str) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            cm = core_v1.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise FetchError(
                    FetchReason.NOT_FOUND, f"ConfigMap {namespace}/{name} does not exist"
                ) from None
            if exc.status == 403:
                raise FetchError(
                    FetchReason.FORBIDDEN,
                    f"the operator may not read ConfigMap {namespace}/{name} (RBAC)",
                ) from None
            raise FetchError(
                FetchReason.UNREACHABLE,
                f"reading ConfigMap {namespace}/{name}: HTTP {exc.status} {exc.reason}",
            ) from None
        return {"data": cm.data or {}, "binaryData": cm.binary_data or {}}

    return read
