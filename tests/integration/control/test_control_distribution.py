"""The operator's model distribution over real HTTP on loopback: the verified bytes for the
right token, 401 without it, 404 for a model the operator does not hold, 400 for a bad digest."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from pathlib import Path

import httpx

from partita.control.distribution import model_token, model_url, new_key
from partita.control.endpoint import Endpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serves_the_verified_file_to_the_holder_of_its_token(tmp_path: Path) -> None:
    data = b"onnx bytes " * 100_000
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / f"{digest}.onnx").write_bytes(data)
    key, port = new_key(), _free_port()

    def locate(d: str) -> Path | None:
        path = tmp_path / f"{d}.onnx"
        return path if path.is_file() else None

    async def scenario() -> None:
        server = Endpoint(
            f"127.0.0.1:{port}", healthy=lambda: True, exposition=bytes, models=(key, locate)
        )
        await server.start()
        base = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(trust_env=False) as client:
                url = model_url(base, digest)
                good = await client.get(
                    url, headers={"Authorization": f"Bearer {model_token(key, digest)}"}
                )
                assert good.status_code == 200 and good.content == data
                anonymous = await client.get(url)
                assert anonymous.status_code == 401 and "model token" in anonymous.json()["error"]
                other = model_token(key, "0" * 64)  # a token for another model
                wrong = await client.get(url, headers={"Authorization": f"Bearer {other}"})
                assert wrong.status_code == 401
                missing = "1" * 64
                absent = await client.get(
                    model_url(base, missing),
                    headers={"Authorization": f"Bearer {model_token(key, missing)}"},
                )
                assert absent.status_code == 404 and "not held" in absent.json()["error"]
                bad = await client.get(f"{base}/v1/models/..%2Fetc%2Fpasswd")
                assert bad.status_code in (400, 404)
        finally:
            await server.stop()

    asyncio.run(scenario())
