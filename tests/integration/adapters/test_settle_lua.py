"""The scripts that move Redis after the ledger (settle, rebase, provider_settle) and keep live calls'
records (reserve, update_call, release) and ended ones (park), against the real Redis: double and
out-of-order settles, a missing account, an expired reservation, a negative balance, the daily limit across
midnight, calls parked while PostgreSQL is away."""

from __future__ import annotations

import pytest

from a2bd.adapters.redis_store import (
    RedisStore,
    account_key,
    calls_key,
    ended_key,
    expiry_key,
    parked_key,
    provider_key,
    record_key,
    utc_day,
)
from a2bd.domain.authorize import ReserveOutcome

pytestmark = pytest.mark.integration

NOW = 1_800_000_000_000  # 2027-01-15 08:00 UTC, in ms
LATER = NOW + 3_600_000
DAY = utc_day(NOW / 1000)
NEXT_DAY_MS = NOW + 16 * 3_600_000  # 2027-01-16 00:00 UTC
NUMBER = "7320000001"  # apart from other tests' accounts: Redis db 15 is shared by concurrent runs


async def put_account(store: RedisStore, *, balance: int = 10_000_000, credit_limit: int = 0, last_line_id: int = 1,
                      daily_limit_s: int = 0, today_s: int = 0, now_ms: int = NOW, max_calls: int = 0) -> None:
    await store.put_accounts([{
        "number": NUMBER, "status": "active", "tariff": "t", "balance_micro": balance,
        "credit_limit_micro": credit_limit, "max_calls": max_calls, "expires_at": None, "restrict_mode": "none",
        "restrict_prefixes": [], "timezone": "UTC", "currency": "EUR", "daily_limit_s": daily_limit_s,
        "last_line_id": last_line_id, "today_s": today_s,
    }], now_s=now_ms / 1000)


async def account_keys(store: RedisStore) -> list[str]:
    keys: list[str] = await store.client.keys(account_key(NUMBER) + "*")
    return keys


async def acct(store: RedisStore) -> dict[str, str]:
    fields: dict[str, str] = await store.client.hgetall(account_key(NUMBER))
    return fields


async def reserve(store: RedisStore, call_id: str, hold: int = 100_000, *, expires_ms: int = LATER,
                  now_ms: int = NOW, record: str = "") -> ReserveOutcome:
    r = await store.reserve(NUMBER, call_id, hold, now_ms, expires_ms, record=record)
    assert r is not None
    return r.outcome


# -- park.lua: ended calls whose ledger line waits (PostgreSQL away) ------------------------------------------


async def test_a_parked_call_frees_its_slot_and_holds_its_price_until_its_line_is_settled(store: RedisStore) -> None:
    await put_account(store, balance=1_000_000, max_calls=1)
    assert await reserve(store, "ast1/1", 100_000, record="{}") is ReserveOutcome.OK
    assert await reserve(store, "ast1/2", 100_000) is ReserveOutcome.MAXCALLS
    await store.record_ended(NUMBER, "ast1/1", '{"e":1}', 700_000)  # ended; PostgreSQL is away
    assert await store.client.hgetall(ended_key(NUMBER)) == {"ast1/1": '{"e":1}'}
    assert await store.parked(NUMBER) == {"ast1/1": 700_000}
    assert await store.client.exists(calls_key(NUMBER), expiry_key(NUMBER), record_key(NUMBER)) == 0
    assert (await acct(store))["held"] == "700000"
    # Its slot is free for the next call, and the credit left already counts what it cost.
    assert await reserve(store, "ast1/2", 400_000) is ReserveOutcome.NOFUNDS
    assert await reserve(store, "ast1/2", 300_000) is ReserveOutcome.OK
    assert (await acct(store))["held"] == "1000000"
    # Its line is written: the balance takes the price and the parked price is let go, once.
    assert await store.settle(NUMBER, 10, 300_000, DAY, [("ast1/1", 42)]) == (1, True)
    assert await store.settle(NUMBER, 10, 300_000, DAY, [("ast1/1", 0)]) == (0, True)
    a = await acct(store)
    assert (a["balance"], a["held"], a["today_s"]) == ("300000", "300000", "42")
    assert await store.client.exists(ended_key(NUMBER), parked_key(NUMBER)) == 0


