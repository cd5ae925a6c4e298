"""Invoicing: the preview an account can read at any moment, closing it (by an admin or on the account's
invoice day), confirming or discarding drafts, and the document each invoice prints as.

The money moves in adapters/invoices.py inside one transaction per batch; this module chooses which
accounts close, keeps Redis in step afterwards (tax lines and autorefills move balances) and builds the
`InvoiceDocument` a PDF is drawn from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from zoneinfo import ZoneInfo

import asyncpg
import structlog

from a2bd.adapters import invoices
from a2bd.adapters.redis_store import RedisStore
from a2bd.domain import invoice as invoice_maths
from a2bd.domain.calls import destination_name
from a2bd.domain.invoice import CREDIT_KINDS, OPENING_KINDS, format_rate
from a2bd.domain.statement import CallSummary, InvoiceDocument, LineGroup, Party, StatementLine, TaxRow
from a2bd.errors import InputError
from a2bd.services.posting import tell_redis

log = structlog.get_logger("a2bd.invoicing")

# Accounts closed per transaction: the close holds their rows' locks, which the call writer waits for.
BATCH_ACCOUNTS = 500

GROUP_TITLES = {
    "did": "DID numbers", "subscription": "Subscriptions", "service": "Services", "charge": "Charges",
    "correction": "Corrections",
}


@dataclass(slots=True)
class RunReport:
    drafts: int = 0
    empty: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    numbers: list[str] = field(default_factory=list)  # of the invoices issued (confirmed), in order

    @property
    def closed(self) -> int:
        """Invoices issued (numbered)."""
        return len(self.numbers)

    def add(self, part: invoices.CloseReport) -> None:
        for c in part.closed:
            if c.number is not None:
                self.numbers.append(c.number)
            else:
                self.drafts += 1
        self.empty += len(part.empty)
        self.errors.update(part.errors)


async def _after_commit(store: RedisStore | None, part: invoices.CloseReport) -> None:
    if store is None:
        return
    for c in part.closed:
        if c.newest_line is not None:
            await tell_redis(store, c.account, c.newest_line)


async def close_accounts(conn: asyncpg.Connection, store: RedisStore | None, numbers: Sequence[str],
                         now: datetime) -> RunReport:
    """An admin's close, now, of the named accounts (a final bill, an early statement)."""
    rows = await conn.fetch("SELECT id, number FROM accounts WHERE number = ANY($1::text[])", list(numbers))
    ids = {r["number"]: r["id"] for r in rows}
    report = RunReport()
    for number in numbers:
        if number not in ids:
            report.errors[number] = "no such account"
    id_list = [ids[n] for n in numbers if n in ids]
    for start in range(0, len(id_list), BATCH_ACCOUNTS):
        part = await _close_isolated(conn, id_list[start:start + BATCH_ACCOUNTS], until=now, now=now)
        await _after_commit(store, part)
        report.add(part)
    return report


@dataclass(frozen=True, slots=True)
class AccountFilter:
    """Which accounts an admin closes at once (`a2bd invoice close --filter ...`). None: any."""

    reseller: str | None = None
    tariff: str | None = None
    currency: str | None = None
    postpaid: bool | None = None  # True: credit limit > 0; False: pre-paid
    invoice_day: int | None = None


async def filtered_accounts(conn: asyncpg.Connection, f: AccountFilter) -> list[str]:
    rows = await conn.fetch(
        "SELECT a.number FROM accounts a JOIN tariffs t ON t.id = a.tariff_id"
        " LEFT JOIN resellers r ON r.id = a.reseller_id"
        " WHERE a.status <> 'closed' AND ($1::text IS NULL OR r.name = $1) AND ($2::text IS NULL OR t.name = $2)"
        " AND ($3::text IS NULL OR a.currency = $3)"
        " AND ($4::boolean IS NULL OR (a.credit_limit_micro > 0) = $4)"
        " AND ($5::integer IS NULL OR a.invoice_day = $5) ORDER BY a.id",
        f.reseller, f.tariff, f.currency, f.postpaid, f.invoice_day,
    )
    return [r["number"] for r in rows]


