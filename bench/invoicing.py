"""Invoicing benchmark: close and number every preview of a month, then render invoices to PDF.

    .venv/bin/python bench/invoicing.py [--accounts 100000] [--lines 50] [--pdfs 400] [--batch 500]

Sets up the database a2bd_bench (migrated) with --accounts accounts in four time zones (UTC, Europe/Paris,
America/Los_Angeles, Pacific/Auckland; invoice day 1; VAT 20 %) and a month (October 2026) of --lines ledger
lines each: calls to 12 destinations (80 %), DID rentals and services, an exempt fee, corrections, payments.
Lines go in by COPY, chained (each states its balance after), through the ledger's own trigger; not timed.
Then, timed:

  baseline  one `SELECT account_id, kind, tax class, sum, count ... GROUP BY` over the whole ledger: the
            reading any close must do at least, in one statement.
  close     `invoicing.close_due` at 2026-11-02 00:00 UTC, when every account's 1 November has begun: what
            the scheduler does on the first of the month. Batches of --batch accounts per transaction: lock,
            find each period's lines, sum them per kind and tax class, number (gapless per issuer), insert
            invoices and tax rows, post the tax lines, move the marks. The books are then checked: one
            invoice per account, numbers 1..N with no gap, each closing = its account's balance.
  load      `invoicing.invoice_document` for --pdfs invoices (the statement's lines read from the ledger).
  render    `render_invoice` of those documents, in this process (one core), beside a minimal reportlab
            PDF (one page, one line of text: the floor of the library) rendered in the same run.

Targets (issue): close and number all previews of 100,000 accounts x 50 lines in under 60 s; over 200 PDFs/s
rendered on one core.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

import asyncpg
from _common import BenchLock, bench_urls, calibrate_ms, create_bench_db, drop_bench_db, print_machine

from a2bd.adapters import postgres
from a2bd.adapters.pdf import render_invoice
from a2bd.domain.invoice import close_after, day_start
from a2bd.services import invoicing

ZONES = ("UTC", "Europe/Paris", "America/Los_Angeles", "Pacific/Auckland")
DESTINATIONS = ("France fixed", "France mobile", "Germany fixed", "Germany mobile", "UK fixed", "UK mobile",
                "USA", "Canada", "Spain mobile", "Italy mobile", "Belgium fixed", "Switzerland mobile")
MONTH = datetime(2026, 10, 1, tzinfo=UTC)
RUN_AT = datetime(2026, 11, 2, tzinfo=UTC)
CHUNK = 5_000  # accounts per COPY of lines


def month_lines(rng: random.Random, account_id: int, n: int) -> list[tuple[Any, ...]]:
    """A month of one account's lines, chained from a zero balance, in time order."""
    lines = []
    balance = 0
    # 2 to 30 October UTC: inside October in every zone (Auckland's November begins on 31 October, 11:00 UTC)
    times = sorted(MONTH + timedelta(days=1, seconds=rng.randrange(0, 29 * 86400)) for _ in range(n))
    for i, at in enumerate(times):
        roll = rng.random()
        dest = seconds = tax_class = None
        if i == 0:
            kind, amount, text = "payment", 50_000_000, "opening payment"
        elif roll < 0.80:
            seconds = rng.randrange(5, 1800)
            dest = DESTINATIONS[rng.randrange(len(DESTINATIONS))]
            kind, amount, text = "call", -(seconds * rng.choice((150, 400, 1200, 9000))), dest
        elif roll < 0.86:
            kind, amount, text = "did", -5_000_000, "DID rental"
        elif roll < 0.90:
            kind, amount, text = "service", -10_000_000, "trunk channel"
        elif roll < 0.92:
            kind, amount, text, tax_class = "charge", -2_500_000, "itemised report", "exempt"
        elif roll < 0.95:
            kind, amount, text = "correction", rng.randrange(1, 2_000_000), "goodwill credit"
        else:
            kind, amount, text = "payment", rng.randrange(1, 100) * 1_000_000, "bank transfer"
        balance += amount
        lines.append((account_id, kind, amount, balance, text, dest, seconds, at, tax_class))
    return lines


async def setup(pg_url: str, accounts: int, lines: int, seed: int) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await postgres.migrate(conn)
        await postgres.replace_tariff(conn, "bench", [])
        tariff_id = await conn.fetchval("SELECT id FROM tariffs WHERE name = 'bench'")
        rows = []
        for i in range(accounts):
            tz = ZONES[i % len(ZONES)]
            started = day_start(MONTH.date(), ZoneInfo(tz))  # their October began at their midnight
            rows.append((f"{10_000_000 + i}", tariff_id, tz, 1, 200_000, f"Customer {i}", f"Name{i % 997}",
                         f"{i} Rue de la Paix\n75002 Paris", started, close_after(started, 1, ZoneInfo(tz))))
        await conn.copy_records_to_table("accounts", records=rows, columns=(
            "number", "tariff_id", "timezone", "invoice_day", "vat_rate_ppm", "name", "last_name", "address",
            "period_start", "next_close_at"))
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM accounts ORDER BY id")]
        rng = random.Random(seed)
        for start in range(0, len(ids), CHUNK):
            chunk = [line for acct in ids[start:start + CHUNK] for line in month_lines(rng, acct, lines)]
            chunk.sort(key=lambda x: (x[0], x[7]))  # the trigger chains each account's lines in id order
            await conn.copy_records_to_table("ledger", records=chunk, columns=(
                "account_id", "kind", "amount_micro", "balance_after_micro", "description", "destination",
                "seconds", "created_at", "tax_class"))
        await conn.execute("VACUUM ANALYZE ledger")
        await conn.execute("VACUUM ANALYZE accounts")
    finally:
        await conn.close()


