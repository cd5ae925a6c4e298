"""A call from authorization to ledger line, end to end: the daemon with its AMI connection to the simulated
Asterisk (a2bd/sim/ami.py, built from the recordings), the real PostgreSQL and Redis.

The simulated Asterisk runs the FastAGI session against the daemon, dials the route it was given, emits the
AMI events of the recorded calls, obeys the Hangup action and enforces the Dial L() limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from a2bd.adapters import postgres
from a2bd.adapters.redis_store import RedisStore, account_key, calls_key
from a2bd.config import (
    AgiSettings,
    AsteriskServer,
    BillingSettings,
    MetricsSettings,
    PostgresSettings,
    RedisSettings,
    Settings,
)
from a2bd.daemon import Daemon
from a2bd.domain.rating import SellRate, cost_micro
from a2bd.domain.tariff import BuyRate, RateEntry
from a2bd.observability import REGISTRY
from a2bd.sim.ami import CallSpec, SimAsterisk
from a2bd.sim.cdr import CdrTable, create_table
from a2bd.sim.proxy import proxied

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

SECRET = "sim-secret"
# 6.00 a minute, billed per second from the first: 0.10 a second, so credit runs out in seconds.
FAST = SellRate(rate_per_min_micro=6_000_000)
NORMAL = SellRate(rate_per_min_micro=120_000, initial_block_s=30, increment_s=6)
FAST_BUY = BuyRate(3_000_000)
NORMAL_BUY = BuyRate(60_000, 30, 6)

async def seed(pg: asyncpg.Connection) -> None:
    await postgres.add_provider(pg, "carrier-a", "PJSIP/{number}@carrier-a")
    # carrier-b stops taking traffic as soon as we owe it anything at all (balance limit of 1 micro-unit).
    await postgres.add_provider(pg, "carrier-b", "PJSIP/{number}@carrier-b", balance_limit_micro=1)
    await postgres.replace_tariff(pg, "retail", [
        RateEntry("99", "Fast test destination", FAST, "carrier-a", FAST_BUY),
        RateEntry("49", "Germany", NORMAL, "carrier-a", NORMAL_BUY),
        RateEntry("77", "Only via carrier-b", NORMAL, "carrier-b", NORMAL_BUY),
    ])
    add = postgres.create_account
    await add(pg, number="1000000001", tariff="retail", initial_balance_micro=10_000_000)
    await add(pg, number="1000000002", tariff="retail", initial_balance_micro=500_000)  # 0.50: 5 s of FAST
    await add(pg, number="1000000003", tariff="retail", initial_balance_micro=10_000_000, daily_limit_s=2)
    await add(pg, number="1000000004", tariff="retail", initial_balance_micro=10_000_000,
              low_credit_threshold_micro=9_990_000)
    await create_table(pg)
    await pg.execute("TRUNCATE cdr")


def fixes(action: str) -> float:
    return REGISTRY.get_sample_value("a2bd_reconcile_fixes_total", {"action": action}) or 0.0


@dataclass
class Rig:
    daemon: Daemon
    sim: SimAsterisk
    pg: asyncpg.Connection
    store: RedisStore

    async def call(self, spec: CallSpec) -> object:
        return await self.sim.call(spec)

    async def settled(self, account: str, timeout_s: float = 10.0) -> None:
        """Wait until the account has no live call left in Redis and the writer has nothing pending."""
        lifecycle = self.daemon.lifecycle
        assert lifecycle is not None
        async with asyncio.timeout(timeout_s):
            while await self.store.client.hlen(calls_key(account)) or lifecycle.writer.backlog:
                await asyncio.sleep(0.02)

    async def balances(self, account: str) -> tuple[int, int]:
        pg_balance = await self.pg.fetchval("SELECT balance_micro FROM accounts WHERE number = $1", account)
        redis_balance = int(await self.store.client.hget(account_key(account), "balance") or 0)
        return pg_balance, redis_balance


def settings_for(pg_url: str, redis_url: str, ami_port: int, *, cdr_table: str = "", **billing: object) -> Settings:
    return Settings(
        agi=AgiSettings(host="127.0.0.1", port=0),
        redis=RedisSettings(url=redis_url, timeout_s=0.5),
        postgres=PostgresSettings(url=pg_url),
        billing=BillingSettings(**{"cdr_wait_s": 1.0, "reconcile_cdr_age_s": 0, **billing}),  # type: ignore[arg-type]
        metrics=MetricsSettings(port=0),
        asterisk=(AsteriskServer(name="pbx1", host="127.0.0.1", port=ami_port, secret=SECRET, cdr_table=cdr_table),),
    ).validate()


@pytest.fixture
async def rig(pg: asyncpg.Connection, pg_url: str, store: RedisStore, redis_url: str) -> AsyncIterator[Rig]:
    await seed(pg)

    pg_pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=2)
    sim = SimAsterisk(username="a2bd", secret=SECRET, cdr_sink=CdrTable(pg_pool), seed=7)
    await sim.start()
    daemon = Daemon(settings_for(pg_url, redis_url, sim.port, cdr_table="cdr", reconcile_interval_s=3600))
    try:
        await daemon.start()
        assert daemon.agi is not None
        sim.agi = ("127.0.0.1", daemon.agi.port)
        yield Rig(daemon, sim, pg, store)
    finally:
        await daemon.close(grace_s=2)
        await sim.close()
        await pg_pool.close()


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_an_answered_call_is_billed_once_to_the_account_and_the_carrier(rig: Rig) -> None:
    rated, batches = metric("a2bd_calls_rated_total"), metric("a2bd_ledger_batch_lines_count")
    answered = metric("a2bd_calls_ended_total", {"disposition": "ANSWERED"})
    assert metric("a2bd_ami_connected", {"server": "pbx1"}) == 1
    result = await rig.sim.call(CallSpec(extension="4930123456", accountcode="1000000001", talk_s=1.2))
    assert (result.status, result.disposition) == ("OK", "ANSWERED")
    await rig.settled("1000000001")
    lines = await rig.pg.fetch("SELECT * FROM ledger WHERE kind = 'call'")
    assert len(lines) == 1
    line = lines[0]
    assert line["call_id"] == f"pbx1/{result.uniqueid}"
    assert line["seconds"] == result.billable_s
    assert line["amount_micro"] == -cost_micro(NORMAL, result.billable_s)
    assert line["provider_amount_micro"] == cost_micro(SellRate(60_000, initial_block_s=30, increment_s=6),
                                                      result.billable_s)
    pg_balance, redis_balance = await rig.balances("1000000001")
    assert pg_balance == redis_balance == 10_000_000 - cost_micro(NORMAL, result.billable_s)
    assert line["balance_after_micro"] == pg_balance
    owed = await rig.pg.fetchval("SELECT balance_micro FROM providers WHERE name = 'carrier-a'")
    assert owed == line["provider_amount_micro"]
    assert metric("a2bd_calls_rated_total") == rated + 1
    assert metric("a2bd_ledger_batch_lines_count") == batches + 1
    assert metric("a2bd_calls_ended_total", {"disposition": "ANSWERED"}) == answered + 1


@pytest.mark.parametrize("outcome", ["busy", "noanswer"])
async def test_an_unanswered_call_bills_nothing_and_frees_its_slot(rig: Rig, outcome: str) -> None:
    result = await rig.sim.call(CallSpec(extension="4930123456", accountcode="1000000001", outcome=outcome,  # type: ignore[arg-type]
                                         dial_timeout_s=0.3, ring_s=0.1))
    assert result.status == "OK"
    await rig.settled("1000000001")
    assert await rig.pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'") == 0
    assert await rig.balances("1000000001") == (10_000_000, 10_000_000)


async def test_three_calls_on_one_credit_are_cut_by_the_guard_where_their_limits_would_overspend(rig: Rig) -> None:
    # 0.50 of credit at 0.10 a second; answered at about 0, 0.5 and 1.0 s. Each call's own L() limit
    # (5 s, 4 s, 3 s: the credit less the others' first-second holds) would let them spend 1.20 together.
    specs = [CallSpec(extension="9912345", accountcode="1000000002", ring_s=ring, talk_s=30.0, cdr_first=None)
             for ring in (0.0, 0.5, 1.0)]
    results = await asyncio.gather(*(rig.sim.call(s) for s in specs))
    limits = [int(r.variables["A2B_LIMIT_MS"]) for r in results]
    would_spend = sum(cost_micro(FAST, ms // 1000) for ms in limits)
    assert would_spend > 500_000 + 3 * 100_000  # the L() timers alone overspend by more than the bound
    assert all(r.ended_by == "ami_hangup" for r in results), [r.ended_by for r in results]
    await rig.settled("1000000002")
    lines = await rig.pg.fetch("SELECT * FROM ledger WHERE kind = 'call' ORDER BY id")
    assert sorted(line["call_id"] for line in lines) == sorted(f"pbx1/{r.uniqueid}" for r in results)
    by_id = {line["call_id"]: line for line in lines}
    for r in results:
        line = by_id[f"pbx1/{r.uniqueid}"]
        # Billed for the seconds it really lasted (the Cdr of the cut call), and marked as cut.
        assert line["seconds"] == r.billable_s
        assert line["amount_micro"] == -cost_micro(FAST, r.billable_s)
        assert "cut by the credit guard" in line["description"]
    pg_balance, redis_balance = await rig.balances("1000000002")
    assert pg_balance == redis_balance
    # The account ends no lower than one increment (0.10) per live call below zero.
    assert pg_balance >= -3 * 100_000
    assert len(rig.sim.hangup_actions) == 3


async def test_a_call_that_ends_while_ami_is_down_is_rated_from_the_cdr_table(rig: Rig) -> None:
    lifecycle = rig.daemon.lifecycle
    assert lifecycle is not None
    before = fixes("rated_from_cdr")
    call = asyncio.create_task(rig.sim.call(CallSpec(extension="4930123456", accountcode="1000000001",
                                                     talk_s=1.5)))
    async with asyncio.timeout(5):
        while not rig.sim.live_channels() or not any(t.live for t in lifecycle.trackers.values()):
            await asyncio.sleep(0.02)
    await rig.sim.drop_ami()  # events of the call's end are lost, as with a real Asterisk
    rig.sim.stall_ami(True)  # and a2bd cannot log in again until the call is over
    result = await call
    rig.sim.stall_ami(False)
    await rig.settled("1000000001", timeout_s=20)
    line = await rig.pg.fetchrow("SELECT * FROM ledger WHERE kind = 'call'")
    assert line is not None and line["call_id"] == f"pbx1/{result.uniqueid}"
    assert line["seconds"] == result.billable_s
    assert await rig.pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'") == 1
    assert fixes("rated_from_cdr") == before + 1
    # Nothing of the call is left behind: no tracked call, nothing the credit guard still counts.
    async with asyncio.timeout(5):
        while any(t.live for t in lifecycle.trackers.values()) or lifecycle.guard.accounts:
            await asyncio.sleep(0.02)


async def test_a_call_that_ends_while_ami_is_down_without_a_cdr_table_is_released_and_reported(
    pg: asyncpg.Connection, pg_url: str, store: RedisStore, redis_url: str,
) -> None:
    await seed(pg)
    sim = SimAsterisk(username="a2bd", secret=SECRET, seed=3)
    await sim.start()
    daemon = Daemon(settings_for(pg_url, redis_url, sim.port, reconcile_interval_s=3600))
    try:
        await daemon.start()
        assert daemon.agi is not None and daemon.lifecycle is not None
        sim.agi = ("127.0.0.1", daemon.agi.port)
        before = fixes("unrated")
        call = asyncio.create_task(sim.call(CallSpec(extension="4930123456", accountcode="1000000001",
                                                     talk_s=1.0)))
        async with asyncio.timeout(5):
            while not any(c.answered_ms for t in daemon.lifecycle.trackers.values() for c in t.live.values()):
                await asyncio.sleep(0.02)
        await sim.drop_ami()
        sim.stall_ami(True)
        await call
        sim.stall_ami(False)
        async with asyncio.timeout(20):
            while await store.client.hlen(calls_key("1000000001")):
                await asyncio.sleep(0.02)
        # The money of that call is unknown (no event, no CDR row): its slot is freed, it is reported.
        assert fixes("unrated") == before + 1
        assert await pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'") == 0
    finally:
        await daemon.close(grace_s=2)
        await sim.close()


async def test_redis_restarted_empty_with_a_live_call_loses_nothing(rig: Rig) -> None:
    lifecycle = rig.daemon.lifecycle
    assert lifecycle is not None
    call = asyncio.create_task(rig.sim.call(CallSpec(extension="4930123456", accountcode="1000000001",
                                                     talk_s=2.0)))
    async with asyncio.timeout(5):
        while not any(c.answered_ms for t in lifecycle.trackers.values() for c in t.live.values()):
            await asyncio.sleep(0.02)
    await rig.store.client.flushdb()  # Redis restarted with nothing: reservations, balances, indexes gone
    async with asyncio.timeout(5):  # reloaded from PostgreSQL, and the live call registered again
        while not await rig.store.client.hlen(calls_key("1000000001")):
            await asyncio.sleep(0.05)
    result = await call
    async with asyncio.timeout(10):
        while (await rig.pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'") < 1
               or not await rig.store.is_synced() or lifecycle.writer.backlog):
            await asyncio.sleep(0.05)
    line = await rig.pg.fetchrow("SELECT * FROM ledger WHERE kind = 'call'")
    assert line["call_id"] == f"pbx1/{result.uniqueid}" and line["seconds"] == result.billable_s
    async with asyncio.timeout(5):  # the daemon reloaded Redis from PostgreSQL by itself
        while (pair := await rig.balances("1000000001"))[0] != pair[1]:
            await asyncio.sleep(0.05)
    assert pair[0] == 10_000_000 - cost_micro(NORMAL, result.billable_s)
    # And it authorizes again from the rebuilt state.
    again = await rig.sim.call(CallSpec(extension="4930123456", accountcode="1000000001", talk_s=0.2))
    assert again.status == "OK"


async def test_the_daily_minute_limit_of_an_account_caps_then_denies(rig: Rig) -> None:
    first = await rig.sim.call(CallSpec(extension="9912345", accountcode="1000000003", talk_s=5.0))
    assert first.variables["A2B_LIMIT_MS"] == "2000"  # 2 s left today, whatever the credit
    assert (first.ended_by, first.billable_s) == ("limit", 2)
    await rig.settled("1000000003")
    second = await rig.sim.call(CallSpec(extension="9912345", accountcode="1000000003", talk_s=1.0))
    assert (second.status, second.variables.get("A2B_HANGUPCAUSE")) == ("DAILYLIMIT", "34")


async def test_a_carrier_over_its_balance_limit_is_skipped_when_routing(rig: Rig) -> None:
    first = await rig.sim.call(CallSpec(extension="7712345", accountcode="1000000001", talk_s=1.1))
    assert first.status == "OK" and first.variables["A2B_ROUTE_1"] == "PJSIP/7712345@carrier-b"
    await rig.settled("1000000001")
    owed = await rig.pg.fetchval("SELECT balance_micro FROM providers WHERE name = 'carrier-b'")
    assert owed > 0  # the call's buy cost: now over its limit
    async with asyncio.timeout(5):  # every daemon re-reads carriers from Redis each second
        while (again := await rig.sim.call(CallSpec(extension="7712345", accountcode="1000000001",
                                                    talk_s=0.1))).status == "OK":
            await rig.settled("1000000001")
    assert again.status == "NOROUTE"


async def test_a_low_credit_notice_is_recorded_once_per_crossing(rig: Rig) -> None:
    for _ in range(2):  # the first call crosses 9.99; the second stays below: no second notice
        await rig.sim.call(CallSpec(extension="4930123456", accountcode="1000000004", talk_s=1.0))
        await rig.settled("1000000004")
    notices = await rig.pg.fetch(
        "SELECT n.* FROM notices n JOIN accounts a ON a.id = n.account_id WHERE a.number = '1000000004'")
    assert [n["kind"] for n in notices] == ["low_credit"]


async def test_postgresql_unreachable_while_calls_end_loses_and_doubles_nothing(
    pg: asyncpg.Connection, pg_url: str, store: RedisStore, redis_url: str,
) -> None:
    # The daemon reaches PostgreSQL only through a TCP proxy; the proxy refuses and drops connections for a
    # few seconds while calls end. Authorization goes on from Redis; the lines wait and are written after.
    await seed(pg)
    async with proxied(pg_url) as (proxy, via_proxy):
        sim = SimAsterisk(username="a2bd", secret=SECRET, seed=5)
        await sim.start()
        daemon = Daemon(settings_for(via_proxy, redis_url, sim.port, reconcile_interval_s=3600))
        try:
            await daemon.start()
            assert daemon.agi is not None and daemon.lifecycle is not None
            sim.agi = ("127.0.0.1", daemon.agi.port)
            await proxy.refuse()
            results = await asyncio.gather(*(
                sim.call(CallSpec(extension="4930123456", accountcode="1000000001", talk_s=0.5 + i / 10))
                for i in range(6)))
            assert all(r.status == "OK" and r.disposition == "ANSWERED" for r in results)
            async with asyncio.timeout(5):
                while daemon.lifecycle.writer.backlog < len(results):  # ended, rated, waiting
                    await asyncio.sleep(0.02)
            assert (REGISTRY.get_sample_value("a2bd_ledger_backlog") or 0) >= len(results)
            await asyncio.sleep(2)  # PostgreSQL stays away a while longer
            assert await pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'") == 0
            await proxy.restore()
            async with asyncio.timeout(20):
                while daemon.lifecycle.writer.backlog or await store.client.hlen(calls_key("1000000001")):
                    await asyncio.sleep(0.05)
        finally:
            await daemon.close(grace_s=2)
            await sim.close()
    lines = await pg.fetch("SELECT call_id, seconds, amount_micro FROM ledger WHERE kind = 'call'")
    assert sorted(r["call_id"] for r in lines) == sorted(f"pbx1/{r.uniqueid}" for r in results)
    spent = sum(cost_micro(NORMAL, r.billable_s) for r in results)
    assert await pg.fetchval("SELECT balance_micro FROM accounts WHERE number = '1000000001'") == 10_000_000 - spent
    assert int(await store.client.hget(account_key("1000000001"), "balance")) == 10_000_000 - spent
