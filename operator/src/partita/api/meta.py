"""Types shared by both kinds: tiers, conditions, object metadata."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from partita.api.rules import StatusModel

GROUP = "partita.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Conditions are a map keyed by type, so server-side apply merges them per type.
CONDITIONS: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}

# Defaults an absent nested object to {}, so the apiserver fills in its fields' defaults.
OBJECT: dict[str, Any] = {"default": {}}

# Names of pools, nodes and Kubernetes objects (RFC 1123 subdomain, the common subset).
DNS_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
DnsName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_NAME)]


class Tier(StrEnum):
    """Where a pool sits: next to the data (edge) or in a data centre (cloud)."""

    EDGE = "edge"
    CLOUD = "cloud"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(StatusModel):
    """A Kubernetes-style condition (metav1.Condition): what is true, why, since when."""

    type: str = Field(max_length=64)
    """What the condition is about, e.g. ModelFetched, Profiled, Planned, Ready."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = Field("", max_length=128)
    """A CamelCase word a program can switch on, e.g. DigestMismatch."""
    message: str = Field("", max_length=4096)
    """What happened and what to do, for a person."""
    last_transition_time: str = Field("", max_length=64)
    """When `status` last changed (RFC 3339)."""
    observed_generation: int = Field(0, ge=0)
    """The `metadata.generation` this condition was computed from."""


class ObjectMeta(BaseModel):
    """The part of `metadata` Partita reads; everything else is kept as is."""

    model_config = ConfigDict(populate_by_name=True, extra="allow", frozen=True)

    name: str
    namespace: str | None = None
    generation: int = 0
    uid: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
