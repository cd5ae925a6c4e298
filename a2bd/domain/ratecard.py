"""A2Billing-style rate card CSV → RateEntry values, with every problem found in one pass.

    entries, errors = parse_ratecard(stream)     # any iterable of text lines; no I/O of its own

As beancount's loader does, a bad row does not stop the parse: it becomes a RowError (line as in the file,
the header being line 1; the column; what is wrong and what to do) and parsing goes on, so an operator
fixes a whole file at once. An importer must refuse the file when `errors` is not empty: `entries` then
holds only the rows that were good on their own.

Columns carry A2Billing's cc_ratecard names, so its exports load as they are. Rates are per minute in
currency units ("0.0125"), parsed exactly by money.parse_amount; times are whole seconds; starttime/endtime
are minutes since Monday 00:00 (0..10079; start > end wraps past Sunday midnight); dates are ISO and
inclusive. A column that is absent or empty takes A2Billing's default.

Files have up to a million rows: identical SellRate/BuyRate values (most rows share a few price plans) are
interned, as are destination and provider names, and parsed field texts are cached.
"""

from __future__ import annotations

import csv
import difflib
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from itertools import chain
from typing import TypeVar

from a2bd.domain.money import format_amount, parse_amount
from a2bd.domain.rating import SellRate
from a2bd.domain.tariff import WEEK_MINUTES, BuyRate, RateEntry

REQUIRED_COLUMNS = ("dialprefix", "rateinitial")
OPTIONAL_COLUMNS = (
    "destination",
    "initblock",
    "billingblock",
    "connectcharge",
    "disconnectcharge",
    "minimal_cost",
    "grace",
    "buyrate",
    "buyrateinitblock",
    "buyrateincrement",
    "provider",
    "starttime",
    "endtime",
    "startdate",
    "stopdate",
)
# Other names for a column. A2Billing (and MagnusBilling after it) call the free grace minimal_time_charge.
COLUMN_ALIASES = {"minimal_time_charge": "grace"}

# Columns of A2Billing's cc_ratecard that do not change what a call costs here: accepted and skipped.
IGNORED_COLUMNS = frozenset(
    {
        "id",  # the row's key in A2Billing's database
        "idtariffplan",  # the tariff is chosen by the import command, not by the file
        "id_trunk",  # A2Billing's trunk number; a2bd routes by the `provider` column
        "musiconhold",
        "id_outbound_cidgroup",  # caller ID rewriting, not billing
        "tag",
        "is_merged",
        # A2Billing adds it to the call timeout, letting a call run past what its credit pays (the
        # fault a2bd exists to fix); a2bd's limit is always the exact inverse of the cost.
        "additional_grace",
        "announce_time_correction",  # scales the time announced to the caller; a2bd announces none
    }
)
# A2Billing price features a2bd does not implement (progressive charges a/b/c, call-time rounding, extra
# block charges, a disconnect charge only past a threshold). A row that leaves them at A2Billing's default
# of 0 costs the same here as there, so the columns are accepted; any other value is an error, because
# the call would silently be priced differently from the card the operator sold.
UNSUPPORTED_UNLESS_ZERO = frozenset(
    {
        "stepchargea", "chargea", "timechargea", "billingblocka",
        "stepchargeb", "chargeb", "timechargeb", "billingblockb",
        "stepchargec", "chargec", "timechargec", "billingblockc",
        "rounding_calltime",
        "rounding_threshold",
        "additional_block_charge",
        "additional_block_charge_time",
        "disconnectcharge_after",
    }
)  # fmt: skip
KNOWN_COLUMNS = frozenset(
    {*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, *COLUMN_ALIASES, *IGNORED_COLUMNS, *UNSUPPORTED_UNLESS_ZERO}
)

