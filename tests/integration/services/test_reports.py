"""Staff reports against the real PostgreSQL: charge history filtered by account, last name, kind and dates,
each line with its effective tax class and confirmed invoice; invoice search by number and prefix; CSV and
JSON output that keep every micro-unit and never hold a float; impossible queries refused."""

from __future__ import annotations

import csv
import io
import json
from contextlib import aclosing
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import asyncpg
import pytest

from a2bd.adapters import postgres
from a2bd.adapters.postgres import AccountLine, CallLine
from a2bd.domain.money import parse_amount, to_decimal
from a2bd.errors import InputError
from a2bd.services.reports import (
    ChargeQuery,
    ChargeRow,
    InvoiceQuery,
    InvoiceRow,
    charge_batches,
    charge_history,
    columns,
    search_invoices,
    to_json,
    write_csv,
    write_report,
)

pytestmark = pytest.mark.integration

DUPONT, DUPRE, MARTIN = "7400000001", "7400000002", "7400000003"
JAN = datetime(2030, 1, 1, tzinfo=UTC)
FEB = datetime(2030, 2, 1, tzinfo=UTC)
MAR = datetime(2030, 3, 1, tzinfo=UTC)


def day(n: int, hour: int = 12) -> datetime:
    """Day n of January 2030 (n > 31 runs on into February)."""
    return JAN + timedelta(days=n - 1, hours=hour)


async def add_invoice(pg: asyncpg.Connection, account_id: int, *, status: str = "confirmed",
                      number: str | None = None, seq: int | None = None, start: datetime = JAN,
                      end: datetime = FEB, lines: tuple[int, int] = (0, 0), opening: int = 0,
                      lines_micro: int = 0, tax: int = 0, net: int = 0) -> int:
    """An invoice row as the closer would write it (issuer 1, the admin's): its id."""
    confirmed = status == "confirmed"
    invoice_id: int = await pg.fetchval(
        "INSERT INTO invoices (account_id, issuer_id, status, number, seq, period_start, period_end,"
        " from_line_id, through_line_id, opening_micro, lines_micro, tax_micro, closing_micro, net_micro,"
        " payments_micro, line_count, currency, timezone, confirmed_at)"
        " VALUES ($1, 1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 0, 0, 'EUR', 'UTC', $14)"
        " RETURNING id",
        account_id, status, number, seq, start, end, lines[0], lines[1], opening, lines_micro, tax,
        opening + lines_micro - tax, net, end if confirmed else None,
    )
    return invoice_id


async def world(pg: asyncpg.Connection) -> dict[str, object]:
    """Three accounts (Dupont, dupré, Martin), a carrier, January's lines, a confirmed invoice for Dupont's
    January with its tax line, February lines left open, a draft for dupré: what the tests look at."""
    await postgres.replace_tariff(pg, "t", [])
    carrier = await postgres.add_provider(pg, "carrier-a", "PJSIP/{number}@a")
    ids: dict[str, int] = {}
    for number, name, last in ((DUPONT, "Jean Dupont", "Dupont"), (DUPRE, "Anne Dupré", "dupré"),
                               (MARTIN, "Paul Martin", "Martin")):
        acct = await postgres.create_account(pg, number=number, tariff="t", initial_balance_micro=0, name=name)
        await pg.execute("UPDATE accounts SET last_name = $1 WHERE id = $2", last, acct["id"])
        ids[number] = acct["id"]

    a = ids[DUPONT]
    initial = await postgres.post(pg, kind="initial", amount_micro=10_000_000, account_id=a, at=day(1),
                                  description="initial balance")
    [call] = await postgres.write_calls(pg, [CallLine(
        call_id="c1", account=DUPONT, amount_micro=-1_234_567, seconds=95, destination="4930123456",
        description="Germany Berlin", answered_at=day(5) - timedelta(seconds=95), ended_at=day(5),
        provider="carrier-a", provider_amount_micro=400_000)])
    exempt = await postgres.post(pg, kind="charge", amount_micro=-1, account_id=a, at=day(10),
                                 description="rounding, untaxed", tax_class="exempt")
    await postgres.post(pg, kind="provider_payment", provider_id=carrier, provider_amount_micro=-5_000_000,
                        at=day(11), description="paid the carrier")  # a carrier's line: in no report
    inv_a = await add_invoice(pg, a, number="INV-2030-0001", seq=1, lines=(0, exempt["id"]), opening=0,
                              lines_micro=10_000_000 - 1_234_567 - 1, tax=250_000, net=1_234_567)
    [tax] = await postgres.post_lines(pg, a, [AccountLine(
        kind="tax", amount_micro=-250_000, description="VAT 20 %", invoice_id=inv_a, tax_rate_ppm=200_000,
        tax_base_micro=1_234_567, at=FEB)])
    payment = await postgres.post(pg, kind="payment", amount_micro=5_500_000, account_id=a, at=day(36),
                                  description="bank transfer")

    b = ids[DUPRE]
    b1 = await postgres.post(pg, kind="initial", amount_micro=2_000_000, account_id=b, at=day(2))
    b2 = await postgres.post(pg, kind="subscription", amount_micro=-999_999, account_id=b, at=day(15),
                             description="monthly plan")
    await add_invoice(pg, b, status="draft", lines=(0, b2["id"]), lines_micro=2_000_000 - 999_999)

    c = ids[MARTIN]
    await postgres.post(pg, kind="initial", amount_micro=3_000_000, account_id=c, at=day(3))
    await add_invoice(pg, c, number="INV-2030-0002", seq=2, start=FEB, end=MAR, opening=3_000_000,
                      lines_micro=-4_000_000, tax=123_456, net=4_000_000)
    await add_invoice(pg, c, number="INV-2031-0001", seq=3, start=datetime(2031, 1, 1, tzinfo=UTC),
                      end=datetime(2031, 2, 1, tzinfo=UTC), opening=-1_123_456, lines_micro=5_000_000)
    return {"ids": ids, "a": [initial["id"], call.line_id, exempt["id"], tax["id"], payment["id"]],
            "b": [b1["id"], b2["id"]]}


