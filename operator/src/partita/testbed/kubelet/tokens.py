"""ServiceAccount tokens projected into pods, kept as a kubelet keeps them: a TokenRequest for
the pod's ServiceAccount, bound to the pod (deleting the pod revokes it), written into the
pod's projected volume and requested again once 80 % of its lifetime has passed."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partita.testbed.kubelet.podspec import PodError, TokenProjection, pod_name

log = logging.getLogger(__name__)

REFRESH_FRACTION = 0.8  # of the token's lifetime, as the kubelet's token manager
MAX_AGE_S = 24 * 3600.0  # and never older than a day


@dataclass(frozen=True)
class IssuedToken:
    token: str
    issued_at: float  # seconds since the epoch
    expires_at: float

    @property
    def refresh_at(self) -> float:
        lifetime = self.expires_at - self.issued_at
        return self.issued_at + min(REFRESH_FRACTION * lifetime, MAX_AGE_S)


def token_request(pod: Mapping[str, Any], projection: TokenProjection) -> dict[str, Any]:
    """The TokenRequest body: the projection's audience (the apiserver's own when unset) and
    lifetime, bound to this pod by name and uid."""
    meta = pod["metadata"]
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [projection.audience] if projection.audience else [],
            "expirationSeconds": projection.expiration_s,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "uid": meta["uid"],
            },
        },
    }


def issued(doc: Mapping[str, Any], now: dt.datetime) -> IssuedToken:
    status = doc["status"]
    expires = dt.datetime.fromisoformat(status["expirationTimestamp"].replace("Z", "+00:00"))
    return IssuedToken(status["token"], now.timestamp(), expires.timestamp())


class TokenKeeper:
    """Writes and refreshes the token files of the pods the agent runs."""

    def __init__(self, core: Any, now: Callable[[], dt.datetime]) -> None:
        self._core, self._now = core, now
        self._issued: dict[Path, IssuedToken] = {}

    def ensure(self, pod: Mapping[str, Any], projections: Iterable[TokenProjection]) -> None:
        """Every projection's file holds a token that is not due for refresh. A pod whose
        first token cannot be had is a PodError; a failed refresh keeps the old token."""
        for projection in projections:
            current = self._issued.get(projection.file)
            if current is not None and self._now().timestamp() < current.refresh_at:
                continue
            try:
                fresh = self._request(pod, projection)
            except PodError as exc:
                if current is None or self._now().timestamp() >= current.expires_at:
                    raise
                log.warning("%s; keeping the current token until it expires", exc)
                continue
            _write_atomic(projection.file, fresh.token)
            self._issued[projection.file] = fresh

    def forget(self, files: Iterable[Path]) -> None:
        for f in files:
            self._issued.pop(f, None)

    def _request(self, pod: Mapping[str, Any], projection: TokenProjection) -> IssuedToken:
        from kubernetes.client.exceptions import ApiException

        ns = pod["metadata"]["namespace"]
        try:
            resp = self._core.create_namespaced_service_account_token(
                projection.service_account,
                ns,
                token_request(pod, projection),
                _preload_content=False,
            )
        except ApiException as exc:
            raise PodError(
                f"pod {pod_name(pod)}: no token for ServiceAccount {ns}/"
                f"{projection.service_account}: {exc.status} {exc.reason}"
            ) from None
        return issued(json.loads(resp.data), self._now())


def _write_atomic(path: Path, text: str) -> None:
    """Replace the file in one step, so a reader never sees half a token."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
