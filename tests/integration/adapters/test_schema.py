"""The schema enforces the money invariants itself, not only the code."""

from __future__ import annotations

import asyncpg
import pytest

from a2bd.adapters import postgres
from a2bd.errors import InputError

pytestmark = pytest.mark.integration


async def make_account(pg: asyncpg.Connection, balance: int = 5_000_000) -> asyncpg.Record:
    await postgres.replace_tariff(pg, "t", [])
    return await postgres.create_account(pg, number="1000000001", tariff="t", initial_balance_micro=balance)


async def test_migrate_is_idempotent_and_recorded(pg: asyncpg.Connection) -> None:
    assert await postgres.migrate(pg) == []
    versions = [r["version"] for r in await pg.fetch("SELECT version FROM schema_migrations")]
    assert versions == [m.version for m in postgres.migrations()]


async def test_an_edited_migration_is_refused(pg: asyncpg.Connection, tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    for mig in postgres.migrations():
        (folder / mig.path.name).write_text(mig.path.read_text() + "\n-- edited\n")
    with pytest.raises(InputError, match="changed after it was applied"):
        await postgres.migrate(pg, folder)


async def test_initial_balance_is_a_ledger_line_with_balance_after(pg: asyncpg.Connection) -> None:
    acct = await make_account(pg)
    assert acct["balance_micro"] == 5_000_000
    lines = await pg.fetch("SELECT kind, amount_micro, balance_after_micro FROM ledger")
    assert [tuple(r) for r in lines] == [("initial", 5_000_000, 5_000_000)]
    line = await postgres.post(pg, kind="charge", amount_micro=-1_250_000, account_id=acct["id"])
    assert line["balance_after_micro"] == 3_750_000


@pytest.mark.parametrize("statement", [
    "UPDATE ledger SET amount_micro = 1",
    "DELETE FROM ledger",
    "TRUNCATE ledger",
])
async def test_ledger_is_append_only(pg: asyncpg.Connection, statement: str) -> None:
    await make_account(pg)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await pg.execute(statement)
    assert await pg.fetchval("SELECT count(*) FROM ledger") == 1


async def test_balance_changes_only_through_the_ledger(pg: asyncpg.Connection) -> None:
    await make_account(pg)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="only through a ledger line"):
        await pg.execute("UPDATE accounts SET balance_micro = 999")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="starts at a zero balance"):
        await pg.execute("INSERT INTO accounts (number, tariff_id, balance_micro) VALUES ('2000000002', 1, 7)")
    # other fields of the account stay editable
    await pg.execute("UPDATE accounts SET max_calls = 3")


async def test_a_call_is_billed_once(pg: asyncpg.Connection) -> None:
    acct = await make_account(pg)
    await postgres.post(pg, kind="call", amount_micro=-100, account_id=acct["id"], call_id="ast1/1.1")
    with pytest.raises(asyncpg.UniqueViolationError):
        await postgres.post(pg, kind="call", amount_micro=-100, account_id=acct["id"], call_id="ast1/1.1")


async def test_rate_changes_bump_the_tariff_version_and_notify(pg: asyncpg.Connection, pg_url: str) -> None:
    import asyncio

    from a2bd.domain.rating import SellRate
    from a2bd.domain.tariff import RateEntry

    await postgres.replace_tariff(pg, "t", [])
    before = (await postgres.tariff_versions(pg))["t"]
    listener = await asyncpg.connect(pg_url)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("a2bd_tariffs", lambda *args: heard.put_nowait(args[2]))
    try:
        await postgres.replace_tariff(pg, "t", [RateEntry("33", "France", SellRate(10_000))])
        async with asyncio.timeout(5):
            await heard.get()
        await pg.execute("UPDATE rates SET rate_per_min_micro = 20000")
        async with asyncio.timeout(5):
            await heard.get()
    finally:
        await listener.close()
    assert (await postgres.tariff_versions(pg))["t"] == before + 2


async def test_import_with_unknown_provider_writes_nothing(pg: asyncpg.Connection) -> None:
    from a2bd.domain.rating import SellRate
    from a2bd.domain.tariff import RateEntry

    await postgres.replace_tariff(pg, "t", [RateEntry("33", "France", SellRate(10_000))])
    with pytest.raises(InputError, match="unknown provider"):
        await postgres.replace_tariff(pg, "t", [RateEntry("44", "UK", SellRate(1), provider="nope")])
    assert [r["prefix"] for r in await pg.fetch("SELECT prefix FROM rates")] == ["33"]


async def test_tariff_round_trip_shares_identical_rates(pg: asyncpg.Connection) -> None:
    from datetime import date

    from a2bd.domain.rating import SellRate
    from a2bd.domain.tariff import BuyRate, RateEntry

    await postgres.add_provider(pg, "carrier-a", "PJSIP/{number}@a")
    sell = SellRate(90_000, connect_micro=10_000, initial_block_s=30, increment_s=6, grace_s=3,
                    min_cost_micro=5_000)
    entries = [
        RateEntry("331", "France fixed", sell, "carrier-a", BuyRate(40_000, 30, 6), 0, 10079),
        RateEntry("336", "France mobile", sell, "carrier-a", BuyRate(50_000, 1, 1), 480, 1080,
                  date(2026, 1, 1), date(2026, 12, 31)),
    ]
    await postgres.replace_tariff(pg, "t", entries)
    loaded = await postgres.load_tariff_entries(pg, "t")
    assert loaded == entries
    assert loaded[0].sell is loaded[1].sell


async def test_provider_template_must_name_the_number(pg: asyncpg.Connection) -> None:
    with pytest.raises(InputError, match="must contain"):
        await postgres.add_provider(pg, "bad", "PJSIP/carrier")
    await postgres.add_provider(pg, "ok", "PJSIP/{number}@ok")
    with pytest.raises(InputError, match="already exists"):
        await postgres.add_provider(pg, "ok", "PJSIP/{number}@ok")
