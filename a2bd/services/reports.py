"""Reports for billing staff: an account's charge history (its ledger lines) and invoice search, as CSV or JSON.

Exports of millions of lines stream: `charge_batches` reads through a cursor and `write_report` writes each
batch as it comes.

Output (`write_csv`, `to_json`, `write_report`): one column/key per row field, in field order. Money fields
are integer micro-units inside a2bd and keep their meaning outside it under the name without `_micro`
(`amount_micro` → `amount`), printed by `format_amount`: exact, never rounded, at least two decimals
("12.50", "-0.000001", "12.345678"). In JSON, money is a *string* of that exact decimal, never a JSON
number: a reader's float would round it. Times are ISO 8601 with their UTC offset
("2030-01-02T12:00:00+00:00"); a missing value is an empty CSV cell and a JSON null.

Which invoice a line belongs to. A confirmed invoice covers the account's ledger ids in
(from_line_id, through_line_id] plus the lines posted for it (`ledger.invoice_id`, its tax lines). A line
that names an invoice belongs to that one only (or to none while it is a draft or was discarded); any other
line belongs to the confirmed invoice of its account whose id range holds it. Drafts and discarded invoices
never count.

Filters are ANDed; an impossible query (since >= until, an unknown kind, a limit below 1...) raises
`InputError` before anything is read. Everything one report reads comes from one snapshot (a read-only
REPEATABLE READ transaction, unless the caller already holds a transaction).
"""

from __future__ import annotations

import bisect
import csv
import json
import operator
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, nullcontext
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Final, TextIO, TypeVar

import asyncpg

from a2bd.domain.money import format_amount
from a2bd.errors import InputError

# The ledger's kinds, as its ledger_kind_check names them (sql/0003_invoicing.sql).
LEDGER_KINDS: Final = frozenset({
    "initial", "call", "payment", "refill", "charge", "correction", "did", "subscription", "service", "tax",
    "provider_call", "provider_payment",
})
# Kinds that only ever move a carrier's balance: never on an account's line.
PROVIDER_KINDS: Final = frozenset({"provider_call", "provider_payment"})
INVOICE_STATUSES: Final = ("draft", "confirmed", "discarded")

_MICRO_SUFFIX = "_micro"


# -- charge history ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChargeQuery:
    """Which account lines to list. None / empty: no filter on that field."""

    account_number: str | None = None
    last_name: str | None = None  # prefix of accounts.last_name, case-insensitive
    kinds: tuple[str, ...] = ()  # ledger kinds; empty = every kind
    since: datetime | None = None  # created_at >= since (time-zone aware)
    until: datetime | None = None  # created_at < until (time-zone aware)
    limit: int | None = None  # at most this many lines (the first ones in report order)


@dataclass(frozen=True, slots=True)
class ChargeRow:
    """One ledger line of an account. Money in micro-units; `amount_micro` is signed (+ credits the account)."""

    line_id: int
    created_at: datetime
    account_number: str
    last_name: str
    kind: str
    description: str
    destination: str | None  # the number dialled (call lines)
    seconds: int | None  # answered seconds (call lines)
    currency: str  # the account's
    amount_micro: int
    balance_after_micro: int
    tax_class: str | None  # the line's own class, else its kind's; None: not a taxable supply
    invoice_number: str | None  # the confirmed invoice it belongs to, if any


_CHARGES = (
    "SELECT l.id, l.created_at, a.number, a.last_name, l.kind, l.description, l.destination, l.seconds,"
    " a.currency, l.amount_micro, l.balance_after_micro, coalesce(l.tax_class, k.tax_class) AS tax_class,"
    " l.account_id, l.invoice_id"
    " FROM ledger l JOIN accounts a ON a.id = l.account_id"
    " LEFT JOIN kind_tax_classes k ON k.kind = l.kind"
)


