"""The daemon on a free port, answering the simulated Asterisk, with the real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from structlog.testing import capture_logs

from a2bd import daemon as daemon_module
from a2bd.adapters import postgres
from a2bd.adapters.redis_store import RedisStore
from a2bd.config import (
    AgiSettings,
    BillingSettings,
    MetricsSettings,
    PostgresSettings,
    RedisSettings,
    Settings,
)
from a2bd.daemon import Daemon
from a2bd.domain.ratecard import parse_ratecard
from a2bd.domain.rating import SellRate, cost_micro, max_duration_s
from a2bd.observability import REGISTRY
from a2bd.sim.agi import SimResult, make_environment, run_session
from a2bd.sim.proxy import TcpProxy, proxied

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample_tariff.csv"
_ids = itertools.count(1)


def NOW_MS() -> int:
    return int(time.time() * 1000)


async def seed(pg: asyncpg.Connection) -> None:
    await postgres.add_provider(pg, "carrier-a", "PJSIP/{number}@carrier-a")
    await postgres.add_provider(pg, "carrier-b", "PJSIP/{number}@carrier-b")
    with SAMPLE.open(newline="") as fh:
        entries, errors = parse_ratecard(fh)
    assert errors == []
    await postgres.replace_tariff(pg, "retail", entries)
    add = postgres.create_account
    await add(pg, number="1000000001", tariff="retail", initial_balance_micro=10_000_000, max_calls=2)
    await add(pg, number="1000000002", tariff="retail", initial_balance_micro=5_000,
              callerids=["33123456789"])
    await add(pg, number="1000000003", tariff="retail", initial_balance_micro=0, status="blocked")
    await add(pg, number="1000000004", tariff="retail", initial_balance_micro=1_000_000,
              expires_at=datetime.now(UTC) - timedelta(days=1))
    await add(pg, number="1000000005", tariff="retail", initial_balance_micro=1_000_000, pin="4242",
              restrict_mode="deny", restrict_prefixes=["1900"])
    await add(pg, number="1000000006", tariff="retail", initial_balance_micro=-2_000_000,
              credit_limit_micro=50_000_000)


def settings_for(pg_url: str, redis_url: str, **billing: int) -> Settings:
    return Settings(
        agi=AgiSettings(host="127.0.0.1", port=0, env_timeout_s=1.0, command_timeout_s=1.0, pin_attempts=2),
        redis=RedisSettings(url=redis_url, timeout_s=0.3),
        postgres=PostgresSettings(url=pg_url),
        billing=BillingSettings(**billing),
        metrics=MetricsSettings(port=0),
    ).validate()


@pytest.fixture
async def daemon(pg: asyncpg.Connection, pg_url: str, store: RedisStore, redis_url: str) -> AsyncIterator[Daemon]:
    await seed(pg)
    d = Daemon(settings_for(pg_url, redis_url))
    await d.start()
    try:
        yield d
    finally:
        await d.close(grace_s=2)


async def call(d: Daemon, destination: str, *, accountcode: str = "", callerid: str = "5551234",
               digits: str = "", dead: bool = False) -> SimResult:
    assert d.agi is not None
    n = next(_ids)
    env = make_environment(uniqueid=f"1795374825.{n}", channel=f"Local/{destination}@billing-{n:08x};2",
                           extension=destination, callerid=callerid, accountcode=accountcode,
                           port=d.agi.port)
    return await run_session("127.0.0.1", d.agi.port, env, digits=digits, dead=dead, timeout_s=5)


def counter(status: str) -> float:
    return REGISTRY.get_sample_value("a2bd_authorizations_total", {"status": status}) or 0.0


async def test_ok_answer_carries_the_exact_limit_and_routes_cheapest_first(daemon: Daemon) -> None:
    before = counter("OK")
    result = await call(daemon, "33123456789", accountcode="1000000001")
    v = result.variables
    france = SellRate(20_000, initial_block_s=30, increment_s=6, grace_s=3)
    expected_s = max_duration_s(france, 10_000_000, daemon.settings.billing.max_call_s)
    assert v["A2B_STATUS"] == "OK"
    assert v["A2B_LIMIT_MS"] == str(expected_s * 1000)
    assert cost_micro(france, expected_s) <= 10_000_000
    assert (v["A2B_ROUTES"], v["A2B_ROUTE_1"], v["A2B_ROUTE_2"]) == (
        "2", "PJSIP/33123456789@carrier-b", "PJSIP/33123456789@carrier-a")
    assert v["CHANNEL(accountcode)"] == v["A2B_ACCOUNT"] == "1000000001"
    assert result.commands[-1] == "SET VARIABLE A2B_STATUS OK"  # the gate is set last
    assert result.server_closed
    assert counter("OK") == before + 1


async def test_caller_id_identifies_the_account_and_a_small_credit_gets_nofunds(daemon: Daemon) -> None:
    # 0.005 of credit does not pay France mobile's first block (30 s at 0.12/min = 0.06).
    result = await call(daemon, "33612345678", callerid="33123456789")
    assert result.variables["A2B_STATUS"] == "NOFUNDS"
    assert result.variables["A2B_HANGUPCAUSE"] == "21"
    assert result.variables["CHANNEL(accountcode)"] == "1000000002"
    # ... but it pays some seconds of France fixed (30 s block at 0.02/min = 0.01 > 0.005: still no)
    assert (await call(daemon, "33123456789", callerid="33123456789")).variables["A2B_STATUS"] == "NOFUNDS"
    # USA: block 6 s at 0.01/min = 0.001: pays 30 s
    us = await call(daemon, "12125551234", callerid="33123456789")
    assert (us.variables["A2B_STATUS"], us.variables["A2B_LIMIT_MS"]) == ("OK", "30000")


async def test_pin_is_asked_with_get_data_when_the_caller_is_unknown(daemon: Daemon) -> None:
    result = await call(daemon, "4420712345678", digits="4242")
    assert result.commands[0].startswith("GET DATA a2b/enter-pin")
    assert (result.variables["A2B_STATUS"], result.variables["A2B_ACCOUNT"]) == ("OK", "1000000005")


async def test_a_wrong_pin_twice_is_noaccount(daemon: Daemon) -> None:
    result = await call(daemon, "4420712345678", digits="9999")
    assert [c.split()[0:2] for c in result.commands[:2]] == [["GET", "DATA"], ["GET", "DATA"]]
    assert result.variables["A2B_STATUS"] == "NOACCOUNT"
    assert "CHANNEL(accountcode)" not in result.variables


@pytest.mark.parametrize(("accountcode", "destination", "status", "cause"), [
    ("1000000003", "33123456789", "BLOCKED", "21"),     # status blocked
    ("1000000004", "33123456789", "EXPIRED", "21"),     # expired yesterday
    ("1000000005", "19005551234", "BLOCKED", "21"),     # deny list
    ("1000000001", "8613912345678", "NORATE", "1"),     # no prefix in the tariff
    ("1000000001", "33abc", "NORATE", "1"),             # not a number
    ("9999999999", "33123456789", "NOACCOUNT", "21"),   # unknown account code
    ("12}34", "33123456789", "NOACCOUNT", "21"),        # garbage account code
])
async def test_refusals_carry_status_and_cause(daemon: Daemon, accountcode: str, destination: str,
                                               status: str, cause: str) -> None:
    result = await call(daemon, destination, accountcode=accountcode)
    assert (result.variables["A2B_STATUS"], result.variables["A2B_HANGUPCAUSE"]) == (status, cause)
    assert "A2B_LIMIT_MS" not in result.variables


async def test_postpaid_credit_limit_pays_despite_a_negative_balance(daemon: Daemon) -> None:
    result = await call(daemon, "447700900123", accountcode="1000000006")
    assert result.variables["A2B_STATUS"] == "OK"
    uk_mobile = SellRate(100_000, initial_block_s=60, increment_s=1, min_cost_micro=50_000)
    assert result.variables["A2B_LIMIT_MS"] == str(max_duration_s(uk_mobile, 48_000_000, 14400) * 1000)


async def test_concurrent_call_limit_counts_live_reservations(daemon: Daemon, store: RedisStore) -> None:
    first, second, third = await asyncio.gather(*(call(daemon, "33123456789", accountcode="1000000001")
                                                  for _ in range(3)))
    statuses = sorted(r.variables["A2B_STATUS"] for r in (first, second, third))
    assert statuses == ["MAXCALLS", "OK", "OK"]
    assert len(await store.live_calls("1000000001", NOW_MS())) == 2


async def test_a_caller_who_hung_up_during_the_agi_holds_no_slot(daemon: Daemon, store: RedisStore) -> None:
    result = await call(daemon, "33123456789", accountcode="1000000001", dead=True)
    assert result.variables["A2B_STATUS"] == "OK"  # SET VARIABLE works on a dead channel (transcript 10)
    for _ in range(50):  # the release follows the answer; bounded wait
        if not await store.live_calls("1000000001", NOW_MS()):
            break
        await asyncio.sleep(0.02)
    assert await store.live_calls("1000000001", NOW_MS()) == {}


async def test_an_answer_asterisk_never_read_frees_the_slot(daemon: Daemon, store: RedisStore) -> None:
    from a2bd.sim.agi import encode_environment

    assert daemon.agi is not None
    env = make_environment(uniqueid="1795374825.999", channel="Local/33123456789@billing-000003e7;2",
                           extension="33123456789", accountcode="1000000001", port=daemon.agi.port)
    eof_before = REGISTRY.get_sample_value("a2bd_agi_rejected_total", {"reason": "eof"}) or 0.0
    _, writer = await asyncio.open_connection("127.0.0.1", daemon.agi.port)
    writer.write(encode_environment(env))
    writer.close()  # gone before any reply: the server reads EOF where it expects "200 result=1"
    await writer.wait_closed()
    for _ in range(100):  # bounded wait for the session to end on that EOF
        if (REGISTRY.get_sample_value("a2bd_agi_rejected_total", {"reason": "eof"}) or 0.0) > eof_before:
            break
        await asyncio.sleep(0.02)
    assert (REGISTRY.get_sample_value("a2bd_agi_rejected_total", {"reason": "eof"}) or 0.0) == eof_before + 1
    assert await store.live_calls("1000000001", NOW_MS()) == {}
    # the slot is free again: two more calls fit in max_calls=2
    results = await asyncio.gather(*(call(daemon, "33123456789", accountcode="1000000001") for _ in range(2)))
    assert [r.variables["A2B_STATUS"] for r in results] == ["OK", "OK"]


async def test_a_known_account_costs_one_redis_command(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    assert daemon.store is not None
    sent: list[str] = []
    real = daemon.store.mux.execute

    async def counting(*args: str | int | bytes) -> object:
        sent.append(str(args[0]))
        return await real(*args)

    monkeypatch.setattr(daemon.store.mux, "execute", counting)
    assert (await call(daemon, "33123456789", accountcode="1000000001")).variables["A2B_STATUS"] == "OK"
    assert sent == ["HGETALL", "EVALSHA"]  # first sight of the account
    sent.clear()
    assert (await call(daemon, "33123456789", accountcode="1000000001")).variables["A2B_STATUS"] == "OK"
    assert sent == ["EVALSHA"]


async def test_a_status_change_is_seen_on_the_next_call(daemon: Daemon, pg: asyncpg.Connection,
                                                        store: RedisStore) -> None:
    from a2bd.services.sync import sync_redis

    async def status() -> str:
        return (await call(daemon, "33123456789", accountcode="1000000001")).variables["A2B_STATUS"]

    assert await status() == "OK"  # the daemon now remembers the account as active
    await pg.execute("UPDATE accounts SET status = 'blocked' WHERE number = '1000000001'")
    await sync_redis(pg, store)
    assert await status() == "BLOCKED"  # reserve.lua saw the version move
    await pg.execute("UPDATE accounts SET status = 'active' WHERE number = '1000000001'")
    await sync_redis(pg, store)
    assert await status() == "OK"  # a remembered refusal is checked against the version first


async def test_no_route_when_every_carrier_is_over_its_limit(daemon: Daemon, store: RedisStore) -> None:
    await store.client.hset("a2b:prov:carrier-a", mapping={"balance": "100", "balance_limit": "100"})
    await store.client.hset("a2b:prov:carrier-b", "enabled", "0")
    assert daemon.authorizer is not None
    await daemon.authorizer.providers.refresh()
    result = await call(daemon, "12125551234", accountcode="1000000001")
    assert (result.variables["A2B_STATUS"], result.variables["A2B_HANGUPCAUSE"]) == ("NOROUTE", "3")
    await store.client.hset("a2b:prov:carrier-b", "enabled", "1")
    await daemon.authorizer.providers.refresh()
    ok = await call(daemon, "12125551234", accountcode="1000000001")
    assert (ok.variables["A2B_ROUTES"], ok.variables["A2B_ROUTE_1"]) == ("1", "PJSIP/12125551234@carrier-b")


async def test_a_tariff_change_is_picked_up_without_restart(daemon: Daemon, pg: asyncpg.Connection) -> None:
    assert (await call(daemon, "8613912345678", accountcode="1000000001")).variables["A2B_STATUS"] == "NORATE"
    tariff_id = await pg.fetchval("SELECT id FROM tariffs WHERE name = 'retail'")
    await pg.execute("INSERT INTO rates (tariff_id, prefix, destination, rate_per_min_micro, provider_id)"
                     " VALUES ($1, '86', 'China', 30000, 1)", tariff_id)
    status = ""
    for _ in range(100):  # the NOTIFY reload is asynchronous; bounded wait
        status = (await call(daemon, "8613912345678", accountcode="1000000001")).variables["A2B_STATUS"]
        if status == "OK":
            break
        await asyncio.sleep(0.05)
    assert status == "OK"


@contextlib.asynccontextmanager
async def behind_a_proxy(pg: asyncpg.Connection, pg_url: str, redis_url: str,
                         **billing: int) -> AsyncIterator[tuple[Daemon, TcpProxy]]:
    """A seeded daemon whose Redis is reached through a proxy the test can cut."""
    await seed(pg)
    async with proxied(redis_url) as (proxy, url):
        d = Daemon(settings_for(pg_url, url, **billing))
        await d.start()
        try:
            yield d, proxy
        finally:
            await d.close(grace_s=2)


async def test_redis_down_fails_closed_and_recovers(pg: asyncpg.Connection, pg_url: str, store: RedisStore,
                                                    redis_url: str) -> None:
    async with behind_a_proxy(pg, pg_url, redis_url) as (d, proxy):
        assert (await call(d, "33123456789", accountcode="1000000001")).variables["A2B_STATUS"] == "OK"
        for cut in (proxy.refuse, proxy.blackhole):
            await cut()
            with capture_logs() as logs:
                result = await call(d, "33123456789", accountcode="1000000001")
            assert result.server_closed
            assert (result.variables["A2B_STATUS"], result.variables["A2B_HANGUPCAUSE"]) == ("ERROR", "38")
            assert any(e.get("status") == "ERROR" and "cannot decide" in e.get("reason", "") for e in logs)
            await proxy.restore()
        status = ""
        for _ in range(20):  # the pool reconnects on the next command; bounded retries
            status = (await call(d, "33123456789", accountcode="1000000001")).variables["A2B_STATUS"]
            if status == "OK":
                break
            await asyncio.sleep(0.1)
        assert status == "OK"


async def test_redis_emptied_answers_error_not_noaccount_until_reloaded(daemon: Daemon, store: RedisStore,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Redis restarted empty: every account is missing from it, and "no such account" would be a lie told
    # to the dialplan. The daemon answers ERROR until its watcher has reloaded Redis (within a second or so).
    # The watcher is held off until the first call has been answered, whatever this machine's speed.
    noticed = asyncio.Event()
    real_needs_sync = daemon_module.needs_sync

    async def needs_sync_once_noticed(s: RedisStore) -> bool:
        return noticed.is_set() and await real_needs_sync(s)

    monkeypatch.setattr(daemon_module, "needs_sync", needs_sync_once_noticed)
    assert (await call(daemon, "33123456789", accountcode="1000000001")).variables["A2B_STATUS"] == "OK"
    await store.client.flushdb()
    first = await call(daemon, "33123456789", accountcode="1000000001")
    assert (first.variables["A2B_STATUS"], first.variables["A2B_HANGUPCAUSE"]) == ("ERROR", "38")
    noticed.set()
    statuses = [first.variables["A2B_STATUS"]]
    async with asyncio.timeout(15):
        while statuses[-1] != "OK":
            await asyncio.sleep(0.2)
            statuses.append((await call(daemon, "33123456789", accountcode="1000000001")).variables["A2B_STATUS"])
    assert set(statuses) == {"ERROR", "OK"}  # never NOACCOUNT on the way
    unknown = await call(daemon, "33123456789", accountcode="9999999999")
    assert unknown.variables["A2B_STATUS"] == "NOACCOUNT"  # once loaded, an unknown account is NOACCOUNT again


async def test_fail_open_lets_a_known_postpaid_account_through(pg: asyncpg.Connection, pg_url: str,
                                                                store: RedisStore, redis_url: str) -> None:
    async with behind_a_proxy(pg, pg_url, redis_url, fail_open_limit_ms=120_000) as (d, proxy):
        for account in ("1000000006", "1000000001"):  # seen once while Redis is up
            assert (await call(d, "447700900123", accountcode=account)).variables["A2B_STATUS"] == "OK"
        await proxy.refuse()
        postpaid = await call(d, "447700900123", accountcode="1000000006")
        prepaid = await call(d, "447700900123", accountcode="1000000001")
        unseen = await call(d, "447700900123", accountcode="1000000002")
        assert (postpaid.variables["A2B_STATUS"], postpaid.variables["A2B_LIMIT_MS"]) == ("OK", "120000")
        assert prepaid.variables["A2B_STATUS"] == "ERROR"
        assert unseen.variables["A2B_STATUS"] == "ERROR"


async def test_daemon_refuses_to_start_on_an_unmigrated_database(servers: object, redis_url: str) -> None:
    from a2bd.devservers import Servers
    from a2bd.errors import ConfigError

    assert isinstance(servers, Servers)
    admin = await asyncpg.connect(servers.pg_url)
    name = "a2bd_test_unmigrated"
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = servers.pg_url.rsplit("/", 1)[0] + f"/{name}"
        d = Daemon(replace(settings_for(url, redis_url)))
        with pytest.raises(ConfigError, match="a2bd db migrate"):
            await d.start()
        await d.close(grace_s=1)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