# -- charge history ----------------------------------------------------------------------------------------


async def test_one_account_every_line_with_tax_class_and_invoice(pg: asyncpg.Connection) -> None:
    w = await world(pg)
    rows = await charge_history(pg, ChargeQuery(account_number=DUPONT))
    assert [r.line_id for r in rows] == w["a"]
    assert [(r.kind, r.amount_micro, r.balance_after_micro, r.tax_class, r.invoice_number) for r in rows] == [
        ("initial", 10_000_000, 10_000_000, None, "INV-2030-0001"),
        ("call", -1_234_567, 8_765_433, "standard", "INV-2030-0001"),  # the kind's class
        ("charge", -1, 8_765_432, "exempt", "INV-2030-0001"),  # the line's own class wins
        ("tax", -250_000, 8_515_432, None, "INV-2030-0001"),  # past the range, posted for the invoice
        ("payment", 5_500_000, 14_015_432, None, None),  # the open period
    ]
    call = rows[1]
    assert (call.account_number, call.last_name, call.currency) == (DUPONT, "Dupont", "EUR")
    assert (call.destination, call.seconds, call.description) == ("4930123456", 95, "Germany Berlin")
    assert call.created_at == day(5)
    assert (rows[0].destination, rows[0].seconds) == (None, None)


async def test_a_draft_invoice_numbers_no_line(pg: asyncpg.Connection) -> None:
    await world(pg)
    rows = await charge_history(pg, ChargeQuery(account_number=DUPRE))
    assert [(r.kind, r.tax_class, r.invoice_number) for r in rows] == [
        ("initial", None, None), ("subscription", "standard", None)]


async def test_every_account_in_account_order_and_no_carrier_line(pg: asyncpg.Connection) -> None:
    w = await world(pg)
    rows = await charge_history(pg, ChargeQuery())
    assert [r.account_number for r in rows] == [DUPONT] * 5 + [DUPRE] * 2 + [MARTIN]
    assert "provider_payment" not in {r.kind for r in rows}
    assert [r.line_id for r in rows][:7] == w["a"] + w["b"]


@pytest.mark.parametrize(("last_name", "accounts"), [
    ("dup", [DUPONT, DUPRE]),
    ("DUP", [DUPONT, DUPRE]),
    ("DuPo", [DUPONT]),
    ("DUPRÉ", [DUPRE]),
    ("upont", []),  # a prefix, not a substring
    ("mart", [MARTIN]),
])
async def test_last_name_is_a_case_insensitive_prefix(pg: asyncpg.Connection, last_name: str,
                                                      accounts: list[str]) -> None:
    await world(pg)
    rows = await charge_history(pg, ChargeQuery(last_name=last_name))
    assert sorted({r.account_number for r in rows}) == accounts