def charge_batches(
    conn: asyncpg.Connection, q: ChargeQuery, *, batch_size: int = 10_000
) -> AsyncGenerator[list[ChargeRow], None]:
    """The account lines matching `q` in batches of up to `batch_size`, streamed through a server-side cursor
    (millions of lines never sit in memory at once), ordered by account (its id: creation order), then line id.

    The query is checked here, before anything is read (InputError). Lines are read in the order of the
    ledger's (account_id, id) index: a query for one account walks that account's slice of the index and a
    `limit` stops the scan early. Invoice numbers come from the confirmed invoices of the accounts seen,
    loaded once per account and matched by id range (no per-line subquery). Everything is read in one
    snapshot, in a transaction held until the iteration ends: close it (`contextlib.aclosing`) when stopping
    early.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} is below 1")
    kinds = _check_kinds(q.kinds)
    _check_text("account number", q.account_number)
    _check_text("last name", q.last_name)
    _check_range(q.since, q.until)
    _check_limit(q.limit)

    cond = _Conditions("l.account_id IS NOT NULL")  # the condition of the partial index ledger_account
    if q.account_number is not None:
        cond.add("a.number = {}", q.account_number)
    if q.last_name is not None:
        cond.add("starts_with(lower(a.last_name), lower({}))", q.last_name)
    if kinds:
        cond.add("l.kind = ANY({}::text[])", sorted(kinds))
    if q.since is not None:
        cond.add("l.created_at >= {}", q.since)
    if q.until is not None:
        cond.add("l.created_at < {}", q.until)
    # Only conditions that filter appear (no `$n IS NULL OR ...`), so each shape gets its own plan that uses
    # the index.
    sql = _CHARGES + cond.where() + " ORDER BY l.account_id, l.id" + cond.limit(q.limit)
    return _stream_charges(conn, sql, cond.args, batch_size)


async def charge_history(conn: asyncpg.Connection, q: ChargeQuery) -> list[ChargeRow]:
    """Every account line matching `q`, as `charge_batches` reads them, in one list (give a `limit`, or use
    `charge_batches` for exports of millions of lines)."""
    rows: list[ChargeRow] = []
    async with aclosing(charge_batches(conn, q)) as batches:
        async for batch in batches:
            rows += batch
    return rows


async def _stream_charges(
    conn: asyncpg.Connection, sql: str, args: Sequence[Any], batch_size: int
) -> AsyncGenerator[list[ChargeRow], None]:
    async with _snapshot(conn):  # a cursor lives in a transaction; this one also gives the one snapshot
        invoices = _InvoiceFinder()
        cursor = await conn.cursor(sql, *args)
        while lines := await cursor.fetch(batch_size):
            await invoices.load(conn, {line["account_id"] for line in lines})
            yield [
                ChargeRow(
                    line_id=line["id"], created_at=line["created_at"], account_number=line["number"],
                    last_name=line["last_name"], kind=line["kind"], description=line["description"],
                    destination=line["destination"], seconds=line["seconds"], currency=line["currency"],
                    amount_micro=line["amount_micro"], balance_after_micro=line["balance_after_micro"],
                    tax_class=line["tax_class"],
                    invoice_number=invoices.number(line["account_id"], line["id"], line["invoice_id"]),
                )
                for line in lines
            ]


class _InvoiceFinder:
    """The confirmed invoice a line belongs to, from its account's confirmed invoices (disjoint id ranges)."""

    def __init__(self) -> None:
        self._by_id: dict[int, str] = {}
        self._starts: dict[int, list[int]] = {}  # account id -> from_line_id of each invoice, ascending
        self._ends: dict[int, list[tuple[int, str]]] = {}  # account id -> (through_line_id, number), same order

    async def load(self, conn: asyncpg.Connection, account_ids: Iterable[int]) -> None:
        """Read the confirmed invoices of the accounts not read yet."""
        new = sorted(set(account_ids) - self._starts.keys())
        for account_id in new:
            self._starts[account_id], self._ends[account_id] = [], []
        if not new:
            return
        for inv in await conn.fetch(
            "SELECT id, account_id, from_line_id, through_line_id, number FROM invoices"
            " WHERE status = 'confirmed' AND account_id = ANY($1::bigint[]) ORDER BY account_id, from_line_id",
            new,
        ):
            self._by_id[inv["id"]] = inv["number"]
            self._starts[inv["account_id"]].append(inv["from_line_id"])
            self._ends[inv["account_id"]].append((inv["through_line_id"], inv["number"]))

    def number(self, account_id: int, line_id: int, invoice_id: int | None) -> str | None:
        if invoice_id is not None:  # posted for that invoice: its own, whatever range it falls in
            return self._by_id.get(invoice_id)
        i = bisect.bisect_left(self._starts[account_id], line_id) - 1  # the last range starting before it
        if i < 0:
            return None
        through, number = self._ends[account_id][i]
        return number if line_id <= through else None


