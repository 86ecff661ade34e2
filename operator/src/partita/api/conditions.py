"""Conditions as values: setting one keeps its transition time unless its status changed,
which is what `kubectl wait --for=condition=...` and people reading `describe` rely on."""

from __future__ import annotations

from collections.abc import Sequence

from partita.api.meta import Condition, ConditionStatus


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int,
) -> tuple[Condition, ...]:
    """`conditions` with `type_` replaced (or appended), in a stable order."""
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == status else now
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message[:4096],
        last_transition_time=since,
        observed_generation=generation,
    )
    if old is None:
        return (*conditions, new)
    return tuple(new if c.type == type_ else c for c in conditions)


def find(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)
