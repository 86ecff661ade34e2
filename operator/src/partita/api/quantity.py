"""Kubernetes resource quantities (`500m`, `2`, `4Gi`, `1.5e3`): the one parser Partita has.

The grammar is the apiserver's (`k8s.io/apimachinery/pkg/api/resource`): a signed decimal
number, then a binary suffix (Ki..Ei), a decimal suffix (n, u, m, "", k, M, G, T, P, E) or a
decimal exponent (e3, E-2). Values come back as `Decimal`, so `0.1` cores stays exact until
the caller turns it into the unit it needs.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
}
# What the CRD schemas accept for a byte quantity: unsigned, no milli-bytes.
BYTES_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"

_QUANTITY = re.compile(
    r"^(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?[0-9]+|[numkMGTPE]?)$"
)


class QuantityError(ValueError):
    """Not a Kubernetes quantity; the message shows the text and what would be accepted."""


def parse_quantity(value: object, where: str = "quantity") -> Decimal:
    """`value` (a str, int or float as YAML gives it) as a Decimal in base units."""
    text = str(value).strip()
    match = _QUANTITY.match(text)
    if match is None:
        raise QuantityError(
            f"{where}: {text!r} is not a Kubernetes quantity such as 500m, 2, 512Mi or 4Gi"
        )
    try:
        number = Decimal(match["number"])
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise QuantityError(f"{where}: {text!r} has no number") from None
    suffix = match["suffix"]
    if suffix in BINARY:
        return number * BINARY[suffix]
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        return number.scaleb(int(suffix[1:]))
    return number * DECIMAL[suffix]


def cpu_cores(value: object, where: str = "cpu") -> float:
    """A cpu quantity in cores: `500m` -> 0.5, `2` -> 2.0."""
    return float(parse_quantity(value, where))


def byte_count(value: object, where: str = "memory") -> int:
    """A memory quantity in bytes, rounded up as the kubelet does (`1.5Ki` -> 1536)."""
    exact = parse_quantity(value, where)
    whole = int(exact.to_integral_value(rounding="ROUND_CEILING"))
    return whole
