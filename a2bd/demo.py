"""`make demo`: the main job, end to end, on this machine's servers (or embedded ones).

It creates a scratch database `a2bd_demo`, applies the schema, adds two carriers, imports the sample
rate card, creates accounts of every kind, starts a simulated Asterisk (AMI) and the daemon on free ports,
and plays calls as Asterisk would: one of each kind, 50 at once on a small credit, calls followed over AMI
to their ledger lines, three calls on one small credit cut together by the credit guard, a burst of
FastAGI authorizations, then a payment and every account's preview closed into an invoice, one rendered to
PDF, and last a storm of 600 calls against the daemon as a separate process with its books checked.
Everything it created in the servers is dropped at the end; the PDF and the plots stay in .a2bd-dev/.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from a2bd.adapters import postgres
from a2bd.config import (
    AgiSettings,
    AsteriskServer,
    LogSettings,
    MetricsSettings,
    PostgresSettings,
    RedisSettings,
    Settings,
)
from a2bd.daemon import Daemon
from a2bd.devservers import find_servers, with_database, with_redis_db
from a2bd.domain.money import format_amount
from a2bd.domain.ratecard import parse_ratecard
from a2bd.domain.rating import SellRate
from a2bd.domain.tariff import BuyRate, RateEntry
from a2bd.observability import configure_logging
from a2bd.sim.agi import SimResult, make_environment, run_session
from a2bd.sim.ami import CallSpec, SimAsterisk

SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sample_tariff.csv"
DB = "a2bd_demo"
REDIS_DB = 13
DEMO_PDF = Path(".a2bd-dev") / "demo-invoice.pdf"  # kept after the demo, to open
DEMO_PLOT = Path(".a2bd-dev") / "demo-storm.png"
DEMO_CALLS = Path(".a2bd-dev") / "demo-storm.csv"  # the storm's calls, as `a2bd storm --csv` reads them
ACCOUNTS: list[tuple[str, str, dict[str, Any]]] = [
    # number, what it is, create_account fields
    ("2000000001", "pre-paid, 10.00", dict(initial_balance_micro=10_000_000, max_calls=20)),
    ("2000000002", "pre-paid, 0.10, 50 calls at once", dict(initial_balance_micro=100_000)),
    ("2000000003", "post-paid, -5.00 with 50.00 limit",
     dict(initial_balance_micro=-5_000_000, credit_limit_micro=50_000_000)),
    ("2000000004", "blocked", dict(initial_balance_micro=1_000_000, status="blocked")),
    ("2000000005", "calling card (PIN 2468), no premium",
     dict(initial_balance_micro=2_000_000, pin="2468", restrict_mode="deny", restrict_prefixes=["1900"])),
    ("2000000006", "pinless by caller ID 33198765432",
     dict(initial_balance_micro=3_000_000, callerids=["33198765432"])),
    ("2000000007", "wholesale, 1000.00, for the burst", dict(initial_balance_micro=1_000_000_000)),
    ("2000000008", "pre-paid, 0.50, three calls at once", dict(initial_balance_micro=500_000)),
]
# A destination priced so that credit runs out in seconds: 6.00 a minute, per second (0.10 a second).
FAST = RateEntry("999", "Demo premium line", SellRate(rate_per_min_micro=6_000_000), "carrier-a", BuyRate(3_000_000))
AMI_SECRET = "demo-secret"  # noqa: S105 - the simulated Asterisk of the demo, on loopback


async def setup(pg_url: str) -> None:
    conn = await postgres.connect(pg_url)
    try:
        await postgres.migrate(conn)
        await postgres.add_provider(conn, "carrier-a", "PJSIP/{number}@carrier-a")
        await postgres.add_provider(conn, "carrier-b", "PJSIP/{number}@carrier-b")
        with SAMPLE.open(newline="") as fh:
            entries, errors = parse_ratecard(fh)
        if errors:
            raise SystemExit(f"sample tariff has errors: {errors}")
        await postgres.replace_tariff(conn, "retail", [*entries, FAST])
        for number, _, fields in ACCOUNTS:
            extra = dict(fields)
            balance = extra.pop("initial_balance_micro")
            callerids = extra.pop("callerids", [])
            await postgres.create_account(conn, number=number, tariff="retail", initial_balance_micro=balance,
                                          callerids=callerids, **extra)
    finally:
        await conn.close()


async def burst(port: int) -> None:
    ids = itertools.count(1)

    async def call(dest: str, *, accountcode: str = "", callerid: str = "5550000", digits: str = "") -> SimResult:
        n = next(ids)
        env = make_environment(uniqueid=f"1795400000.{n}", channel=f"PJSIP/phone-{n:08x}",
                               extension=dest, callerid=callerid, accountcode=accountcode, port=port)
        return await run_session("127.0.0.1", port, env, digits=digits, timeout_s=10)

    print("\n== one call of each kind ==")
    cases = [
        ("pre-paid to France", dict(dest="33123456789", accountcode="2000000001")),
        ("pre-paid to France mobile", dict(dest="33612345678", accountcode="2000000001")),
        ("post-paid, negative balance, to UK mobile", dict(dest="447700900123", accountcode="2000000003")),
        ("blocked account", dict(dest="33123456789", accountcode="2000000004")),
        ("calling card by PIN to USA", dict(dest="12125550100", digits="2468")),
        ("calling card to a denied premium number", dict(dest="19005550100", digits="2468")),
        ("pinless caller ID to Germany", dict(dest="4930123456", callerid="33198765432")),
        ("unknown account", dict(dest="33123456789", accountcode="2999999999")),
        ("no rate for China", dict(dest="8613912345678", accountcode="2000000001")),
    ]
    for label, kw in cases:
        r = await call(str(kw.pop("dest")), **kw)
        v = r.variables
        detail = (f"limit {int(v['A2B_LIMIT_MS']) / 1000:.0f} s via {v['A2B_ROUTE_1']}"
                  + (f" (+{int(v['A2B_ROUTES']) - 1} failover)" if int(v["A2B_ROUTES"]) > 1 else "")
                  if v.get("A2B_STATUS") == "OK" else f"hang up with cause {v.get('A2B_HANGUPCAUSE')}")
        print(f"  {label:<45} {v.get('A2B_STATUS', '?'):<9} {detail}")

    print("\n== 50 simultaneous calls on one pre-paid account holding 0.10 (France mobile: 0.06 a first block)==")
    results = await asyncio.gather(*(call("33612345678", accountcode="2000000002") for _ in range(50)))
    tally = collections.Counter(r.variables.get("A2B_STATUS") for r in results)
    print(f"  answers: {dict(tally)}  (A2Billing's AGI would let every one of them through)")

    total = 2000
    print(f"\n== a burst of {total} authorizations, 50 at a time ==")
    latencies: list[float] = []
    statuses: collections.Counter[str] = collections.Counter()
    sem = asyncio.Semaphore(50)

    async def one(i: int) -> None:
        async with sem:
            r = await call("4420712345678" if i % 3 else "12125550100", accountcode="2000000007")
            latencies.append(r.elapsed_s)
            statuses[r.variables.get("A2B_STATUS", "?")] += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    print(f"  {total / elapsed:,.0f} sessions/s, session latency p50 {q[49] * 1000:.2f} ms, "
          f"p99 {q[98] * 1000:.2f} ms "
          "(simulated Asterisk and daemon share one event loop here;\n  bench/agi_authorize.py measures them apart)")
    print(f"  answers: {dict(statuses)}")


async def lifecycle(sim: SimAsterisk, pg_url: str) -> None:
    print("\n== calls followed over AMI, rated and written to the ledger ==")
    calls = await asyncio.gather(
        sim.call(CallSpec(extension="33123456789", accountcode="2000000001", talk_s=5.0)),
        sim.call(CallSpec(extension="4930123456", accountcode="2000000001", ring_s=0.3, talk_s=3.0)),
        sim.call(CallSpec(extension="33612345678", accountcode="2000000001", outcome="busy", ring_s=0.2)),
    )
    for r in calls:
        print(f"  {r.variables.get('A2B_ROUTE_1', '-'):<32} {r.disposition:<10} {r.billable_s} s")

    print("\n== three calls on one 0.50 credit at 0.10 a second, answered half a second apart ==")
    three = await asyncio.gather(*(
        sim.call(CallSpec(extension="9991234", accountcode="2000000008", ring_s=ring, talk_s=30.0))
        for ring in (0.0, 0.5, 1.0)))
    limits = [int(r.variables["A2B_LIMIT_MS"]) // 1000 for r in three]
    print(f"  each call's own Dial L() limit: {limits} s, which alone would let them spend "
          f"{format_amount(sum(limits) * 100_000)}")
    for r in three:
        print(f"  {r.channel:<32} answered, ended by {r.ended_by} after {r.billable_s} s")
    await asyncio.sleep(0.5)  # the ledger writer commits every few milliseconds
    conn = await asyncpg.connect(pg_url)
    try:
        lines = await conn.fetch(
            "SELECT a.number, l.amount_micro, l.balance_after_micro, l.description FROM ledger l"
            " JOIN accounts a ON a.id = l.account_id WHERE l.kind = 'call' ORDER BY l.id")
        owed = await conn.fetch("SELECT name, balance_micro FROM providers ORDER BY name")
    finally:
        await conn.close()
    print("\n== the ledger's call lines ==")
    for line in lines:
        print(f"  {line['number']}  {format_amount(line['amount_micro']):>7}  balance after "
              f"{format_amount(line['balance_after_micro']):>7}  {line['description']}")
    print("  owed to carriers: " + ", ".join(f"{r['name']} {format_amount(r['balance_micro'])}" for r in owed))


async def show_accounts(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT number, balance_micro, credit_limit_micro FROM accounts ORDER BY number")
    finally:
        await conn.close()
    print("\n== accounts ==")
    labels = {n: what for n, what, _ in ACCOUNTS}
    for r in rows:
        print(f"  {r['number']}  balance {format_amount(r['balance_micro']):>7}  "
              f"limit {format_amount(r['credit_limit_micro']):>6}  {labels[r['number']]}")


async def invoices(pg_url: str, redis_url: str) -> None:
    """A DID, a trunk channel, a fee and a payment, then every preview closed into an invoice (20 % VAT), the
    post-paid account's rendered to PDF."""
    from a2bd.adapters import invoices as invoices_repo
    from a2bd.adapters.pdf import render_invoice
    from a2bd.adapters.redis_store import RedisStore
    from a2bd.services import invoicing
    from a2bd.services.posting import post_to_account
    from a2bd.services.recurring import add_service

    conn = await asyncpg.connect(pg_url)
    store = RedisStore.from_url(redis_url, 2.0)
    try:
        await invoices_repo.set_issuer(conn, None, {
            "name": "Example Telecom", "company": "Example Telecom SAS",
            "address": "1 rue de la Paix\n75002 Paris\nFrance", "vat_number": "FR 12 345678901",
            "email": "billing@example.net", "invoice_prefix": "ET-2026-"})
        await conn.execute("UPDATE accounts SET vat_rate_ppm = 200000, name = 'Ada Lovelace',"
                           " company = 'Analytical Engines Ltd', email = 'ada@example.net',"
                           " address = '12 Quai de Conti\n75006 Paris' WHERE number = '2000000003'")
        await conn.execute("UPDATE accounts SET vat_rate_ppm = 200000")
        await add_service(conn, store=store, account_number="2000000003", kind="did", name="DID 33184000000 rental",
                          amount_micro=5_000_000, did="33184000000")
        await add_service(conn, store=store, account_number="2000000003", kind="service", name="SIP trunk channel",
                          amount_micro=10_000_000)
        await post_to_account(conn, store, "2000000003", "charge", -2_500_000, "itemised call report")
        await post_to_account(conn, store, "2000000003", "payment", 5_000_000, "bank transfer")
        report = await invoicing.close_accounts(conn, store, [n for n, _, _ in ACCOUNTS], datetime.now(UTC))
        print(f"\n== invoices: every preview closed by an admin ({report.closed} issued, VAT 20 %) ==")
        rows = await conn.fetch("SELECT i.*, a.number AS account FROM invoices i JOIN accounts a ON a.id = i.account_id"
                                " ORDER BY i.id")
        for r in rows:
            due = max(0, -r["closing_micro"])
            print(f"  {r['number']}  account {r['account']}  {r['line_count']:>3} lines  net "
                  f"{format_amount(r['net_micro']):>6}  tax {format_amount(r['tax_micro']):>5}  closing "
                  f"{format_amount(r['closing_micro']):>7}  {'to pay ' + format_amount(due) if due else 'in credit'}")
        post_paid = next(r for r in rows if r["account"] == "2000000003")
        pdf = await invoicing.store_document(conn, post_paid["id"], render_invoice)
        DEMO_PDF.parent.mkdir(exist_ok=True)
        DEMO_PDF.write_bytes(pdf)
        print(f"  {post_paid['number']} rendered to {DEMO_PDF} ({len(pdf):,} bytes)")
    finally:
        await conn.close()
        await store.close()


