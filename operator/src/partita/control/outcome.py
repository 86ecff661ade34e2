"""What a reconciliation or a step of the loop decided, as data: the status fields to write,
the Events to post and whether to try again. The kopf handlers only carry it out, the same way
for every kind (`partita.handlers.registry.apply_outcome`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class EventType(StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: str
    message: str


@dataclass(frozen=True)
class Backoff:
    """Exponential delay between attempts after an error, capped, so a broken source costs
    one request per few minutes and never a crash loop."""

    first_s: float = 5.0
    factor: float = 2.0
    max_s: float = 300.0

    def delay(self, retry: int) -> float:
        return float(min(self.max_s, self.first_s * self.factor ** max(0, retry)))


@dataclass(frozen=True)
class Outcome:
    """`status` holds every status field the writer owns (camelCase, conditions by type):
    it is applied server-side under the writer's field manager, so two writers of one
    object's status (the model reconciler and the loop) never overwrite each other."""

    status: Mapping[str, Any] = field(default_factory=dict)
    events: tuple[Event, ...] = ()
    retry_after_s: float | None = None  # try again after this long (a TemporaryError)
    permanent_error: str | None = None  # will not heal by waiting (a PermanentError)