async def test_parking_twice_or_after_the_settle_holds_nothing_more(store: RedisStore) -> None:
    await put_account(store, balance=1_000_000)
    await reserve(store, "ast1/1", 100_000)
    await store.record_ended_many([(NUMBER, "ast1/1", "{}", 250_000), (NUMBER, "ast1/1", "{}", 250_000)])
    await store.record_ended(NUMBER, "ast1/1", "{}", 250_000)  # kept again after a restart
    assert (await acct(store))["held"] == "250000"
    await store.settle(NUMBER, 10, 750_000, DAY, [("ast1/1", 30)])
    # A late keep (another daemon's reconciler) after the settle: kept for the reconciler, no price held.
    await store.record_ended(NUMBER, "ast1/1", "{}", 250_000)
    assert (await acct(store))["held"] == "0"
    assert await store.parked(NUMBER) == {}
    assert await store.client.hexists(ended_key(NUMBER), "ast1/1")


async def test_a_call_without_a_slot_is_kept_but_holds_no_price(store: RedisStore) -> None:
    await put_account(store, balance=1_000_000)
    await reserve(store, "ast1/old", 100_000, expires_ms=NOW + 1_000)
    await reserve(store, "ast1/new", 100_000, now_ms=NOW + 1_000)  # purges ast1/old, expired
    await store.record_ended(NUMBER, "ast1/old", "{}", 600_000)
    assert (await acct(store))["held"] == "100000"
    assert await store.client.hexists(ended_key(NUMBER), "ast1/old")


async def test_parking_for_a_missing_account_creates_no_partial_hash(store: RedisStore) -> None:
    await put_account(store)
    await reserve(store, "ast1/1", 100_000)
    await store.client.delete(account_key(NUMBER))  # Redis lost the account (sync brings it back whole)
    await store.record_ended(NUMBER, "ast1/1", "{}", 600_000)
    assert await store.client.exists(account_key(NUMBER), parked_key(NUMBER)) == 0
    assert await store.client.hexists(ended_key(NUMBER), "ast1/1")
    assert await store.client.hexists(calls_key(NUMBER), "ast1/1")  # the slot waits for the settle


async def test_a_parked_price_outlives_expiry_purges_and_releases(store: RedisStore) -> None:
    await put_account(store, balance=1_000_000)
    await reserve(store, "ast1/1", 100_000, expires_ms=NOW + 1_000)
    await store.record_ended(NUMBER, "ast1/1", "{}", 400_000)
    # Past the reservation's expiry a reserve purges expired slots: the parked price is not one of them.
    assert await reserve(store, "ast1/2", 700_000, now_ms=NOW + 5_000) is ReserveOutcome.NOFUNDS
    assert await store.release(NUMBER, "ast1/1") is False  # not a live call any more
    assert (await acct(store))["held"] == "400000"
    assert await store.parked(NUMBER) == {"ast1/1": 400_000}


async def test_parking_after_redis_forgot_its_scripts_loads_them_again(store: RedisStore) -> None:
    await put_account(store, balance=1_000_000)
    await reserve(store, "ast1/1", 100_000)
    await store.client.script_flush()  # Redis restarted or SCRIPT FLUSH
    await store.record_ended(NUMBER, "ast1/1", "{}", 250_000)
    assert (await acct(store))["held"] == "250000"
    assert await store.parked(NUMBER) == {"ast1/1": 250_000}


# -- settle.lua ------------------------------------------------------------------------------------------


async def test_settle_frees_the_calls_counts_their_seconds_and_sets_the_balance(store: RedisStore) -> None:
    await put_account(store)
    assert await reserve(store, "ast1/1", 300_000) is ReserveOutcome.OK
    assert await reserve(store, "ast1/2", 200_000) is ReserveOutcome.OK
    assert await store.settle(NUMBER, 10, 9_400_000, DAY, [("ast1/1", 60), ("ast1/2", 30)]) == (2, True)
    a = await acct(store)
    assert (a["balance"], a["lid"], a["held"], a["day"], a["today_s"]) == ("9400000", "10", "0", DAY, "90")
    assert await store.client.exists(calls_key(NUMBER), expiry_key(NUMBER)) == 0


