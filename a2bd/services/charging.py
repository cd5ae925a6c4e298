"""Charging: an ended call becomes one ledger line (batched), then Redis is settled from what was written.

    tracker ──EndedCall──▶ submit() ──▶ queue ──▶ PostgreSQL: one batch (while it is away: kept in :ended)
                                                   ──▶ Redis: settle.lua per account, provider_settle.lua
                                                   ──▶ publish a2b:changed (every guard re-checks)

Order is what makes it exact. The ledger line is committed before Redis moves, and Redis is only ever SET to
the balance a committed line states (settle.lua), so a crash anywhere leaves Redis behind PostgreSQL, never
ahead, and the next settle or `a2bd sync` brings it level. A call is written at most once (the ledger's
unique (call_id, kind) and the batch's fresh-filter), so replays and restarts never bill twice. While
PostgreSQL is away the batch is retried with backoff and the queue grows (it is visible in the metrics),
and every waiting call is kept in Redis (`:ended`, park.lua), so a daemon killed meanwhile loses none: the
reconciler writes them at the next start. Keeping a call also frees its slot and holds its whole price in
place of its first block (`:parked`), so an outage neither refuses the account's next calls as MAXCALLS nor
lets them spend what the waiting calls cost; the settle after the write lets the price go.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import asyncpg
import structlog

from a2bd.adapters import postgres
from a2bd.adapters.postgres import CallLine, WrittenLine
from a2bd.adapters.redis_store import RedisStore, utc_day
from a2bd.domain.calls import EndedCall, RatedCall, encode_ended, rate_call
from a2bd.errors import StoreUnavailable
from a2bd.observability import (
    CALLS_RATED,
    LEDGER_BACKLOG,
    LEDGER_BATCH_LINES,
    LEDGER_COMMIT_SECONDS,
    LEDGER_REJECTED,
    LEDGER_RETRIES,
)

log = structlog.get_logger("a2bd.charging")

# PostgreSQL away (restarting, cut off, refusing): wait and retry the same batch. Anything else is a bug.
_PG_DOWN = (OSError, TimeoutError, asyncpg.exceptions.PostgresConnectionError, asyncpg.InterfaceError,
            asyncpg.CannotConnectNowError, asyncpg.ConnectionDoesNotExistError, asyncpg.TooManyConnectionsError)


def to_line(rated: RatedCall) -> CallLine:
    return CallLine(
        call_id=rated.call_id, account=rated.account, amount_micro=rated.amount_micro, seconds=rated.seconds,
        destination=rated.destination, description=rated.description,
        answered_at=datetime.fromtimestamp(rated.answered_ms / 1000, UTC),
        ended_at=datetime.fromtimestamp(rated.ended_ms / 1000, UTC),
        provider=rated.provider, provider_amount_micro=rated.provider_amount_micro, sell=rated.sell,
    )


class LedgerWriter:
    """Batches ended calls into the ledger and settles Redis after each commit.

    `submit` never blocks and never drops: the queue is unbounded on purpose (a call that ended is money;
    memory is the lesser risk, and the backlog gauge shows it growing).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: RedisStore,
        *,
        batch_lines: int = 500,
        batch_ms: int = 5,
        retry_max_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.store = store
        self.batch_lines = batch_lines
        self.batch_s = batch_ms / 1000
        self.retry_max_s = retry_max_s
        self.clock = clock
        self._queue: deque[tuple[RatedCall, EndedCall | None]] = deque()
        self._pending: set[str] = set()  # call ids queued or being written
        self._kept: set[str] = set()  # call ids kept in Redis during a PostgreSQL outage
        self._settling: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.written = 0  # fresh lines committed by this writer
        self.rejected: dict[str, RatedCall] = {}  # lines PostgreSQL refused (unknown account), by call id
        self.on_settled: Callable[[Sequence[WrittenLine]], None] | None = None

    @property
    def backlog(self) -> int:
        """Calls not yet committed (queued, or in the batch being written)."""
        return len(self._pending)

    def is_pending(self, call_id: str) -> bool:
        return call_id in self._pending

    def charge(self, call: EndedCall) -> None:
        """The tracker's sink: an answered call is queued for the ledger; any other frees its slot."""
        if self.submit(call) is None:
            task = asyncio.get_running_loop().create_task(self._release(call))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _release(self, call: EndedCall) -> None:
        try:
            await self.store.release(call.record.account, call.record.call_id)
            await self.store.publish_changed([call.record.account])
        except StoreUnavailable as exc:
            log.warning("could not free an unanswered call's slot; the reconciler will", call=call.record.call_id,
                        error=str(exc))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ledger-writer")

    def submit(self, call: EndedCall) -> RatedCall | None:
        """Queue an ended call; returns its line, or None when it bills nothing (the caller frees its slot)."""
        rated = rate_call(call)
        if rated is not None and rated.call_id not in self._pending:
            self._pending.add(rated.call_id)
            self._queue.append((rated, call))
            self._signal()
        return rated

    def submit_rated(self, rated: RatedCall) -> None:
        """Queue a line recovered from Redis or from the CDR table (already rated, already kept)."""
        if rated.call_id in self._pending:
            return
        self._pending.add(rated.call_id)
        self._queue.append((rated, None))
        self._signal()

    def _signal(self) -> None:
        LEDGER_BACKLOG.set(len(self._pending))
        self._idle.clear()
        self._wake.set()

    async def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued so far is written (or the timeout): True when empty."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout_s: float = 10.0) -> None:
        """Flush what is queued (bounded), then stop. Lines left are still in Redis (:ended)."""
        if self._task is None:
            return
        flushed = await self.drain(timeout_s)
        if not flushed:
            log.error("ledger writer stopped with lines unwritten; they stay in Redis for the reconciler",
                      backlog=len(self._pending))
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout_s)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        if self._settling is not None:
            await asyncio.wait([self._settling], timeout=timeout_s)
            self._settling = None

    # -- the loop ----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._settling is not None:
                    await self._settling
                    self._settling = None
                    continue
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            if len(self._queue) < self.batch_lines:
                await asyncio.sleep(self.batch_s)  # let a batch gather: one commit for many calls
            batch = [self._queue.popleft() for _ in range(min(self.batch_lines, len(self._queue)))]
            try:
                written = await self._write(batch)
            except Exception:  # the writer must outlive any one bad batch; logged with its trace
                log.exception("ledger batch failed; writing its lines one by one", lines=len(batch))
                written = await self._write_singly(batch)
            for rated, _ in batch:
                self._pending.discard(rated.call_id)
            LEDGER_BACKLOG.set(len(self._pending))
            # Settle this batch while the next one is written: Redis and PostgreSQL work side by side.
            # One settle in flight at most; their order does not matter (settle.lua: newest line wins).
            if self._settling is not None:
                await self._settling
            self._settling = asyncio.create_task(self._settle_logged(written), name="ledger-settle")

    async def _write_singly(self, batch: Sequence[tuple[RatedCall, EndedCall | None]]) -> list[WrittenLine]:
        """A batch PostgreSQL refused for a reason other than being away (a line it will not take): write
        each line alone, so that one bad line holds back only itself. Each line that still fails is named in
        the log and kept in Redis (:ended) for the reconciler and an operator."""
        written: list[WrittenLine] = []
        for item in batch:
            try:
                written += await self._write([item])
            except Exception as exc:
                rated = item[0]
                LEDGER_REJECTED.inc()
                log.error("call not written: PostgreSQL refused its line; kept in Redis for the reconciler",
                          call=rated.call_id, account=rated.account, amount_micro=rated.amount_micro,
                          seconds=rated.seconds, error=f"{type(exc).__name__}: {exc}")
                await self._keep([item])
        return written

    async def _settle_logged(self, written: Sequence[WrittenLine]) -> None:
        try:
            await self._settle(written)
        except Exception:  # a settle that fails is levelled by the next one or by sync; never fatal
            log.exception("settling a written batch in Redis failed", lines=len(written))

    async def _keep(self, items: Sequence[tuple[RatedCall, EndedCall | None]], *, remember: bool = True) -> None:
        """Put ended calls in Redis while PostgreSQL is away (or refuses them, or a batch fails): a daemon
        killed meanwhile loses none (the reconciler writes them at the next start), their slots are freed
        and their prices held (park.lua). Best effort: without Redis they are still in memory. Only then:
        when the ledger answers, a call is committed a few milliseconds after it ends and keeping it first
        would double the Redis work of every call."""
        todo = [(rated, call) for rated, call in items
                if call is not None and not (remember and rated.call_id in self._kept)]
        if not todo:
            return
        try:
            # A call's line debits the account (amount_micro < 0): its price is what stays held.
            await self.store.record_ended_many([(r.account, r.call_id, encode_ended(c), max(-r.amount_micro, 0))
                                                for r, c in todo if c is not None])
            if remember:  # not to keep them again at each retry of the outage
                self._kept.update(rated.call_id for rated, _ in todo)
        except StoreUnavailable as exc:
            log.warning("could not keep ended calls in Redis while PostgreSQL is away", error=str(exc))

    async def _write(self, batch: Sequence[tuple[RatedCall, EndedCall | None]]) -> list[WrittenLine]:
        lines = [to_line(rated) for rated, _ in batch]
        delay = 0.05
        while True:
            started = time.perf_counter()
            try:
                async with self.pool.acquire(timeout=5.0) as conn:
                    written = await postgres.write_calls(conn, lines)
                break
            except (asyncpg.UniqueViolationError, asyncpg.TransactionRollbackError):
                # Another daemon wrote one of these calls between our filter and our insert (the retry's
                # filter sees its line and writes only the others), or locked the same accounts in another
                # order (deadlock): the batch is simply run again.
                LEDGER_RETRIES.labels("race").inc()
                continue
            except _PG_DOWN as exc:
                LEDGER_RETRIES.labels("unavailable").inc()
                await self._keep([*batch, *self._queue])  # this batch and all that waits behind it
                log.warning("PostgreSQL unavailable; ledger batch waits", lines=len(lines), backlog=len(self._pending),
                            retry_in_s=round(delay, 2), error=str(exc) or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
        LEDGER_COMMIT_SECONDS.observe(time.perf_counter() - started)
        LEDGER_BATCH_LINES.observe(len(lines))
        if self._kept:
            self._kept.difference_update(rated.call_id for rated, _ in batch)
        fresh = sum(1 for w in written if w.fresh)
        self.written += fresh
        CALLS_RATED.inc(fresh)
        found = {w.call_id for w in written}
        refused = [(rated, call) for rated, call in batch if rated.call_id not in found]
        for rated, _ in refused:
            if rated.call_id in self.rejected:
                continue  # resubmitted by a reconcile pass: reported once
            LEDGER_REJECTED.inc()
            self.rejected[rated.call_id] = rated
            log.error("call not written: its account is not in PostgreSQL", call=rated.call_id,
                      account=rated.account, amount_micro=rated.amount_micro)
        if refused:
            # Kept in Redis (:ended) and in `rejected`: `a2bd reconcile` writes them once the account exists.
            await self._keep(refused, remember=False)
        return written

    async def _settle(self, written: Sequence[WrittenLine]) -> None:
        """Move Redis to what was committed: per account one settle.lua, per provider one provider_settle."""
        day = utc_day(self.clock())
        accounts: dict[str, list[WrittenLine]] = {}
        providers: dict[str, list[WrittenLine]] = {}
        for line in written:
            accounts.setdefault(line.account, []).append(line)
            if line.provider is not None:
                providers.setdefault(line.provider, []).append(line)
        account_jobs = []
        for number, lines in accounts.items():
            newest = max(lines, key=lambda w: w.line_id)
            calls = [(w.call_id, w.seconds if w.fresh else 0) for w in lines]
            account_jobs.append((number, newest.line_id, newest.balance_after_micro, calls))
        provider_jobs = []
        for name, lines in providers.items():
            newest = max(lines, key=lambda w: w.line_id)
            assert newest.provider_balance_after_micro is not None
            seconds = sum(w.seconds for w in lines if w.fresh)
            provider_jobs.append((name, newest.line_id, newest.provider_balance_after_micro, seconds))
        try:
            missing = await self.store.settle_many(account_jobs, provider_jobs, day)
            if missing:
                log.warning("accounts missing from Redis at settle; the next sync loads them", accounts=len(missing))
            await self.store.publish_changed(accounts)
        except StoreUnavailable as exc:
            log.warning("Redis settle failed after the ledger commit; `a2bd sync` or the next settle levels it",
                        error=str(exc))
        if self.on_settled is not None:
            self.on_settled(written)
