"""Cross-field rules written once, enforced twice: by the apiserver as CEL
`x-kubernetes-validations` and by pydantic when Python code parses a manifest.

Keeping the CEL text and the Python predicate side by side is what keeps the two in step;
`tests/unit/api` checks every invalid manifest against pydantic and the integration tests
against the real apiserver.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self, TypeVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


@dataclass(frozen=True)
class CelRule:
    """One `x-kubernetes-validations` entry and its Python twin.

    `field_path` is relative to the object the rule sits on (`.maxStages`), so the
    apiserver reports the offending field and not only the enclosing object.
    """

    rule: str
    message: str
    holds: Callable[[Any], bool]
    field_path: str | None = None
    reason: str = "FieldValueInvalid"

    def to_openapi(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
            out["reason"] = self.reason
        return out


def _add_rules(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    rules: tuple[CelRule, ...] = getattr(cls, "cel_rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [r.to_openapi() for r in rules]


class ApiModel(BaseModel):
    """Base of every spec and status model: camelCase on the wire, docstrings as
    descriptions, unknown fields refused, CEL rules exported and enforced."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="forbid",
        frozen=True,
        json_schema_extra=_add_rules,
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rules(self) -> Self:
        for rule in type(self).cel_rules:
            if not rule.holds(self):
                raise ValueError(rule.message)
        return self


class StatusModel(ApiModel):
    """Status is written by the operator and read back leniently: fields a newer
    operator added are ignored rather than refused."""

    model_config = ConfigDict(extra="ignore")


def parse_manifest(cls: type[M], body: Any) -> M:
    """Validate `body` (a dict or a kopf Body) as `cls`, turning pydantic's error into a
    `ManifestError` whose message lists each offending field path."""
    from pydantic import ValidationError

    from partita.api.errors import ManifestError

    try:
        return cls.model_validate(plain(body))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = "".join(
                f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"]
            ).lstrip(".")
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {msg}")
        name = ""
        if isinstance(body, dict | Mapping):
            name = str((body.get("metadata") or {}).get("name", ""))
        raise ManifestError(f"{cls.__name__} {name!r} is invalid: " + "; ".join(lines)) from None


def plain(value: Any) -> Any:
    """Deep copy of kopf's mapping views as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def unique(items: list[T]) -> list[T]:
    """List fields declared as sets (`x-kubernetes-list-type: set`) refuse duplicates, as the
    apiserver does."""
    seen = [i for n, i in enumerate(items) if i in items[:n]]
    if seen:
        raise ValueError(f"duplicate value {seen[0]!r}")
    return items