async def test_account_and_last_name_together(pg: asyncpg.Connection) -> None:
    await world(pg)
    assert await charge_history(pg, ChargeQuery(account_number=DUPRE, last_name="dupo")) == []
    assert len(await charge_history(pg, ChargeQuery(account_number=DUPRE, last_name="dupr"))) == 2


async def test_kinds(pg: asyncpg.Connection) -> None:
    await world(pg)
    rows = await charge_history(pg, ChargeQuery(kinds=("call", "subscription", "tax")))
    assert [(r.account_number, r.kind) for r in rows] == [
        (DUPONT, "call"), (DUPONT, "tax"), (DUPRE, "subscription")]
    assert await charge_history(pg, ChargeQuery(kinds=("refill",))) == []


async def test_since_is_inclusive_and_until_exclusive(pg: asyncpg.Connection) -> None:
    await world(pg)
    rows = await charge_history(pg, ChargeQuery(since=day(5), until=day(15)))
    assert [(r.account_number, r.kind) for r in rows] == [(DUPONT, "call"), (DUPONT, "charge")]
    rows = await charge_history(pg, ChargeQuery(since=day(5), until=day(15) + timedelta(microseconds=1)))
    assert [r.kind for r in rows] == ["call", "charge", "subscription"]
    rows = await charge_history(pg, ChargeQuery(account_number=DUPONT, since=FEB))
    assert [r.kind for r in rows] == ["tax", "payment"]
    # Any offset: 13:00 in Paris is 12:00 UTC, the instant of the line of day 5.
    paris = datetime(2030, 1, 5, 13, 0, tzinfo=timezone(timedelta(hours=1)))
    rows = await charge_history(pg, ChargeQuery(until=paris))
    assert [r.kind for r in rows] == ["initial", "initial", "initial"]


async def test_limit_takes_the_first_lines_in_report_order(pg: asyncpg.Connection) -> None:
    w = await world(pg)
    rows = await charge_history(pg, ChargeQuery(limit=6))
    assert [r.line_id for r in rows] == w["a"] + w["b"][:1]


async def test_reads_inside_the_callers_transaction(pg: asyncpg.Connection) -> None:
    await world(pg)
    async with pg.transaction():
        rows = await charge_history(pg, ChargeQuery(account_number=DUPONT, kinds=("tax",)))
    assert [r.invoice_number for r in rows] == ["INV-2030-0001"]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 100])
async def test_batches_stream_the_same_rows_as_the_list(pg: asyncpg.Connection, batch_size: int) -> None:
    await world(pg)
    whole = await charge_history(pg, ChargeQuery())
    batches = [batch async for batch in charge_batches(pg, ChargeQuery(), batch_size=batch_size)]
    assert all(0 < len(batch) <= batch_size for batch in batches)
    assert [row for batch in batches for row in batch] == whole
    assert not pg.is_in_transaction()


async def test_a_stream_stopped_early_ends_its_transaction(pg: asyncpg.Connection) -> None:
    await world(pg)
    async with aclosing(charge_batches(pg, ChargeQuery(), batch_size=2)) as batches:
        async for _ in batches:
            assert pg.is_in_transaction()
            break
    assert not pg.is_in_transaction()
    assert len(await charge_history(pg, ChargeQuery(account_number=DUPRE))) == 2  # the connection is usable


async def test_a_bad_stream_is_refused_before_anything_is_read(pg: asyncpg.Connection) -> None:
    with pytest.raises(InputError, match="is not before until"):
        charge_batches(pg, ChargeQuery(since=FEB, until=JAN))  # raised by the call, not the first iteration


# -- invoice search ----------------------------------------------------------------------------------------


async def test_invoice_by_exact_number(pg: asyncpg.Connection) -> None:
    await world(pg)
    [row] = await search_invoices(pg, InvoiceQuery(number="INV-2030-0002"))
    assert row == InvoiceRow(
        number="INV-2030-0002", status="confirmed", account_number=MARTIN, name="Paul Martin",
        last_name="Martin", period_start=FEB, period_end=MAR, currency="EUR", opening_micro=3_000_000,
        net_micro=4_000_000, tax_micro=123_456, closing_micro=-1_123_456, amount_due_micro=1_123_456)
    assert await search_invoices(pg, InvoiceQuery(number="INV-2030-000")) == []  # exact unless it ends in *
    assert await search_invoices(pg, InvoiceQuery(number="inv-2030-0002")) == []