async def test_a_second_settle_of_the_same_lines_moves_nothing(store: RedisStore) -> None:
    await put_account(store)
    await reserve(store, "ast1/1", 300_000)
    await reserve(store, "ast1/keep", 50_000)
    assert await store.settle(NUMBER, 10, 9_400_000, DAY, [("ast1/1", 60)]) == (1, True)
    after_first = await acct(store)
    # What the writer sends when it meets the line again (a replayed event: not fresh, 0 seconds).
    assert await store.settle(NUMBER, 10, 9_400_000, DAY, [("ast1/1", 0)]) == (0, True)
    assert await acct(store) == after_first
    assert (after_first["held"], after_first["today_s"], after_first["balance"]) == ("50000", "60", "9400000")
    assert await store.live_calls(NUMBER, NOW) == {"ast1/keep": 50_000}  # the other call keeps its slot


async def test_out_of_order_settles_keep_the_newer_balance(store: RedisStore) -> None:
    await put_account(store)
    await reserve(store, "ast1/old", 100_000)
    await reserve(store, "ast1/new", 100_000)
    # Two daemons: the one holding the newer line settles first.
    assert await store.settle(NUMBER, 21, 9_000_000, DAY, [("ast1/new", 40)]) == (1, True)
    assert await store.settle(NUMBER, 20, 9_500_000, DAY, [("ast1/old", 20)]) == (1, True)
    a = await acct(store)
    assert (a["balance"], a["lid"]) == ("9000000", "21")
    assert (a["held"], a["today_s"]) == ("0", "60")  # the older settle still frees its call and counts it


async def test_a_settle_of_a_line_older_than_the_loaded_balance_leaves_it(store: RedisStore) -> None:
    await put_account(store, balance=7_000_000, last_line_id=50)
    assert await store.settle(NUMBER, 49, 7_100_000, DAY, [("ast1/9", 5)]) == (0, True)
    a = await acct(store)
    assert (a["balance"], a["lid"], a["today_s"]) == ("7000000", "50", "5")


async def test_a_settle_for_a_missing_account_creates_no_partial_hash(store: RedisStore) -> None:
    await store.record_ended(NUMBER, "ast1/1", "{}", 50_000)
    assert await store.settle(NUMBER, 10, 5, DAY, [("ast1/1", 60)]) == (0, False)
    assert await account_keys(store) == []  # its :ended entry went; nothing was created


async def test_a_settle_after_the_account_hash_vanished_frees_the_slot_but_writes_no_balance(
    store: RedisStore,
) -> None:
    await put_account(store)
    await reserve(store, "ast1/1", 100_000, record="{\"id\":\"ast1/1\"}")
    await store.client.delete(account_key(NUMBER))
    assert await store.settle(NUMBER, 10, 5, DAY, [("ast1/1", 60)]) == (1, False)
    assert await account_keys(store) == []


async def test_settling_an_expired_reservation_frees_nothing_twice(store: RedisStore) -> None:
    await put_account(store, balance=1_000_000)
    assert await reserve(store, "ast1/old", 600_000, expires_ms=NOW + 1_000) is ReserveOutcome.OK
    # A reservation past its expiry is purged by the next reserve of the account.
    assert await reserve(store, "ast1/new", 300_000, now_ms=NOW + 1_000) is ReserveOutcome.OK
    assert (await acct(store))["held"] == "300000"
    assert await store.settle(NUMBER, 10, 400_000, DAY, [("ast1/old", 600)]) == (0, True)
    a = await acct(store)
    assert (a["held"], a["balance"], a["today_s"]) == ("300000", "400000", "600")  # the hold of ast1/new stays


