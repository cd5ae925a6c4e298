"""/healthz against the real Redis and PostgreSQL and a logged-in simulated Asterisk (AMI), each behind a
TCP proxy the test cuts: 200 while all answer, 503 naming the one that does not, 200 again once it is back."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from a2bd.adapters.redis_store import RedisStore
from a2bd.ami.client import AmiClient
from a2bd.api.health import daemon_health
from a2bd.api.metrics import start_metrics_server
from a2bd.sim.ami import SimAsterisk
from a2bd.sim.proxy import TcpProxy, proxied
from tests.e2e.test_metrics_endpoint import get

pytestmark = pytest.mark.integration

SECRET = "sim-secret"
ALL_OK = "redis: ok\npostgresql: ok\nami:pbx1: ok\n"


async def healthz(port: int) -> tuple[int, str]:
    status, body = await get(port, "/healthz")
    return int(status.split(" ", 2)[1]), body


async def until(port: int, status: int, timeout_s: float = 5.0) -> str:
    """Ask /healthz until it answers `status`; its body."""
    async with asyncio.timeout(timeout_s):
        while True:
            code, body = await healthz(port)
            if code == status:
                return body
            await asyncio.sleep(0.05)


@dataclass
class Rig:
    port: int
    redis: TcpProxy
    postgres: TcpProxy
    ami: TcpProxy
    client: AmiClient


@pytest.fixture
async def rig(pg_url: str, pg: asyncpg.Connection, redis_url: str) -> AsyncIterator[Rig]:
    async with proxied(redis_url) as (redis_proxy, redis_via), proxied(pg_url) as (pg_proxy, pg_via):
        store = RedisStore.from_url(redis_via, timeout_s=0.5)
        pool = await asyncpg.create_pool(pg_via, min_size=1, max_size=2)
        sim = SimAsterisk(username="a2bd", secret=SECRET)
        await sim.start()
        ami_proxy = TcpProxy("127.0.0.1", sim.port)
        await ami_proxy.start()
        client = AmiClient("pbx1", "127.0.0.1", ami_proxy.port, "a2bd", SECRET, reconnect_min_s=0.05,
                           reconnect_max_s=0.2, ping_interval_s=0.5, ping_timeout_s=0.5)
        await client.start()
        server = await start_metrics_server("127.0.0.1", 0, daemon_health(store, pool, {"pbx1": client}),
                                            health_ttl_s=0.1)
        try:
            yield Rig(server.sockets[0].getsockname()[1], redis_proxy, pg_proxy, ami_proxy, client)
        finally:
            server.close()
            await server.wait_closed()
            await client.close()
            await ami_proxy.close()
            await sim.close()
            await pool.close()
            await store.close()


async def test_ready_when_redis_postgresql_and_the_ami_answer(rig: Rig) -> None:
    assert rig.client.connected
    assert await healthz(rig.port) == (200, ALL_OK)


@pytest.mark.parametrize("cut", ["refuse", "blackhole", "stall"])
async def test_redis_cut_off_is_503_within_the_bound_then_200_when_back(rig: Rig, cut: str) -> None:
    assert await healthz(rig.port) == (200, ALL_OK)
    if cut == "stall":
        rig.redis.stall()  # connections stay open, nothing comes back: only the time bound ends the PING
    else:
        await getattr(rig.redis, cut)()
    await asyncio.sleep(0.15)  # past the cache
    status, body = await healthz(rig.port)
    assert status == 503
    redis, postgresql, ami = body.splitlines()
    assert redis.startswith("redis: ") and redis != "redis: ok"
    assert "PING" in redis
    if cut != "refuse":  # nothing answers: only a time bound (the store's or the check's) ended it
        assert re.search(r"within [0-9.]+ s$", redis), redis
    assert (postgresql, ami) == ("postgresql: ok", "ami:pbx1: ok")
    await rig.redis.restore()
    assert await until(rig.port, 200) == ALL_OK


async def test_postgresql_cut_off_is_503_then_200_when_back(rig: Rig) -> None:
    await rig.postgres.refuse()
    body = await until(rig.port, 503)
    assert body.splitlines()[0] == "redis: ok"
    assert body.splitlines()[1].startswith("postgresql: SELECT 1 failed: ")
    await rig.postgres.restore()
    assert await until(rig.port, 200) == ALL_OK


async def test_ami_down_is_503_until_the_client_is_logged_in_again(rig: Rig) -> None:
    await rig.ami.refuse()  # Asterisk gone: the connection drops and reconnecting is refused
    body = await until(rig.port, 503)
    assert body.splitlines()[:2] == ["redis: ok", "postgresql: ok"]
    assert body.splitlines()[2].startswith("ami:pbx1: not logged in (state ")
    await rig.ami.restore()
    assert await until(rig.port, 200) == ALL_OK
    assert rig.client.connected


async def test_without_a_pool_postgresql_is_not_checked(redis_url: str, store: RedisStore) -> None:
    check = daemon_health(store, None, {})
    assert await check() == {"redis": None}