# -- invoice search ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InvoiceQuery:
    """Which invoices to list. None: no filter on that field."""

    account_number: str | None = None
    last_name: str | None = None  # prefix of accounts.last_name, case-insensitive
    number: str | None = None  # exact; "INV-2030*" = every number starting with "INV-2030"
    since: datetime | None = None  # period_end >= since (time-zone aware)
    until: datetime | None = None  # period_end < until (time-zone aware)
    status: str = "confirmed"  # draft | confirmed | discarded | all
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class InvoiceRow:
    """One invoice with its account. Money in micro-units; a negative closing balance is owed by the customer."""

    number: str | None  # None until confirmed
    status: str
    account_number: str
    name: str
    last_name: str
    period_start: datetime
    period_end: datetime
    currency: str
    opening_micro: int  # balance carried forward
    net_micro: int  # taxable charges, net
    tax_micro: int
    closing_micro: int  # balance carried into the next period
    amount_due_micro: int  # max(0, -closing)


_INVOICES = (
    "SELECT i.number, i.status, a.number AS account_number, a.name, a.last_name, i.period_start,"
    " i.period_end, i.currency, i.opening_micro, i.net_micro, i.tax_micro, i.closing_micro"
    " FROM invoices i JOIN accounts a ON a.id = i.account_id"
)


async def search_invoices(conn: asyncpg.Connection, q: InvoiceQuery) -> list[InvoiceRow]:
    """The invoices matching `q`, ordered by period end, then invoice id (the order they were made in)."""
    _check_text("account number", q.account_number)
    _check_text("last name", q.last_name)
    _check_text("invoice number", q.number)
    _check_range(q.since, q.until)
    _check_limit(q.limit)
    if q.status != "all" and q.status not in INVOICE_STATUSES:
        raise InputError(f"invoice status {q.status!r} does not exist: use {', '.join(INVOICE_STATUSES)} or all")

    cond = _Conditions()
    if q.status != "all":
        cond.add("i.status = {}", q.status)
    if q.account_number is not None:
        cond.add("a.number = {}", q.account_number)
    if q.last_name is not None:
        cond.add("starts_with(lower(a.last_name), lower({}))", q.last_name)
    if q.number is not None:
        prefix, star, rest = q.number.partition("*")
        if star and rest:
            raise InputError(f"invoice number {q.number!r}: '*' may only end it (INV-2030* = numbers starting "
                             "with INV-2030)")
        cond.add("starts_with(i.number, {})" if star else "i.number = {}", prefix)
    if q.since is not None:
        cond.add("i.period_end >= {}", q.since)
    if q.until is not None:
        cond.add("i.period_end < {}", q.until)
    sql = _INVOICES + cond.where() + " ORDER BY i.period_end, i.id" + cond.limit(q.limit)
    records = await conn.fetch(sql, *cond.args)
    return [
        InvoiceRow(
            number=r["number"], status=r["status"], account_number=r["account_number"], name=r["name"],
            last_name=r["last_name"], period_start=r["period_start"], period_end=r["period_end"],
            currency=r["currency"], opening_micro=r["opening_micro"], net_micro=r["net_micro"],
            tax_micro=r["tax_micro"], closing_micro=r["closing_micro"],
            amount_due_micro=max(0, -r["closing_micro"]),
        )
        for r in records
    ]


# -- output ------------------------------------------------------------------------------------------------

Row = TypeVar("Row", ChargeRow, InvoiceRow)


def columns(row_type: type[ChargeRow] | type[InvoiceRow]) -> list[str]:
    """The output names of a row type's fields, in order (money without its `_micro` suffix)."""
    return list(_layout(row_type).columns)


def write_csv(rows: Iterable[Row], out: TextIO, row_type: type[Row], *, header: bool = True) -> int:
    """Write `rows` as CSV, after a header line unless `header` is False (the header is written even when
    there are no rows); returns the row count. Open `out` with newline="" (csv writes CRLF line ends)."""
    layout = _layout(row_type)
    writer = csv.writer(out)
    if header:
        writer.writerow(layout.columns)
    count = 0
    for row in rows:
        writer.writerow(["" if cell is None else cell for cell in layout.cells(row)])
        count += 1
    return count


def to_json(rows: Iterable[ChargeRow | InvoiceRow], *, indent: int | None = None) -> str:
    """`rows` as a JSON array of objects; money as exact decimal strings, never JSON numbers."""
    return json.dumps([as_dict(row) for row in rows], ensure_ascii=False, indent=indent)


def as_dict(row: ChargeRow | InvoiceRow) -> dict[str, Any]:
    """A row as output names → JSON-safe values (money and times as text, counts as ints, None kept)."""
    layout = _layout(type(row))
    return dict(zip(layout.columns, layout.cells(row), strict=True))