async def test_settling_an_expired_but_not_purged_reservation_frees_it(store: RedisStore) -> None:
    await put_account(store, balance=1_000_000)
    await reserve(store, "ast1/old", 600_000, expires_ms=NOW + 1_000)
    assert await store.settle(NUMBER, 10, 400_000, DAY, [("ast1/old", 600)]) == (1, True)
    assert (await acct(store))["held"] == "0"
    assert await reserve(store, "ast1/new", 300_000, now_ms=NOW + 5_000) is ReserveOutcome.OK
    assert (await acct(store))["held"] == "300000"


async def test_a_negative_balance_is_stored_as_stated_and_refuses_new_calls(store: RedisStore) -> None:
    await put_account(store, balance=100_000, credit_limit=250_000)
    await reserve(store, "ast1/1", 100_000)
    assert await store.settle(NUMBER, 10, -400_000, DAY, [("ast1/1", 3_600)]) == (1, True)
    assert (await acct(store))["balance"] == "-400000"
    r = await store.reserve(NUMBER, "ast1/2", 1, NOW, LATER)
    assert r is not None and (r.outcome, r.credit_micro) == (ReserveOutcome.NOFUNDS, -150_000)
    assert await store.settle(NUMBER, 11, 600_000, DAY, []) == (0, True)  # a payment's line
    assert await reserve(store, "ast1/2", 1) is ReserveOutcome.OK


async def test_seconds_of_a_new_day_restart_the_count(store: RedisStore) -> None:
    await put_account(store, today_s=100)
    assert (await acct(store))["today_s"] == "100"
    await store.settle(NUMBER, 10, 1, DAY, [("ast1/1", 30)])
    assert (await acct(store))["today_s"] == "130"
    tomorrow = utc_day(NEXT_DAY_MS / 1000)
    await store.settle(NUMBER, 11, 1, tomorrow, [("ast1/2", 7)])
    a = await acct(store)
    assert (a["day"], a["today_s"]) == (tomorrow, "7")


# -- rebase.lua (a2bd sync) ------------------------------------------------------------------------------


async def rebase(store: RedisStore, line_id: int, balance: int, today_s: int = 0) -> int:
    result: int = await store._rebase(store.mux, [account_key(NUMBER)], [line_id, balance, DAY, today_s])
    return result


async def test_rebase_applies_only_when_redis_is_not_ahead(store: RedisStore) -> None:
    await put_account(store)
    await store.settle(NUMBER, 10, 500, DAY, [("ast1/1", 60)])
    assert await rebase(store, 9, 900, 5) == 0  # a snapshot older than the settle: refused
    a = await acct(store)
    assert (a["balance"], a["lid"], a["today_s"]) == ("500", "10", "60")
    assert await rebase(store, 10, 500, 60) == 1  # the same line: applied (nothing is newer in Redis)
    assert await rebase(store, 12, 300, 90) == 1
    a = await acct(store)
    assert (a["balance"], a["lid"], a["today_s"], a["day"]) == ("300", "12", "90", DAY)


async def test_rebase_loads_an_account_redis_has_never_seen(store: RedisStore) -> None:
    assert await rebase(store, 0, 42, 0) == 1
    a = await acct(store)
    assert (a["balance"], a["lid"]) == ("42", "0")


async def test_a_sync_from_an_older_snapshot_does_not_move_the_balance_back(store: RedisStore) -> None:
    await put_account(store, balance=1_000_000, last_line_id=5)
    await reserve(store, "ast1/1", 100_000)
    # A daemon settles line 6 while `a2bd sync` holds a snapshot taken before it (line 5, 1.00).
    await store.settle(NUMBER, 6, 700_000, DAY, [("ast1/1", 60)])
    await put_account(store, balance=1_000_000, last_line_id=5)
    a = await acct(store)
    assert (a["lid"], a["today_s"], a["balance"]) == ("6", "60", "700000")


# -- provider_settle.lua ---------------------------------------------------------------------------------


async def put_provider(store: RedisStore, *, balance: int = 1_000, last_line_id: int = 5, today_s: int = 60) -> None:
    await store.put_providers([{
        "name": "carrier-s", "dial_template": "PJSIP/{number}@a", "enabled": True, "balance_limit_micro": 0,
        "daily_limit_s": 0, "balance_micro": balance, "last_line_id": last_line_id, "today_s": today_s,
    }], now_s=NOW / 1000)


