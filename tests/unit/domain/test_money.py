"""money: exact parsing and printing of amounts in micro-units."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from a2bd.domain.money import LIMIT_MICRO, MICRO, ceil_div, format_amount, parse_amount, to_decimal

in_range = st.integers(min_value=-LIMIT_MICRO + 1, max_value=LIMIT_MICRO - 1)


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("0", 0),
        ("-0", 0),
        ("1", 1_000_000),
        ("1.25", 1_250_000),
        ("0.0125", 12_500),  # a typical per-minute rate
        ("0.000001", 1),
        ("-0.000001", -1),
        ("+3", 3_000_000),
        (" 2.5 \n", 2_500_000),
        (".5", 500_000),
        ("5.", 5_000_000),
        ("1.250000", 1_250_000),  # trailing zeros beyond 6 places are exact, not rounding
        ("1.25000000000000000000000000000000000000000", 1_250_000),
        ("1e3", 1_000_000_000),
        ("1.5E-6", None),  # 0.0000015: more than 6 places
        ("12345E-6", 12_345),
        ("4611686018427.387903", LIMIT_MICRO - 1),
        (Decimal("1.5"), 1_500_000),
        (7, 7_000_000),
        (-2, -2_000_000),
    ],
)
def test_parse_amount(text: str | int | Decimal, micro: int | None) -> None:
    if micro is None:
        with pytest.raises(ValueError, match="more than 6 decimal places"):
            parse_amount(text)
    else:
        assert parse_amount(text) == micro


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0.1, "not float"),
        (1.0, "not float"),
        (True, "not bool"),
        ("1.0000001", "more than 6 decimal places"),
        ("0.1234567", "more than 6 decimal places"),
        # 29 significant digits: Decimal's default 28-digit context would round this to exactly 1.
        ("1.0000000000000000000000000001", "more than 6 decimal places"),
        ("1e-999999999", "more than 6 decimal places"),
        ("NaN", "not a finite number"),
        ("nan", "not a finite number"),
        ("sNaN", "not a finite number"),
        ("Infinity", "not a finite number"),
        ("-inf", "not a finite number"),
        (Decimal("NaN"), "not a finite number"),
        (Decimal("-Infinity"), "not a finite number"),
        ("", "is not a number"),
        ("   ", "is not a number"),
        ("abc", "is not a number"),
        ("1,5", "is not a number"),
        ("1.2.3", "is not a number"),
        ("$1", "is not a number"),
        ("0x10", "is not a number"),
        ("1_000", "not a plain decimal number"),  # Decimal() would take it
        ("١٢", "not a plain decimal number"),  # Arabic-Indic digits: Decimal() would take them too
        ("1e999999999", "out of range"),  # the default context would raise decimal.Overflow instead
        ("4611686018427.387904", "out of range"),
        ("-4611686018427.387904", "out of range"),
        (10**13, "out of range"),
    ],
)
def test_parse_amount_refuses(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_amount(value)  # type: ignore[arg-type]


def test_parse_amount_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"^rateinitial: 'x' is not a number$"):
        parse_amount("x", field="rateinitial")


@pytest.mark.parametrize(
    ("micro", "places", "text"),
    [
        (0, 2, "0.00"),
        (1_000_000, 2, "1.00"),
        (1_250_000, 2, "1.25"),
        (12_500, 2, "0.0125"),  # more places when needed: never rounds
        (1, 2, "0.000001"),
        (-1, 2, "-0.000001"),
        (-1_500_000, 2, "-1.50"),
        (1_000_000, 0, "1"),
        (1_500_000, 0, "1.5"),
        (0, 0, "0"),
        (123_456_789, 4, "123.456789"),
    ],
)
def test_format_amount(micro: int, places: int, text: str) -> None:
    assert format_amount(micro, places) == text


@given(in_range, st.integers(min_value=0, max_value=6))
def test_format_then_parse_is_identity(micro: int, places: int) -> None:
    assert parse_amount(format_amount(micro, places)) == micro


@given(in_range)
def test_to_decimal_is_exact(micro: int) -> None:
    assert to_decimal(micro) * MICRO == micro
    assert parse_amount(to_decimal(micro)) == micro


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_floats_are_always_refused(value: float) -> None:
    with pytest.raises(ValueError, match="not float"):
        parse_amount(value)  # type: ignore[arg-type]


@given(st.text(max_size=20))
def test_parse_amount_raises_only_value_error(text: str) -> None:
    # Whatever the operator types, the answer is a number or a ValueError (never decimal.Overflow & co).
    try:
        micro = parse_amount(text)
    except ValueError:
        return
    assert abs(micro) < LIMIT_MICRO
    assert Decimal(text.strip()) * MICRO == micro


@given(st.decimals(allow_nan=False, allow_infinity=False, places=7))
def test_seventh_place_is_refused_unless_zero(value: Decimal) -> None:
    if abs(value) >= Decimal(LIMIT_MICRO) / MICRO:
        return
    if (value * MICRO) == (value * MICRO).to_integral_value():
        assert parse_amount(str(value)) == int(value * MICRO)
    else:
        with pytest.raises(ValueError, match="more than 6 decimal places"):
            parse_amount(str(value))


@pytest.mark.parametrize(
    ("numerator", "denominator", "result"),
    [(0, 60, 0), (1, 60, 1), (60, 60, 1), (61, 60, 2), (-1, 60, 0), (-61, 60, -1), (750_000, 60, 12_500)],
)
def test_ceil_div(numerator: int, denominator: int, result: int) -> None:
    assert ceil_div(numerator, denominator) == result