async def close_due(conn: asyncpg.Connection, store: RedisStore | None, now: datetime,
                    batch: int = BATCH_ACCOUNTS) -> RunReport:
    """The scheduler's run: every account whose invoice day has begun in its time zone closes its period
    at that day's local midnight. Safe to run from several daemons at once (the account lock decides).

    Accounts are taken in (next close, id) order, each once per run: one that cannot close (a draft
    waiting for review) is reported and the run goes on past it. A catch-up of several missed months
    closes one month per run (the scheduler runs every minute)."""
    await invoices.schedule_new_accounts(conn)
    report = RunReport()
    after: tuple[datetime, int] | None = None
    while True:
        due = await invoices.due_accounts(conn, now, batch, after=after)
        if not due:
            return report
        after = due[-1]
        part = await _close_isolated(conn, [account_id for _, account_id in due], until=None, now=now,
                                     scheduled=True)
        await _after_commit(store, part)
        report.add(part)
        for number, why in part.errors.items():
            log.warning("invoice not closed", account=number, reason=why)


async def _close_isolated(conn: asyncpg.Connection, ids: list[int], *, until: datetime | None, now: datetime,
                          scheduled: bool = False) -> invoices.CloseReport:
    """Close a batch in one transaction; if PostgreSQL refuses it, close its accounts one by one, so that
    one account that cannot close is reported and the others still are (beancount's loader)."""
    try:
        return await invoices.close_periods(conn, ids, until=until, now=now, scheduled=scheduled)
    except asyncpg.PostgresError as exc:
        if len(ids) == 1:
            number = await conn.fetchval("SELECT number FROM accounts WHERE id = $1", ids[0])
            failed = invoices.CloseReport()
            failed.errors[number or str(ids[0])] = f"refused by PostgreSQL: {exc}"
            log.error("invoice close refused", account=number, error=str(exc))
            return failed
    merged = invoices.CloseReport()
    for account_id in ids:
        part = await _close_isolated(conn, [account_id], until=until, now=now, scheduled=scheduled)
        merged.closed += part.closed
        merged.empty += part.empty
        merged.errors.update(part.errors)
    return merged


async def confirm(conn: asyncpg.Connection, store: RedisStore | None, invoice_id: int, now: datetime) -> str:
    closed = await invoices.confirm(conn, invoice_id, now)
    if store is not None and closed.newest_line is not None:
        await tell_redis(store, closed.account, closed.newest_line)
    assert closed.number is not None
    return closed.number


async def discard(conn: asyncpg.Connection, invoice_id: int, now: datetime) -> None:
    await invoices.discard(conn, invoice_id, now)


# -- documents --------------------------------------------------------------------------------------

_STATEMENT_LINES = """
SELECT l.id, l.kind, l.amount_micro, l.description, l.destination, l.seconds, l.created_at,
       coalesce(l.tax_class, k.tax_class) AS tax_class, c.rate_ppm AS class_rate, l.tax_rate_ppm, l.tax_base_micro
FROM ledger l
LEFT JOIN kind_tax_classes k ON k.kind = l.kind
LEFT JOIN tax_classes c ON c.name = coalesce(l.tax_class, k.tax_class)
WHERE (l.account_id = $1 AND l.id > $2 AND l.id <= $3 AND l.invoice_id IS NULL) OR l.invoice_id = $4
ORDER BY l.id
"""

_ACCOUNT = """
SELECT a.*, """ + invoices.OPENING + """ AS opening_micro,
       i.name AS issuer_name, i.company AS issuer_company, i.address AS issuer_address,
       i.vat_number AS issuer_vat, i.email AS issuer_email, i.mode AS issuer_mode
FROM accounts a LEFT JOIN issuers i ON i.reseller_id IS NOT DISTINCT FROM a.reseller_id
WHERE a.{key} = $1
"""


def _parties(acct: asyncpg.Record) -> tuple[Party, Party]:
    issuer = Party(acct["issuer_name"] or "", acct["issuer_company"] or "", acct["issuer_address"] or "",
                   acct["issuer_vat"] or "", acct["issuer_email"] or "")
    customer = Party(acct["name"], acct["company"], acct["address"], acct["vat_number"], acct["email"])
    return issuer, customer