async def main() -> None:
    configure_logging("warning")
    servers = find_servers()
    print(f"PostgreSQL: {servers.how['postgres']}, Redis: {servers.how['redis']}")
    admin = await asyncpg.connect(servers.pg_url)
    await admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {DB}")
    pg_url = with_database(servers.pg_url, DB)
    redis_url = with_redis_db(servers.redis_url, REDIS_DB)
    sim = SimAsterisk(username="a2bd", secret=AMI_SECRET)
    await sim.start()
    settings = Settings(
        agi=AgiSettings(host="127.0.0.1", port=0), redis=RedisSettings(url=redis_url),
        postgres=PostgresSettings(url=pg_url), metrics=MetricsSettings(port=0), log=LogSettings(level="warning"),
        asterisk=(AsteriskServer(name="pbx1", host="127.0.0.1", port=sim.port, secret=AMI_SECRET),),
    ).validate()
    daemon = Daemon(settings)
    try:
        await setup(pg_url)
        await show_accounts(pg_url)
        await daemon.start()
        assert daemon.agi is not None
        sim.agi = ("127.0.0.1", daemon.agi.port)
        print(f"\na2bd is answering FastAGI on 127.0.0.1:{daemon.agi.port}, following the simulated Asterisk's AMI "
              f"on 127.0.0.1:{sim.port}")
        await lifecycle(sim, pg_url)
        await burst(daemon.agi.port)
        await show_accounts(pg_url)
        await invoices(pg_url, redis_url)
    finally:
        await daemon.close(grace_s=2)
        await sim.close()
        await admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        await admin.close()
        if not redis_url.startswith("unix://"):
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(redis_url)
            await client.flushdb()
            await client.aclose()
    await storm()
    from a2bd.sim.storm import dashboard_path

    print(f"\ndone: the demo databases and Redis dbs were dropped; the invoice PDF is {DEMO_PDF}, the storm's "
          f"plots {DEMO_PLOT} and {dashboard_path(DEMO_PLOT)}.")