MAX_MINUTE = WEEK_MINUTES - 1  # 10079: Sunday 23:59
BOM = "\ufeff"
_SECONDS = re.compile(r"[0-9]+")
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RowError:
    """One problem in a rate card. `column` is None when the problem is the whole line."""

    line: int  # as in the file: the header is line 1; a quoted field spanning lines counts them all
    column: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.column is None else f"line {self.line}, column {self.column}"
        return f"{where}: {self.message}"


class _FieldError(ValueError):
    def __init__(self, column: str, message: str) -> None:
        super().__init__(message)
        self.column = column
        self.message = message


def parse_ratecard(
    lines: Iterable[str], *, default_provider: str | None = None, max_errors: int = 1000
) -> tuple[list[RateEntry], list[RowError]]:
    """Parse a rate card: (the entries of the good rows, every error found).

    `lines` is any iterable of text lines (a file opened with newline="", a list, or one str). A BOM at the
    start is skipped; the delimiter is ',' or ';', whichever the header uses more. A row without a
    provider (A2Billing's own exports name trunks by number, in id_trunk) gets `default_provider`.
    After `max_errors` errors the parse stops with a last error saying so (a file in the wrong format
    would otherwise give one error per row).
    """
    if isinstance(lines, str):
        lines = lines.splitlines(keepends=True)
    source = iter(lines)
    header_line = 0
    for text in source:
        header_line += 1
        if header_line == 1:
            text = text.removeprefix(BOM)
        if text.strip():
            break
    else:
        return [], [
            RowError(
                1,
                None,
                "the file is empty: expected a header line such as 'dialprefix,destination,rateinitial'",
            )
        ]

    delimiter = ";" if text.count(";") > text.count(",") else ","
    reader = csv.reader(chain([text], source), delimiter=delimiter, strict=True)
    offset = header_line - 1  # lines skipped before the header, which the reader did not see
    try:
        header = next(reader)
    except csv.Error as exc:
        return [], [RowError(header_line, None, f"the header is not valid CSV: {exc}")]
    columns, spelled, errors, fatal = _read_header(header, header_line)
    if fatal:
        return [], errors

    parser = _RowParser(columns, spelled, default_provider)
    entries: list[RateEntry] = []
    width = len(header)
    rows = 0
    end = reader.line_num + offset
    while len(errors) < max_errors:
        line = end + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            end = reader.line_num + offset
            errors.append(RowError(line, None, f"not valid CSV: {exc}"))
            rows += 1
            continue
        end = reader.line_num + offset
        if not any(value.strip() for value in row):
            continue  # a blank line, or a line of empty fields as spreadsheets leave at the end
        rows += 1
        if len(row) != width:
            errors.append(
                RowError(
                    line,
                    None,
                    f"has {len(row)} fields but the header has {width} "
                    f"(delimiter {delimiter!r}); quote fields that contain it",
                )
            )
            continue
        entry = parser.parse(row, line, errors)
        if entry is not None:
            entries.append(entry)
    else:
        errors.append(RowError(end, None, f"stopped after {max_errors} errors; fix these and try again"))
        return entries, errors

    if rows == 0:
        errors.append(RowError(header_line, None, "the file has a header but no rates"))
    return entries, errors


def _read_header(header: list[str], line: int) -> tuple[dict[str, int], dict[str, str], list[RowError], bool]:
    """Map each column used to its index, by its canonical name (aliases resolved).

    Returns (index by canonical name, header spelling by canonical name, errors, fatal: rows cannot be
    read)."""
    columns: dict[str, int] = {}
    spelled: dict[str, str] = {}
    errors: list[RowError] = []
    fatal = False
    for index, raw in enumerate(header):
        name = raw.strip().lower()
        if not name:
            errors.append(RowError(line, None, f"column {index + 1} has no name (a stray delimiter?)"))
            continue
        if name not in KNOWN_COLUMNS:
            close = difflib.get_close_matches(name, sorted(KNOWN_COLUMNS), n=1)
            hint = (
                f"did you mean {close[0]!r}?"
                if close
                else f"a2bd reads {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)} and skips A2Billing's own"
            )
            errors.append(RowError(line, raw.strip(), f"unknown column: {hint}"))
            continue
        canonical = COLUMN_ALIASES.get(name, name)
        if canonical in columns:
            first = spelled[canonical]
            same = "appears twice" if first == name else f"means the same as {first!r}"
            errors.append(RowError(line, name, f"{same}; keep one"))
            fatal = True
            continue
        columns[canonical] = index
        spelled[canonical] = name
    for name in REQUIRED_COLUMNS:
        if name not in columns:
            errors.append(RowError(line, name, "required column is missing"))
            fatal = True
    return columns, spelled, errors, fatal


