"""The reconciler with the real PostgreSQL and Redis, asking the simulated Asterisk for its channels.

Each test builds the state a fault leaves behind (a daemon killed between the ledger commit and the Redis
settle, killed while PostgreSQL was away, an AMI outage with a CDR table, a server that cannot be reached)
and checks that one pass fixes it, and that a second pass finds nothing more to do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from a2bd.adapters import postgres
from a2bd.adapters.postgres import CallLine
from a2bd.adapters.redis_store import RedisStore, account_key, calls_key, ended_key
from a2bd.ami.client import AmiClient
from a2bd.config import AsteriskServer, Settings
from a2bd.domain.authorize import Route
from a2bd.domain.calls import CallRecord, EndedCall, encode_ended, encode_record
from a2bd.domain.rating import SellRate, cost_micro
from a2bd.domain.tariff import BuyRate, RateEntry
from a2bd.services.charging import LedgerWriter
from a2bd.services.lifecycle import list_channels
from a2bd.services.reconcile import Reconciler
from a2bd.services.sync import sync_redis
from a2bd.sim.ami import CallSpec, SimAsterisk
from a2bd.sim.cdr import create_table

pytestmark = pytest.mark.integration

ACCOUNT = "1000000001"
SELL = SellRate(rate_per_min_micro=120_000, increment_s=6)
BUY = BuyRate(60_000)


class Rig:
    def __init__(self, pg: asyncpg.Connection, pool: asyncpg.Pool, store: RedisStore, sim: SimAsterisk,
                 client: AmiClient, writer: LedgerWriter, reconciler: Reconciler) -> None:
        self.pg, self.pool, self.store, self.sim = pg, pool, store, sim
        self.client, self.writer, self.reconciler = client, writer, reconciler

    def record(self, uniqueid: str, answered_ms: int | None = None) -> CallRecord:
        rec = CallRecord(f"pbx1/{uniqueid}", ACCOUNT, "4930123", "Germany", "49", SELL,
                         (Route("carrier-a", "PJSIP/4930123@carrier-a", BUY),), int(time.time() * 1000) - 60_000)
        return rec.answered(answered_ms, "PJSIP/x-1", "carrier-a") if answered_ms else rec

    async def reserve(self, rec: CallRecord) -> None:
        now = int(time.time() * 1000)
        got = await self.store.reserve(ACCOUNT, rec.call_id, 10_000, now, now + 3_600_000, "", encode_record(rec))
        assert got is not None and got.outcome == "OK"

    async def balances(self) -> tuple[int, int]:
        pg_balance = await self.pg.fetchval("SELECT balance_micro FROM accounts WHERE number = $1", ACCOUNT)
        return pg_balance, int(await self.store.client.hget(account_key(ACCOUNT), "balance") or 0)


@pytest.fixture
async def rig(pg: asyncpg.Connection, pg_url: str, store: RedisStore) -> AsyncIterator[Rig]:
    await postgres.add_provider(pg, "carrier-a", "PJSIP/{number}@carrier-a")
    await postgres.replace_tariff(pg, "retail", [RateEntry("49", "Germany", SELL, "carrier-a", BUY)])
    await postgres.create_account(pg, number=ACCOUNT, tariff="retail", initial_balance_micro=10_000_000)
    await create_table(pg)
    await pg.execute("TRUNCATE cdr")
    await sync_redis(pg, store)
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=3)
    sim = SimAsterisk(username="a2bd", secret="s", auth_fail_delay_s=0)
    await sim.start()
    client = AmiClient("pbx1", "127.0.0.1", sim.port, "a2bd", "s")
    await client.start()
    writer = LedgerWriter(pool, store, batch_ms=1)
    writer.start()
    settings = Settings(asterisk=(AsteriskServer(name="pbx1", port=sim.port, secret="s", cdr_table="cdr"),)).validate()

    async def channels(name: str) -> list:  # type: ignore[type-arg]
        return await list_channels(client)

    reconciler = Reconciler(settings, store, pool, writer, list_channels=channels)
    try:
        yield Rig(pg, pool, store, sim, client, writer, reconciler)
    finally:
        await writer.close()
        await client.close()
        await sim.close()
        await pool.close()


async def test_killed_between_the_ledger_commit_and_the_redis_settle(rig: Rig) -> None:
    rec = rig.record("1795000000.1", answered_ms=int(time.time() * 1000) - 30_000)
    await rig.reserve(rec)
    now = datetime.now(UTC)
    # The commit happened; the daemon died before settle.lua ran: Redis still holds the call and the old balance.
    await postgres.write_calls(rig.pg, [CallLine(rec.call_id, ACCOUNT, -cost_micro(SELL, 30), 30, "4930123",
                                                 "Germany", now, now, "carrier-a", 30_000)])
    assert (await rig.balances())[1] == 10_000_000
    report = await rig.reconciler.run_once()
    assert report.settled == [rec.call_id]
    assert await rig.store.client.hlen(calls_key(ACCOUNT)) == 0
    pg_balance, redis_balance = await rig.balances()
    assert pg_balance == redis_balance == 10_000_000 - cost_micro(SELL, 30)
    again = await rig.reconciler.run_once()
    assert again.fixes == 0


async def test_killed_while_postgresql_was_away_the_kept_ended_calls_are_written_once(rig: Rig) -> None:
    rec = rig.record("1795000000.2", answered_ms=int(time.time() * 1000) - 40_000)
    await rig.reserve(rec)
    ended = EndedCall(rec, int(time.time() * 1000), 40, "ANSWERED")
    # What the writer kept, its slot parked at its price.
    await rig.store.record_ended(ACCOUNT, rec.call_id, encode_ended(ended), cost_micro(SELL, 40))
    report = await rig.reconciler.run_once()
    assert report.written == [rec.call_id]
    assert await rig.writer.drain(10)
    assert await rig.pg.fetchval("SELECT count(*) FROM ledger WHERE call_id = $1", rec.call_id) == 1
    assert await rig.store.client.hlen(ended_key(ACCOUNT)) == 0
    assert await rig.store.client.hget(account_key(ACCOUNT), "held") == "0"  # the parked price went
    pg_balance, redis_balance = await rig.balances()
    assert pg_balance == redis_balance == 10_000_000 - cost_micro(SELL, 40)
    assert (await rig.reconciler.run_once()).fixes == 0


async def test_a_gone_call_is_rated_from_its_dial_row_in_the_cdr_table(rig: Rig) -> None:
    rec = rig.record("1795000000.3", answered_ms=int(time.time() * 1000) - 20_000)
    await rig.reserve(rec)
    end = datetime.now(UTC).replace(tzinfo=None)
    await rig.pg.execute(
        'INSERT INTO cdr (accountcode, dst, lastapp, answer, "end", billsec, disposition, uniqueid)'
        " VALUES ($1, '4930123', 'Dial', $2, $3, 17, 'ANSWERED', '1795000000.3')",
        ACCOUNT, end, end,
    )
    report = await rig.reconciler.run_once()
    assert report.rated_from_cdr == [rec.call_id]
    assert await rig.writer.drain(10)
    line = await rig.pg.fetchrow("SELECT * FROM ledger WHERE call_id = $1", rec.call_id)
    assert (line["seconds"], line["amount_micro"]) == (17, -cost_micro(SELL, 17))
    assert (await rig.reconciler.run_once()).fixes == 0


async def test_a_gone_call_never_answered_is_released_and_one_answered_unseen_is_reported(rig: Rig) -> None:
    quiet = rig.record("1795000000.4")  # reserved, never answered as far as anyone saw
    lost = rig.record("1795000000.5", answered_ms=int(time.time() * 1000) - 5_000)
    await rig.reserve(quiet)
    await rig.reserve(lost)
    report = await rig.reconciler.run_once()
    assert report.released == [quiet.call_id]
    assert report.unrated == [lost.call_id]  # its money is unknown: no event, no CDR row
    assert await rig.store.client.hlen(calls_key(ACCOUNT)) == 0
    assert await rig.pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'") == 0


async def test_the_cdr_table_bills_calls_of_an_asterisk_whose_ami_is_down(rig: Rig) -> None:
    # AMI is down: channels cannot be listed, so reservations are not judged; the CDR table still bills the
    # calls a2bd holds a record of. Rows a2bd holds no record of are left alone: a leg that only inherited
    # the accountcode (a Local route running its own Dial) has a Dial row too, and must not bill twice.
    await rig.client.close()
    rec = rig.record("1795000000.6", answered_ms=int(time.time() * 1000) - 200_000)
    await rig.reserve(rec)
    end = datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=2)  # past reconcile_cdr_age_s
    await rig.pg.execute(
        'INSERT INTO cdr (accountcode, dst, lastapp, answer, "end", billsec, disposition, uniqueid) VALUES'
        " ($1, '4930123', 'Dial', $2, $2, 61, 'ANSWERED', '1795000000.6'),"
        " ($1, '4930123', 'Dial', $2, $2, 61, 'ANSWERED', '1795000000.60'),"  # no record: not provably ours
        " ($1, '4930999', 'Dial', $2, $2, 0, 'NO ANSWER', '1795000000.7'),"  # not billed
        " ('', '4930999', 'Dial', $2, $2, 9, 'ANSWERED', '1795000000.8'),"  # never authorized by a2bd
        " ($1, '4930999', 'Hangup', $2, $2, 9, 'ANSWERED', '1795000000.9'),"  # not the billed leg
        " ($1, '4930999', 'Dial', $3, $3, 9, 'ANSWERED', '1795000000.12')",  # just ended: AMI goes first
        ACCOUNT, end, datetime.now(UTC).replace(tzinfo=None),
    )
    report = await rig.reconciler.run_once()
    assert report.servers_unreachable == ["pbx1"]
    assert report.rated_from_cdr == [rec.call_id]
    assert await rig.writer.drain(10)
    line = await rig.pg.fetchrow("SELECT * FROM ledger WHERE kind = 'call'")
    assert (line["call_id"], line["amount_micro"]) == (rec.call_id, -cost_micro(SELL, 61))
    assert line["provider_amount_micro"] == cost_micro(SellRate(60_000), 61)
    assert await rig.store.client.hlen(calls_key(ACCOUNT)) == 0  # the settle freed its slot
    assert (await rig.reconciler.run_once()).fixes == 0


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A FastAGI server that says OK to every call (the daemon is not under test here)."""
    await reader.readuntil(b"\n\n")
    for command in (b"SET VARIABLE A2B_STATUS OK\n", b"SET VARIABLE A2B_LIMIT_MS 60000\n"):
        writer.write(command)
        await reader.readline()
    writer.close()