async def prov(store: RedisStore) -> dict[str, str]:
    fields: dict[str, str] = await store.client.hgetall(provider_key("carrier-s"))
    return fields


async def load_provider(store: RedisStore, line_id: int, balance: int, today_s: int) -> int:
    result: int = await store._provider_settle(store.mux, [provider_key("carrier-s")],
                                               [line_id, balance, DAY, today_s, "1"])
    return result


async def test_provider_settle_adds_seconds_and_sets_the_newest_balance(store: RedisStore) -> None:
    await put_provider(store)
    await store.settle_provider("carrier-s", 7, 1_300, DAY, 30)
    p = await prov(store)
    assert (p["balance"], p["lid"], p["today_s"], p["day"]) == ("1300", "7", "90", DAY)
    await store.settle_provider("carrier-s", 6, 1_200, DAY, 10)  # an older line, settled late
    p = await prov(store)
    assert (p["balance"], p["lid"], p["today_s"]) == ("1300", "7", "100")
    await store.settle_provider("carrier-s", 8, 1_400, utc_day(NEXT_DAY_MS / 1000), 4)
    p = await prov(store)
    assert (p["balance"], p["today_s"], p["day"]) == ("1400", "4", utc_day(NEXT_DAY_MS / 1000))


async def test_provider_load_replaces_the_days_count_unless_redis_is_ahead(store: RedisStore) -> None:
    await put_provider(store)
    await store.settle_provider("carrier-s", 7, 1_300, DAY, 30)
    assert await load_provider(store, 6, 1_200, 40) == 0  # older snapshot: nothing at all changes
    p = await prov(store)
    assert (p["balance"], p["lid"], p["today_s"]) == ("1300", "7", "90")
    assert await load_provider(store, 9, 1_900, 500) == 1  # the whole day's count, not added
    p = await prov(store)
    assert (p["balance"], p["lid"], p["today_s"]) == ("1900", "9", "500")
    await put_provider(store, balance=0, last_line_id=2, today_s=0)  # `a2bd sync` with an old snapshot
    p = await prov(store)
    assert (p["balance"], p["lid"], p["today_s"], p["name"]) == ("1900", "9", "500", "carrier-s")


async def test_provider_settle_of_an_unknown_provider_creates_nothing(store: RedisStore) -> None:
    await store.settle_provider("nobody", 7, 1_300, DAY, 30)
    assert await store.client.exists(provider_key("nobody")) == 0


# -- the live call's record: reserve, update_call, release, settle ---------------------------------------


async def test_reserve_stores_the_record_and_release_removes_it(store: RedisStore) -> None:
    await put_account(store)
    await reserve(store, "ast1/1", record='{"id":"ast1/1"}')
    assert await store.client.hget(record_key(NUMBER), "ast1/1") == '{"id":"ast1/1"}'
    assert await store.release(NUMBER, "ast1/1") is True
    assert await store.client.hexists(record_key(NUMBER), "ast1/1") == 0


async def test_a_refused_reservation_stores_no_record(store: RedisStore) -> None:
    await put_account(store, balance=10)
    assert await reserve(store, "ast1/1", 100_000, record='{"id":"ast1/1"}') is ReserveOutcome.NOFUNDS
    assert await store.client.exists(record_key(NUMBER)) == 0


async def test_settle_removes_the_record_and_the_ended_entry(store: RedisStore) -> None:
    await put_account(store)
    await reserve(store, "ast1/1", record='{"id":"ast1/1"}')
    await store.record_ended(NUMBER, "ast1/1", '{"e":1}', 50_000)
    await store.settle(NUMBER, 10, 9, DAY, [("ast1/1", 60)])
    assert await store.client.exists(record_key(NUMBER), ended_key(NUMBER), parked_key(NUMBER)) == 0
    assert [s async for s in store.live_state() if s.number == NUMBER] == []


async def test_a_purged_reservation_takes_its_record_with_it(store: RedisStore) -> None:
    await put_account(store)
    await reserve(store, "ast1/old", expires_ms=NOW + 10, record="old")
    await reserve(store, "ast1/new", now_ms=NOW + 10, record="new")
    assert await store.client.hgetall(record_key(NUMBER)) == {"ast1/new": "new"}