def _document(
    acct: asyncpg.Record, lines: Sequence[asyncpg.Record], *, status: str, number: str | None, issued_on: date,
    period_start: datetime, period_end: datetime, opening_micro: int, taxes: Sequence[TaxRow], timezone: str,
    currency: str,
) -> InvoiceDocument:
    """Group a period's lines the way a statement reads: calls per destination, other charges by kind,
    payments; the invoice's own tax lines are its tax rows, not lines."""
    calls: dict[str, list[int]] = {}
    groups: dict[str, list[StatementLine]] = {}
    payments: list[StatementLine] = []
    for line in lines:
        kind = line["kind"]
        if kind in OPENING_KINDS:  # the account's opening balance reads as carried forward
            opening_micro += line["amount_micro"]
        elif kind == "call":
            c = calls.setdefault(destination_name(line["description"] or line["destination"] or ""), [0, 0, 0])
            c[0] += 1
            c[1] += line["seconds"] or 0
            c[2] -= line["amount_micro"]
        elif kind in CREDIT_KINDS:
            payments.append(StatementLine(line["created_at"], kind, line["description"] or kind, line["amount_micro"]))
        elif kind == "tax":
            continue  # the tax rows say it
        else:
            groups.setdefault(kind, []).append(
                StatementLine(line["created_at"], kind, line["description"] or kind, line["amount_micro"]))
    call_rows = tuple(CallSummary(dest, n, s, amount) for dest, (n, s, amount) in sorted(calls.items()))
    group_rows = tuple(
        LineGroup(GROUP_TITLES.get(kind, kind.title()), tuple(items), sum(x.amount_micro for x in items))
        for kind, items in sorted(groups.items(), key=lambda kv: list(GROUP_TITLES).index(kv[0])
                                  if kv[0] in GROUP_TITLES else 99)
    )
    call_total = sum(c.amount_micro for c in call_rows)
    net = call_total - sum(g.total_micro for g in group_rows)
    tax = sum(t.tax_micro for t in taxes)
    paid = sum(p.amount_micro for p in payments)
    issuer, customer = _parties(acct)
    return InvoiceDocument(
        issuer=issuer, customer=customer, account_number=acct["number"], status=status, number=number,
        issued_on=issued_on, period_start=period_start, period_end=period_end, timezone=timezone,
        currency=currency, opening_micro=opening_micro, calls=call_rows, call_lines_total_micro=call_total,
        groups=group_rows, payments=tuple(payments), payments_total_micro=paid, taxes=tuple(taxes), net_micro=net,
        tax_micro=tax, gross_micro=net + tax, closing_micro=opening_micro + paid - net - tax,
    )


def _tax_rows(rows: Iterable[invoice_maths.TaxRow]) -> list[TaxRow]:
    return [TaxRow(_label(t.tax_class, t.rate_ppm), t.rate_ppm, t.net_micro, t.tax_micro) for t in rows]


def _label(tax_class: str, rate_ppm: int) -> str:
    return f"VAT {format_rate(rate_ppm)} ({tax_class})"


async def invoice_document(conn: asyncpg.Connection, invoice_id: int) -> InvoiceDocument:
    inv = await conn.fetchrow("SELECT * FROM invoices WHERE id = $1", invoice_id)
    if inv is None:
        raise InputError(f"invoice {invoice_id} does not exist")
    if inv["status"] == "discarded":
        raise InputError(f"invoice {invoice_id} was discarded: its lines are in the preview")
    acct = await conn.fetchrow(_ACCOUNT.format(key="id"), inv["account_id"])
    lines = await conn.fetch(_STATEMENT_LINES, inv["account_id"], inv["from_line_id"], inv["through_line_id"],
                             invoice_id)
    taxes = await conn.fetch("SELECT * FROM invoice_taxes WHERE invoice_id = $1 ORDER BY tax_class, rate_ppm",
                             invoice_id)
    tz = ZoneInfo(inv["timezone"])
    issued = (inv["confirmed_at"] or inv["created_at"]).astimezone(tz).date()
    status = inv["status"]  # confirmed or draft (a discarded one was refused above)
    return _document(acct, lines, status=status, number=inv["number"], issued_on=issued,
                     period_start=inv["period_start"], period_end=inv["period_end"],
                     opening_micro=inv["opening_micro"], timezone=inv["timezone"], currency=inv["currency"],
                     taxes=_tax_rows(invoice_maths.TaxRow(t["tax_class"], t["rate_ppm"], t["net_micro"],
                                                          t["tax_micro"]) for t in taxes))


