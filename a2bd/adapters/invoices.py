"""PostgreSQL side of invoicing: closing previews into invoices, numbering, confirming and discarding drafts.

An invoice names a range of its account's ledger ids, (from_line_id, through_line_id], plus the tax lines
posted for it (ledger.invoice_id). Closing happens under the account's row lock, which every posting also
takes, and moves `accounts.invoiced_through_id`; the ledger refuses a line at or below that mark (sql/0003).
Numbers come from the issuer's row (`next_number`), taken in the closing transaction: a rollback gives the
number back, two closes queue on the row, so each issuer's sequence has no gap and no repeat.

Many accounts close in one transaction (set-based statements), which is what closing 100,000 previews on
the first of the month needs; one account that cannot close is reported, not fatal (beancount's loader).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from a2bd.adapters import postgres
from a2bd.domain.invoice import PeriodLine, PeriodTotals, TaxRow, close_after, format_rate, period_totals
from a2bd.errors import InputError


@dataclass(frozen=True, slots=True)
class Closed:
    """An invoice made by a close: confirmed (numbered) or a draft waiting for review."""

    invoice_id: int
    account: str
    status: str
    number: str | None
    newest_line: asyncpg.Record | None  # the account's newest ledger line when the close posted any


@dataclass(slots=True)
class CloseReport:
    closed: list[Closed] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)  # accounts with no line in the period: no invoice
    errors: dict[str, str] = field(default_factory=dict)  # account -> why it could not close


def invoice_number(prefix: str, seq: int) -> str:
    return f"{prefix}{seq:06d}"


_TAKE_NUMBERS = """
UPDATE invoice_prefixes p SET next_number = p.next_number + $2
FROM issuers i WHERE i.id = $1 AND p.prefix = i.invoice_prefix
RETURNING p.next_number - $2 AS first, p.prefix
"""


async def take_numbers(conn: asyncpg.Connection, issuer_id: int, count: int) -> tuple[int, str]:
    """The first of `count` consecutive numbers of the issuer's current prefix, and the prefix, taken under
    the prefix row's lock until the caller's transaction ends (a rollback gives them back: no gap)."""
    row = await conn.fetchrow(_TAKE_NUMBERS, issuer_id, count)
    assert row is not None, "every issuer has its prefix's sequence (deferred foreign key)"
    return int(row["first"]), str(row["prefix"])


# An account `a`'s balance carried forward: its last closed invoice's closing balance (0 before the first).
OPENING = """coalesce((SELECT p.closing_micro FROM invoices p WHERE p.account_id = a.id AND p.status <> 'discarded'
                 ORDER BY p.id DESC LIMIT 1), 0)"""

# The lock first, alone: a statement that waited for a lock re-reads the locked row but not what its
# subqueries saw, so what depends on a concurrent close (its invoice) is read by the next statement.
_LOCK = "SELECT id FROM accounts WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE"

_ACCOUNTS = """
SELECT a.id, a.number, a.balance_micro, a.invoiced_through_id, coalesce(a.period_start, a.created_at) AS period_start,
       a.vat_rate_ppm, a.tax_mode, a.currency, a.timezone, a.invoice_day, a.next_close_at,
       a.autorefill, a.initial_balance_micro, a.invoices_enabled, a.reseller_id,
       i.id AS issuer_id, i.mode AS issuer_mode,
       (SELECT d.id FROM invoices d WHERE d.account_id = a.id AND d.status = 'draft') AS draft_id,
       """ + OPENING + """ AS opening_micro
FROM accounts a LEFT JOIN issuers i ON i.reseller_id IS NOT DISTINCT FROM a.reseller_id
WHERE a.id = ANY($1::bigint[])
ORDER BY a.id
"""  # noqa: S608 - constant SQL fragments, no input

# Each account's period: its open lines up to, not including, the first one dated at or after the period's
# end. A line written late but dated inside the period (a call rated from the CDR table a minute after it
# ended) then goes to the next preview, like any line written after the close, instead of taking a line
# dated after the end (the next month's DID rental) into this invoice with it.
_THROUGH = """
SELECT r.id, (SELECT max(l.id) FROM ledger l
              WHERE l.account_id = r.id AND l.id > r.after AND l.invoice_id IS NULL
                AND l.id < coalesce((SELECT min(x.id) FROM ledger x
                                     WHERE x.account_id = r.id AND x.id > r.after AND x.invoice_id IS NULL
                                       AND x.created_at >= r.until), 9223372036854775807))
       AS through
FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[]) AS r(id, after, until)
"""

# Summed per account, kind and own class first; the classes' rates are joined to those few groups.
_PERIOD_GROUPS = """
WITH g AS (
    SELECT l.account_id, l.kind, l.tax_class, l.tax_rate_ppm, sum(l.amount_micro)::bigint AS amount_micro,
           sum(l.tax_base_micro)::bigint AS tax_base_micro, count(*)::integer AS n
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS r(id, after, through)
    JOIN ledger l ON l.account_id = r.id AND l.id > r.after AND l.id <= r.through AND l.invoice_id IS NULL
    GROUP BY 1, 2, 3, 4
)
SELECT g.account_id, g.kind, coalesce(g.tax_class, k.tax_class) AS tax_class, c.rate_ppm AS class_rate,
       g.tax_rate_ppm, g.amount_micro, g.tax_base_micro, g.n
FROM g
LEFT JOIN kind_tax_classes k ON k.kind = g.kind
LEFT JOIN tax_classes c ON c.name = coalesce(g.tax_class, k.tax_class)
"""

_INSERT_INVOICES = """
INSERT INTO invoices (account_id, issuer_id, status, number, seq, period_start, period_end, from_line_id,
                      through_line_id, opening_micro, lines_micro, tax_micro, closing_micro, net_micro,
                      payments_micro, line_count, currency, timezone, confirmed_at)
SELECT * FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::text[], $5::bigint[], $6::timestamptz[],
                     $7::timestamptz[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[],
                     $13::bigint[], $14::bigint[], $15::bigint[], $16::integer[], $17::text[], $18::text[],
                     $19::timestamptz[])
RETURNING id, account_id
"""

_INSERT_TAXES = """
INSERT INTO invoice_taxes (invoice_id, tax_class, rate_ppm, net_micro, tax_micro)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::integer[], $4::bigint[], $5::bigint[])
"""

_INSERT_LINES = """
INSERT INTO ledger (account_id, kind, amount_micro, balance_after_micro, description, tax_class, invoice_id,
                    tax_rate_ppm, tax_base_micro)
SELECT account_id, kind, amount, after, description, tax_class, invoice_id, rate, base
FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::bigint[],
            $8::integer[], $9::bigint[])
    WITH ORDINALITY AS t(account_id, kind, amount, after, description, tax_class, invoice_id, rate, base, ord)
ORDER BY ord
RETURNING *
"""

_MOVE_MARKS = """
UPDATE accounts a SET invoiced_through_id = coalesce(m.through, a.invoiced_through_id),
                      period_start = coalesce(m.period_start, a.period_start),
                      next_close_at = m.next_close
FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::timestamptz[]) AS m(id, through, period_start,
                                                                                    next_close)
