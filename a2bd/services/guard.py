"""The live credit guard: all answered calls of an account share one credit; at the instant they have used it
up together, hang them all up.

For each account with answered calls on the Asterisk servers this daemon watches, it keeps one timer at the
exhaustion instant (domain.calls.exhaustion_ms) computed from Redis: the balance and credit limit, every
answered call of the account on ANY server (their records carry answer time and rate), and ended calls not
yet in the balance. The instant is recomputed when a call of the account is answered or ends, or money is
posted to it, here or on another daemon: every change is published on the Redis channel `a2b:changed`,
and every daemon listens. Recomputations are coalesced: a burst of events on one account costs one Redis
read. When the timer fires, each of the account's calls on this daemon's servers gets the AMI Hangup
action; the tracker marks them, so their ledger lines say they were cut.

Accuracy: a call is billed on its whole answered seconds, so at the instant the total first exceeds the
credit, each call has crossed at most one billing step: the account ends at most one increment per live
call below zero (DESIGN §2). The Dial L() limit given at authorization remains the backstop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.exceptions import RedisError

from a2bd.adapters.redis_store import CHANGED_CHANNEL, RedisStore
from a2bd.domain.calls import CallRecord, decode_ended, decode_record, exhaustion_ms, rate_call
from a2bd.domain.rating import SellRate
from a2bd.errors import StoreUnavailable
from a2bd.observability import GUARD_HANGUPS, GUARD_LATENESS_SECONDS, GUARD_WATCHED

log = structlog.get_logger("a2bd.guard")

_READS_AT_ONCE = 32  # accounts recomputed concurrently (each one pipelined Redis read)
_RESEND_AFTER_MS = 2_000  # a call's Hangup is sent again only if it is still up this long after

# (server, channel) -> sent: True when Asterisk hung it up, False when it had no such channel any more.
Hangup = Callable[[str, str], Awaitable[bool]]


@dataclass(slots=True)
class Watched:
    """One account's answered calls on this daemon's servers, and its timer."""

    calls: dict[str, tuple[str, str, CallRecord]] = field(default_factory=dict)  # call id -> (server, channel, rec)
    timer: asyncio.TimerHandle | None = None
    due_ms: int | None = None
    hung_up_ms: dict[str, int] = field(default_factory=dict)  # call id -> when its Hangup was sent


@dataclass(frozen=True, slots=True)
class Cut:
    """A guard hangup, for the log, the metrics and the benchmark."""

    account: str
    call_id: str
    due_ms: int
    sent_ms: int


class CreditGuard:
    def __init__(
        self,
        store: RedisStore,
        hangup: Hangup,
        *,
        horizon_s: int = 4 * 3600,
        clock: Callable[[], float] = time.time,
        on_cut: Callable[[Cut], None] | None = None,
    ) -> None:
        self.store = store
        self.hangup = hangup
        self.horizon_ms = horizon_s * 1000
        self.clock = clock
        self.on_cut = on_cut
        self.accounts: dict[str, Watched] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self.cuts: list[Cut] = []  # bounded: the newest 10,000

    # -- what the tracker and the writer tell it ----------------------------------------------------------

    def answered(self, server: str, channel: str, record: CallRecord) -> None:
        watched = self.accounts.get(record.account)
        if watched is None:
            watched = self.accounts[record.account] = Watched()
            GUARD_WATCHED.set(len(self.accounts))
        watched.calls[record.call_id] = (server, channel, record)
        self.touch(record.account)

    def ended(self, account: str, call_id: str) -> None:
        watched = self.accounts.get(account)
        if watched is None or watched.calls.pop(call_id, None) is None:
            return
        watched.hung_up_ms.pop(call_id, None)
        if not watched.calls:
            if watched.timer is not None:
                watched.timer.cancel()
            del self.accounts[account]
            GUARD_WATCHED.set(len(self.accounts))
        else:
            self.touch(account)

    def touch(self, account: str) -> None:
        """The account's credit or calls changed: recompute its instant soon (coalesced)."""
        if account in self.accounts:
            self._dirty.add(account)
            self._wake.set()

    # -- running ------------------------------------------------------------------------------------------

    def start(self, listen: bool = True) -> None:
        self._runner = asyncio.create_task(self._run(), name="credit-guard")
        if listen:
            self._listener = asyncio.create_task(self._listen(), name="credit-guard-listener")

    async def close(self) -> None:
        for task in (self._runner, self._listener):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        for watched in self.accounts.values():
            if watched.timer is not None:
                watched.timer.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._dirty = list(self._dirty), set()
            # A bounded number of reads at a time: thousands of accounts touched at once (a change feed that
            # reconnected) must not take every connection of the pool the authorize path also uses.
            for start in range(0, len(batch), _READS_AT_ONCE):
                chunk = batch[start : start + _READS_AT_ONCE]
                results = await asyncio.gather(*(self.recompute(a) for a in chunk), return_exceptions=True)
                failed = [a for a, r in zip(chunk, results, strict=True) if isinstance(r, BaseException)]
                if failed:
                    log.warning("credit guard could not read Redis; retrying in a second", accounts=len(failed),
                                error=str(next(r for r in results if isinstance(r, BaseException))))
                    loop = asyncio.get_running_loop()
                    for account in failed:
                        loop.call_later(1.0, self.touch, account)

    async def _listen(self) -> None:
        """Follow `a2b:changed`: another daemon (or this one) moved an account's credit or calls."""
        delay = 0.2
        while True:
            pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANGED_CHANNEL)
                delay = 0.2
                async for message in pubsub.listen():
                    data = message.get("data")
                    if isinstance(data, str):
                        for account in data.split(","):
                            self.touch(account)
            except (RedisError, OSError) as exc:
                log.warning("credit guard lost the Redis change feed; resubscribing", error=str(exc))
                for account in list(self.accounts):
                    self.touch(account)  # changes may have been missed meanwhile
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped

    async def recompute(self, account: str) -> int | None:
        """Read the account's credit and calls, (re)arm its timer; returns the instant (Unix ms) or None."""
        watched = self.accounts.get(account)
        if watched is None:
            return None
        credit = await self.store.credit(account)
        watched = self.accounts.get(account)  # it may have ended while Redis answered
        if watched is None:
            return None
        if credit is None:
            raise StoreUnavailable(f"account {account} is not in Redis (run `a2bd sync`)")
        available = credit.balance_micro + credit.credit_limit_micro
        for text in credit.ended.values():  # ended, rated, not yet in the balance
            try:
                rated = rate_call(decode_ended(text))
            except (ValueError, KeyError, TypeError):
                continue
            if rated is not None:
                available += rated.amount_micro
        calls: dict[str, tuple[int, SellRate]] = {}
        for call_id, text in credit.records.items():
            try:
                rec = decode_record(text)
            except (ValueError, KeyError, TypeError):
                continue
            if rec.answered_ms is not None and call_id not in credit.ended:
                calls[call_id] = (rec.answered_ms, rec.sell)
        for call_id, (_server, _channel, rec) in watched.calls.items():
            if rec.answered_ms is not None and call_id not in credit.ended:
                calls.setdefault(call_id, (rec.answered_ms, rec.sell))  # ours, even before Redis has it
        now_ms = int(self.clock() * 1000)
        due = exhaustion_ms(available, list(calls.values()), now_ms, self.horizon_ms)
        if watched.timer is not None:
            watched.timer.cancel()
            watched.timer = None
        watched.due_ms = due
        if due is not None:
            loop = asyncio.get_running_loop()
            delay_s = max(0.0, (due - now_ms) / 1000)
            watched.timer = loop.call_at(loop.time() + delay_s, self._fire, account, due)
        return due

    def _fire(self, account: str, due_ms: int) -> None:
        watched = self.accounts.get(account)
        if watched is None:
            return
        watched.timer = None
        sent_ms = int(self.clock() * 1000)
        GUARD_LATENESS_SECONDS.observe(max(0, sent_ms - due_ms) / 1000)
        log.info("credit used up: hanging up the account's calls", account=account, calls=len(watched.calls),
                 late_ms=sent_ms - due_ms)
        for call_id, (server, channel, _rec) in list(watched.calls.items()):
            sent_before = watched.hung_up_ms.get(call_id)
            if sent_before is not None and sent_ms - sent_before < _RESEND_AFTER_MS:
                continue  # already being cut: its end events are on their way
            watched.hung_up_ms[call_id] = sent_ms
            cut = Cut(account, call_id, due_ms, sent_ms)
            self.cuts.append(cut)
            if len(self.cuts) > 10_000:
                del self.cuts[: len(self.cuts) - 10_000]
            GUARD_HANGUPS.inc()
            if self.on_cut is not None:
                self.on_cut(cut)
            task = asyncio.get_running_loop().create_task(self._hang_up(server, channel, call_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # If a hangup was lost (AMI down), the calls are still here in a moment: fire again then.
        asyncio.get_running_loop().call_later(2.0, self.touch, account)

    async def _hang_up(self, server: str, channel: str, call_id: str) -> None:
        try:
            if not await self.hangup(server, channel):
                log.info("guard hangup: the channel was already gone", call=call_id, channel=channel)
        except Exception as exc:  # one failed action must not stop the others; the L() limit stays
            log.error("guard hangup failed; the Dial limit still ends the call", call=call_id, channel=channel,
                      error=str(exc))
