"""The one quantity parser: the apiserver's grammar, exact values, errors that show the text."""

from __future__ import annotations

from decimal import Decimal

import pytest

from partita.api.quantity import QuantityError, byte_count, cpu_cores, parse_quantity


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", Decimal("0.5")),
        ("2", Decimal(2)),
        ("1.5", Decimal("1.5")),
        ("250m", Decimal("0.25")),
        ("4Gi", Decimal(4 * 2**30)),
        ("512Mi", Decimal(512 * 2**20)),
        ("8G", Decimal(8 * 10**9)),
        ("1e3", Decimal(1000)),
        ("1.5E-2", Decimal("0.015")),
        (".5", Decimal("0.5")),
        (3, Decimal(3)),
    ],
)
def test_parses_what_the_apiserver_accepts(text: object, value: Decimal) -> None:
    assert parse_quantity(text) == value


def test_cpu_in_cores_and_memory_in_bytes_rounded_up() -> None:
    assert cpu_cores("100m") == pytest.approx(0.1)
    assert byte_count("1.5Ki") == 1536
    assert byte_count("1.0001") == 2


@pytest.mark.parametrize("text", ["two", "4GB", "1.2.3", "", "Gi", "5 Mi"])
def test_refuses_nonsense_naming_the_text_and_the_field(text: str) -> None:
    with pytest.raises(QuantityError, match=r"spec\.memory: .* is not a Kubernetes quantity"):
        parse_quantity(text, "spec.memory")
