"""Bank-statement invoices over the real ledger: previews, closes, numbers, taxes, drafts, time zones."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from a2bd.adapters import invoices, postgres
from a2bd.adapters.postgres import AccountLine, CallLine
from a2bd.adapters.redis_store import RedisStore
from a2bd.domain.invoice import tax_in_gross, tax_on_net
from a2bd.domain.rating import SellRate, cost_micro
from a2bd.domain.statement import InvoiceDocument
from a2bd.errors import InputError
from a2bd.services import invoicing
from a2bd.services.posting import post_to_account
from a2bd.services.sync import sync_redis
from tests.conftest import empty_database

pytestmark = pytest.mark.integration

OCT = datetime(2026, 10, 15, 12, tzinfo=UTC)
NOV = datetime(2026, 11, 1, tzinfo=UTC)
DEC = datetime(2026, 12, 1, tzinfo=UTC)


async def account(pg: asyncpg.Connection, number: str = "5550001", opening: int = 0, **fields: object) -> int:
    if not await pg.fetchval("SELECT EXISTS (SELECT 1 FROM tariffs WHERE name = 't')"):
        await postgres.replace_tariff(pg, "t", [])
    fields.setdefault("vat_rate_ppm", 200_000)
    acct = await postgres.create_account(pg, number=number, tariff="t", initial_balance_micro=0, **fields)
    # Accounts created "now" would start their first period after the lines the tests date in the past;
    # their opening line is dated with them.
    opened = OCT - timedelta(days=30)
    await pg.execute("UPDATE accounts SET period_start = $2 WHERE id = $1", acct["id"], opened)
    if opening:
        await postgres.post(pg, kind="initial", amount_micro=opening, account_id=acct["id"], at=opened,
                            description="initial balance")
        await pg.execute("UPDATE accounts SET initial_balance_micro = $2 WHERE id = $1", acct["id"], opening)
    return int(acct["id"])


async def line(pg: asyncpg.Connection, account_id: int, kind: str, amount: int, at: datetime, description: str = "",
               tax_class: str | None = None) -> asyncpg.Record:
    return await postgres.post(pg, kind=kind, amount_micro=amount, account_id=account_id, description=description,
                               at=at, tax_class=tax_class)


async def calls(pg: asyncpg.Connection, number: str, name: str, prices: list[int], seconds: int, at: datetime) -> None:
    """Calls to one destination, each billed its price (a positive number: the ledger debits it)."""
    await postgres.write_calls(pg, [
        CallLine(f"{number}/{name}/{i}", number, -price, seconds, "33123456789", name, at, at + timedelta(minutes=i))
        for i, price in enumerate(prices)
    ])


async def invoice_lines(pg: asyncpg.Connection, invoice_id: int) -> list[asyncpg.Record]:
    inv = await pg.fetchrow("SELECT * FROM invoices WHERE id = $1", invoice_id)
    return list(await pg.fetch(
        "SELECT * FROM ledger WHERE (account_id = $1 AND id > $2 AND id <= $3 AND invoice_id IS NULL)"
        " OR invoice_id = $4 ORDER BY id", inv["account_id"], inv["from_line_id"], inv["through_line_id"], invoice_id))


# -- the statement of a telecom customer ------------------------------------------------------------


async def test_the_statement_example_closes_to_the_cent_per_tax_class(pg: asyncpg.Connection) -> None:
    acct = await account(pg, "5550001", name="Ada", last_name="Lovelace", credit_limit_micro=1_000_000_000)
    # October leaves 357.00 to pay: 297.50 of services + 20 % VAT.
    await line(pg, acct, "service", -297_500_000, OCT, "October services")
    october = await invoicing.close_accounts(pg, None, ["5550001"], NOV)
    assert october.numbers == ["INV-000001"]
    assert await pg.fetchval("SELECT closing_micro FROM invoices WHERE number = 'INV-000001'") == -357_000_000

    at = NOV + timedelta(days=4)
    await line(pg, acct, "payment", 357_000_000, at, "bank transfer, thank you")  # on the 5th
    for n in (1, 2):
        await line(pg, acct, "did", -5_000_000, at, f"DID 3361234567{n} rental")
    for n in range(4):
        await line(pg, acct, "service", -10_000_000, at, f"trunk channel {n + 1}")
    await calls(pg, "5550001", "France local", [1_200_000, 1_234_567, 1_022_222], 300, NOV + timedelta(days=7))
    await calls(pg, "5550001", "USA long distance", [7_500_000, 4_321_098], 900, NOV + timedelta(days=9))
    await line(pg, acct, "charge", -2_500_000, NOV + timedelta(days=10), "itemised call report", tax_class="exempt")
    await line(pg, acct, "payment", 50_000_000, NOV + timedelta(days=19), "partial payment")

    preview = await invoicing.preview(pg, "5550001", DEC - timedelta(seconds=1))
    assert preview.opening_micro == -357_000_000 and preview.status == "preview"

    november = await invoicing.close_accounts(pg, None, ["5550001"], DEC)
    assert november.numbers == ["INV-000002"]
    inv = await pg.fetchrow("SELECT * FROM invoices WHERE number = 'INV-000002'")
    taxes = {(t["tax_class"], t["rate_ppm"]): (t["net_micro"], t["tax_micro"])
             for t in await pg.fetch("SELECT * FROM invoice_taxes WHERE invoice_id = $1", inv["id"])}
    standard_net = 10_000_000 + 40_000_000 + 3_456_789 + 11_821_098  # 65.277887
    assert taxes == {("standard", 200_000): (standard_net, 13_060_000),  # 13.0555774 -> 13.06, once
                     ("exempt", 0): (2_500_000, 0)}
    assert inv["opening_micro"] == -357_000_000
    assert inv["payments_micro"] == 407_000_000
    assert inv["net_micro"] == standard_net + 2_500_000
    assert inv["tax_micro"] == 13_060_000
    assert inv["closing_micro"] == -357_000_000 + 407_000_000 - standard_net - 2_500_000 - 13_060_000
    assert inv["closing_micro"] == -30_837_887  # 30.837887 to pay
    assert await pg.fetchval("SELECT balance_micro FROM accounts WHERE id = $1", acct) == inv["closing_micro"]

    doc = await invoicing.invoice_document(pg, inv["id"])
    assert doc.problems() == ()
    assert doc.amount_due_micro == 30_837_887
    assert [(c.destination, c.calls, c.seconds, c.amount_micro) for c in doc.calls] == [
        ("France local", 3, 900, 3_456_789), ("USA long distance", 2, 1800, 11_821_098)]
    assert {g.title: g.total_micro for g in doc.groups} == {
        "DID numbers": -10_000_000, "Services": -40_000_000, "Charges": -2_500_000}
    assert [p.amount_micro for p in doc.payments] == [357_000_000, 50_000_000]
    assert [(t.rate_ppm, t.net_micro, t.tax_micro) for t in doc.taxes] == [
        (0, 2_500_000, 0), (200_000, standard_net, 13_060_000)]

    # The new preview starts from the closing balance and holds nothing of November.
    december = await invoicing.preview(pg, "5550001", DEC + timedelta(hours=1))
    assert december.opening_micro == -30_837_887 and december.calls == () and december.payments == ()


# -- previews, closes, numbers ----------------------------------------------------------------------


async def test_closing_twice_is_a_no_op_and_an_empty_period_makes_no_invoice(pg: asyncpg.Connection) -> None:
    acct = await account(pg, opening=10_000_000)
    await line(pg, acct, "charge", -1_000_000, OCT)
    first = await invoicing.close_accounts(pg, None, ["5550001"], NOV)
    second = await invoicing.close_accounts(pg, None, ["5550001"], NOV)
    assert first.closed == 1 and second.closed == 0 and second.empty == 1
    assert await pg.fetchval("SELECT count(*) FROM invoices") == 1
    assert await pg.fetchval("SELECT next_number FROM invoice_prefixes WHERE prefix = 'INV-'") == 2  # no gap


async def test_numbers_are_gapless_per_issuer_under_concurrent_closes(pg_url: str, pg: asyncpg.Connection) -> None:
    await pg.execute("INSERT INTO resellers (name) VALUES ('acme')")
    reseller = await pg.fetchval("SELECT id FROM resellers WHERE name = 'acme'")
    await invoices.set_issuer(pg, reseller, {"name": "Acme", "invoice_prefix": "ACME-"})
    numbers = [f"555{i:04d}" for i in range(40)]
    for i, number in enumerate(numbers):
        acct = await account(pg, number, reseller_id=reseller if i % 2 else None)
        await line(pg, acct, "charge", -1_000_000, OCT)
    conns = [await asyncpg.connect(pg_url) for _ in range(8)]
    try:
        # Eight admins closing overlapping sets at once: each account closes once, numbers never repeat.
        await asyncio.gather(*(invoicing.close_accounts(c, None, numbers[i * 4:i * 4 + 12], NOV)
                               for i, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.close()
    rows = await pg.fetch("SELECT i.number, i.seq, s.invoice_prefix FROM invoices i"
                          " JOIN issuers s ON s.id = i.issuer_id")
    assert len(rows) == 40
    for prefix in ("INV-", "ACME-"):
        seqs = sorted(r["seq"] for r in rows if r["invoice_prefix"] == prefix)
        assert seqs == list(range(1, 21))  # gapless, from 1, counted per issuer
    assert {r["number"] for r in rows} == {f"{p}{n:06d}" for p in ("INV-", "ACME-") for n in range(1, 21)}


async def test_concurrent_closes_and_posts_neither_lose_nor_duplicate_a_line(pg_url: str,
                                                                            pg: asyncpg.Connection) -> None:
    acct = await account(pg, opening=1_000_000_000)
    poster, closer = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
    now = datetime.now(UTC)

    async def post_many() -> None:
        for i in range(200):
            await postgres.post(poster, kind="charge", amount_micro=-(i + 1), account_id=acct)

    async def close_many() -> None:
        for _ in range(30):
            await invoicing.close_accounts(closer, None, ["5550001"], datetime.now(UTC) + timedelta(hours=1))
            await asyncio.sleep(0.002)

    try:
        await asyncio.gather(post_many(), close_many())
    finally:
        await poster.close()
        await closer.close()
    await invoicing.close_accounts(pg, None, ["5550001"], now + timedelta(hours=2))
    seen: list[int] = []
    previous_closing = 0
    for inv in await pg.fetch("SELECT * FROM invoices ORDER BY id"):
        lines = await invoice_lines(pg, inv["id"])
        seen += [x["id"] for x in lines]
        assert inv["opening_micro"] == previous_closing  # each carries the previous one forward
        assert inv["closing_micro"] == inv["opening_micro"] + sum(x["amount_micro"] for x in lines)
        previous_closing = inv["closing_micro"]
    every = [r["id"] for r in await pg.fetch("SELECT id FROM ledger WHERE account_id = $1 ORDER BY id", acct)]
    assert sorted(seen) == every  # every line in exactly one invoice
    assert previous_closing == await pg.fetchval("SELECT balance_micro FROM accounts WHERE id = $1", acct)


async def test_a_line_cannot_be_slipped_into_a_closed_period(pg: asyncpg.Connection) -> None:
    acct = await account(pg, opening=5_000_000)
    await line(pg, acct, "charge", -1_000_000, OCT)
    await invoicing.close_accounts(pg, None, ["5550001"], NOV)
    # A writer whose line got its id before the close moved the mark past it (what the mark is there for):
    # simulated by moving the mark ahead of the ids the next lines get.
    await pg.execute("UPDATE accounts SET invoiced_through_id = invoiced_through_id + 100 WHERE id = $1", acct)
    with pytest.raises(asyncpg.SerializationError, match="closed invoice period"):
        await line(pg, acct, "charge", -1, NOV)
    # initial, charge and its tax: the refused line is not there
    assert await pg.fetchval("SELECT count(*) FROM ledger") == 3


async def test_a_confirmed_invoice_never_changes(pg: asyncpg.Connection) -> None:
    acct = await account(pg, opening=5_000_000)
    await line(pg, acct, "charge", -1_000_000, OCT)
    await invoicing.close_accounts(pg, None, ["5550001"], NOV)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="never changes"):
        await pg.execute("UPDATE invoices SET closing_micro = 0")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="never changes"):
        await pg.execute("DELETE FROM invoices")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await pg.execute("UPDATE invoice_taxes SET tax_micro = 0")


# -- drafts -----------------------------------------------------------------------------------------


async def test_draft_mode_waits_for_review_then_confirm_numbers_and_taxes(pg: asyncpg.Connection,
                                                                          store: RedisStore) -> None:
    await pg.execute("UPDATE issuers SET mode = 'draft'")
    acct = await account(pg, opening=100_000_000)
    await sync_redis(pg, store)
    await line(pg, acct, "charge", -10_000_000, OCT)
    report = await invoicing.close_accounts(pg, store, ["5550001"], NOV)
    assert report.drafts == 1 and report.numbers == []
    draft = await pg.fetchrow("SELECT * FROM invoices")
    assert draft["status"] == "draft" and draft["number"] is None and draft["tax_micro"] == 2_000_000
    assert await pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'tax'") == 0  # nothing posted yet
    again = await invoicing.close_accounts(pg, store, ["5550001"], NOV + timedelta(days=1))
    assert "draft invoice" in again.errors["5550001"]

    number = await invoicing.confirm(pg, store, draft["id"], NOV + timedelta(days=2))
    assert number == "INV-000001"
    tax = await pg.fetchrow("SELECT * FROM ledger WHERE kind = 'tax'")
    assert tax["amount_micro"] == -2_000_000 and tax["invoice_id"] == draft["id"]
    assert [x["kind"] for x in await invoice_lines(pg, draft["id"])] == ["initial", "charge", "tax"]
    assert (await store.credit("5550001")).balance_micro == 88_000_000  # Redis follows the tax line
    with pytest.raises(InputError, match="not a draft"):
        await invoicing.confirm(pg, store, draft["id"], NOV + timedelta(days=2))


async def test_discarding_a_draft_returns_its_lines_to_the_preview(pg: asyncpg.Connection) -> None:
    await pg.execute("UPDATE issuers SET mode = 'draft'")
    acct = await account(pg, opening=100_000_000)
    await line(pg, acct, "charge", -10_000_000, OCT)
    await invoicing.close_accounts(pg, None, ["5550001"], NOV)
    draft_id = await pg.fetchval("SELECT id FROM invoices")
    await line(pg, acct, "charge", -1_000_000, NOV + timedelta(days=1))
    await invoicing.discard(pg, draft_id, NOV + timedelta(days=2))
    preview = await invoicing.preview(pg, "5550001", NOV + timedelta(days=3))
    assert preview.opening_micro == 100_000_000  # no invoice yet: the opening balance heads it
    assert preview.payments == ()
    assert [g.total_micro for g in preview.groups] == [-11_000_000]
    await invoicing.close_accounts(pg, None, ["5550001"], NOV + timedelta(days=3))
    second = await pg.fetchrow("SELECT * FROM invoices WHERE status = 'draft'")
    assert second["line_count"] == 3 and second["from_line_id"] == 0
    assert await pg.fetchval("SELECT next_number FROM invoice_prefixes") == 1  # drafts take no number


# -- taxes at payment, autorefill, switches ---------------------------------------------------------


async def test_a_prepaid_account_taxed_at_payment_is_credited_the_net_part(pg: asyncpg.Connection,
                                                                            store: RedisStore) -> None:
    acct = await account(pg, tax_mode="payment")
    await sync_redis(pg, store)
    await post_to_account(pg, store, "5550001", "payment", 12_000_000, "card top-up")
    assert await pg.fetchval("SELECT balance_micro FROM accounts WHERE id = $1", acct) == 10_000_000
    assert (await store.credit("5550001")).balance_micro == 10_000_000
    await calls(pg, "5550001", "France local", [1_000_000], 60, datetime.now(UTC))
    await invoicing.close_accounts(pg, store, ["5550001"], datetime.now(UTC) + timedelta(minutes=1))
    inv = await pg.fetchrow("SELECT * FROM invoices")
    assert inv["tax_micro"] == 0  # nothing taxed again on the invoice
    assert inv["closing_micro"] == 9_000_000
    doc = await invoicing.invoice_document(pg, inv["id"])
    assert [(t.rate_ppm, t.net_micro, t.tax_micro) for t in doc.taxes] == [(200_000, 10_000_000, 2_000_000)]


async def test_autorefill_tops_up_to_the_initial_balance_in_the_new_preview(pg: asyncpg.Connection) -> None:
    acct = await account(pg, opening=20_000_000, autorefill=True, vat_rate_ppm=0)
    await line(pg, acct, "charge", -7_500_000, OCT)
    await invoicing.close_accounts(pg, None, ["5550001"], NOV)
    assert await pg.fetchval("SELECT balance_micro FROM accounts WHERE id = $1", acct) == 20_000_000
    assert await pg.fetchval("SELECT closing_micro FROM invoices") == 12_500_000
    preview = await invoicing.preview(pg, "5550001", NOV + timedelta(days=1))
    assert [(p.kind, p.amount_micro) for p in preview.payments] == [("refill", 7_500_000)]


async def test_unknown_accounts_are_reported_not_fatal(pg: asyncpg.Connection) -> None:
    acct = await account(pg, opening=1_000_000)
    await line(pg, acct, "charge", -1, OCT)
    report = await invoicing.close_accounts(pg, None, ["5550001", "9999999"], NOV)
    assert report.closed == 1 and report.errors == {"9999999": "no such account"}
    with pytest.raises(InputError, match="does not exist"):
        await invoicing.preview(pg, "9999999", NOV)


# -- the invoice day, in each account's time zone ---------------------------------------------------


async def test_accounts_close_on_their_own_local_midnight(pg: asyncpg.Connection) -> None:
    auckland = await account(pg, "5550001", opening=1_000_000, timezone="Pacific/Auckland", invoice_day=1)
    la = await account(pg, "5550002", opening=1_000_000, timezone="America/Los_Angeles", invoice_day=1)
    off = await account(pg, "5550003", opening=1_000_000, invoices_enabled=False)
    for acct in (auckland, la, off):
        await line(pg, acct, "charge", -1_000, OCT)
    await pg.execute("UPDATE accounts SET period_start = $1", OCT)  # their period began in October
    # Auckland's 1 November begins at 11:00 UTC on 31 October (NZDT, +13); Los Angeles' at 07:00 UTC (PDT).
    auckland_midnight = datetime(2026, 10, 31, 11, tzinfo=UTC)
    la_midnight = datetime(2026, 11, 1, 7, tzinfo=UTC)
    report = await invoicing.close_due(pg, None, auckland_midnight - timedelta(seconds=1))
    assert report.closed == 0
    report = await invoicing.close_due(pg, None, auckland_midnight)
    assert report.numbers == ["INV-000001"]
    report = await invoicing.close_due(pg, None, la_midnight - timedelta(seconds=1))
    assert report.closed == 0
    report = await invoicing.close_due(pg, None, la_midnight + timedelta(minutes=5))
    assert report.numbers == ["INV-000002"]
    rows = {r["account_id"]: r for r in await pg.fetch("SELECT * FROM invoices")}
    assert rows[auckland]["period_end"] == auckland_midnight and rows[la]["period_end"] == la_midnight
    assert off not in rows
    # Next closes: Auckland's 1 December is NZDT too; Los Angeles' is PST after the 1 November change.
    nexts = {r["id"]: r["next_close_at"] for r in await pg.fetch("SELECT id, next_close_at FROM accounts")}
    assert nexts[auckland] == datetime(2026, 11, 30, 11, tzinfo=UTC)
    assert nexts[la] == datetime(2026, 12, 1, 8, tzinfo=UTC)
    # A line written after local midnight but before the run belongs to the next period.
    await line(pg, la, "charge", -5, datetime(2026, 12, 1, 8, 0, 30, tzinfo=UTC))
    await invoicing.close_due(pg, None, datetime(2026, 12, 1, 8, 1, tzinfo=UTC))
    assert await pg.fetchval("SELECT count(*) FROM invoices WHERE account_id = $1", la) == 1  # empty period


async def test_post_lines_chain_and_refuse_unknown_accounts(pg: asyncpg.Connection) -> None:
    acct = await account(pg, opening=1_000_000)
    rows = await postgres.post_lines(pg, acct, [AccountLine("payment", 5_000_000), AccountLine("charge", -2_000_000)])
    assert [r["balance_after_micro"] for r in rows] == [6_000_000, 4_000_000]
    with pytest.raises(InputError, match="does not exist"):
        await postgres.post_lines(pg, 424242, [AccountLine("payment", 1)])


async def test_due_accounts_are_scheduled_once(pg: asyncpg.Connection) -> None:
    await account(pg, opening=1_000_000)
    await pg.execute("UPDATE accounts SET next_close_at = NULL")
    assert await invoices.schedule_new_accounts(pg) == 1
    assert await invoices.schedule_new_accounts(pg) == 0


# -- properties over random months -------------------------------------------------------------------

class Op(NamedTuple):
    minute: int  # after OCT
    kind: str  # a ledger kind, or "close" (an admin's close at that minute)
    tax_class: str | None = None
    amount: int = 0


KINDS = [("payment", None), ("refill", None), ("charge", None), ("charge", "exempt"), ("did", None),
         ("service", None), ("correction", None), ("correction", "exempt"), ("call", None)]
OPS = st.lists(st.one_of(
    st.builds(lambda m, k, a: Op(m, k[0], k[1], a), st.integers(0, 60 * 24 * 90), st.sampled_from(KINDS),
              st.integers(1, 50_000_000)),
    st.builds(lambda m: Op(m, "close"), st.integers(0, 60 * 24 * 90)),
), min_size=1, max_size=25)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, vat=st.sampled_from([0, 55_000, 200_000]), tax_mode=st.sampled_from(["invoice", "payment"]))
async def test_random_months_invoice_every_line_once_and_chain_their_balances(
    pg: asyncpg.Connection, ops: list[Op], vat: int, tax_mode: str
) -> None:
    await empty_database(pg)
    acct = await account(pg, opening=3_000_000, vat_rate_ppm=vat, tax_mode=tax_mode)
    for n, op in sorted(enumerate(ops), key=lambda item: (item[1].minute, item[0])):  # by time, stably
        at = OCT + timedelta(minutes=op.minute)
        if op.kind == "close":
            await invoicing.close_accounts(pg, None, ["5550001"], at)
        elif op.kind == "call":
            await postgres.write_calls(pg, [CallLine(f"c{n}", "5550001", -op.amount, 60, "331", "France", at, at)])
        elif op.kind in ("payment", "refill"):  # taxed at payment when the account is
            await postgres.post_lines(pg, acct, postgres.credit_lines(op.kind, op.amount, "", tax_mode=tax_mode,
                                                                      vat_rate_ppm=vat, at=at))
        else:
            credit = op.kind == "correction" and n % 2 == 1
            await postgres.post(pg, kind=op.kind, amount_micro=op.amount if credit else -op.amount, account_id=acct,
                                at=at, tax_class=op.tax_class)
    end = OCT + timedelta(days=91)
    await invoicing.close_accounts(pg, None, ["5550001"], end)
    again = await invoicing.close_accounts(pg, None, ["5550001"], end)
    assert again.closed == 0  # closing twice is a no-op

    seen: list[int] = []
    previous = 0
    for inv in await pg.fetch("SELECT * FROM invoices ORDER BY id"):
        lines = await invoice_lines(pg, inv["id"])
        ids = [x["id"] for x in lines]
        assert not set(ids) & set(seen)  # nothing invoiced twice
        seen += ids
        assert inv["opening_micro"] == previous
        assert inv["closing_micro"] == inv["opening_micro"] + sum(x["amount_micro"] for x in lines)
        own_tax = -sum(x["amount_micro"] for x in lines if x["invoice_id"] == inv["id"])
        assert inv["tax_micro"] == own_tax
        taxes = await pg.fetch("SELECT * FROM invoice_taxes WHERE invoice_id = $1", inv["id"])
        if tax_mode == "invoice":
            assert sum(t["tax_micro"] for t in taxes) == own_tax
            for t in taxes:  # each class's net is the exact sum of its lines; its tax is rounded once
                net = -sum(x["amount_micro"] for x in lines if x["kind"] != "tax" and x["kind"] not in (
                    "payment", "refill", "initial") and (x["tax_class"] or "standard") == t["tax_class"])
                assert t["net_micro"] == net
                assert t["tax_micro"] == tax_on_net(net, t["rate_ppm"])
        else:  # taxed at payment: nothing more on the invoice, which shows what the payments carried
            assert own_tax == 0
            carried = -sum(x["amount_micro"] for x in lines if x["kind"] == "tax")
            assert sum(t["tax_micro"] for t in taxes) == carried
            assert all(t["tax_micro"] == tax_in_gross(t["net_micro"] + t["tax_micro"], t["rate_ppm"]) for t in taxes
                       if len([x for x in lines if x["kind"] == "tax"]) == 1)
        previous = inv["closing_micro"]
    every = [r["id"] for r in await pg.fetch("SELECT id FROM ledger WHERE account_id = $1 ORDER BY id", acct)]
    assert sorted(seen) == every  # the sum of all invoices' lines is the ledger
    assert previous == await pg.fetchval("SELECT balance_micro FROM accounts WHERE id = $1", acct)


# -- free-minute packages -----------------------------------------------------------------------------

PER_SECOND = SellRate(rate_per_min_micro=60_000, connect_micro=5_000)  # 1,000 micro-units a second


def priced_call(call_id: str, destination: str, seconds: int) -> CallLine:
    return CallLine(call_id, "5550001", -cost_micro(PER_SECOND, seconds), seconds, destination, "dest", OCT, OCT,
                    sell=PER_SECOND)


async def test_packages_are_used_first_once_per_call_and_afresh_each_period(pg: asyncpg.Connection) -> None:
    acct = await account(pg, opening=10_000_000, vat_rate_ppm=0)
    anywhere = await postgres.add_package(pg, "5550001", "2 minutes", 120)
    france = await postgres.add_package(pg, "5550001", "France", 60, ["33"])
    await postgres.write_calls(pg, [priced_call("a", "33612345678", 90), priced_call("b", "4930123", 100)])
    lines = {r["call_id"]: r for r in await pg.fetch("SELECT * FROM ledger WHERE kind = 'call'")}
    # France: its own package first (60 s), then 30 s of the other; covered whole, so no connection charge
    assert (lines["a"]["amount_micro"], lines["a"]["free_s"]) == (0, 90)
    # Germany: the 90 s left of the general package, then 10 s paid, plus the connection
    assert (lines["b"]["amount_micro"], lines["b"]["free_s"]) == (-(5_000 + 10_000), 90)
    used = {r["id"]: r["used_s"] for r in await pg.fetch("SELECT id, used_s FROM packages")}
    assert used == {anywhere["id"]: 120, france["id"]: 60}

    # A replayed call uses nothing again; a new call finds nothing left and pays in full.
    await postgres.write_calls(pg, [priced_call("a", "33612345678", 90), priced_call("c", "33140000000", 80)])
    c = await pg.fetchrow("SELECT * FROM ledger WHERE call_id = 'c'")
    assert (c["amount_micro"], c["free_s"]) == (-cost_micro(PER_SECOND, 80), None)
    assert await pg.fetchval("SELECT sum(used_s) FROM packages") == 180
    assert await pg.fetchval("SELECT balance_micro FROM accounts WHERE id = $1", acct) == \
        10_000_000 - 15_000 - cost_micro(PER_SECOND, 80)

    # The close starts a new period: its calls find the packages whole again.
    await invoicing.close_accounts(pg, None, ["5550001"], NOV)
    later = NOV + timedelta(days=1)
    await postgres.write_calls(pg, [CallLine("d", "5550001", -cost_micro(PER_SECOND, 50), 50, "33140000000", "dest",
                                             later, later, sell=PER_SECOND)])
    d = await pg.fetchrow("SELECT * FROM ledger WHERE call_id = 'd'")
    assert (d["amount_micro"], d["free_s"]) == (0, 50)
    rows = {r["id"]: r for r in await pg.fetch("SELECT * FROM packages")}
    assert (rows[france["id"]]["used_s"], rows[france["id"]]["period"]) == (50, NOV)
    assert rows[anywhere["id"]]["used_s"] == 120  # untouched this period: its count is last period's


async def test_a_call_that_ended_after_the_next_close_counts_in_the_next_period(pg: asyncpg.Connection) -> None:
    await account(pg, opening=10_000_000, vat_rate_ppm=0)
    await pg.execute("UPDATE accounts SET next_close_at = $1", NOV)
    await postgres.add_package(pg, "5550001", "1 minute", 60)
    before, after = NOV - timedelta(minutes=5), NOV + timedelta(minutes=5)
    await postgres.write_calls(pg, [
        CallLine("old", "5550001", -cost_micro(PER_SECOND, 60), 60, "331", "dest", before, before, sell=PER_SECOND),
        CallLine("new", "5550001", -cost_micro(PER_SECOND, 60), 60, "331", "dest", after, after, sell=PER_SECOND),
    ])
    free = {r["call_id"]: r["free_s"] for r in await pg.fetch("SELECT call_id, free_s FROM ledger WHERE kind = 'call'")}
    assert free == {"old": 60, "new": 60}  # each period's minute, though the close has not run yet


async def test_a_package_for_an_unknown_account_or_bad_prefix_is_refused(pg: asyncpg.Connection) -> None:
    await account(pg)
    with pytest.raises(InputError, match="does not exist"):
        await postgres.add_package(pg, "9999999", "x", 60)
    with pytest.raises(InputError, match="digits"):
        await postgres.add_package(pg, "5550001", "x", 60, ["+33"])
    with pytest.raises(InputError, match="at least one"):
        await postgres.add_package(pg, "5550001", "x", 0)


# -- what a review found ------------------------------------------------------------------------------


async def test_a_refund_taxed_at_payment_gives_its_tax_back(pg: asyncpg.Connection, store: RedisStore) -> None:
    await account(pg, tax_mode="payment")
    await sync_redis(pg, store)
    await post_to_account(pg, store, "5550001", "payment", 12_000_000, "card top-up")
    newest = await post_to_account(pg, store, "5550001", "payment", -12_000_000, "refund")
    assert newest["kind"] == "tax" and newest["amount_micro"] == 2_000_000  # the 2.00 of VAT comes back
    assert newest["balance_after_micro"] == 0 and (await store.credit("5550001")).balance_micro == 0


async def test_autorefill_of_an_account_taxed_at_payment_is_taxed(pg: asyncpg.Connection) -> None:
    acct = await account(pg, opening=12_000_000, autorefill=True, tax_mode="payment")
    await line(pg, acct, "charge", -6_000_000, OCT)
    await invoicing.close_accounts(pg, None, ["5550001"], NOV)
    refill, tax = await pg.fetch("SELECT * FROM ledger WHERE kind IN ('refill', 'tax') ORDER BY id")
    assert (refill["amount_micro"], tax["amount_micro"]) == (6_000_000, -1_000_000)
    assert tax["balance_after_micro"] == 11_000_000  # topped up by the net part of the refill


async def test_the_tax_mode_does_not_change_under_an_open_period(pg: asyncpg.Connection) -> None:
    acct = await account(pg, opening=5_000_000)
    with pytest.raises(InputError, match="close its preview first"):
        await postgres.update_account(pg, "5550001", {"tax_mode": "payment"})
    await invoicing.close_accounts(pg, None, ["5550001"], NOV)
    changed = await postgres.update_account(pg, "5550001", {"tax_mode": "payment"})
    assert changed["tax_mode"] == "payment" and changed["id"] == acct


async def test_a_late_line_dated_in_the_period_waits_for_the_next_invoice(pg: asyncpg.Connection) -> None:
    acct = await account(pg, opening=5_000_000, vat_rate_ppm=0)
    await line(pg, acct, "charge", -1_000_000, OCT)
    await line(pg, acct, "did", -5_000_000, NOV + timedelta(seconds=20), "December's DID rental")
    await line(pg, acct, "charge", -7, NOV - timedelta(minutes=1), "a call rated late from the CDR table")
    await invoicing.close_accounts(pg, None, ["5550001"], NOV)
    inv = await pg.fetchrow("SELECT * FROM invoices")
    assert [x["kind"] for x in await invoice_lines(pg, inv["id"])] == ["initial", "charge"]  # no December DID
    preview = await invoicing.preview(pg, "5550001", NOV + timedelta(days=1))
    assert sorted(g.total_micro for g in preview.groups) == [-5_000_000, -7]


async def test_accounts_that_cannot_close_do_not_hold_back_the_others(pg: asyncpg.Connection) -> None:
    await pg.execute("UPDATE issuers SET mode = 'draft'")
    for i in range(5):
        acct = await account(pg, f"555000{i}", opening=1_000_000)
        await line(pg, acct, "charge", -1_000, OCT)
    await pg.execute("UPDATE accounts SET period_start = $1, next_close_at = $2", OCT, NOV)
    first = await invoicing.close_due(pg, None, NOV, batch=2)
    assert first.drafts == 5
    # The five drafts wait; a sixth account due later still closes, however small the batches.
    acct = await account(pg, "5550009", opening=1_000_000)
    await line(pg, acct, "charge", -1_000, OCT)
    await pg.execute("UPDATE accounts SET period_start = $1, next_close_at = $2 WHERE id = $3", OCT,
                     NOV + timedelta(hours=1), acct)
    await pg.execute("UPDATE accounts SET next_close_at = $1 WHERE id <> $2", NOV - timedelta(days=30), acct)
    second = await invoicing.close_due(pg, None, NOV + timedelta(hours=2), batch=2)
    assert second.drafts == 1 and len(second.errors) == 5


async def test_a_document_that_fails_does_not_hold_back_the_others(pg: asyncpg.Connection) -> None:
    for i in range(3):
        acct = await account(pg, f"555000{i}", opening=1_000_000)
        await line(pg, acct, "charge", -1_000, OCT)
    await invoicing.close_accounts(pg, None, ["5550000", "5550001", "5550002"], NOV)

    def render(doc: InvoiceDocument) -> bytes:
        if doc.account_number == "5550000":
            raise RuntimeError("font missing")
        return b"%PDF " + doc.account_number.encode()

    skip: set[int] = set()
    assert await invoicing.store_documents(pg, render, skip=skip) == 3
    assert len(skip) == 1
    assert await pg.fetchval("SELECT count(*) FROM invoice_documents") == 2


async def test_a_close_and_the_call_writer_with_packages_do_not_deadlock(pg_url: str, pg: asyncpg.Connection) -> None:
    numbers = [f"555{i:04d}" for i in range(30)]
    for number in numbers:
        await account(pg, number, opening=100_000_000, vat_rate_ppm=0)
        await postgres.add_package(pg, number, "free", 600)
    writer, closer = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)

    async def write() -> None:
        for n in range(40):
            now = datetime.now(UTC)
            await postgres.write_calls(writer, [
                CallLine(f"{number}/{n}", number, -cost_micro(PER_SECOND, 30), 30, "331", "d", now, now,
                         sell=PER_SECOND) for number in reversed(numbers)])

    async def close() -> None:
        for _ in range(10):
            await invoicing.close_accounts(closer, None, numbers, datetime.now(UTC))

    try:
        await asyncio.gather(write(), close())  # a deadlock would abort one of them with an error
    finally:
        await writer.close()
        await closer.close()
    assert await pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'") == 30 * 40