@dataclass(slots=True)
class _Seen:
    """The first row of one (prefix, window, dates): the sell price every carrier's row must repeat.

    Most prefixes have one carrier, so the first provider is a field and the dict of the others is made
    only when a second one comes (a million rows should not mean a million dicts)."""

    sell: SellRate
    line: int
    provider: str | None
    others: dict[str | None, int] | None = None  # provider → its line, after the first

    def line_of(self, provider: str | None) -> int | None:
        if provider == self.provider:
            return self.line
        return None if self.others is None else self.others.get(provider)

    def add(self, provider: str | None, line: int) -> None:
        if self.others is None:
            self.others = {}
        self.others[provider] = line


_SELL_COLUMNS: tuple[tuple[str, str, bool], ...] = (  # SellRate field, column, is money
    ("rate_per_min_micro", "rateinitial", True),
    ("connect_micro", "connectcharge", True),
    ("disconnect_micro", "disconnectcharge", True),
    ("initial_block_s", "initblock", False),
    ("increment_s", "billingblock", False),
    ("grace_s", "grace", False),
    ("min_cost_micro", "minimal_cost", True),
)


@dataclass(frozen=True, slots=True)
class _Price:
    """Everything of a row but its prefix, names and carrier: what many rows share."""

    sell: SellRate
    buy: BuyRate
    start_min: int
    end_min: int
    start_date: date | None
    stop_date: date | None
    always: bool  # active all week, every day


# The cross-row check's key: (prefix, start min, end min, start date, stop date), or the prefix alone
# for an entry active all the time.
_Key = str | tuple[str, int, int, date | None, date | None]

_IDENTITY_COLUMNS = frozenset({"dialprefix", "destination", "provider"})
_PRICE_CACHE_SIZE = 1 << 16  # distinct price texts remembered; a card with more starts over


