"""The `serve` fixture: start real stage servers, always torn down after the test."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from stage_servers import GRPC, Serve, running, spec_for

from partita_server.app import create_app, create_dataplane
from partita_server.spec import OrtSizing, StageTokens


@pytest.fixture(scope="session")
def stage_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One piece cache for the session: cut stages are keyed by digest + spec, so reusable."""
    return tmp_path_factory.mktemp("stage-cache")


@pytest.fixture
def serve(stage_cache: Path) -> Iterator[Serve]:
    """`serve(model_path, name, token=..., tokens=..., cores=..., **spec_fields)` → REST base
    URL (`cores`: the CPU limit the server sizes its ORT runs for); the same server's gRPC
    address is `GRPC[url]`. All torn down after the test."""
    with ExitStack() as stack:

        def start(
            model: Path,
            name: str,
            *,
            token: str | None = None,
            tokens: StageTokens | None = None,
            cores: float | None = None,
            **fields: Any,
        ) -> str:
            spec = spec_for(model, name, stage_cache, **fields)
            if tokens is None:
                tokens = StageTokens((token,) if token else ())
            sizing = OrtSizing.for_cores(cores) if cores is not None else None
            plane = create_dataplane(spec, tokens=tokens, sizing=sizing)
            app = create_app(dataplane=plane, grpc_address="127.0.0.1:0")
            url = stack.enter_context(running(app))
            GRPC[url] = f"127.0.0.1:{app.state.grpc_port}"
            return url

        yield start