async def timed(pg_url: str, args: argparse.Namespace) -> dict[str, Any]:
    conn = await asyncpg.connect(pg_url)
    out: dict[str, Any] = {}
    try:
        t = time.perf_counter()
        groups = await conn.fetch(
            "SELECT l.account_id, l.kind, coalesce(l.tax_class, k.tax_class) AS c, sum(l.amount_micro), count(*)"
            " FROM ledger l LEFT JOIN kind_tax_classes k ON k.kind = l.kind GROUP BY 1, 2, 3")
        out["baseline_s"] = time.perf_counter() - t
        out["baseline_groups"] = len(groups)

        t = time.perf_counter()
        report = await invoicing.close_due(conn, None, RUN_AT, batch=args.batch)
        out["close_s"] = time.perf_counter() - t
        out["issued"] = report.closed
        out["errors"] = len(report.errors)

        # The books: one invoice per account, gapless numbers, closings equal to balances.
        check = await conn.fetchrow(
            "SELECT count(*) AS n, min(seq) AS lo, max(seq) AS hi, count(DISTINCT i.number) AS distinct_numbers,"
            " count(*) FILTER (WHERE i.closing_micro <> a.balance_micro) AS off"
            " FROM invoices i JOIN accounts a ON a.id = i.account_id")
        out["books_ok"] = (check["n"] == args.accounts and check["lo"] == 1 and check["hi"] == args.accounts
                           and check["distinct_numbers"] == args.accounts and check["off"] == 0)
        out["check"] = dict(check)

        ids = [r["id"] for r in await conn.fetch("SELECT id FROM invoices ORDER BY id LIMIT $1", args.pdfs)]
        t = time.perf_counter()
        docs = [await invoicing.invoice_document(conn, i) for i in ids]
        out["load_per_s"] = len(docs) / (time.perf_counter() - t)
        assert all(not d.problems() for d in docs), "a document does not add up"
    finally:
        await conn.close()

    out["render_per_s"] = _rate(lambda: [render_invoice(d) for d in docs], len(docs))
    out["floor_per_s"] = _rate(lambda: [_minimal_pdf(i) for i in range(len(docs))], len(docs))
    out["pages"] = sum(render_invoice(d).count(b"/Type /Page\n") for d in docs[:20]) / max(1, min(20, len(docs)))
    return out


def _rate(run: Any, n: int, passes: int = 3) -> float:
    best = 0.0
    for _ in range(passes):
        t = time.perf_counter()
        run()
        best = max(best, n / (time.perf_counter() - t))
    return best


def _minimal_pdf(i: int) -> bytes:
    from reportlab.pdfgen.canvas import Canvas

    buf = io.BytesIO()
    canvas = Canvas(buf, invariant=1, pageCompression=0)
    canvas.drawString(72, 720, f"invoice {i}")
    canvas.showPage()
    canvas.save()
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--lines", type=int, default=50, help="ledger lines per account in the month")
    parser.add_argument("--pdfs", type=int, default=400, help="invoices loaded and rendered to PDF")
    parser.add_argument("--batch", type=int, default=invoicing.BATCH_ACCOUNTS,
                        help="accounts closed per transaction (default: the scheduler's)")
    parser.add_argument("--seed", type=int, default=20261101)
    args = parser.parse_args()
    if not (1 <= args.accounts <= 1_000_000 and 1 <= args.lines <= 1000 and 1 <= args.pdfs <= args.accounts):
        parser.error("bounds: accounts 1..1e6, lines 1..1000, pdfs 1..accounts")
    print_machine("bench/invoicing.py")
    print(f"   args     --accounts {args.accounts} --lines {args.lines} --pdfs {args.pdfs} --batch {args.batch}"
          f" --seed {args.seed}")
    admin_url, pg_url, _redis = bench_urls()
    with BenchLock(admin_url):
        asyncio.run(create_bench_db(admin_url))
        try:
            t = time.perf_counter()
            asyncio.run(setup(pg_url, args.accounts, args.lines, args.seed))
            print(f"   setup    {args.accounts * args.lines:,} lines in {time.perf_counter() - t:.1f} s (not timed)")
            calib = calibrate_ms()
            out = asyncio.run(timed(pg_url, args))
        finally:
            asyncio.run(drop_bench_db(admin_url))
    lines = args.accounts * args.lines
    print(f"   calibration loop {calib:.1f} ms")
    print(f"baseline  GROUP BY over the ledger:  {out['baseline_s']:6.2f} s  "
          f"({lines / out['baseline_s']:,.0f} lines/s)")
    print(f"close     close_due, {args.accounts:,} accounts: {out['close_s']:6.2f} s  "
          f"({args.accounts / out['close_s']:,.0f} invoices/s, {lines / out['close_s']:,.0f} lines/s; "
          f"{out['close_s'] / out['baseline_s']:.1f}x the baseline)  issued {out['issued']:,}, "
          f"errors {out['errors']}")
    print(f"          books: {'OK' if out['books_ok'] else 'WRONG'} {out['check']}")
    print(f"load      invoice_document: {out['load_per_s']:,.0f} documents/s")
    print(f"render    render_invoice: {out['render_per_s']:,.0f} PDFs/s on one core ({out['pages']:.1f} pages each); "
          f"minimal reportlab PDF: {out['floor_per_s']:,.0f}/s")
    close_ok = out["close_s"] < 60 and out["books_ok"]
    print(f"targets   close < 60 s: {'MET' if close_ok else 'MISSED'}; "
          f"render > 200/s: {'MET' if out['render_per_s'] > 200 else 'MISSED'}")
    return 0 if out["books_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