async def write_report(batches: AsyncIterable[Sequence[Row]], out: TextIO, row_type: type[Row], fmt: str) -> int:
    """Stream batches of rows (`charge_batches`) to `out` as "csv" (as `write_csv`) or "json" (a JSON array,
    one object a line, as `to_json` would give); returns the row count."""
    if fmt == "csv":
        count = 0
        write_csv([], out, row_type)
        async for batch in batches:
            count += write_csv(batch, out, row_type, header=False)
        return count
    if fmt == "json":
        count = 0
        out.write("[")
        async for batch in batches:
            for row in batch:
                out.write(("," if count else "") + "\n" + json.dumps(as_dict(row), ensure_ascii=False))
                count += 1
        out.write("\n]\n")
        return count
    raise InputError(f"report format {fmt!r} does not exist: use csv or json")


@dataclass(frozen=True, slots=True)
class _Layout:
    """How a row type is printed: its output names, and each field's converter (None: as it is)."""

    columns: tuple[str, ...]
    values: Callable[[Any], tuple[Any, ...]]
    converters: tuple[Callable[[Any], Any] | None, ...]

    def cells(self, row: ChargeRow | InvoiceRow) -> list[Any]:
        return [value if value is None or convert is None else convert(value)
                for value, convert in zip(self.values(row), self.converters, strict=True)]


def _layout(row_type: type[ChargeRow] | type[InvoiceRow]) -> _Layout:
    return _LAYOUTS[row_type.__name__]


def _make_layout(row_type: type[ChargeRow] | type[InvoiceRow]) -> _Layout:
    names = [f.name for f in fields(row_type)]
    converters: list[Callable[[Any], Any] | None] = []
    for f in fields(row_type):
        if f.name.endswith(_MICRO_SUFFIX):
            converters.append(format_amount)
        elif "datetime" in str(f.type):
            converters.append(datetime.isoformat)
        else:
            converters.append(None)
    getter = operator.attrgetter(*names)
    return _Layout(tuple(n.removesuffix(_MICRO_SUFFIX) for n in names), getter, tuple(converters))


_LAYOUTS = {t.__name__: _make_layout(t) for t in (ChargeRow, InvoiceRow)}


# -- SQL ---------------------------------------------------------------------------------------------------


class _Conditions:
    """A WHERE clause built from constant SQL templates; every value goes in as a $n parameter, so the text
    of a query never holds input."""

    def __init__(self, *fixed: str) -> None:
        self.terms = list(fixed)
        self.args: list[Any] = []

    def add(self, template: str, value: Any) -> None:
        """`template` is constant SQL with one `{}` where the value's placeholder goes."""
        self.terms.append(template.format(self._param(value)))

    def limit(self, limit: int | None) -> str:
        return "" if limit is None else f" LIMIT {self._param(limit)}"

    def where(self) -> str:
        return f" WHERE {' AND '.join(self.terms)}" if self.terms else ""

    def _param(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"


# -- checks ------------------------------------------------------------------------------------------------


def _check_kinds(kinds: Iterable[str]) -> frozenset[str]:
    if isinstance(kinds, str):  # a lone "call" would read as the kinds "c", "a", "l"
        raise TypeError("kinds is a tuple of kind names, not a string")
    wanted = frozenset(kinds)
    unknown = sorted(wanted - LEDGER_KINDS)
    if unknown:
        known = ", ".join(sorted(LEDGER_KINDS - PROVIDER_KINDS))
        raise InputError(f"unknown ledger kind(s) {', '.join(map(repr, unknown))}: use {known}")
    carrier = sorted(wanted & PROVIDER_KINDS)
    if carrier:
        raise InputError(f"{', '.join(carrier)} lines belong to carriers, never to an account: "
                         "leave them out of a charge history")
    return wanted


def _check_text(what: str, value: str | None) -> None:
    if value is not None and not value.strip():
        raise InputError(f"{what} is empty: give one, or leave the filter out")


def _check_range(since: datetime | None, until: datetime | None) -> None:
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.utcoffset() is None:
            raise InputError(f"{name} {value.isoformat()} has no time zone: give one (e.g. +00:00 for UTC)")
    if since is not None and until is not None and since >= until:
        raise InputError(f"since {since.isoformat()} is not before until {until.isoformat()}: "
                         "the range holds nothing (since is inclusive, until exclusive)")


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise InputError(f"limit {limit} is below 1: give a positive count, or no limit")


def _snapshot(conn: asyncpg.Connection) -> AbstractAsyncContextManager[Any]:
    """One read-only snapshot for the statements of a report, inside the caller's transaction if any."""
    if conn.is_in_transaction():
        return nullcontext()
    transaction: AbstractAsyncContextManager[Any] = conn.transaction(isolation="repeatable_read", readonly=True)
    return transaction
