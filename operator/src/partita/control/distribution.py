"""Model distribution: stage servers get a model's verified bytes from the operator, by digest.

The operator already fetched every model from its source (a file on its own filesystem or
model store volume, a ConfigMap, an http(s) URL) and checked its sha256; stage servers on any
node then fetch `GET /v1/models/<sha256>` from the operator instead of reaching the source
themselves, so every source kind serves on any cluster and stage pods need no volume, no RBAC
and no egress to the source. A request must carry the model's token: an HMAC of the digest
under the operator's key, which the operator puts in each revision's token Secret. Nothing is
stored per token, so a restarted operator (with the same key) honours the tokens it issued.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

PATH = "/v1/models/{digest}"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


def model_token(key: bytes, digest: str) -> str:
    """The token that lets a stage server fetch the model with sha256 `digest`."""
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


def new_key() -> bytes:
    return secrets.token_bytes(32)


def model_url(base: str, digest: str) -> str:
    return base.rstrip("/") + PATH.format(digest=digest)


# The verified file of a digest, None when the operator does not hold it.
Locate = Callable[[str], Path | None]


def add_routes(app: web.Application, key: bytes, locate: Locate) -> None:
    """`GET /v1/models/<sha256>` on `app`."""

    async def get_model(request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        if _DIGEST.match(digest) is None:
            return web.json_response({"error": f"{digest!r} is not a sha256 digest"}, status=400)
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(presented.encode(), model_token(key, digest).encode()):
            return web.json_response(
                {"error": f"model {digest[:12]}…: send 'Authorization: Bearer <model token>'"},
                status=401,
            )
        path = locate(digest)
        if path is None or not path.is_file():
            return web.json_response(
                {"error": f"model {digest[:12]}… is not held by this operator"}, status=404
            )
        return web.FileResponse(path, chunk_size=CHUNK)

    app.router.add_get(PATH, get_model)
