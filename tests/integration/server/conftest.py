"""The `serve` fixture: start real stage servers, always torn down after the test."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from stage_servers import Serve, running, spec_for

from partita_server.app import create_app


@pytest.fixture(scope="session")
def stage_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One piece cache for the session: cut stages are keyed by digest + spec, so reusable."""
    return tmp_path_factory.mktemp("stage-cache")


@pytest.fixture
def serve(stage_cache: Path) -> Iterator[Serve]:
    """`serve(model_path, name, token=..., **spec_fields)` → base URL; all torn down after."""
    with ExitStack() as stack:

        def start(model: Path, name: str, *, token: str | None = None, **fields: Any) -> str:
            spec = spec_for(model, name, stage_cache, **fields)
            app = create_app(spec, token=token)
            return stack.enter_context(running(app))

        yield start