class _RowParser:
    """Parses data rows against one header; holds the caches, the interned values and the seen keys."""

    def __init__(
        self, columns: dict[str, int], spelled: dict[str, str], default_provider: str | None
    ) -> None:
        self.columns = columns
        self.default_provider = default_provider
        self.spelled = spelled  # how the header names each column: errors use the operator's word
        self.unsupported = sorted((name, i) for name, i in columns.items() if name in UNSUPPORTED_UNLESS_ZERO)
        # A row's price is a function of the texts of these columns: parsed once per distinct texts.
        self.price_indexes = tuple(sorted(i for name, i in columns.items() if name not in _IDENTITY_COLUMNS))
        self.prices: dict[tuple[str, ...], _Price] = {}
        self.money: dict[str, int] = {}
        self.seconds: dict[str, int] = {}
        self.dates: dict[str, date] = {}
        self.sells: dict[SellRate, SellRate] = {}
        self.buys: dict[BuyRate, BuyRate] = {}
        self.seen: dict[_Key, _Seen] = {}

    def parse(self, row: list[str], line: int, errors: list[RowError]) -> RateEntry | None:
        """The row's entry, or None after appending each of its errors to `errors`."""
        found: list[RowError] = []
        prefix = self._field(
            row, "dialprefix", _prefix, "", line, found, required="give the destination's digits, e.g. 4420"
        )
        texts = tuple([row[i] for i in self.price_indexes])
        price = self.prices.get(texts)
        if price is None:
            price = self._price(row, line, found)
            if price is not None:
                if len(self.prices) >= _PRICE_CACHE_SIZE:
                    self.prices.clear()
                self.prices[texts] = price
        if price is None or found:
            errors.extend(found)
            return None
        provider = self._field(row, "provider", _text, "", line, found) or self.default_provider
        if price.always:
            key: _Key = prefix  # most rows: no window, no dates; a str key saves a tuple per row
        else:
            key = (prefix, price.start_min, price.end_min, price.start_date, price.stop_date)
        if not self._agrees(key, price.sell, provider, line, errors):
            return None
        return RateEntry(
            prefix=prefix,
            destination=self._field(row, "destination", _text, "", line, found),
            sell=price.sell,
            provider=provider,
            buy=price.buy,
            week_start_min=price.start_min,
            week_end_min=price.end_min,
            start_date=price.start_date,
            stop_date=price.stop_date,
        )

    def _field(
        self,
        row: list[str],
        column: str,
        convert: Callable[[str, str], T],
        default: T,
        line: int,
        found: list[RowError],
        required: str = "",
    ) -> T:
        """The converted value of `column`, or `default` when it is absent or empty (or wrong: then an
        error is added to `found`)."""
        index = self.columns.get(column)
        text = row[index].strip() if index is not None else ""
        if not text:
            if required:
                found.append(RowError(line, column, f"is empty: {required}"))
            return default
        try:
            return convert(text, column)
        except _FieldError as exc:
            found.append(RowError(line, self.spelled.get(exc.column, exc.column), exc.message))
            return default

    def _price(self, row: list[str], line: int, found: list[RowError]) -> _Price | None:
        before = len(found)

        def get(column: str, convert: Callable[[str, str], T], default: T, required: str = "") -> T:
            return self._field(row, column, convert, default, line, found, required)

        rate = get("rateinitial", self._money, 0, required="give the sell rate per minute, e.g. 0.0125")
        connect = get("connectcharge", self._money, 0)
        disconnect = get("disconnectcharge", self._money, 0)
        min_cost = get("minimal_cost", self._money, 0)
        block = get("initblock", self._seconds, 0)
        increment = get("billingblock", self._seconds, 1) or 1  # A2Billing: 0 means 1 s
        grace = get("grace", self._seconds, 0)
        buy_rate = get("buyrate", self._money, 0)
        buy_block = get("buyrateinitblock", self._seconds, 0)
        buy_increment = get("buyrateincrement", self._seconds, 1) or 1
        start_min = get("starttime", self._minute, 0)
        end_min = get("endtime", self._minute, MAX_MINUTE)
        start_date = get("startdate", self._date, None)
        stop_date = get("stopdate", self._date, None)
        if start_date is not None and stop_date is not None and start_date > stop_date:
            found.append(RowError(line, "stopdate", f"{stop_date} is before startdate {start_date}"))
        for column, index in self.unsupported:
            _check_zero(row[index].strip(), column, line, found)
        if len(found) > before:
            return None
        sell = SellRate(
            rate_per_min_micro=rate,
            connect_micro=connect,
            disconnect_micro=disconnect,
            initial_block_s=block,
            increment_s=increment,
            grace_s=grace,
            min_cost_micro=min_cost,
        )
        buy = BuyRate(rate_per_min_micro=buy_rate, initial_block_s=buy_block, increment_s=buy_increment)
        return _Price(
            self.sells.setdefault(sell, sell),
            self.buys.setdefault(buy, buy),
            start_min,
            end_min,
            start_date,
            stop_date,
            always=(start_min, end_min, start_date, stop_date) == (0, MAX_MINUTE, None, None),
        )

    def _agrees(
        self,
        key: _Key,
        sell: SellRate,
        provider: str | None,
        line: int,
        errors: list[RowError],
    ) -> bool:
        """Cross-row check: one sell price per (prefix, window, dates), each carrier once. The later row
        is the one reported (and dropped)."""
        seen = self.seen.get(key)
        if seen is None:
            self.seen[key] = _Seen(sell, line, provider)
            return True
        ok = True
        if sell is not seen.sell:  # interned: equal prices are the same object
            diffs = [
                (
                    self.spelled.get(column, column),
                    _show(getattr(seen.sell, name), money),
                    _show(getattr(sell, name), money),
                )
                for name, column, money in _SELL_COLUMNS
                if getattr(seen.sell, name) != getattr(sell, name)
            ]
            detail = ", ".join(f"{column} {new} here, {old} there" for column, old, new in diffs)
            message = (
                f"sell price differs from line {seen.line} for the same prefix and time window ({detail}): "
                "a destination has one price whatever the carrier"
            )
            errors.append(RowError(line, diffs[0][0], message))
            ok = False
        first = seen.line_of(provider)
        if first is not None:
            what = f"provider {provider!r} already has" if provider else "a row without provider already has"
            errors.append(
                RowError(line, "provider", f"{what} a rate for this prefix and time window on line {first}")
            )
            ok = False
        if ok:
            seen.add(provider, line)
        return ok

    def _money(self, text: str, column: str) -> int:
        micro = self.money.get(text)
        if micro is None:
            try:
                micro = parse_amount(text, field=column)
            except ValueError as exc:
                raise _FieldError(column, str(exc).removeprefix(f"{column}: ")) from None
            if micro < 0:
                raise _FieldError(column, f"{text!r} is negative")
            self.money[text] = micro
        return micro

    def _seconds(self, text: str, column: str) -> int:
        value = self.seconds.get(text)
        if value is None:
            if text.startswith("-") and _SECONDS.fullmatch(text[1:]):
                raise _FieldError(column, f"{text!r} is negative")
            if not _SECONDS.fullmatch(text):
                raise _FieldError(column, f"{text!r} is not a whole number of seconds")
            if len(text.lstrip("0")) > 6:
                raise _FieldError(column, f"{text!r} is more than 999999 seconds (11 days)")
            value = int(text)
            self.seconds[text] = value
        return value

    def _minute(self, text: str, column: str) -> int:
        if not _SECONDS.fullmatch(text) or len(text.lstrip("0")) > 5 or int(text) > MAX_MINUTE:
            raise _FieldError(
                column,
                f"{text!r} is not a minute of the week: 0 (Monday 00:00) .. {MAX_MINUTE} (Sunday 23:59)",
            )
        return int(text)

    def _date(self, text: str, column: str) -> date:
        day = self.dates.get(text)
        if day is None:
            try:
                if not _ISO_DATE.fullmatch(text):
                    raise ValueError(text)
                day = date.fromisoformat(text)
            except ValueError:
                raise _FieldError(column, f"{text!r} is not an ISO date (YYYY-MM-DD)") from None
            self.dates[text] = day
        return day


def _prefix(text: str, column: str) -> str:
    digits = text.removeprefix("+")
    if digits.isascii() and digits.isdigit():
        return digits
    if text.startswith("_"):
        raise _FieldError(
            column,
            f"{text!r} is an Asterisk pattern; a2bd matches plain digit prefixes "
            "(longest first): give one row per prefix",
        )
    raise _FieldError(column, f"{text!r} is not a prefix of digits")


def _text(text: str, column: str) -> str:
    return sys.intern(text)


def _check_zero(text: str, column: str, line: int, found: list[RowError]) -> None:
    try:
        zero = not text or Decimal(text) == 0
    except InvalidOperation:
        zero = False
    if not zero:
        found.append(
            RowError(
                line,
                column,
                f"{text!r}: A2Billing's {column} is not supported by a2bd; set it to 0 or remove the column",
            )
        )


def _show(value: int, money: bool) -> str:
    return format_amount(value, places=0) if money else f"{value} s"