async def test_invoice_by_number_prefix(pg: asyncpg.Connection) -> None:
    await world(pg)
    rows = await search_invoices(pg, InvoiceQuery(number="INV-2030*"))
    assert [r.number for r in rows] == ["INV-2030-0001", "INV-2030-0002"]
    rows = await search_invoices(pg, InvoiceQuery(number="INV-*"))
    assert [r.number for r in rows] == ["INV-2030-0001", "INV-2030-0002", "INV-2031-0001"]
    assert await search_invoices(pg, InvoiceQuery(number="INV-2030%*")) == []  # no LIKE wildcards


async def test_invoice_status_account_name_and_period_end(pg: asyncpg.Connection) -> None:
    await world(pg)
    assert [r.number for r in await search_invoices(pg, InvoiceQuery())] == [
        "INV-2030-0001", "INV-2030-0002", "INV-2031-0001"]  # confirmed only, by period end
    rows = await search_invoices(pg, InvoiceQuery(status="all"))
    assert [(r.number, r.status) for r in rows] == [
        ("INV-2030-0001", "confirmed"), (None, "draft"), ("INV-2030-0002", "confirmed"),
        ("INV-2031-0001", "confirmed")]
    assert [r.account_number for r in await search_invoices(pg, InvoiceQuery(status="draft"))] == [DUPRE]
    rows = await search_invoices(pg, InvoiceQuery(last_name="MAR"))
    assert [r.number for r in rows] == ["INV-2030-0002", "INV-2031-0001"]
    rows = await search_invoices(pg, InvoiceQuery(account_number=DUPONT))
    assert [(r.number, r.closing_micro, r.amount_due_micro) for r in rows] == [
        ("INV-2030-0001", 8_515_432, 0)]  # in credit: nothing due
    rows = await search_invoices(pg, InvoiceQuery(since=FEB, until=MAR))
    assert [r.number for r in rows] == ["INV-2030-0001"]  # period_end FEB in, MAR out
    rows = await search_invoices(pg, InvoiceQuery(since=MAR, limit=1))
    assert [r.number for r in rows] == ["INV-2030-0002"]


# -- output ------------------------------------------------------------------------------------------------


async def test_charges_csv_round_trips_to_the_exact_amounts(pg: asyncpg.Connection) -> None:
    await world(pg)
    rows = await charge_history(pg, ChargeQuery())
    out = io.StringIO(newline="")
    assert write_csv(rows, out, ChargeRow) == len(rows)
    read = list(csv.DictReader(io.StringIO(out.getvalue(), newline="")))
    assert list(read[0]) == ["line_id", "created_at", "account_number", "last_name", "kind", "description",
                             "destination", "seconds", "currency", "amount", "balance_after", "tax_class",
                             "invoice_number"]  # money without its _micro suffix
    assert [r["amount"] for r in read[:5]] == ["10.00", "-1.234567", "-0.000001", "-0.25", "5.50"]
    for row, text in zip(rows, read, strict=True):
        assert parse_amount(text["amount"]) == row.amount_micro
        assert parse_amount(text["balance_after"]) == row.balance_after_micro
        stamp = datetime.fromisoformat(text["created_at"])
        assert stamp.utcoffset() is not None and stamp == row.created_at
        assert text["invoice_number"] == (row.invoice_number or "")
        assert int(text["line_id"]) == row.line_id
    assert read[1]["created_at"] == "2030-01-05T12:00:00+00:00"
    assert (read[1]["destination"], read[1]["seconds"], read[0]["seconds"]) == ("4930123456", "95", "")


async def test_invoices_csv_round_trips(pg: asyncpg.Connection) -> None:
    await world(pg)
    rows = await search_invoices(pg, InvoiceQuery(status="all"))
    out = io.StringIO(newline="")
    write_csv(rows, out, InvoiceRow)
    read = list(csv.DictReader(io.StringIO(out.getvalue(), newline="")))
    assert [r["amount_due"] for r in read] == ["0.00", "0.00", "1.123456", "0.00"]
    assert read[1]["number"] == ""  # a draft has none yet
    for row, text in zip(rows, read, strict=True):
        for name in ("opening", "net", "tax", "closing", "amount_due"):
            assert parse_amount(text[name]) == getattr(row, f"{name}_micro")
        assert datetime.fromisoformat(text["period_end"]) == row.period_end


def test_an_empty_report_still_has_its_header() -> None:
    out = io.StringIO(newline="")
    assert write_csv([], out, InvoiceRow) == 0
    assert out.getvalue() == ",".join(columns(InvoiceRow)) + "\r\n"
    assert to_json([]) == "[]"


