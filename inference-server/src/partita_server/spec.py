"""The stage spec: what the operator writes into a stage's ConfigMap, read once at start-up.

A stage server serves one piece of one model: the whole model, a vertical stage (given by its
boundary tensor names) or one shard of a stage. It may forward its outputs to next hops: a
list processed in order, where a fan-out hop sends the same tensors to every shard of the next
stage and gathers their parts, and a chain hop (always last) hands the tensors to the next
stage, whose answer becomes this stage's answer.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from partita_server.errors import StageSpecError

__all__ = [
    "Batching",
    "Cascade",
    "Compression",
    "Hop",
    "ModelSource",
    "ShardSpec",
    "StageSpec",
    "cpu_limit",
    "internal_token",
    "load_spec",
]

SPEC_ENV = "PARTITA_STAGE_SPEC"
TOKEN_ENV = "PARTITA_INTERNAL_TOKEN"
TOKEN_FILE_ENV = "PARTITA_INTERNAL_TOKEN_FILE"
CPU_LIMIT_ENV = "PARTITA_CPU_LIMIT"


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
        min_length=1, description="base URLs (http://host:port) of the next stage's servers"
    )
    model: str | None = Field(default=None, description="model name there; default: ours")
    fan_out: bool = Field(
        default=False,
        description="endpoints are the shards of one stage: send to all, gather their parts",
    )
    compression: Compression = Compression.NONE
    timeout_s: float = Field(default=30.0, gt=0)


class Cascade(_Frozen):
    """Answer here when confident, otherwise send the original inputs to the next hop."""

    output: str = Field(description="output tensor holding class probabilities")
    threshold: float = Field(ge=0.0, le=1.0)


class Batching(_Frozen):
    max_batch_size: int = Field(ge=1, le=4096)
    max_delay_ms: float = Field(ge=0.0, le=10_000.0)


class StageSpec(_Frozen):
    """One stage or shard of one model, as the planner placed it."""

    model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="served model name")
    stage: str = Field(default="stage-0", description="stage name in metrics and errors")
    version: str = "1"
    source: ModelSource
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
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    cache_dir: Path = Field(default=Path("~/.cache/partita/stages"))

    @model_validator(mode="after")
    def _coherent(self) -> StageSpec:
        for i, hop in enumerate(self.next[:-1]):
            if not hop.fan_out:
                raise ValueError(
                    f"next[{i}] ({hop.stage}): a chain hop returns the final answer, so it "
                    "must be the last hop; make it fan_out or move it last"
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


def internal_token(env: Mapping[str, str] | None = None) -> str | None:
    """The stage-to-stage token from `$PARTITA_INTERNAL_TOKEN` or the file it is mounted at."""
    env = os.environ if env is None else env
    if token := env.get(TOKEN_ENV):
        return token.strip()
    if file := env.get(TOKEN_FILE_ENV):
        try:
            return Path(file).read_text().strip() or None
        except OSError as exc:
            raise StageSpecError(f"{TOKEN_FILE_ENV}={file}: cannot read ({exc.strerror})") from exc
    return None


def cpu_limit(
    env: Mapping[str, str] | None = None, cgroup_root: Path = Path("/sys/fs/cgroup")
) -> int:
    """Cores this container may use: `$PARTITA_CPU_LIMIT`, else the cgroup quota, else all.

    ORT's intra-op pool sized past the quota only adds throttling, so threads follow this.
    """
    env = os.environ if env is None else env
    if value := env.get(CPU_LIMIT_ENV):
        try:
            cores = float(value)
        except ValueError as exc:
            raise StageSpecError(
                f"{CPU_LIMIT_ENV}={value!r}: expected cores, e.g. 2 or 0.5"
            ) from exc
        return max(1, math.floor(cores))
    cores_seen = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(cores_seen, math.floor(quota))) if quota else cores_seen


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