async def test_update_call_replaces_the_record_of_a_live_call_only(store: RedisStore) -> None:
    await put_account(store)
    await reserve(store, "ast1/1", record="dialling")
    assert await store.update_record(NUMBER, "ast1/1", "answered") is True
    assert await store.client.hget(record_key(NUMBER), "ast1/1") == "answered"
    await store.settle(NUMBER, 10, 9, DAY, [("ast1/1", 60)])
    # A late AnswerEvent after the call was settled must not bring the record back.
    assert await store.update_record(NUMBER, "ast1/1", "answered late") is False
    assert await store.client.exists(record_key(NUMBER)) == 0
    await reserve(store, "ast1/2", record="dialling")
    await store.release(NUMBER, "ast1/2")
    assert await store.update_record(NUMBER, "ast1/2", "answered") is False
    assert await store.update_record(NUMBER, "ast1/never", "answered") is False
    assert await store.client.exists(record_key(NUMBER)) == 0


# -- reserve.lua: the daily minute limit ---------------------------------------------------------------


async def test_the_daily_limit_refuses_once_reached_and_opens_again_the_next_utc_day(store: RedisStore) -> None:
    await put_account(store, daily_limit_s=600)
    r = await store.reserve(NUMBER, "ast1/1", 1, NOW, LATER)
    assert r is not None and (r.outcome, r.daily_left_s) == (ReserveOutcome.OK, 600)
    await store.settle(NUMBER, 10, 9_000_000, DAY, [("ast1/1", 450)])
    r = await store.reserve(NUMBER, "ast1/2", 1, NOW, LATER)
    assert r is not None and (r.outcome, r.daily_left_s) == (ReserveOutcome.OK, 150)
    await store.settle(NUMBER, 11, 8_000_000, DAY, [("ast1/2", 150)])
    r = await store.reserve(NUMBER, "ast1/3", 1, NOW + 1_000, LATER)
    assert r is not None and (r.outcome, r.daily_left_s) == (ReserveOutcome.DAILYLIMIT, 0)
    assert await store.live_calls(NUMBER, NOW) == {}  # refused: nothing reserved
    last_second = NEXT_DAY_MS - 1
    r = await store.reserve(NUMBER, "ast1/3", 1, last_second, last_second + 60_000)
    assert r is not None and r.outcome is ReserveOutcome.DAILYLIMIT
    r = await store.reserve(NUMBER, "ast1/3", 1, NEXT_DAY_MS, NEXT_DAY_MS + 60_000)
    assert r is not None and (r.outcome, r.daily_left_s) == (ReserveOutcome.OK, 600)


async def test_a_day_over_its_limit_reports_zero_left(store: RedisStore) -> None:
    await put_account(store, daily_limit_s=60, today_s=75)  # a sync of a day that went over (a long call)
    r = await store.reserve(NUMBER, "ast1/1", 1, NOW, LATER)
    assert r is not None and (r.outcome, r.daily_left_s) == (ReserveOutcome.DAILYLIMIT, 0)


async def test_no_daily_limit_reports_none(store: RedisStore) -> None:
    await put_account(store, today_s=999_999)
    r = await store.reserve(NUMBER, "ast1/1", 1, NOW, LATER)
    assert r is not None and (r.outcome, r.daily_left_s) == (ReserveOutcome.OK, None)



async def test_a_batch_of_settles_survives_redis_forgetting_its_scripts_and_counts_seconds_once(
    store: RedisStore,
) -> None:
    await put_account(store, balance=1_000_000)
    await reserve(store, "ast1/1", 100_000)
    await store.client.script_flush()  # Redis restarted its script cache (or an operator flushed it)
    missing = await store.settle_many([(NUMBER, 70, 900_000, [("ast1/1", 42)])], [], DAY)
    assert missing == []
    a = await acct(store)
    assert (a["balance"], a["lid"], a["today_s"], a["held"]) == ("900000", "70", "42", "0")
