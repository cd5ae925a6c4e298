"""The authorization path's Redis connection: many commands in flight, replies in order, failures bounded."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import hiredis
import pytest

from a2bd.adapters import redis_mux
from a2bd.adapters.redis_mux import RedisMux
from a2bd.adapters.redis_store import RedisStore
from a2bd.errors import StoreUnavailable
from a2bd.sim.proxy import proxied

pytestmark = pytest.mark.integration


async def answers_again(mux: RedisMux) -> None:
    """PING until the mux has a working connection again (bounded: 20 tries, 50 ms apart)."""
    for _ in range(20):
        try:
            assert await mux.execute("PING") == "PONG"
            return
        except StoreUnavailable:
            await asyncio.sleep(0.05)
    pytest.fail("the mux never reconnected")


async def test_concurrent_commands_get_their_own_replies(store: RedisStore, redis_url: str) -> None:
    await store.client.mset({f"mux:{i}": f"v{i}" for i in range(500)})
    mux = RedisMux(redis_url, timeout_s=2.0)
    try:
        replies = await asyncio.gather(*(mux.execute("GET", f"mux:{i}") for i in range(500)))
        assert replies == [f"v{i}" for i in range(500)]
        assert await mux.execute("INCRBY", "mux:n", 7) == 7
        assert await mux.execute("GET", "mux:absent") is None
    finally:
        mux.close()


async def test_an_error_reply_fails_only_its_command(store: RedisStore, redis_url: str) -> None:
    await store.client.set("mux:s", "text")
    mux = RedisMux(redis_url, timeout_s=2.0)
    try:
        results = await asyncio.gather(
            mux.execute("GET", "mux:s"), mux.execute("HGETALL", "mux:s"), mux.execute("GET", "mux:s"),
            return_exceptions=True,
        )
        assert results[0] == results[2] == "text"
        assert isinstance(results[1], hiredis.ReplyError) and "WRONGTYPE" in str(results[1])
    finally:
        mux.close()


async def test_the_database_of_the_url_is_selected(store: RedisStore, redis_url: str) -> None:
    assert redis_url.rsplit("/", 1)[1] != "0"  # a test database, never the default one
    await store.client.set("mux:db", "fifteen")
    mux = RedisMux(redis_url, timeout_s=2.0)
    try:
        assert await mux.execute("GET", "mux:db") == "fifteen"
    finally:
        mux.close()


async def test_a_stuck_redis_fails_every_command_in_flight_then_recovers(store: RedisStore, redis_url: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    async with proxied(redis_url) as (proxy, url):
        mux = RedisMux(url, timeout_s=0.2)
        try:
            assert await mux.execute("PING") == "PONG"
            await proxy.blackhole()  # connections accepted, nothing forwarded: Redis looks stuck
            with pytest.raises(StoreUnavailable, match="connection lost"):
                await mux.execute("PING")  # the connection in use was cut by the proxy
            accepted = proxy.accepted
            async with asyncio.timeout(5):  # they fail on the mux's own deadline; this only stops a hang
                results = await asyncio.gather(*(mux.execute("PING") for _ in range(20)), return_exceptions=True)
            # One shared connect attempt, into a Redis that never answers: all 20 get its failure together.
            assert {str(r) for r in results} == {"Redis unreachable: no connection within 0.2 s"}
            assert proxy.accepted == accepted + 1
            # ... and for one timeout period later calls fail at once, without another attempt. (The mux's
            # clock is held inside that period, however slowly this machine reaches the next line.)
            held = mux._down_until - 0.1
            with monkeypatch.context() as patch:
                patch.setattr(redis_mux, "time", SimpleNamespace(monotonic=lambda: held))
                with pytest.raises(StoreUnavailable, match="no connection within"):
                    await mux.execute("PING")
            assert proxy.accepted == accepted + 1
            await proxy.restore()
            await answers_again(mux)
        finally:
            mux.close()


async def test_a_connection_killed_by_the_server_is_reopened(store: RedisStore, redis_url: str) -> None:
    mux = RedisMux(redis_url, timeout_s=2.0)
    try:
        own_id = await mux.execute("CLIENT", "ID")
        # Only this connection: the Redis may serve others (a demo, a benchmark) at the same time.
        assert await store.client.client_kill_filter(_id=own_id) == 1
        await answers_again(mux)
    finally:
        mux.close()


async def test_unreachable_redis_is_store_unavailable() -> None:
    mux = RedisMux("redis://127.0.0.1:1/0", timeout_s=0.5)
    with pytest.raises(StoreUnavailable, match="Redis unreachable"):
        await mux.execute("PING")


async def test_a_redis_that_stalls_mid_connection_is_cut_at_the_deadline(store: RedisStore,
                                                                         redis_url: str) -> None:
    async with proxied(redis_url) as (proxy, url):
        mux = RedisMux(url, timeout_s=0.2)
        try:
            assert await mux.execute("PING") == "PONG"
            proxy.stall()  # the connection stays open; nothing comes back
            async with asyncio.timeout(5):
                results = await asyncio.gather(*(mux.execute("PING") for _ in range(10)), return_exceptions=True)
            assert {str(r) for r in results} == {"Redis did not answer within 0.2 s"}
            await proxy.restore()
            await answers_again(mux)
        finally:
            mux.close()