WHERE a.id = m.id
"""


def period_taxes(rows: Sequence[asyncpg.Record], tax_mode: str, vat_rate_ppm: int) -> tuple[PeriodTotals, list[TaxRow]]:
    """A period's totals, and the tax rows its invoice shows: charged by the invoice, or (an account taxed
    at payment) collected by its tax lines. `rows`: ledger lines, or sums of them (`n` lines each), with
    kind, effective tax_class, the class's rate (class_rate), tax_rate_ppm, amount_micro, tax_base_micro.
    The close and the preview both use it, so a preview shows what its close will charge."""
    taxed_here = tax_mode == "invoice"
    lines = []
    for r in rows:
        taxable = r["kind"] != "tax" and r["tax_class"] is not None
        rate = (int(r["class_rate"]) if r["class_rate"] is not None else vat_rate_ppm) if taxable else None
        lines.append(PeriodLine(r["kind"], int(r["amount_micro"]), r["tax_class"] if taxable else None, rate,
                                r.get("n", 1)))
    totals = period_totals(lines, taxed_here=taxed_here)
    if taxed_here:
        return totals, list(totals.taxes)
    collected: dict[tuple[str, int], tuple[int, int]] = {}
    for r in rows:
        if r["kind"] == "tax":
            key = (r["tax_class"] or "standard", int(r["tax_rate_ppm"]))
            net, tax = collected.get(key, (0, 0))
            collected[key] = (net + int(r["tax_base_micro"] or 0), tax - int(r["amount_micro"]))
    return totals, [TaxRow(c, rate, net, tax) for (c, rate), (net, tax) in sorted(collected.items())]


async def close_periods(
    conn: asyncpg.Connection,
    account_ids: Sequence[int],
    *,
    until: datetime | None,
    now: datetime,
    scheduled: bool = False,
) -> CloseReport:
    """Close the open previews of `account_ids` in one transaction.

    `until`: the period ends there (an admin's close: now); None with `scheduled`: each account's own
    `next_close_at` (its invoice day's local midnight), and only accounts still due after the lock.
    A period with no line makes no invoice (closing twice is a no-op). Issuers in draft mode get drafts:
    no number and no tax line until `confirm`.
    """
    report = CloseReport()
    async with conn.transaction():
        await conn.execute(_LOCK, list(account_ids))
        accounts = await conn.fetch(_ACCOUNTS, list(account_ids))
        found = {a["id"] for a in accounts}
        for missing in sorted(set(account_ids) - found):
            report.errors[str(missing)] = "no such account"
        ready: list[tuple[asyncpg.Record, datetime]] = []
        for acct in accounts:
            if acct["issuer_id"] is None:
                report.errors[acct["number"]] = (f"reseller {acct['reseller_id']} has no issuer: add one with "
                                                 "`a2bd issuer add --reseller`")
            elif acct["draft_id"] is not None:
                report.errors[acct["number"]] = f"draft invoice {acct['draft_id']} waits: confirm or discard it first"
            elif scheduled:
                if acct["invoices_enabled"] and acct["next_close_at"] is not None and acct["next_close_at"] <= now:
                    ready.append((acct, acct["next_close_at"]))
            else:
                ready.append((acct, until or now))
        if not ready:
            return report

        throughs = {
            r["id"]: r["through"]
            for r in await conn.fetch(_THROUGH, [a["id"] for a, _ in ready],
                                      [a["invoiced_through_id"] for a, _ in ready], [end for _, end in ready])
        }
        with_lines = [(a, end) for a, end in ready if throughs.get(a["id"]) is not None]
        groups: dict[int, list[asyncpg.Record]] = {}
        if with_lines:
            for row in await conn.fetch(_PERIOD_GROUPS, [a["id"] for a, _ in with_lines],
                                        [a["invoiced_through_id"] for a, _ in with_lines],
                                        [throughs[a["id"]] for a, _ in with_lines]):
                groups.setdefault(row["account_id"], []).append(row)

        # Numbers: one block per issuer, taken under the issuer's row lock (issuers in id order).
        confirm_counts: dict[int, int] = {}
        for acct, _ in with_lines:
            if acct["issuer_mode"] == "confirm":
                confirm_counts[acct["issuer_id"]] = confirm_counts.get(acct["issuer_id"], 0) + 1
        next_seq: dict[int, int] = {}
        prefix_of: dict[int, str] = {}
        for issuer_id in sorted(confirm_counts):
            next_seq[issuer_id], prefix_of[issuer_id] = await take_numbers(conn, issuer_id, confirm_counts[issuer_id])

        cols: dict[str, list[Any]] = {k: [] for k in (
            "account", "issuer", "status", "number", "seq", "start", "end", "from", "through", "opening",
            "lines", "tax", "closing", "net", "payments", "count", "currency", "tz", "confirmed")}
        tax_rows: dict[int, list[TaxRow]] = {}
        charged: dict[int, list[TaxRow]] = {}
        number_of: dict[int, str | None] = {}  # account -> its invoice's number (None: a draft)
        for acct, end in with_lines:
            totals, shown = period_taxes(groups.get(acct["id"], []), acct["tax_mode"], acct["vat_rate_ppm"])
            confirm = acct["issuer_mode"] == "confirm"
            seq = number = None
            if confirm:
                seq = next_seq[acct["issuer_id"]]
                next_seq[acct["issuer_id"]] = seq + 1
                number = invoice_number(prefix_of[acct["issuer_id"]], seq)
            tax = totals.tax_micro
            for key, value in (
                ("account", acct["id"]), ("issuer", acct["issuer_id"]), ("status", "confirmed" if confirm else "draft"),
                ("number", number), ("seq", seq), ("start", acct["period_start"]), ("end", end),
                ("from", acct["invoiced_through_id"]), ("through", throughs[acct["id"]]),
                ("opening", acct["opening_micro"]), ("lines", totals.lines_micro), ("tax", tax),
                ("closing", acct["opening_micro"] + totals.lines_micro - tax), ("net", totals.net_micro),
                ("payments", totals.payments_micro), ("count", totals.line_count), ("currency", acct["currency"]),
                ("tz", acct["timezone"]), ("confirmed", now if confirm else None),
            ):
                cols[key].append(value)
            tax_rows[acct["id"]] = shown
            number_of[acct["id"]] = number
            if confirm:
                charged[acct["id"]] = list(totals.taxes)

        inserted = await conn.fetch(_INSERT_INVOICES, *cols.values())
        invoice_of = {r["account_id"]: r["id"] for r in inserted}
        await conn.execute(
            _INSERT_TAXES,
            *_columns([(invoice_of[acct_id], t.tax_class, t.rate_ppm, t.net_micro, t.tax_micro)
                       for acct_id, rows in tax_rows.items() for t in rows], 5),
        )

        # Tax lines of confirmed invoices, then autorefills into the new preview; both chain from the locked
        # balance.
        balances = {a["id"]: a["balance_micro"] for a, _ in ready}
        new_lines: list[tuple[int, str, int, int, str, str | None, int | None, int | None, int | None]] = []
        for acct, _ in with_lines:
            lines, balances[acct["id"]] = _tax_lines(acct["id"], balances[acct["id"]], invoice_of[acct["id"]],
                                                     charged.get(acct["id"], []))
            new_lines += lines
        for acct, _ in with_lines:
            short = acct["initial_balance_micro"] - balances[acct["id"]]
            if acct["autorefill"] and short > 0:
                for x in postgres.credit_lines("refill", short, "autorefill to the initial balance",
                                               tax_mode=acct["tax_mode"], vat_rate_ppm=acct["vat_rate_ppm"]):
                    balances[acct["id"]] += x.amount_micro
                    new_lines.append((acct["id"], x.kind, x.amount_micro, balances[acct["id"]], x.description,
                                      x.tax_class, None, x.tax_rate_ppm, x.tax_base_micro))
        newest: dict[int, asyncpg.Record] = {}
        if new_lines:
            for row in await conn.fetch(_INSERT_LINES, *_columns(new_lines, 9)):
                newest[row["account_id"]] = row

        marks = []
        for acct, end in ready:
            has = acct["id"] in invoice_of
            next_close = acct["next_close_at"]
            if next_close is None or next_close <= end:
                next_close = close_after(end, acct["invoice_day"], ZoneInfo(acct["timezone"]))
            marks.append((acct["id"], throughs[acct["id"]] if has else None, end if has else None, next_close))
        await conn.execute(_MOVE_MARKS, *_columns(marks, 4))
        await _notify_issued(conn, [invoice_of[a["id"]] for a, _ in with_lines if a["issuer_mode"] == "confirm"])
        if newest:
            await postgres.note_low_credit(conn, list(newest))

        for acct, _ in with_lines:
            number = number_of[acct["id"]]
            status = "draft" if number is None else "confirmed"
            report.closed.append(Closed(invoice_of[acct["id"]], acct["number"], status, number, newest.get(acct["id"])))
        report.empty = [a["number"] for a, _ in ready if a["id"] not in invoice_of]
    return report


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows to the column arrays an unnest() insert takes."""
    return [[row[i] for row in rows] for i in range(width)]


async def _notify_issued(conn: asyncpg.Connection, invoice_ids: Sequence[int]) -> None:
    """An e-mail notice per issued invoice whose account has an address (the outbox sends it, PDF attached)."""
    if invoice_ids:
        await conn.execute(
            "INSERT INTO notices (account_id, kind, detail, to_address)"
            " SELECT i.account_id, 'invoice', jsonb_build_object('invoice_id', i.id, 'number', i.number), a.email"
            " FROM invoices i JOIN accounts a ON a.id = i.account_id"
            " WHERE i.id = ANY($1::bigint[]) AND a.email <> ''",
            list(invoice_ids),
        )


def _tax_lines(account_id: int, balance: int, invoice_id: int, taxes: Sequence[TaxRow]
               ) -> tuple[list[tuple[Any, ...]], int]:
    """The tax lines an invoice posts (for _INSERT_LINES), chained from `balance`; and the balance after."""
    lines = []
    for t in taxes:
        if t.tax_micro:
            balance -= t.tax_micro
            lines.append((account_id, "tax", -t.tax_micro, balance, f"VAT {format_rate(t.rate_ppm)} on {t.tax_class}",
                          t.tax_class, invoice_id, t.rate_ppm, t.net_micro))
    return lines, balance


async def _lock_draft(conn: asyncpg.Connection, invoice_id: int, refusal: str) -> tuple[asyncpg.Record, asyncpg.Record]:
    """The draft and its account, locked (account first, as every posting locks it); `refusal` completes the
    message when the invoice is no longer a draft."""
    account_id = await conn.fetchval("SELECT account_id FROM invoices WHERE id = $1", invoice_id)
    if account_id is None:
        raise InputError(f"invoice {invoice_id} does not exist")
    acct = await conn.fetchrow("SELECT id, number, balance_micro FROM accounts WHERE id = $1 FOR UPDATE", account_id)
    inv = await conn.fetchrow("SELECT * FROM invoices WHERE id = $1 FOR UPDATE", invoice_id)
    if inv["status"] != "draft":
        raise InputError(f"invoice {invoice_id} is {inv['status']}{refusal}")
    return acct, inv


async def confirm(conn: asyncpg.Connection, invoice_id: int, now: datetime) -> Closed:
    """Number a draft, post the tax it charges, and make it final."""
    async with conn.transaction():
        acct, inv = await _lock_draft(conn, invoice_id, ", not a draft")
        seq, prefix = await take_numbers(conn, inv["issuer_id"], 1)
        number = invoice_number(prefix, seq)
        newest = None
        if inv["tax_micro"]:
            taxes = [TaxRow(t["tax_class"], t["rate_ppm"], t["net_micro"], t["tax_micro"]) for t in await conn.fetch(
                "SELECT * FROM invoice_taxes WHERE invoice_id = $1 ORDER BY tax_class, rate_ppm", invoice_id)]
            lines, _ = _tax_lines(acct["id"], acct["balance_micro"], invoice_id, taxes)
            written = await conn.fetch(_INSERT_LINES, *_columns(lines, 9))
            newest = written[-1] if written else None
        await conn.execute("UPDATE invoices SET status = 'confirmed', number = $2, seq = $3, confirmed_at = $4"
                           " WHERE id = $1", invoice_id, number, seq, now)
        await _notify_issued(conn, [invoice_id])
    return Closed(invoice_id, acct["number"], "confirmed", number, newest)


async def discard(conn: asyncpg.Connection, invoice_id: int, now: datetime) -> None:
    """Drop a draft: its lines go back to the account's preview."""
    async with conn.transaction():
        acct, inv = await _lock_draft(conn, invoice_id, ": only a draft can be discarded")
        await conn.execute("UPDATE invoices SET status = 'discarded', discarded_at = $2 WHERE id = $1",
                           invoice_id, now)
        await conn.execute("UPDATE accounts SET invoiced_through_id = $2, period_start = $3 WHERE id = $1",
                           acct["id"], inv["from_line_id"], inv["period_start"])


async def due_accounts(conn: asyncpg.Connection, now: datetime, limit: int,
                       after: tuple[datetime, int] | None = None) -> list[tuple[datetime, int]]:
    """(next close, id) of accounts whose invoice day has come, in that order, after `after` (a page)."""
    rows = await conn.fetch(
        "SELECT next_close_at, id FROM accounts WHERE invoices_enabled AND next_close_at <= $1"
        " AND ($3::timestamptz IS NULL OR (next_close_at, id) > ($3, $4)) ORDER BY next_close_at, id LIMIT $2",
        now, limit, after[0] if after else None, after[1] if after else 0)
    return [(r["next_close_at"], r["id"]) for r in rows]


async def schedule_new_accounts(conn: asyncpg.Connection) -> int:
    """Give every account without one its next close (its first invoice day after its period began)."""
    rows = await conn.fetch("SELECT id, coalesce(period_start, created_at) AS start, invoice_day, timezone"
                            " FROM accounts WHERE next_close_at IS NULL")
    if rows:
        await conn.execute(
            "UPDATE accounts a SET next_close_at = m.at FROM unnest($1::bigint[], $2::timestamptz[]) AS m(id, at)"
            " WHERE a.id = m.id AND a.next_close_at IS NULL",
            [r["id"] for r in rows],
            [close_after(r["start"], r["invoice_day"], ZoneInfo(r["timezone"])) for r in rows],
        )
    return len(rows)


ISSUER_COLUMNS = ("invoice_prefix", "mode", "name", "company", "address", "vat_number", "email")


async def set_issuer(conn: asyncpg.Connection, reseller_id: int | None, changes: dict[str, str]) -> asyncpg.Record:
    """Create or change the issuer of a reseller (None: the admin). A new reseller issuer needs a prefix."""
    unknown = set(changes) - set(ISSUER_COLUMNS)
    if unknown:
        raise InputError(f"unknown issuer field(s): {', '.join(sorted(unknown))}")
    try:
        async with conn.transaction():
            row = await conn.fetchrow("SELECT * FROM issuers WHERE reseller_id IS NOT DISTINCT FROM $1 FOR UPDATE",
                                      reseller_id)
            if row is None:
                if "invoice_prefix" not in changes:
                    raise InputError("a new issuer needs its own invoice number prefix (--prefix)")
                values = {"name": changes.get("name") or changes["invoice_prefix"], **changes,
                          "reseller_id": reseller_id}
                names = list(values)
                row = await conn.fetchrow(
                    f"INSERT INTO issuers ({', '.join(names)}) VALUES"  # noqa: S608 - names are ISSUER_COLUMNS
                    f" ({', '.join(f'${i + 1}' for i in range(len(names)))}) RETURNING *", *values.values())
            elif changes:
                names = list(changes)
                row = await conn.fetchrow(
                    f"UPDATE issuers SET {', '.join(f'{n} = ${i + 2}' for i, n in enumerate(names))}"  # noqa: S608
                    " WHERE id = $1 RETURNING *", row["id"], *changes.values())
            assert row is not None
            # A prefix is this issuer's for ever: a new one starts at 1, an old one of its own goes on.
            owner = await conn.fetchval(
                "INSERT INTO invoice_prefixes (prefix, issuer_id) VALUES ($1, $2)"
                " ON CONFLICT (prefix) DO UPDATE SET prefix = EXCLUDED.prefix RETURNING issuer_id",
                row["invoice_prefix"], row["id"])
            if owner != row["id"]:
                raise InputError(f"invoice prefix {row['invoice_prefix']!r} belongs to another issuer")
    except asyncpg.CheckViolationError as exc:
        raise InputError(f"issuer refused: {exc.constraint_name} (a prefix is up to 20 letters, digits or "
                         "/_.- and ends with a non-digit, e.g. INV-2026-)") from None
    return row


async def next_invoice_number(conn: asyncpg.Connection, issuer_id: int) -> str:
    """What the issuer's next invoice will be numbered (for display; nothing is taken)."""
    row = await conn.fetchrow("SELECT p.prefix, p.next_number FROM issuers i JOIN invoice_prefixes p"
                              " ON p.prefix = i.invoice_prefix WHERE i.id = $1", issuer_id)
    assert row is not None
    return invoice_number(row["prefix"], row["next_number"])
