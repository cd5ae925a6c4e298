"""Recurring services and account expiry with the real PostgreSQL and Redis: each period of a service is one
ledger line, once ever (repeated runs, racing schedulers, a daemon down for months), a service the credit
cannot pay is suspended with a notice and resumed after a payment, reminders and expiry notices are
recorded once, and every balance and expiry reaches Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from a2bd.adapters import postgres
from a2bd.adapters.postgres import CallLine
from a2bd.adapters.redis_store import RedisStore, account_key
from a2bd.errors import InputError
from a2bd.services.posting import post_to_account
from a2bd.services.recurring import add_service, cancel_service, resume_service, run_due, services_of
from a2bd.services.sync import sync_redis

pytestmark = pytest.mark.integration

A, B = "7320000001", "7320000002"  # not shared with other tests' data
ROME = ZoneInfo("Europe/Rome")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


async def open_account(pg: asyncpg.Connection, store: RedisStore, number: str = A, *, balance: int = 10_000_000,
                       **fields: Any) -> int:
    """An account on tariff `t` opened with `balance`, loaded into Redis: its id."""
    if await pg.fetchval("SELECT id FROM tariffs WHERE name = 't'") is None:
        await postgres.replace_tariff(pg, "t", [])
    acct = await postgres.create_account(pg, number=number, tariff="t", initial_balance_micro=balance, **fields)
    await sync_redis(pg, store)
    account_id: int = acct["id"]
    return account_id


async def service_lines(pg: asyncpg.Connection, service_id: int) -> list[asyncpg.Record]:
    return list(await pg.fetch("SELECT * FROM ledger WHERE service_id = $1 ORDER BY id", service_id))


async def notices(pg: asyncpg.Connection, account_id: int, kind: str) -> list[dict[str, Any]]:
    rows = await pg.fetch("SELECT detail FROM notices WHERE account_id = $1 AND kind = $2 ORDER BY id",
                          account_id, kind)
    return [json.loads(r["detail"]) for r in rows]


async def service(pg: asyncpg.Connection, service_id: int) -> asyncpg.Record:
    row: asyncpg.Record = await pg.fetchrow("SELECT * FROM services WHERE id = $1", service_id)
    return row


async def balances(pg: asyncpg.Connection, store: RedisStore, number: str) -> tuple[int, int]:
    """(PostgreSQL's balance, Redis's balance)."""
    pg_balance = await pg.fetchval("SELECT balance_micro FROM accounts WHERE number = $1", number)
    hot = await store.client.hgetall(account_key(number))
    return pg_balance, int(hot["balance"])


async def did(pg: asyncpg.Connection, store: RedisStore, start: datetime, *, number: str = A, amount: int = 1_500_000,
              **kw: Any) -> asyncpg.Record:
    return await add_service(pg, store=store, account_number=number, kind="did", name="DID 3612345678",
                             did=kw.pop("did", "3612345678"), amount_micro=amount, start=start, **kw)


# -- charging -----------------------------------------------------------------------------------------


async def test_monthly_did_is_charged_at_creation_then_at_each_local_midnight_renewal(
        pg: asyncpg.Connection, store: RedisStore) -> None:
    await open_account(pg, store, timezone="Europe/Rome")
    svc = await did(pg, store, datetime(2026, 11, 1, 9, 30, tzinfo=ROME))

    [first] = await service_lines(pg, svc["id"])
    assert (first["kind"], first["amount_micro"], first["balance_after_micro"]) == ("did", -1_500_000, 8_500_000)
    assert first["description"] == "DID 3612345678 rental 2026-11-01 – 2026-11-30"
    assert first["call_id"] == f"service:{svc['id']}:2026-10-31T23:00:00+00:00"  # Rome's midnight, in UTC
    assert first["tax_class"] is None  # the class of its kind
    assert (svc["status"], svc["anchor_day"], svc["next_charge_at"]) == ("active", 1, utc(2026, 11, 30, 23))
    assert await balances(pg, store, A) == (8_500_000, 8_500_000)

    report = await run_due(pg, store, utc(2026, 11, 30, 22, 59))  # 23:59 in Rome: not yet
    assert (report.charged, report.errors) == (0, [])
    assert len(await service_lines(pg, svc["id"])) == 1

    report = await run_due(pg, store, utc(2026, 11, 30, 23))
    assert (report.charged, report.suspended, report.errors) == (1, 0, [])
    second = (await service_lines(pg, svc["id"]))[1]
    assert (second["amount_micro"], second["service_id"]) == (-1_500_000, svc["id"])
    assert second["description"] == "DID 3612345678 rental 2026-12-01 – 2026-12-31"
    assert second["call_id"] == f"service:{svc['id']}:2026-11-30T23:00:00+00:00"
    assert (await service(pg, svc["id"]))["next_charge_at"] == utc(2026, 12, 31, 23)
    assert await balances(pg, store, A) == (7_000_000, 7_000_000)


async def test_a_run_repeated_at_the_same_instant_charges_once(pg: asyncpg.Connection, store: RedisStore) -> None:
    await open_account(pg, store)
    svc = await did(pg, store, utc(2026, 11, 1))
    first = await run_due(pg, store, utc(2026, 12, 1, 8))
    again = await run_due(pg, store, utc(2026, 12, 1, 8))
    assert (first.charged, again.charged, again.errors) == (1, 0, [])
    assert [line["description"][-23:] for line in await service_lines(pg, svc["id"])] == [
        "2026-11-01 – 2026-11-30", "2026-12-01 – 2026-12-31"]
    assert await balances(pg, store, A) == (7_000_000, 7_000_000)


async def test_the_ledger_key_refuses_a_period_twice_even_when_the_schedule_is_set_back(
        pg: asyncpg.Connection, store: RedisStore) -> None:
    await open_account(pg, store)
    svc = await did(pg, store, utc(2026, 11, 1))
    await run_due(pg, store, utc(2026, 12, 1))
    await pg.execute("UPDATE services SET next_charge_at = $2 WHERE id = $1", svc["id"], utc(2026, 11, 1))

    report = await run_due(pg, store, utc(2026, 12, 1))
    assert (report.charged, report.errors) == (0, [])  # both periods are in the ledger already
    assert len(await service_lines(pg, svc["id"])) == 2
    assert (await service(pg, svc["id"]))["next_charge_at"] == utc(2027, 1, 1)
    assert await balances(pg, store, A) == (7_000_000, 7_000_000)


@pytest.fixture
async def second_pool(pg_url: str) -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Connection]]:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=2)
    conn = await asyncpg.connect(pg_url)
    try:
        yield pool, conn
    finally:
        await conn.close()
        await pool.close()


async def test_two_schedulers_racing_charge_each_period_once(
        pg: asyncpg.Connection, store: RedisStore, second_pool: tuple[asyncpg.Pool, asyncpg.Connection]) -> None:
    for number in (A, B):
        await open_account(pg, store, number)
        for i in range(10):
            await add_service(pg, store=store, account_number=number, kind="subscription", name=f"Trunk {i}",
                              amount_micro=100_000, start=utc(2026, 1, 1))
    pool, conn = second_pool

    reports = await asyncio.gather(run_due(pool, store, utc(2026, 6, 15)), run_due(conn, store, utc(2026, 6, 15)))

    assert [r.errors for r in reports] == [[], []]
    assert sum(r.charged for r in reports) == 20 * 5  # February to June, each service, once
    keys = await pg.fetch("SELECT call_id, count(*) AS n FROM ledger WHERE service_id IS NOT NULL GROUP BY call_id")
    assert len(keys) == 20 * 6 and {k["n"] for k in keys} == {1}
    assert await pg.fetchval("SELECT count(*) FROM services WHERE next_charge_at = $1", utc(2026, 7, 1)) == 20
    for number in (A, B):
        assert await balances(pg, store, number) == (10_000_000 - 6 * 10 * 100_000,) * 2


async def test_a_daemon_down_three_months_charges_each_period_while_credit_lasts_then_suspends(
        pg: asyncpg.Connection, store: RedisStore) -> None:
    rich = await open_account(pg, store, A)
    poor = await open_account(pg, store, B, balance=2_000_000, credit_limit_micro=500_000)
    paid = await add_service(pg, store=store, account_number=A, kind="subscription", name="PBX", tax_class="exempt",
                             amount_micro=1_000_000, start=utc(2026, 1, 31))
    short = await add_service(pg, store=store, account_number=B, kind="service", name="Trunk channels x4",
                              amount_micro=1_000_000, start=utc(2026, 1, 31))

    report = await run_due(pg, store, utc(2026, 4, 30, 12))

    assert (report.charged, report.suspended, report.errors) == (4, 1, [])
    lines = await service_lines(pg, paid["id"])
    assert [line["description"] for line in lines] == [  # the anchor, the 31st, is kept through February
        "Subscription PBX 2026-01-31 – 2026-02-27", "Subscription PBX 2026-02-28 – 2026-03-30",
        "Subscription PBX 2026-03-31 – 2026-04-29", "Subscription PBX 2026-04-30 – 2026-05-30"]
    assert {(line["kind"], line["amount_micro"], line["tax_class"]) for line in lines} == {
        ("subscription", -1_000_000, "exempt")}
    assert (await service(pg, paid["id"]))["next_charge_at"] == utc(2026, 5, 31)
    assert await balances(pg, store, A) == (6_000_000, 6_000_000)
    assert await notices(pg, rich, "service_suspended") == []

    # 2.00 + 0.50 of credit: the creation and February are paid, March is short by 0.50.
    assert [line["description"] for line in await service_lines(pg, short["id"])] == [
        "Trunk channels x4 2026-01-31 – 2026-02-27", "Trunk channels x4 2026-02-28 – 2026-03-30"]
    stopped = await service(pg, short["id"])
    assert (stopped["status"], stopped["next_charge_at"]) == ("suspended", utc(2026, 3, 31))
    assert await balances(pg, store, B) == (0, 0)
    [notice] = await notices(pg, poor, "service_suspended")
    assert notice == {"service_id": short["id"], "service": "Trunk channels x4", "kind": "service", "did": None,
                      "amount_micro": 1_000_000, "currency": "EUR", "reason": "credit",
                      "due_at": "2026-03-31T00:00:00+00:00", "available_micro": 500_000, "short_micro": 500_000}

    again = await run_due(pg, store, utc(2026, 6, 1))
    assert (again.charged, again.suspended) == (1, 0)  # the paid one renews; the suspended one waits
    assert len(await notices(pg, poor, "service_suspended")) == 1


async def test_one_bad_service_does_not_stop_the_run(pg: asyncpg.Connection, store: RedisStore) -> None:
    await open_account(pg, store, A)
    await open_account(pg, store, B)
    good = await did(pg, store, utc(2026, 11, 1))
    bad = await did(pg, store, utc(2026, 11, 1), number=B, did="3612345679")
    await pg.execute("UPDATE accounts SET timezone = 'Mars/Olympus_Mons' WHERE number = $1", B)

    report = await run_due(pg, store, utc(2026, 12, 1))

    assert report.charged == 1
    assert [e.service_id for e in report.errors] == [bad["id"]]
    assert "Mars/Olympus_Mons" in report.errors[0].message
    assert len(await service_lines(pg, good["id"])) == 2
    assert len(await service_lines(pg, bad["id"])) == 1
    assert (await service(pg, bad["id"]))["next_charge_at"] == utc(2026, 12, 1)  # retried by the next run


# -- reminders, suspension, resumption, cancellation -------------------------------------------------


async def test_a_renewal_reminder_is_recorded_once_n_days_before_each_renewal(
        pg: asyncpg.Connection, store: RedisStore) -> None:
    account_id = await open_account(pg, store)
    svc = await did(pg, store, utc(2026, 11, 1), reminder_days=7)

    assert (await run_due(pg, store, utc(2026, 11, 23, 23, 59))).reminded == 0  # 7 days and a minute before
    assert (await run_due(pg, store, utc(2026, 11, 24))).reminded == 1
    assert (await run_due(pg, store, utc(2026, 11, 24))).reminded == 0
    assert (await run_due(pg, store, utc(2026, 11, 30, 12))).reminded == 0
    [notice] = await notices(pg, account_id, "renewal_reminder")
    assert notice == {"service_id": svc["id"], "service": "DID 3612345678", "kind": "did", "did": "3612345678",
                      "amount_micro": 1_500_000, "currency": "EUR", "renews_at": "2026-12-01T00:00:00+00:00",
                      "renewal_date": "2026-12-01"}
    assert (await service(pg, svc["id"]))["reminded_for"] == utc(2026, 12, 1)

    assert (await run_due(pg, store, utc(2026, 12, 1))).charged == 1
    assert (await run_due(pg, store, utc(2026, 12, 25))).reminded == 1  # the next renewal, 2027-01-01
    assert [n["renews_at"] for n in await notices(pg, account_id, "renewal_reminder")] == [
        "2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"]


async def test_a_suspended_service_resumes_after_a_payment(pg: asyncpg.Connection, store: RedisStore) -> None:
    account_id = await open_account(pg, store, balance=1_500_000)
    svc = await did(pg, store, utc(2026, 11, 1))
    await run_due(pg, store, utc(2026, 12, 1))
    assert (await service(pg, svc["id"]))["status"] == "suspended"
    assert len(await notices(pg, account_id, "service_suspended")) == 1

    with pytest.raises(InputError, match=r"short by 1\.50"):
        await resume_service(pg, store, svc["id"], utc(2026, 12, 10, 15))
    assert (await service(pg, svc["id"]))["status"] == "suspended"

    await post_to_account(pg, store, A, "payment", 5_000_000, "bank transfer")
    resumed = await resume_service(pg, store, svc["id"], utc(2026, 12, 10, 15))

    assert (resumed["status"], resumed["anchor_day"], resumed["next_charge_at"]) == ("active", 10, utc(2027, 1, 10))
    line = (await service_lines(pg, svc["id"]))[-1]
    assert line["description"] == "DID 3612345678 rental 2026-12-10 – 2027-01-09"
    assert line["call_id"] == f"service:{svc['id']}:2026-12-10T00:00:00+00:00"
    assert len(await service_lines(pg, svc["id"])) == 2  # the suspended days are not charged
    assert await balances(pg, store, A) == (3_500_000, 3_500_000)
    with pytest.raises(InputError, match="is active"):
        await resume_service(pg, store, svc["id"], utc(2026, 12, 10, 16))

    assert (await run_due(pg, store, utc(2027, 1, 10))).charged == 1


async def test_without_credit_a_service_is_refused_or_left_to_the_scheduler(
        pg: asyncpg.Connection, store: RedisStore) -> None:
    account_id = await open_account(pg, store, balance=1_000_000)
    with pytest.raises(InputError, match=r"short by 0\.50"):
        await did(pg, store, utc(2026, 11, 1))
    assert await services_of(pg, A) == []
    assert await pg.fetchval("SELECT count(*) FROM ledger WHERE service_id IS NOT NULL") == 0

    svc = await did(pg, store, utc(2026, 11, 1), charge_now=False)
    assert (svc["status"], svc["next_charge_at"]) == ("active", utc(2026, 11, 1))
    report = await run_due(pg, store, utc(2026, 11, 1, 6))
    assert (report.charged, report.suspended) == (0, 1)
    assert [n["short_micro"] for n in await notices(pg, account_id, "service_suspended")] == [500_000]
    assert await balances(pg, store, A) == (1_000_000, 1_000_000)


async def test_a_cancelled_service_is_never_charged_and_frees_its_did(pg: asyncpg.Connection,
                                                                      store: RedisStore) -> None:
    await open_account(pg, store, A)
    await open_account(pg, store, B)
    svc = await did(pg, store, utc(2026, 11, 1))
    with pytest.raises(InputError, match=f"DID 3612345678 is already rented \\(account {A}\\)"):
        await did(pg, store, utc(2026, 11, 5), number=B)

    assert (await cancel_service(pg, svc["id"]))["status"] == "cancelled"
    assert (await run_due(pg, store, utc(2027, 3, 1))).charged == 0
    assert len(await service_lines(pg, svc["id"])) == 1  # and no refund line
    other = await did(pg, store, utc(2026, 11, 5), number=B)
    assert other["did"] == "3612345678"
    with pytest.raises(InputError, match="service 999 does not exist"):
        await cancel_service(pg, 999)


async def test_an_unknown_account_or_bad_input_is_refused(pg: asyncpg.Connection, store: RedisStore) -> None:
    await open_account(pg, store)
    with pytest.raises(InputError, match="account 7399999999 does not exist"):
        await did(pg, store, utc(2026, 11, 1), number="7399999999")
    with pytest.raises(InputError, match="tax class 'reduced' does not exist"):
        await did(pg, store, utc(2026, 11, 1), tax_class="reduced")
    with pytest.raises(InputError, match="period must be one of"):
        await did(pg, store, utc(2026, 11, 1), period="fortnight")
    with pytest.raises(InputError, match="needs a time zone"):
        await did(pg, store, datetime(2026, 11, 1))
    assert await pg.fetchval("SELECT count(*) FROM services") == 0
    assert await pg.fetchval("SELECT count(*) FROM ledger WHERE service_id IS NOT NULL") == 0


# -- expiry -------------------------------------------------------------------------------------------


async def redis_expiry(store: RedisStore, number: str) -> int:
    return int(await store.client.hget(account_key(number), "expires_at"))


async def test_after_creation_sets_expires_at_and_redis_sees_it(pg: asyncpg.Connection, store: RedisStore) -> None:
    account_id = await open_account(pg, store, expiry_mode="after_creation", expiry_days=30)
    await pg.execute("UPDATE accounts SET created_at = $2 WHERE id = $1", account_id, utc(2026, 10, 1, 9, 30))

    report = await run_due(pg, store, utc(2026, 10, 2))

    assert (report.expiry_set, report.expired, report.errors) == (1, 0, [])
    expires = await pg.fetchval("SELECT expires_at FROM accounts WHERE id = $1", account_id)
    assert expires == utc(2026, 10, 31, 9, 30)
    assert await redis_expiry(store, A) == int(expires.timestamp())
    assert (await run_due(pg, store, utc(2026, 10, 3))).expiry_set == 0

    # Passed: one notice, however many runs follow.
    assert (await run_due(pg, store, utc(2026, 10, 31, 9, 30))).expired == 1
    assert (await run_due(pg, store, utc(2026, 11, 5))).expired == 0
    assert await notices(pg, account_id, "expired") == [
        {"expires_at": "2026-10-31T09:30:00+00:00", "expiry_mode": "after_creation"}]

    # The operator gives it ten more days: Redis follows, and the new date gets its own notice.
    await pg.execute("UPDATE accounts SET expiry_days = 40 WHERE id = $1", account_id)
    assert (await run_due(pg, store, utc(2026, 11, 5))).expiry_set == 1
    assert await redis_expiry(store, A) == int(utc(2026, 11, 10, 9, 30).timestamp())
    assert (await run_due(pg, store, utc(2026, 11, 10, 10))).expired == 1
    assert len(await notices(pg, account_id, "expired")) == 2


async def test_after_first_use_starts_with_the_first_call(pg: asyncpg.Connection, store: RedisStore) -> None:
    account_id = await open_account(pg, store, expiry_mode="after_first_use", expiry_days=10)
    untouched = await open_account(pg, store, B, expiry_mode="after_first_use", expiry_days=10)

    assert (await run_due(pg, store, utc(2026, 11, 1))).expiry_set == 0
    assert await pg.fetchval("SELECT expires_at FROM accounts WHERE id = $1", account_id) is None
    assert await redis_expiry(store, A) == 0

    first_call = utc(2026, 11, 2, 18, 45)
    await postgres.write_calls(pg, [
        CallLine("pbx/1", A, -100_000, 60, "4930123", "Germany", first_call - timedelta(seconds=60), first_call),
        CallLine("pbx/2", A, -100_000, 60, "4930123", "Germany", first_call + timedelta(hours=1),
                 first_call + timedelta(hours=1, seconds=60)),
    ])
    report = await run_due(pg, store, utc(2026, 11, 3))

    assert (report.expiry_set, report.errors) == (1, [])
    row = await pg.fetchrow("SELECT first_use_at, expires_at FROM accounts WHERE id = $1", account_id)
    assert (row["first_use_at"], row["expires_at"]) == (first_call, utc(2026, 11, 12, 18, 45))
    assert await redis_expiry(store, A) == int(utc(2026, 11, 12, 18, 45).timestamp())
    assert await pg.fetchval("SELECT first_use_at FROM accounts WHERE id = $1", untouched) is None
    assert await redis_expiry(store, B) == 0


async def test_a_fixed_date_expiry_is_noticed_once_and_left_as_set(pg: asyncpg.Connection, store: RedisStore) -> None:
    account_id = await open_account(pg, store, expiry_mode="date", expires_at=utc(2026, 12, 31, 23))
    await open_account(pg, store, B, status="blocked", expires_at=utc(2026, 12, 1))

    assert (await run_due(pg, store, utc(2026, 12, 31, 22))).expired == 0
    report = await run_due(pg, store, utc(2027, 1, 1))
    assert (report.expired, report.expiry_set) == (1, 0)  # B is blocked already: no notice
    assert (await run_due(pg, store, utc(2027, 1, 2))).expired == 0
    assert await notices(pg, account_id, "expired") == [
        {"expires_at": "2026-12-31T23:00:00+00:00", "expiry_mode": "date"}]
    assert await pg.fetchval("SELECT expires_at FROM accounts WHERE id = $1", account_id) == utc(2026, 12, 31, 23)


async def test_a_closed_accounts_services_are_suspended_not_charged(pg: asyncpg.Connection, store: RedisStore) -> None:
    account_id = await open_account(pg, store)
    svc = await did(pg, store, utc(2026, 11, 1))
    await pg.execute("UPDATE accounts SET status = 'closed' WHERE id = $1", account_id)

    report = await run_due(pg, store, utc(2026, 12, 1))

    assert (report.charged, report.suspended, report.errors) == (0, 1, [])
    assert (await service(pg, svc["id"]))["status"] == "suspended"
    assert [n["reason"] for n in await notices(pg, account_id, "service_suspended")] == ["account_closed"]
    assert await balances(pg, store, A) == (8_500_000, 8_500_000)
