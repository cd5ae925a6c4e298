"""The billing staff's commands: invoices, issuers, services, packages, reports, one scheduler pass.

`a2bd invoice preview|close|confirm|discard|pdf|search`, `a2bd issuer set`, `a2bd service add|list|resume|
cancel`, `a2bd package add`, `a2bd report charges`, `a2bd billing run`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from a2bd.adapters import invoices, postgres
from a2bd.adapters.redis_store import RedisStore
from a2bd.config import Settings
from a2bd.domain.money import format_amount
from a2bd.domain.statement import InvoiceDocument
from a2bd.errors import InputError
from a2bd.services import invoicing


def add_commands(sub: Any) -> None:
    """Register the billing commands on the CLI's subparsers (`sub.add_parser` gives the common options)."""
    from a2bd.cli import _Subparsers

    invoice = _Subparsers(sub.add_parser("invoice", help="bank-statement invoices").add_subparsers(
        required=True, metavar="ACTION"), sub.common)
    p = invoice.add_parser("preview", help="the open preview of an account: every line since its last invoice")
    p.add_argument("number")
    p.add_argument("--json", action="store_true")
    p.add_argument("--pdf", type=Path, help="also write it as a PDF (marked: not an invoice)")
    p.set_defaults(command=cmd_invoice_preview)

    p = invoice.add_parser("close", help="close previews into invoices now (admin only; customers cannot close)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--account", action="append", help="this account (repeatable): a final or early bill")
    which.add_argument("--all-due", action="store_true", help="every account whose invoice day has come")
    which.add_argument("--filter", action="append", metavar="KEY=VALUE",
                       help="accounts matching all filters: reseller=, tariff=, currency=, postpaid=yes|no, "
                            "invoice_day=N (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(command=cmd_invoice_close)

    p = invoice.add_parser("confirm", help="number a draft invoice, post its tax, render and send it")
    p.add_argument("invoice_id", type=int)
    p.set_defaults(command=cmd_invoice_confirm)
    p = invoice.add_parser("discard", help="drop a draft invoice: its lines return to the preview")
    p.add_argument("invoice_id", type=int)
    p.set_defaults(command=cmd_invoice_discard)
    p = invoice.add_parser("pdf", help="write an invoice's PDF (the stored one once it is issued)")
    p.add_argument("invoice", help="invoice number, or a draft's id")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(command=cmd_invoice_pdf)

    p = invoice.add_parser("search", help="invoices by account, last name, number (prefix with *), period end")
    p.add_argument("--account")
    p.add_argument("--last-name")
    p.add_argument("--number", help="an invoice number, or a prefix ending in * (quote it)")
    p.add_argument("--since", help="period ending at or after this (ISO date or date-time, UTC by default)")
    p.add_argument("--until", help="period ending before this")
    p.add_argument("--status", choices=("confirmed", "draft", "discarded", "all"), default="confirmed")
    p.add_argument("--limit", type=int)
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.set_defaults(command=cmd_invoice_search)

    report = _Subparsers(sub.add_parser("report", help="reports for billing staff").add_subparsers(
        required=True, metavar="ACTION"), sub.common)
    p = report.add_parser("charges", help="the charge history: ledger lines of accounts, with their invoice")
    p.add_argument("--account")
    p.add_argument("--last-name", help="accounts whose last name starts with this (any case)")
    p.add_argument("--kind", action="append", help="only these kinds of line (repeatable)")
    p.add_argument("--since", help="lines at or after this (ISO date or date-time, UTC by default)")
    p.add_argument("--until", help="lines before this")
    p.add_argument("--limit", type=int)
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.set_defaults(command=cmd_report_charges)

    issuer = _Subparsers(sub.add_parser("issuer", help="who issues invoices: the admin, each reseller")
                         .add_subparsers(required=True, metavar="ACTION"), sub.common)
    p = issuer.add_parser("set", help="create or change an issuer (its numbering prefix, draft or confirm mode)")
    p.add_argument("--reseller", help="reseller name (default: the admin)")
    p.add_argument("--prefix", help="invoice number prefix, e.g. INV-2026-")
    p.add_argument("--mode", choices=("confirm", "draft"), help="draft: closed periods wait for review")
    for name in ("name", "company", "address", "vat-number", "email"):
        p.add_argument(f"--{name}")
    p.set_defaults(command=cmd_issuer_set)

    service = _Subparsers(sub.add_parser("service", help="recurring services: DID rentals, subscriptions, "
                                         "trunk channels").add_subparsers(required=True, metavar="ACTION"),
                          sub.common)
    p = service.add_parser("add", help="rent a DID or start a subscription; the first period is charged now")
    p.add_argument("number", help="account number")
    p.add_argument("--kind", choices=("did", "subscription", "service"), required=True)
    p.add_argument("--name", required=True, help="what the invoice calls it, e.g. 'Trunk channel'")
    p.add_argument("--amount", required=True, help="net price per period, e.g. 5.00")
    p.add_argument("--period", choices=("day", "week", "month", "year"), default="month")
    p.add_argument("--every", type=int, default=1, help="every N periods")
    p.add_argument("--did", help="the DID number rented (kind did)")
    p.add_argument("--tax-class", help="tax class when not its kind's (e.g. exempt)")
    p.add_argument("--reminder-days", type=int, default=0, help="a renewal reminder this many days before")
    p.add_argument("--no-charge-now", action="store_true", help="leave the first charge to the scheduler")
    p.set_defaults(command=cmd_service_add)
    p = service.add_parser("list", help="an account's services")
    p.add_argument("number")
    p.add_argument("--json", action="store_true")
    p.set_defaults(command=cmd_service_list)
    p = service.add_parser("resume", help="charge a suspended service now and make it active again")
    p.add_argument("service_id", type=int)
    p.set_defaults(command=cmd_service_resume)
    p = service.add_parser("cancel", help="stop a service (no refund line)")
    p.add_argument("service_id", type=int)
    p.set_defaults(command=cmd_service_cancel)

    package = _Subparsers(sub.add_parser("package", help="free-minute packages").add_subparsers(
        required=True, metavar="ACTION"), sub.common)
    p = package.add_parser("add", help="free minutes per billing period, used before the credit when rating")
    p.add_argument("number", help="account number")
    p.add_argument("--name", required=True)
    p.add_argument("--minutes", type=int, required=True, help="free minutes per period (reset at each invoice)")
    p.add_argument("--prefix", action="append", default=[], help="destinations covered (repeatable; none: all)")
    p.set_defaults(command=cmd_package_add)

    billing = _Subparsers(sub.add_parser("billing", help="the billing scheduler").add_subparsers(
        required=True, metavar="ACTION"), sub.common)
    p = billing.add_parser("run", help="one pass of what the daemon's scheduler does every minute: recurring "
                                       "charges, invoice days, PDFs, e-mails")
    p.add_argument("--json", action="store_true")
    p.set_defaults(command=cmd_billing_run)


# -- commands ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _database(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await postgres.connect(settings.postgres.url)
    try:
        yield conn
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _hot_state(settings: Settings) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(settings.redis.url, settings.redis.timeout_s)
    try:
        yield store
    finally:
        await store.close()



async def cmd_invoice_preview(args: argparse.Namespace, settings: Settings) -> int:
    async with _database(settings) as conn:
        doc = await invoicing.preview(conn, args.number, datetime.now(UTC))
    if args.pdf:
        from a2bd.adapters.pdf import render_invoice

        args.pdf.write_bytes(render_invoice(doc))
    print(json.dumps(document_json(doc), indent=2) if args.json else statement_text(doc))
    return 0


async def cmd_invoice_close(args: argparse.Namespace, settings: Settings) -> int:
    now = datetime.now(UTC)
    async with _database(settings) as conn, _hot_state(settings) as store:
        if args.all_due:
            report = await invoicing.close_due(conn, store, now)
        else:
            numbers = args.account or await invoicing.filtered_accounts(conn, _filter(args.filter))
            report = await invoicing.close_accounts(conn, store, numbers, now)
    if args.json:
        print(json.dumps({"issued": report.numbers, "drafts": report.drafts, "empty": report.empty,
                          "errors": report.errors}, indent=2))
    else:
        print(f"{report.closed} invoice(s) issued, {report.drafts} draft(s) to review, "
              f"{report.empty} account(s) with nothing to invoice")
        for number in report.numbers:
            print(f"  {number}")
        for account, why in report.errors.items():
            print(f"  not closed: {account}: {why}", file=sys.stderr)
    return 1 if report.errors else 0


async def cmd_invoice_confirm(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.adapters.pdf import render_invoice

    async with _database(settings) as conn, _hot_state(settings) as store:
        number = await invoicing.confirm(conn, store, args.invoice_id, datetime.now(UTC))
        await invoicing.store_document(conn, args.invoice_id, render_invoice)  # the outbox mails it next pass
    print(number)
    return 0


async def cmd_invoice_discard(args: argparse.Namespace, settings: Settings) -> int:
    async with _database(settings) as conn:
        await invoicing.discard(conn, args.invoice_id, datetime.now(UTC))
    print(f"draft {args.invoice_id} discarded; its lines are back in the preview")
    return 0


async def cmd_invoice_pdf(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.adapters.pdf import render_invoice

    async with _database(settings) as conn:
        if args.invoice.isdigit() and not await conn.fetchval("SELECT 1 FROM invoices WHERE number = $1",
                                                              args.invoice):
            invoice_id = int(args.invoice)
        else:
            invoice_id = await invoicing.invoice_id_by_number(conn, args.invoice)
        status = await conn.fetchval("SELECT status FROM invoices WHERE id = $1", invoice_id)
        if status == "confirmed":
            pdf = await invoicing.store_document(conn, invoice_id, render_invoice)
        else:  # a draft's, marked as such; not kept
            pdf = render_invoice(await invoicing.invoice_document(conn, invoice_id))
    args.output.write_bytes(pdf)
    print(f"{args.output} ({len(pdf)} bytes)")
    return 0


def _when(text: str | None, option: str) -> datetime | None:
    from a2bd.cli import _datetime

    return None if text is None else _datetime(text, option)


async def cmd_invoice_search(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.services.reports import InvoiceQuery, InvoiceRow, search_invoices, to_json, write_csv

    query = InvoiceQuery(account_number=args.account, last_name=args.last_name, number=args.number,
                         since=_when(args.since, "--since"), until=_when(args.until, "--until"), status=args.status,
                         limit=args.limit)
    async with _database(settings) as conn:
        rows = await search_invoices(conn, query)
    if args.format == "json":
        print(to_json(rows, indent=2))
    else:
        write_csv(rows, sys.stdout, InvoiceRow)
    return 0


async def cmd_report_charges(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.services.reports import ChargeQuery, ChargeRow, charge_batches, write_report

    query = ChargeQuery(account_number=args.account, last_name=args.last_name, kinds=tuple(args.kind or ()),
                        since=_when(args.since, "--since"), until=_when(args.until, "--until"), limit=args.limit)
    async with _database(settings) as conn:
        await write_report(charge_batches(conn, query), sys.stdout, ChargeRow, args.format)  # streamed
    return 0


_ISSUER_COLUMNS = {"prefix": "invoice_prefix", "mode": "mode", "name": "name", "company": "company",
                   "address": "address", "vat_number": "vat_number", "email": "email"}


async def cmd_issuer_set(args: argparse.Namespace, settings: Settings) -> int:
    changes = {column: getattr(args, arg) for arg, column in _ISSUER_COLUMNS.items() if getattr(args, arg) is not None}
    async with _database(settings) as conn:
        reseller_id = None
        if args.reseller:
            reseller_id = await conn.fetchval("SELECT id FROM resellers WHERE name = $1", args.reseller)
            if reseller_id is None:
                raise InputError(f"reseller {args.reseller} does not exist")
        row = await invoices.set_issuer(conn, reseller_id, changes)
        upcoming = await invoices.next_invoice_number(conn, row["id"])
    print(f"issuer {row['name']!r}: prefix {row['invoice_prefix']!r}, {row['mode']} mode, next number {upcoming}")
    return 0


async def cmd_service_add(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.cli import _money
    from a2bd.services.recurring import add_service

    amount = _money(args.amount, field="--amount")
    async with _database(settings) as conn, _hot_state(settings) as store:
        row = await add_service(conn, store=store, account_number=args.number, kind=args.kind, name=args.name,
                                amount_micro=amount, period=args.period, every=args.every, did=args.did,
                                tax_class=args.tax_class, reminder_days=args.reminder_days,
                                charge_now=not args.no_charge_now)
    print(f"service {row['id']}: {row['name']}, {format_amount(amount)} every {args.every} {args.period}(s), "
          f"next charge {row['next_charge_at'].isoformat()}")
    return 0


async def cmd_service_list(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.services.recurring import services_of

    async with _database(settings) as conn:
        rows = await services_of(conn, args.number)
    listed = [{"id": r["id"], "kind": r["kind"], "name": r["name"], "did": r["did"],
               "amount": format_amount(r["amount_micro"]), "period": f"{r['every']} {r['period']}",
               "next_charge_at": r["next_charge_at"].isoformat(), "status": r["status"]} for r in rows]
    if args.json:
        print(json.dumps(listed, indent=2))
    else:
        for r in listed:
            print(f"{r['id']:>6} {r['status']:<9} {r['kind']:<12} {r['amount']:>10} /{r['period']:<8} "
                  f"next {r['next_charge_at']}  {r['name']}{' ' + r['did'] if r['did'] else ''}")
    return 0


async def cmd_service_resume(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.services.recurring import resume_service

    async with _database(settings) as conn, _hot_state(settings) as store:
        row = await resume_service(conn, store, args.service_id, datetime.now(UTC))
    print(f"service {row['id']} active again, next charge {row['next_charge_at'].isoformat()}")
    return 0


async def cmd_service_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.services.recurring import cancel_service

    async with _database(settings) as conn:
        await cancel_service(conn, args.service_id)
    print(f"service {args.service_id} cancelled")
    return 0


async def cmd_package_add(args: argparse.Namespace, settings: Settings) -> int:
    async with _database(settings) as conn:
        row = await postgres.add_package(conn, args.number, args.name, args.minutes * 60,
                                         [p.lstrip("+") for p in args.prefix])
    print(f"package {row['id']}: {args.minutes} free minutes a period"
          f"{' to ' + ', '.join(row['prefixes']) if row['prefixes'] else ''}")
    return 0


async def cmd_billing_run(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.services.scheduler import BillingScheduler

    pool = await postgres.create_pool(settings.postgres.url, 1, 2)
    try:
        async with _hot_state(settings) as store:
            report = await BillingScheduler(pool, store, settings).run_once(datetime.now(UTC))
    finally:
        await pool.close()
    print(json.dumps(report, indent=2) if args.json else
          ", ".join(f"{key}: {value}" for key, value in report.items() if not isinstance(value, dict)))
    return 0


# -- presentation -----------------------------------------------------------------------------------


def _filter(items: list[str]) -> invoicing.AccountFilter:
    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in ("reseller", "tariff", "currency", "postpaid", "invoice_day"):
            raise InputError(f"--filter {item!r}: use reseller=, tariff=, currency=, postpaid=yes|no or invoice_day=")
        if key == "postpaid":
            if value not in ("yes", "no"):
                raise InputError("--filter postpaid= takes yes or no")
            values[key] = value == "yes"
        elif key == "invoice_day":
            if not value.isdigit() or not 1 <= int(value) <= 28:
                raise InputError("--filter invoice_day= takes 1..28")
            values[key] = int(value)
        else:
            values[key] = value.upper() if key == "currency" else value
    return invoicing.AccountFilter(**values)


def statement_text(doc: InvoiceDocument) -> str:
    """The document as a terminal reads it: a bank statement, amounts right-aligned and exact."""
    tz = ZoneInfo(doc.timezone)
    cur = doc.currency
    title = {"preview": "Preview (not an invoice)", "draft": "Draft invoice"}.get(doc.status,
                                                                                   f"Invoice {doc.number}")

    def day(at: datetime) -> str:
        return at.astimezone(tz).strftime("%Y-%m-%d")

    out = [f"{title} - account {doc.account_number} ({doc.customer.name or doc.customer.company})",
           f"Period {day(doc.period_start)} to {day(doc.period_end)} ({doc.timezone})", ""]

    def row(label: str, micro: int) -> None:
        out.append(f"  {label[:58]:<58} {format_amount(micro):>16} {cur}")

    row("Balance carried forward", doc.opening_micro)
    if doc.calls:
        out.append("Calls")
        for c in doc.calls:
            row(f"{c.destination}: {c.calls} call(s), {c.seconds // 60}:{c.seconds % 60:02d} min", -c.amount_micro)
    for group in doc.groups:
        out.append(group.title)
        for line in group.lines:
            row(f"{day(line.at)} {line.description}", line.amount_micro)
    if doc.payments:
        out.append("Payments")
        for line in doc.payments:
            row(f"{day(line.at)} {line.description}", line.amount_micro)
    out.append("Taxes")
    for tax in doc.taxes:
        row(f"{tax.label} on {format_amount(tax.net_micro)}", -tax.tax_micro)
    out += ["", f"  Net {format_amount(doc.net_micro)}  Tax {format_amount(doc.tax_micro)}  "
                f"Gross {format_amount(doc.gross_micro)} {cur}"]
    row("Closing balance", doc.closing_micro)
    if doc.amount_due_micro:
        row("Amount to pay", doc.amount_due_micro)
    else:
        row("In credit", doc.in_credit_micro)
    return "\n".join(out)


def document_json(doc: InvoiceDocument) -> dict[str, Any]:
    """Money as exact decimal strings, never floats."""
    money = format_amount
    return {
        "status": doc.status, "number": doc.number, "account": doc.account_number, "currency": doc.currency,
        "period_start": doc.period_start.isoformat(), "period_end": doc.period_end.isoformat(),
        "carried_forward": money(doc.opening_micro),
        "calls": [{"destination": c.destination, "calls": c.calls, "seconds": c.seconds, "cost": money(c.amount_micro)}
                  for c in doc.calls],
        "groups": [{"title": g.title, "total": money(g.total_micro),
                    "lines": [{"at": x.at.isoformat(), "description": x.description, "amount": money(x.amount_micro)}
                              for x in g.lines]} for g in doc.groups],
        "payments": [{"at": x.at.isoformat(), "description": x.description, "amount": money(x.amount_micro)}
                     for x in doc.payments],
        "taxes": [{"label": t.label, "rate_ppm": t.rate_ppm, "net": money(t.net_micro), "tax": money(t.tax_micro)}
                  for t in doc.taxes],
        "net": money(doc.net_micro), "tax": money(doc.tax_micro), "gross": money(doc.gross_micro),
        "closing_balance": money(doc.closing_micro), "amount_due": money(doc.amount_due_micro),
        "in_credit": money(doc.in_credit_micro),
    }