async def storm() -> None:
    """`a2bd storm` in small: 600 calls at 100/s on 150 accounts and 4 pairs of calls that only the credit guard
    can stop in time, then the books checked call by call."""
    from a2bd.sim.storm import PlannedCall, StormPlan, destinations, load_entries, make_accounts, plan_calls, storm_main

    print("\n== a storm: 600 calls at 100/s, plus 4 pairs on small pre-paid credits, from a simulated Asterisk, "
          "against `a2bd serve` as a process ==")
    plan = StormPlan(rate=100, calls=600, accounts=150, mean_talk_s=4, max_talk_s=12)
    entries, accounts = load_entries(), make_accounts(plan)
    numbers = destinations(entries, plan.seed)
    calls = plan_calls(plan, accounts, numbers)
    # Beside the random calls, two calls at once from each of a few small pre-paid credits to the satellite
    # destination (6.00 a minute): each call's L() limit alone would let the pair spend the credit twice,
    # so the credit guard cuts both at the instant they have used it together.
    satellite = next(n for n in numbers if n.startswith("8816"))
    pairs = [a for a in accounts if a.kind == "prepaid" and a.max_calls == 4 and a.opening_micro >= 300_000][:4]
    calls += [PlannedCall(1.0 + i, a.number, satellite, 60.0) for i, a in enumerate(pairs) for _ in range(2)]
    DEMO_CALLS.parent.mkdir(exist_ok=True)
    DEMO_CALLS.write_text("start_s,account,destination,talk_s,outcome\n" + "".join(
        f"{c.at_s},{c.account},{c.destination},{c.talk_s},{c.outcome}\n" for c in calls))
    report = await storm_main(plan, DEMO_CALLS, DEMO_PLOT)
    summary = report.summary()
    rows = [("calls placed", summary["calls"]), ("calls/s reached", summary["calls_per_s"]),
            ("authorize p50 / p99 / max (ms)",
             f"{summary['authorize_p50_ms']} / {summary['authorize_p99_ms']} / {summary['authorize_max_ms']}"),
            ("answered", summary["answered"]), ("cut by the credit guard", summary["cut_by_guard"]),
            ("cut by the Dial L() limit", summary["cut_by_limit"]),
            ("answers", ", ".join(f"{k} {v}" for k, v in sorted(summary["statuses"].items()))),
            ("daemon CPU per call (us)", summary["daemon_cpu_us_per_call"]),
            ("books (every account, every call)", f"{summary['verdict']}, {summary['discrepancies']} discrepancies")]
    for label, value in rows:
        print(f"  {label:<36} {value}")


if __name__ == "__main__":
    asyncio.run(main())
