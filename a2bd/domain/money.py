"""Exact money: integers of micro-units (1e-6 of the account's currency). Decimal only at the edges.

`parse_amount` turns operator text into micro-units and refuses what it would have to round;
`format_amount` prints micro-units back without losing a digit. Nothing here ever uses float.
"""

from __future__ import annotations

import re
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, Inexact, InvalidOperation

MICRO = 1_000_000  # micro-units per unit of currency
LIMIT_MICRO = 1 << 62  # |amount| below this: room to add many amounts in a signed 64-bit column

# Plain ASCII decimal text. Decimal() alone also takes "1_000", non-ASCII digits, "NaN" and "Infinity".
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# Enough digits for any in-range amount with 6 decimals, and Inexact trapped: scaling never rounds
# silently (the default context keeps 28 digits and would round "1.0000000000000000000000000001" to 1).
_EXACT = Context(prec=40, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[Inexact, InvalidOperation])


def parse_amount(text: str | int | Decimal, *, field: str = "amount") -> int:
    """Parse a decimal amount ("1.25", "-0.000001", "3") into micro-units.

    More than six decimal places would need a rounding that nobody asked for, so it is an error, as are
    floats (pass text), exponents that leave the range of the ledger, and anything that is not a number.
    """
    if isinstance(text, bool | float):
        raise ValueError(f"{field}: give money as text or Decimal, not {type(text).__name__}")
    if isinstance(text, int):
        micro = text * MICRO
    else:
        if isinstance(text, str):
            stripped = text.strip()
            try:
                value = Decimal(stripped)
            except InvalidOperation:
                raise ValueError(f"{field}: {text!r} is not a number") from None
        else:
            value = text
        if not value.is_finite():
            raise ValueError(f"{field}: {text!r} is not a finite number")
        if isinstance(text, str) and not _DECIMAL_TEXT.fullmatch(stripped):
            raise ValueError(f"{field}: {text!r} is not a plain decimal number like 12.5")
        if value and value.adjusted() > 18:  # checked first: scaling 1e999999999 would overflow
            raise ValueError(f"{field}: {text!r} is out of range")
        try:
            scaled = _EXACT.scaleb(value, 6)
        except Inexact:
            raise ValueError(f"{field}: {text!r} has more than 6 decimal places") from None
        if scaled != scaled.to_integral_value():
            raise ValueError(f"{field}: {text!r} has more than 6 decimal places")
        micro = int(scaled)
    if abs(micro) >= LIMIT_MICRO:
        raise ValueError(f"{field}: {text!r} is out of range")
    return micro


def format_amount(micro: int, places: int = 2) -> str:
    """Print micro-units with at least `places` decimals and as many more as needed to be exact."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    digits = f"{frac:06d}".rstrip("0")
    digits = digits.ljust(places, "0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def to_decimal(micro: int) -> Decimal:
    """Micro-units as an exact Decimal, for JSON and reports."""
    return Decimal(micro).scaleb(-6)


def ceil_div(numerator: int, denominator: int) -> int:
    """Integer division rounding toward +infinity (denominator > 0)."""
    return -((-numerator) // denominator)
