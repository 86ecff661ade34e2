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

# The rules Kubernetes applies to names and labels (k8s.io/apimachinery validation), written
# so that Python's re, pydantic's Rust regex and the apiserver's RE2 read them alike: no
# backslashes (a CEL string literal would need them doubled), dots as [.].
_LABEL = "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
# An RFC 1123 subdomain: names of pools, nodes and most Kubernetes objects.
DNS_SUBDOMAIN = f"{_LABEL}([.]{_LABEL})*"
DNS_NAME = f"^{DNS_SUBDOMAIN}$"
# An RFC 1123 label: namespaces.
DNS_LABEL = f"^{_LABEL}$"
DnsName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_NAME)]
# A label key: an optional DNS-subdomain prefix and '/', then a name of at most 63
# characters; and a label value: empty, or such a name.
_QUALIFIED = "[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = f"^({DNS_SUBDOMAIN}/)?{_QUALIFIED}$"
LABEL_VALUE = f"^({_QUALIFIED})?$"
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]


def is_label_key(key: str) -> bool:
    """What the apiserver accepts as a label key (prefix at most 253 characters)."""
    import re

    prefix, _, _ = key.rpartition("/")
    return re.fullmatch(LABEL_KEY.strip("^$"), key) is not None and len(prefix) <= 253


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