async def preview(conn: asyncpg.Connection, number: str, now: datetime) -> InvoiceDocument:
    """The open preview: every line since the last closed invoice, headed by the balance carried forward,
    with the tax its close would charge. Reads only; a customer can pay "up to the minute" from it."""
    acct = await conn.fetchrow(_ACCOUNT.format(key="number"), number)
    if acct is None:
        raise InputError(f"account {number} does not exist")
    lines = await conn.fetch(_STATEMENT_LINES, acct["id"], acct["invoiced_through_id"], 1 << 62, None)
    _, taxes = invoices.period_taxes(lines, acct["tax_mode"], acct["vat_rate_ppm"])
    start = acct["period_start"] or acct["created_at"]
    return _document(acct, lines, status="preview", number=None, issued_on=now.astimezone(ZoneInfo(acct["timezone"]))
                     .date(), period_start=start, period_end=max(now, start), opening_micro=acct["opening_micro"],
                     taxes=_tax_rows(taxes), timezone=acct["timezone"], currency=acct["currency"])


async def store_documents(conn: asyncpg.Connection, render: Callable[[InvoiceDocument], bytes],
                          limit: int = 1000, skip: set[int] | None = None) -> int:
    """Render and keep the PDF of confirmed invoices that have none yet (made once; never re-rendered).
    Invoices whose document fails are logged, added to `skip` and passed over; returns how many were tried."""
    skip = set() if skip is None else skip
    ids = [r["id"] for r in await conn.fetch(
        "SELECT i.id FROM invoices i WHERE i.status = 'confirmed' AND NOT (i.id = ANY($2::bigint[]))"
        " AND NOT EXISTS (SELECT 1 FROM invoice_documents d WHERE d.invoice_id = i.id) ORDER BY i.id LIMIT $1",
        limit, list(skip))]
    for invoice_id in ids:
        try:  # chosen above: confirmed and without a document
            await _keep(conn, invoice_id, render(await invoice_document(conn, invoice_id)))
        except Exception:  # one document that cannot be made must not hold back the others (nor their e-mail)
            log.exception("invoice document not made; will try again next pass", invoice_id=invoice_id)
            skip.add(invoice_id)
    return len(ids)


async def store_document(conn: asyncpg.Connection, invoice_id: int,
                         render: Callable[[InvoiceDocument], bytes]) -> bytes:
    """The PDF of a confirmed invoice: rendered once, then always the stored bytes."""
    stored: bytes | None = await conn.fetchval("SELECT pdf FROM invoice_documents WHERE invoice_id = $1", invoice_id)
    if stored is not None:
        return stored
    doc = await invoice_document(conn, invoice_id)
    if doc.status != "confirmed":
        raise InputError(f"invoice {invoice_id} is a draft: confirm it before it gets its document")
    return await _keep(conn, invoice_id, render(doc))


async def _keep(conn: asyncpg.Connection, invoice_id: int, pdf: bytes) -> bytes:
    await conn.execute(
        "INSERT INTO invoice_documents (invoice_id, pdf, sha256) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        invoice_id, pdf, hashlib.sha256(pdf).hexdigest())
    return pdf


async def invoice_id_by_number(conn: asyncpg.Connection, number: str) -> int:
    invoice_id = await conn.fetchval("SELECT id FROM invoices WHERE number = $1", number)
    if invoice_id is None:
        raise InputError(f"no invoice numbered {number}")
    return int(invoice_id)
