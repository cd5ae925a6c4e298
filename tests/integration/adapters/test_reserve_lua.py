"""reserve.lua against the real Redis: concurrency, credit holds, expiry, negative balance, idempotence."""

from __future__ import annotations

import asyncio

import pytest

from a2bd.adapters.redis_store import RedisStore, account_key, account_to_hash, calls_key
from a2bd.domain.authorize import ReserveOutcome
from a2bd.errors import StoreUnavailable

pytestmark = pytest.mark.integration
NOW = 1_800_000_000_000
LATER = NOW + 3_600_000


async def put_account(store: RedisStore, number: str = "1000000001", *, balance: int = 10_000_000,
                      credit_limit: int = 0, max_calls: int = 0) -> str:
    await store.put_accounts([{
        "number": number, "status": "active", "tariff": "t", "balance_micro": balance,
        "credit_limit_micro": credit_limit, "max_calls": max_calls, "expires_at": None,
        "restrict_mode": "none", "restrict_prefixes": [], "timezone": "UTC", "currency": "EUR",
    }])
    return number


async def test_200_concurrent_reservations_on_5_slots_give_exactly_5_ok(store: RedisStore) -> None:
    number = await put_account(store, max_calls=5)
    results = await asyncio.gather(*(
        store.reserve(number, f"ast1/{i}", 100_000, NOW, LATER) for i in range(200)
    ))
    outcomes = [r.outcome for r in results]
    assert outcomes.count(ReserveOutcome.OK) == 5
    assert outcomes.count(ReserveOutcome.MAXCALLS) == 195
    assert len(await store.live_calls(number, NOW)) == 5


async def test_concurrent_reservations_cannot_overdraw_a_small_credit(store: RedisStore) -> None:
    # 1.00 of credit, each call holds its first block of 0.30: three calls fit, the burst of 50 gets 3.
    number = await put_account(store, balance=1_000_000)
    results = await asyncio.gather(*(
        store.reserve(number, f"ast1/{i}", 300_000, NOW, LATER) for i in range(50)
    ))
    ok = [r for r in results if r.outcome is ReserveOutcome.OK]
    assert len(ok) == 3
    assert sorted(r.credit_micro for r in ok) == [400_000, 700_000, 1_000_000]
    assert all(r.outcome is ReserveOutcome.NOFUNDS for r in results if r not in ok)


async def test_credit_limit_counts_as_available(store: RedisStore) -> None:
    number = await put_account(store, balance=-500_000, credit_limit=2_000_000)
    r = await store.reserve(number, "ast1/1", 100_000, NOW, LATER)
    assert (r.outcome, r.credit_micro, r.live_calls) == (ReserveOutcome.OK, 1_500_000, 1)


async def test_negative_balance_beyond_limit_is_nofunds_and_registers_nothing(store: RedisStore) -> None:
    number = await put_account(store, balance=-3_000_000, credit_limit=1_000_000)
    r = await store.reserve(number, "ast1/1", 1, NOW, LATER)
    assert (r.outcome, r.credit_micro) == (ReserveOutcome.NOFUNDS, -2_000_000)
    assert await store.live_calls(number, NOW) == {}


async def test_expired_reservation_no_longer_counts_and_is_purged(store: RedisStore) -> None:
    number = await put_account(store, balance=1_000_000, max_calls=1)
    first = await store.reserve(number, "ast1/old", 600_000, NOW, NOW + 1000)
    assert first.outcome is ReserveOutcome.OK
    blocked = await store.reserve(number, "ast1/new", 600_000, NOW + 999, LATER)
    assert blocked.outcome is ReserveOutcome.MAXCALLS
    after = await store.reserve(number, "ast1/new", 600_000, NOW + 1000, LATER)
    assert (after.outcome, after.credit_micro, after.live_calls) == (ReserveOutcome.OK, 1_000_000, 1)
    assert list(await store.live_calls(number, NOW)) == ["ast1/new"]


async def test_reserving_the_same_call_twice_takes_one_slot(store: RedisStore) -> None:
    number = await put_account(store, balance=1_000_000, max_calls=1)
    a = await store.reserve(number, "ast1/7", 300_000, NOW, LATER)
    b = await store.reserve(number, "ast1/7", 300_000, NOW, LATER)
    assert a.outcome is b.outcome is ReserveOutcome.OK
    assert a.credit_micro == b.credit_micro == 1_000_000
    assert len(await store.live_calls(number, NOW)) == 1


async def test_unknown_account_is_noaccount(store: RedisStore) -> None:
    r = await store.reserve("999999", "ast1/1", 1, NOW, LATER)
    assert r.outcome is ReserveOutcome.NOACCOUNT
    assert await store.client.exists(calls_key("999999")) == 0