async def test_a_live_call_is_left_alone_and_an_unreachable_server_is_reported(rig: Rig) -> None:
    agi = await asyncio.start_server(answer_ok, "127.0.0.1", 0)
    rig.sim.agi = ("127.0.0.1", agi.sockets[0].getsockname()[1])
    try:
        call = asyncio.create_task(rig.sim.call(CallSpec(extension="4930123", talk_s=2.0)))
        async with asyncio.timeout(5):
            while not [c for c in rig.sim.live_channels() if c.application == "Dial"]:
                await asyncio.sleep(0.02)
        (leg,) = [c for c in rig.sim.live_channels() if c.application == "Dial"]
        live = rig.record(leg.uniqueid, answered_ms=int(time.time() * 1000))
        await rig.reserve(live)
        report = await rig.reconciler.run_once()
        assert report.fixes == 0 and report.servers_unreachable == []
        assert await rig.store.client.hexists(calls_key(ACCOUNT), live.call_id)  # untouched while it talks
        await call
    finally:
        agi.close()
        await agi.wait_closed()
    await rig.client.close()  # Asterisk unreachable now: its calls cannot be judged
    report = await rig.reconciler.run_once()
    assert report.servers_unreachable == ["pbx1"]
    assert report.fixes == 0
    assert await rig.store.client.hexists(calls_key(ACCOUNT), live.call_id)  # left as it is
