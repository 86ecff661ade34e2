"""The stage spec: what the operator writes into a stage's ConfigMap, read once at start-up.

A stage server serves one piece of one model: the whole model, a vertical stage (given by its
boundary tensor names) or one shard of a stage. It may forward its outputs to next hops: a
list processed in order, where a fan-out hop drives the shards of the next stage through the
layout they cut (each shard's piece of the tensors, then segment by segment with the exchanges
between them done by the hop) and gathers their parts, and a chain hop (always last) hands
the tensors to the next stage, whose answer becomes this stage's answer.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from partita_server.errors import StageSpecError

__all__ = [
    "Batching",
    "Cascade",
    "Compression",
    "Hop",
    "Limits",
    "ModelSource",
    "OrtSizing",
    "ShardSpec",
    "StageSpec",
    "StageTokens",
    "cpu_cores",
    "load_spec",
]

SPEC_ENV = "PARTITA_STAGE_SPEC"
TOKEN_ENV = "PARTITA_INTERNAL_TOKEN"
TOKEN_FILE_ENV = "PARTITA_INTERNAL_TOKEN_FILE"
CPU_LIMIT_ENV = "PARTITA_CPU_LIMIT"
MODEL_STORE_ENV = "PARTITA_MODEL_STORE"
ALLOW_PRIVATE_SOURCES_ENV = "PARTITA_ALLOW_LINK_LOCAL_SOURCES"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Compression(StrEnum):
    """How float32 tensors cross a stage boundary."""

    NONE = "none"
    FP16 = "fp16"
    INT8 = "int8"  # per-tensor affine: q = round(x / scale) + zero_point


class ModelSource(_Frozen):
    uri: str = Field(description="file://, http:// or https:// location of the ONNX model")
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="digest of the model bytes; required for http(s) sources",
    )
    distributed: bool = Field(
        default=False,
        description="the operator serves this model by digest at `uri`: fetched with the "
        "model's token (PARTITA_MODEL_TOKEN) from the operator's own Service",
    )

    @model_validator(mode="after")
    def _remote_needs_digest(self) -> ModelSource:
        if self.uri.startswith(("http://", "https://")) and self.sha256 is None:
            raise ValueError("source.sha256 is required for an http(s) source")
        if not self.uri.startswith(("http://", "https://", "file://", "/")):
            raise ValueError(f"source.uri {self.uri!r}: use file://, http:// or https://")
        return self


class ShardSpec(_Frozen):
    index: int = Field(ge=0, description="which shard of the stage this server runs")
    proportions: tuple[Annotated[float, Field(gt=0)], ...] = Field(min_length=2)
    strategy: Literal["tile", "width", "branch"] | None = Field(
        default=None,
        description="how the stage splits, as the plan priced it: spatial tiles, "
        "channel/column/head splits, or branches (default: the cheapest on reference costs)",
    )

    @model_validator(mode="after")
    def _index_in_range(self) -> ShardSpec:
        if self.index >= len(self.proportions):
            raise ValueError(
                f"shard.index {self.index} out of range for {len(self.proportions)} proportions"
            )
        return self


class Hop(_Frozen):
    """A next stage: where to send tensors, how to compress them, how long to wait."""

    stage: str = Field(description="name of the next stage, used in errors and metrics")
    endpoints: tuple[str, ...] = Field(
        min_length=1,
        description="base URLs of the next stage's servers: http://host:port (v2 REST, binary "
        "tensors) or grpc://host:port (v2 gRPC)",
    )
    model: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        description="model name there; default: ours",
    )
    fan_out: bool = Field(
        default=False,
        description="endpoints are the shards of one stage, in shard order: send each its "
        "piece, run their segments and exchanges, gather their parts",
    )
    compression: Compression = Compression.NONE
    timeout_s: float = Field(
        default=30.0, gt=0, description="longest wait for one call; the request deadline cuts it"
    )
    retry: bool = Field(
        default=False,
        description="when the next stage is down, fails on the way (502, 503) or times out, try "
        "again with back-off until the request's deadline: inference is idempotent, and the "
        "Service behind `endpoints` may move to a revision that replaces the failed one",
    )

    @model_validator(mode="after")
    def _endpoints_are_urls(self) -> Hop:
        for endpoint in self.endpoints:
            url = urlsplit(endpoint)
            if url.scheme not in ("http", "grpc") or not url.hostname or url.path not in ("", "/"):
                raise ValueError(
                    f"endpoint {endpoint!r} of hop {self.stage}: use http://HOST:PORT or "
                    "grpc://HOST:PORT"
                )
        return self


class Cascade(_Frozen):
    """Answer here when confident, otherwise send the original inputs to the next hop."""

    output: str = Field(description="output tensor holding class probabilities")
    threshold: float = Field(ge=0.0, le=1.0)


class Batching(_Frozen):
    """Requests queued while every runtime worker is busy share the next run.

    A request that finds a worker free runs at once, alone: batching never waits for
    company. `max_batch_size` bounds the rows of one run, which bounds what a request
    queued behind a batch waits (the latency budget).
    """

    max_batch_size: int = Field(ge=1, le=4096)


class Limits(_Frozen):
    """What one request may ask of the server; past a limit it gets a 4xx, never a 5xx."""

    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=2**31)
    """Bytes of one request body (REST) or message (gRPC)."""
    max_json_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=2**31)
    """Bytes of one JSON body with tensor data in it: JSON numbers become Python objects
    (tens of bytes each) before they become an array, so JSON gets the smaller budget."""
    max_elements: int = Field(default=1 << 24, ge=1, le=1 << 31)
    """Tensor elements of one request, all inputs together."""
    max_batch: int = Field(default=64, ge=1, le=1 << 20)
    """Leading (batch) dimension of an input whose model dimension is free."""


class StageSpec(_Frozen):
    """One stage or shard of one model, as the planner placed it."""

    model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="served model name")
    stage: str = Field(default="stage-0", description="stage name in metrics and errors")
    version: str = "1"
    source: ModelSource | None = Field(
        default=None, description="the model file; a router (`router: true`) has none"
    )
    router: bool = Field(
        default=False,
        description="run no model: relay every request to `next` (a model's entry routers, "
        "in front of the serving revision)",
    )
    input_shapes: dict[str, tuple[Annotated[int, Field(ge=1)], ...]] = Field(
        default_factory=dict,
        description="concrete input shapes the model is specialised to before cutting "
        "(as the planner profiled it); a whole-model stage ignores them and keeps its batch dim",
    )
    inputs: tuple[str, ...] | None = Field(
        default=None, description="stage input tensors; None: the model's inputs"
    )
    outputs: tuple[str, ...] | None = Field(
        default=None, description="stage output tensors; None: the model's outputs"
    )
    shard: ShardSpec | None = None
    next: tuple[Hop, ...] = ()
    cascade: Cascade | None = None
    batching: Batching | None = None
    entry: bool = Field(
        default=True,
        description="clients call this stage; False: only previous stages (token required)",
    )
    limits: Limits = Field(default_factory=Limits)
    deadline_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="time a request may take through this stage and all after it; a caller's "
        "shorter deadline (grpc-timeout, partita-timeout header) wins",
    )
    cache_dir: Path = Field(default=Path("~/.cache/partita/stages"))

    @model_validator(mode="after")
    def _router_or_model(self) -> StageSpec:
        if self.router:
            if not self.next or self.cascade is not None or self.shard is not None:
                raise ValueError("a router relays to `next` and has no cascade or shard")
        elif self.source is None:
            raise ValueError("source is required: the model file this stage runs")
        return self

    @model_validator(mode="after")
    def _coherent(self) -> StageSpec:
        for i, hop in enumerate(self.next[:-1]):
            if not hop.fan_out:
                raise ValueError(
                    f"next[{i}] ({hop.stage}): a chain hop returns the final answer, so it "
                    "must be the last hop; make it fan_out or move it last"
                )
        if self.shard is not None and self.next:
            raise ValueError(
                "a shard answers the server that drives its stage, which goes on from there; "
                "give the shard no next hops"
            )
        if self.cascade is not None and not self.next:
            raise ValueError("cascade needs a next hop to forward unconfident inputs to")
        if (self.inputs is None) != (self.outputs is None):
            raise ValueError("give both inputs and outputs (a stage) or neither (whole model)")
        return self


def load_spec(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> StageSpec:
    """Read the spec from `path` (or `$PARTITA_STAGE_SPEC`), YAML or JSON, then apply flags."""
    env = os.environ if env is None else env
    raw: dict[str, object] = {}
    source = path if path is not None else env.get(SPEC_ENV)
    if source:
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise StageSpecError(f"stage spec {source}: cannot read ({exc.strerror})") from exc
        try:
            loaded = json.loads(text) if str(source).endswith(".json") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise StageSpecError(f"stage spec {source}: not valid YAML/JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise StageSpecError(f"stage spec {source}: expected a mapping at the top level")
        raw.update(loaded)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return StageSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        where = source or "flags"
        raise StageSpecError(f"stage spec {where}: {problems}") from exc


@dataclass(frozen=True)
class OrtSizing:
    """How a stage uses its CPU limit: concurrent ORT runs and threads inside each run.

    Under a quota of C cores, ceil(C) runs at once keep every core busy (each run's calling
    thread works); floor(C) intra-op threads per run keep one request fast when it is alone.
    Spinning stays off: a spinning thread burns quota the next request needs.
    """

    cores: float
    workers: int
    intra_op_threads: int
    allow_spinning: bool = False

    @classmethod
    def for_cores(cls, cores: float) -> OrtSizing:
        whole = max(1, math.floor(cores + 1e-9))
        return cls(cores, max(1, math.ceil(cores - 1e-9)), whole)


def cpu_cores(
    env: Mapping[str, str] | None = None, cgroup_root: Path = Path("/sys/fs/cgroup")
) -> float:
    """Cores this container may use: `$PARTITA_CPU_LIMIT`, else the cgroup quota, else all."""
    env = os.environ if env is None else env
    if value := env.get(CPU_LIMIT_ENV):
        try:
            cores = float(value)
        except ValueError:
            cores = math.nan
        if not math.isfinite(cores) or cores <= 0:
            raise StageSpecError(f"{CPU_LIMIT_ENV}={value!r}: expected cores, e.g. 2 or 0.5")
        return cores
    seen = float(os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup_root)
    return min(seen, quota) if quota else seen


def _cgroup_quota(root: Path) -> float | None:
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


class StageTokens:
    """The stage-to-stage tokens: the one this server sends, and every one it accepts.

    From `$PARTITA_INTERNAL_TOKEN` (fixed for the process) or the file named by
    `$PARTITA_INTERNAL_TOKEN_FILE`, one token per line: the first is sent to the next
    stages, all are accepted. The file is read again when it changes (a mounted Secret is
    updated in place), so a rotation needs no restart and fails no request: write
    `old\nnew` (accept both, send old), then `new\nold` once every server has it (send
    new), then `new`. Comparisons take constant time.
    """

    def __init__(
        self,
        tokens: tuple[str, ...] = (),
        *,
        file: Path | None = None,
        recheck_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tokens = tuple(t for t in tokens if t)
        self._file, self._recheck_s, self._clock = file, recheck_s, clock
        self._checked = -math.inf
        if file is not None:
            self._reload(force=True)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StageTokens:
        env = os.environ if env is None else env
        if token := env.get(TOKEN_ENV, "").strip():
            return cls((token,))
        if file := env.get(TOKEN_FILE_ENV):
            return cls(file=Path(file))
        return cls()

    def _reload(self, *, force: bool = False) -> None:
        assert self._file is not None
        now = self._clock()
        if not force and now - self._checked < self._recheck_s:
            return
        self._checked = now
        try:  # a few bytes: read them again rather than trust mtimes of quick rewrites
            lines = self._file.read_text().splitlines()
        except OSError as exc:
            if force:
                raise StageSpecError(
                    f"{TOKEN_FILE_ENV}={self._file}: cannot read ({exc.strerror})"
                ) from exc
            return  # keep the tokens we have while the file is being replaced
        tokens = tuple(line.strip() for line in lines if line.strip())
        if tokens or force:
            self._tokens = tokens

    @property
    def current(self) -> str | None:
        """The token to send to the next stages."""
        if self._file is not None:
            self._reload()
        return self._tokens[0] if self._tokens else None

    def __bool__(self) -> bool:
        return self.current is not None

    def accepts(self, presented: str) -> bool:
        if self._file is not None:
            self._reload()
        given = presented.encode()
        ok = False
        for token in self._tokens:  # no early exit: the time does not tell which one matched
            ok |= hmac.compare_digest(given, token.encode())
        return ok and bool(self._tokens)