async def test_script_is_reloaded_after_redis_forgets_it(store: RedisStore) -> None:
    number = await put_account(store)
    assert (await store.reserve(number, "ast1/1", 1, NOW, LATER)).outcome is ReserveOutcome.OK
    await store.client.script_flush()
    assert (await store.reserve(number, "ast1/2", 1, NOW, LATER)).outcome is ReserveOutcome.OK


async def test_held_total_follows_reserve_expiry_and_release(store: RedisStore) -> None:
    number = await put_account(store)
    await store.reserve(number, "ast1/1", 250_000, NOW, NOW + 10)
    await store.reserve(number, "ast1/2", 100_000, NOW, LATER)
    await store.reserve(number, "ast1/3", 40_000, NOW, LATER)
    assert await store.client.hget(account_key(number), "held") == "390000"
    assert await store.live_calls(number, NOW) == {"ast1/1": 250_000, "ast1/2": 100_000, "ast1/3": 40_000}
    assert await store.live_calls(number, NOW + 10) == {"ast1/2": 100_000, "ast1/3": 40_000}
    assert await store.release(number, "ast1/3") is True
    assert await store.release(number, "ast1/3") is False  # twice is harmless
    r = await store.reserve(number, "ast1/4", 1, NOW + 10, LATER)  # purges ast1/1 on the way
    assert (r.credit_micro, r.live_calls) == (10_000_000 - 100_000, 2)
    assert await store.client.hget(account_key(number), "held") == "100001"


async def test_a_sync_of_the_account_keeps_its_live_holds(store: RedisStore) -> None:
    number = await put_account(store, balance=1_000_000)
    await store.reserve(number, "ast1/1", 600_000, NOW, LATER)
    await put_account(store, balance=1_000_000)  # `a2bd sync` rewrites the hash from PostgreSQL
    r = await store.reserve(number, "ast1/2", 600_000, NOW, LATER)
    assert (r.outcome, r.credit_micro) == (ReserveOutcome.NOFUNDS, 400_000)


def test_account_hash_round_trip() -> None:
    from datetime import UTC, datetime

    from a2bd.adapters.redis_store import account_from_hash

    data = account_to_hash({
        "number": "42424242", "status": "blocked", "tariff": "retail", "balance_micro": -12,
        "credit_limit_micro": 5, "max_calls": 3, "expires_at": datetime(2030, 1, 1, tzinfo=UTC),
        "restrict_mode": "deny", "restrict_prefixes": ["1900", "44"], "timezone": "Europe/Paris",
        "currency": "EUR",
    })
    view = account_from_hash(data)
    assert (view.balance_micro, view.credit_limit_micro, view.max_calls) == (-12, 5, 3)
    assert view.restrict_prefixes == ("1900", "44")
    assert view.expires_at_s == 1893456000
    assert view.status.value == "blocked"


async def test_a_stale_version_reserves_nothing(store: RedisStore) -> None:
    number = await put_account(store, max_calls=1)
    known = await store.account(number)
    assert known is not None
    _, version = known
    assert version == await store.account_version(number) == "1"
    await put_account(store, max_calls=1)  # a sync from PostgreSQL: version 2
    assert await store.reserve(number, "ast1/1", 1, NOW, LATER, version) is None
    assert await store.live_calls(number, NOW) == {}
    fresh = await store.reserve(number, "ast1/1", 1, NOW, LATER, "2")
    assert fresh is not None and fresh.outcome is ReserveOutcome.OK


@pytest.mark.parametrize(("balance", "credit_limit"), [(2**53, 0), (0, 2**53), (-(2**53), 2**62)])
async def test_money_past_exact_lua_numbers_is_refused_not_rounded(store: RedisStore, balance: int,
                                                                   credit_limit: int) -> None:
    # 2^53 micro-units is 9,007,199,254 units: a double can no longer tell 2^53 from 2^53 + 1.
    number = await put_account(store, "1000000077", balance=balance, credit_limit=credit_limit)
    with pytest.raises(StoreUnavailable, match="holds money past 2\\^53 micro-units"):
        await store.reserve(number, "ast1/big", 1, NOW, LATER)
    assert await store.client.exists(calls_key(number)) == 0
    number = await put_account(store, "1000000078", balance=2**53 - 1)  # the last exact value: served
    reservation = await store.reserve(number, "ast1/ok", 1, NOW, LATER)
    assert reservation is not None and reservation.outcome is ReserveOutcome.OK
    assert reservation.credit_micro == 2**53 - 1
