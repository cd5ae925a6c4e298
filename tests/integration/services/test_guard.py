"""The credit guard against the real Redis: the shared instant, money moving it, and two daemons.

Hangups go to a recorder standing in for the AMI client (the end-to-end tests send them to the simulated
Asterisk); rates are high so that credit runs out in about a second.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from a2bd.adapters.redis_store import RedisStore
from a2bd.domain.authorize import Route
from a2bd.domain.calls import CallRecord, encode_record, spent_micro
from a2bd.domain.rating import SellRate
from a2bd.domain.tariff import BuyRate
from a2bd.services.guard import CreditGuard

pytestmark = pytest.mark.integration

ACCOUNT = "1000000077"
PER_SECOND = SellRate(rate_per_min_micro=6_000_000)  # 6.00 a minute = 0.10 a second, billed per second


class Hangups:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, float]] = []
        self.arrived = asyncio.Event()

    async def __call__(self, server: str, channel: str) -> bool:
        self.sent.append((server, channel, time.time()))
        self.arrived.set()
        return True

    async def wait_for(self, count: int, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.sent) < count:
                await self.arrived.wait()
                self.arrived.clear()


async def account(store: RedisStore, balance: int) -> None:
    await store.put_accounts([{
        "number": ACCOUNT, "status": "active", "tariff": "t", "balance_micro": balance,
        "credit_limit_micro": 0, "max_calls": 0, "expires_at": None, "restrict_mode": "none",
        "restrict_prefixes": [], "timezone": "UTC", "currency": "EUR",
    }])


async def answered_call(store: RedisStore, n: int, answered_ms: int, server: str = "pbx1") -> CallRecord:
    rec = CallRecord(f"{server}/17000.{n}", ACCOUNT, "4930", "Berlin", "49", PER_SECOND,
                     (Route("alpha", "PJSIP/4930@alpha", BuyRate(1)),), answered_ms)
    reservation = await store.reserve(ACCOUNT, rec.call_id, 100_000, answered_ms, answered_ms + 3_600_000, "",
                                      encode_record(rec))
    assert reservation is not None and reservation.outcome == "OK", reservation
    rec = rec.answered(answered_ms, f"PJSIP/alice-{n:08x}", "alpha")
    assert await store.update_record(ACCOUNT, rec.call_id, encode_record(rec))
    return rec


async def test_calls_answered_at_different_times_are_cut_together_when_the_shared_credit_runs_out(
    store: RedisStore,
) -> None:
    await account(store, 500_000)  # 0.50: five call-seconds at 0.10/s
    now_ms = int(time.time() * 1000)
    recs = [await answered_call(store, i, now_ms - 1000 * i) for i in range(3)]  # answered 0, 1, 2 s ago
    hangups = Hangups()
    guard = CreditGuard(store, hangups, horizon_s=3600)
    guard.start(listen=False)
    try:
        for rec in recs:
            guard.answered("pbx1", rec.channel, rec)
        await hangups.wait_for(3, timeout_s=10)
    finally:
        await guard.close()
    assert sorted(channel for _, channel, _ in hangups.sent) == sorted(r.channel for r in recs)
    (cut,) = {c.due_ms for c in guard.cuts}
    calls = [(r.answered_ms or 0, r.sell) for r in recs]
    # The instant is the first millisecond the three calls together cost more than the 0.50: cut there,
    # the account ends at most one increment (0.10) per call below zero.
    assert spent_micro(calls, cut - 1) <= 500_000 < spent_micro(calls, cut) <= 500_000 + 3 * 100_000
    # Alone, each call's own L() limit would have let it talk 5 s: 1.50 spent in all.
    assert all(sent_at * 1000 >= cut for _, _, sent_at in hangups.sent)


async def test_a_payment_posted_anywhere_moves_the_instant_later(store: RedisStore) -> None:
    await account(store, 1_000_000)
    now_ms = int(time.time() * 1000)
    rec = await answered_call(store, 1, now_ms)
    guard = CreditGuard(store, Hangups(), horizon_s=3600)
    guard.start(listen=True)
    try:
        guard.answered("pbx1", rec.channel, rec)
        async with asyncio.timeout(5):
            while guard.accounts[ACCOUNT].due_ms is None:
                await asyncio.sleep(0.01)
        before = guard.accounts[ACCOUNT].due_ms
        assert before is not None and before - rec.answered_ms <= 11_000  # type: ignore[operator]
        # Another daemon (here: the store directly) posts 1.00 and tells everyone on a2b:changed.
        await store.settle(ACCOUNT, 10**9, 2_000_000, "20261122", [])
        await asyncio.sleep(0.05)  # the subscription may still be starting
        await store.publish_changed([ACCOUNT])
        async with asyncio.timeout(5):
            while guard.accounts[ACCOUNT].due_ms == before:
                await store.publish_changed([ACCOUNT])
                await asyncio.sleep(0.05)
        after = guard.accounts[ACCOUNT].due_ms
        assert after is not None and after - before >= 9_000
    finally:
        await guard.close()


async def test_a_call_answered_on_another_daemon_brings_the_instant_sooner(store: RedisStore) -> None:
    await account(store, 1_000_000)
    now_ms = int(time.time() * 1000)
    ours = await answered_call(store, 1, now_ms, server="pbx1")
    guard = CreditGuard(store, Hangups(), horizon_s=3600)
    guard.start(listen=True)
    try:
        guard.answered("pbx1", ours.channel, ours)
        async with asyncio.timeout(5):
            while guard.accounts[ACCOUNT].due_ms is None:
                await asyncio.sleep(0.01)
        alone = guard.accounts[ACCOUNT].due_ms
        assert alone is not None
        await asyncio.sleep(0.05)
        await answered_call(store, 2, now_ms, server="pbx2")  # watched by another a2bd: only in Redis
        async with asyncio.timeout(5):
            while guard.accounts[ACCOUNT].due_ms == alone:
                await store.publish_changed([ACCOUNT])
                await asyncio.sleep(0.05)
        shared = guard.accounts[ACCOUNT].due_ms
        assert shared is not None and shared < alone  # two calls drain the same credit twice as fast
    finally:
        await guard.close()


async def test_an_ended_call_stops_being_watched(store: RedisStore) -> None:
    await account(store, 1_000_000)
    rec = await answered_call(store, 1, int(time.time() * 1000))
    guard = CreditGuard(store, Hangups(), horizon_s=3600)
    guard.start(listen=False)
    try:
        guard.answered("pbx1", rec.channel, rec)
        guard.ended(ACCOUNT, rec.call_id)
        assert ACCOUNT not in guard.accounts
    finally:
        await guard.close()


async def test_a_call_being_cut_is_not_sent_a_second_hangup_when_the_account_is_recomputed(
    store: RedisStore,
) -> None:
    await account(store, 300_000)  # 0.30, and two calls talking for 5 s at 0.10/s: over at once
    now_ms = int(time.time() * 1000)
    recs = [await answered_call(store, i, now_ms - 5_000) for i in range(2)]
    hangups = Hangups()
    guard = CreditGuard(store, hangups, horizon_s=3600)
    guard.start(listen=False)
    try:
        for rec in recs:
            guard.answered("pbx1", rec.channel, rec)
        await hangups.wait_for(2, timeout_s=5)
        assert len(guard.cuts) == 2
        # The first call ends; the account is recomputed and is still over, with the second call being cut:
        # the guard fires again for it, and must send nothing (a cut is appended as a hangup is sent).
        fired = asyncio.Event()
        fire = guard._fire

        def fire_and_tell(account_: str, due_ms: int) -> None:
            fire(account_, due_ms)
            fired.set()

        guard._fire = fire_and_tell  # type: ignore[method-assign,assignment]
        guard.ended(ACCOUNT, recs[0].call_id)
        async with asyncio.timeout(5):
            await fired.wait()
        assert len(guard.cuts) == 2
        assert sorted(channel for _, channel, _ in hangups.sent) == sorted(r.channel for r in recs)
    finally:
        await guard.close()