@pytest.mark.parametrize("batch_size", [1, 4, 100])
async def test_write_report_streams_what_write_csv_and_to_json_give(pg: asyncpg.Connection,
                                                                   batch_size: int) -> None:
    await world(pg)
    rows = await charge_history(pg, ChargeQuery())
    expected = io.StringIO(newline="")
    write_csv(rows, expected, ChargeRow)
    out = io.StringIO(newline="")
    assert await write_report(charge_batches(pg, ChargeQuery(), batch_size=batch_size), out, ChargeRow,
                              "csv") == len(rows)
    assert out.getvalue() == expected.getvalue()
    out = io.StringIO()
    assert await write_report(charge_batches(pg, ChargeQuery(), batch_size=batch_size), out, ChargeRow,
                              "json") == len(rows)
    assert json.loads(out.getvalue(), parse_float=_no_float) == json.loads(to_json(rows))
    out = io.StringIO()
    assert await write_report(charge_batches(pg, ChargeQuery(kinds=("refill",))), out, ChargeRow, "json") == 0
    assert json.loads(out.getvalue()) == []
    with pytest.raises(InputError, match="format 'xml'"):
        await write_report(charge_batches(pg, ChargeQuery()), io.StringIO(), ChargeRow, "xml")


def _no_float(text: str) -> Decimal:
    raise AssertionError(f"a JSON number with a fraction: {text}")


async def test_json_money_is_exact_decimal_text_never_a_float(pg: asyncpg.Connection) -> None:
    await world(pg)
    rows = await charge_history(pg, ChargeQuery())
    data = json.loads(to_json(rows), parse_float=_no_float)
    assert len(data) == len(rows)
    for row, obj in zip(rows, data, strict=True):
        assert isinstance(obj["amount"], str) and isinstance(obj["balance_after"], str)
        assert Decimal(obj["amount"]) == to_decimal(row.amount_micro)
        assert Decimal(obj["balance_after"]) == to_decimal(row.balance_after_micro)
        assert datetime.fromisoformat(obj["created_at"]) == row.created_at
        assert obj["line_id"] == row.line_id
    assert data[1]["amount"] == "-1.234567" and data[1]["seconds"] == 95
    assert data[0]["seconds"] is None and data[-1]["invoice_number"] is None

    invoices = json.loads(to_json(await search_invoices(pg, InvoiceQuery(number="INV-2030-0002"))),
                          parse_float=_no_float)
    assert {k: invoices[0][k] for k in ("opening", "net", "tax", "closing", "amount_due")} == {
        "opening": "3.00", "net": "4.00", "tax": "0.123456", "closing": "-1.123456", "amount_due": "1.123456"}


# -- impossible queries ------------------------------------------------------------------------------------

NAIVE = datetime(2030, 1, 1)  # the point: a time without a zone is refused


@pytest.mark.parametrize(("query", "message"), [
    (ChargeQuery(since=FEB, until=JAN), "is not before until"),
    (ChargeQuery(since=FEB, until=FEB), "is not before until"),
    (ChargeQuery(kinds=("call", "calls")), "unknown ledger kind.*'calls'"),
    (ChargeQuery(kinds=("provider_call",)), "belong to carriers"),
    (ChargeQuery(since=NAIVE), "has no time zone"),
    (ChargeQuery(limit=0), "limit 0 is below 1"),
    (ChargeQuery(last_name=" "), "last name is empty"),
    (ChargeQuery(account_number=""), "account number is empty"),
])
async def test_impossible_charge_queries(pg: asyncpg.Connection, query: ChargeQuery, message: str) -> None:
    with pytest.raises(InputError, match=message):
        await charge_history(pg, query)


@pytest.mark.parametrize(("query", "message"), [
    (InvoiceQuery(since=MAR, until=FEB), "is not before until"),
    (InvoiceQuery(status="paid"), "status 'paid' does not exist"),
    (InvoiceQuery(number="INV-*-1"), "may only end it"),
    (InvoiceQuery(until=NAIVE), "has no time zone"),
    (InvoiceQuery(limit=-1), "below 1"),
])
async def test_impossible_invoice_queries(pg: asyncpg.Connection, query: InvoiceQuery, message: str) -> None:
    with pytest.raises(InputError, match=message):
        await search_invoices(pg, query)


async def test_a_lone_kind_string_is_a_programming_error(pg: asyncpg.Connection) -> None:
    with pytest.raises(TypeError, match="not a string"):
        await charge_history(pg, replace(ChargeQuery(), kinds="call"))  # type: ignore[arg-type]
