"""Reconciliation: so that no call is lost, whatever was down when it ended.

On start, after every AMI reconnect, every `billing.reconcile_interval_s`, and by hand (`a2bd reconcile`):

1. Ended calls kept in Redis (`:ended`) whose ledger line is not written (a daemon killed while PostgreSQL
   was away) are written.
2. Live reservations whose channel Asterisk no longer has (CoreShowChannels) and that no tracker is closing:
   - already in the ledger (killed between the commit and the Redis settle) → Redis is settled from the line;
   - in the server's CDR table (cdr_pgsql) → rated from its Dial row;
   - neither: released (nothing proves it was answered; logged as `unrated` when its record says it was).
   Channels alive that no tracker follows (a restart) are adopted, so the guard watches them again.
3. The CDR table: every answered Dial CDR of a call a2bd still holds a record of (its reservation) with no
   ledger line, old enough that the AMI path had its chance, is rated: this bills calls whose Asterisk
   cannot be asked for its channels (AMI down). A row a2bd holds no record of is left alone: an
   accountcode and a Dial are no proof it is the billed leg (see _cdr_sweep).

Everything it does is idempotent: the ledger writes each call once and settle.lua only moves Redis forward.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from a2bd.adapters.redis_store import LiveState, RedisStore, utc_day
from a2bd.ami.protocol import AmiMessage
from a2bd.config import AsteriskServer, Settings
from a2bd.domain.calls import CallRecord, EndedCall, decode_ended, decode_record, encode_record, rate_call
from a2bd.domain.rating import first_block_micro
from a2bd.observability import RECONCILE_FIXES
from a2bd.services.charging import LedgerWriter
from a2bd.services.sync import needs_sync, sync_redis
from a2bd.services.tracker import CallTracker

log = structlog.get_logger("a2bd.reconcile")

ListChannels = Callable[[str], Any]  # server name -> awaitable list of CoreShowChannel events


@dataclass(slots=True)
class ReconcileReport:
    """What one pass did, call ids by action."""

    written: list[str] = field(default_factory=list)  # ended calls from Redis sent to the ledger
    settled: list[str] = field(default_factory=list)  # in the ledger already: Redis settled from the line
    rated_from_cdr: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)  # gone, never answered as far as anything shows
    unrated: list[str] = field(default_factory=list)  # answered, gone, no CDR: the money is unknown
    adopted: list[str] = field(default_factory=list)
    servers_unreachable: list[str] = field(default_factory=list)
    resynced: bool = False  # Redis had lost its state and was reloaded from PostgreSQL first

    def count(self, action: str, call_id: str) -> None:
        getattr(self, action).append(call_id)
        RECONCILE_FIXES.labels(action).inc()

    @property
    def fixes(self) -> int:
        return len(self.written) + len(self.settled) + len(self.rated_from_cdr) + len(self.released) + len(
            self.unrated)

    def summary(self) -> dict[str, int | list[str]]:
        return {
            "written": len(self.written), "settled": len(self.settled), "rated_from_cdr": len(self.rated_from_cdr),
            "released": len(self.released), "unrated": len(self.unrated), "adopted": len(self.adopted),
            "servers_unreachable": self.servers_unreachable, "resynced": int(self.resynced),
        }


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        store: RedisStore,
        pool: asyncpg.Pool,
        writer: LedgerWriter,
        *,
        list_channels: ListChannels,
        trackers: Mapping[str, CallTracker] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.pool = pool
        self.writer = writer
        self.list_channels = list_channels
        self.trackers = trackers or {}
        self.clock = clock
        self.servers = {s.name: s for s in settings.asterisk}
        self._lock = asyncio.Lock()

    async def run_once(self) -> ReconcileReport:
        async with self._lock:  # one pass at a time (start, timer, reconnect may coincide)
            report = ReconcileReport()
            if await needs_sync(self.store):
                # Redis restarted empty (or was flushed): balances, indexes and providers come back from
                # PostgreSQL before anything else; live calls are then found again in CoreShowChannels.
                async with self.pool.acquire() as conn:
                    synced = await sync_redis(conn, self.store)
                report.resynced = True
                log.warning("Redis had lost its state: reloaded from PostgreSQL", accounts=synced.accounts)
                await self._restore_live()
            # Redis first, Asterisk second: a reservation seen before the channel list had its channel
            # alive then (Asterisk reserves from the AGI of a live channel), so its absence from the list
            # means it ended. A call reserved after the snapshot is not judged in this pass.
            snapshot = [state async for state in self.store.live_state()]
            alive = await self._channels(report)
            await self._redis(report, alive, snapshot)
            for server in self.servers.values():
                if server.cdr_table:
                    await self._cdr_sweep(report, server)
            if report.fixes or report.adopted or report.resynced:
                log.info("reconciled", **report.summary())
            return report

    async def run_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # a pass that fails (a server away, a bug) must not end the ones after it
                log.exception("reconciliation pass failed; next one in the interval")
            await asyncio.sleep(interval_s)

    async def _restore_live(self) -> None:
        """Put back the reservations of the calls this daemon's trackers still follow, so that concurrency
        limits, holds and the other daemons' guards count them again."""
        billing = self.settings.billing
        now_ms = int(self.clock() * 1000)
        expires_ms = now_ms + (billing.max_call_s + billing.reservation_slack_s) * 1000
        restored = 0
        for tracker in self.trackers.values():
            for call in list(tracker.live.values()):
                rec = call.record
                if rec is None:
                    continue
                got = await self.store.reserve(rec.account, rec.call_id, first_block_micro(rec.sell), now_ms,
                                               expires_ms, "", encode_record(rec))
                restored += got is not None and got.outcome == "OK"
        if restored:
            log.info("live calls registered again in Redis", calls=restored)

    # -- 1. what Asterisk has ------------------------------------------------------------------------------

    async def _channels(self, report: ReconcileReport) -> dict[str, set[str]]:
        """Uniqueids alive per reachable server; billed legs nobody tracks are adopted."""
        alive: dict[str, set[str]] = {}
        for name in self.servers:
            try:
                events: list[AmiMessage] = await self.list_channels(name)
            except Exception as exc:  # any failure means: this server's calls are left alone
                report.servers_unreachable.append(name)
                log.warning("cannot list channels; its calls are left as they are", server=name, error=str(exc))
                continue
            alive[name] = {e.get("Uniqueid", "") for e in events}
            tracker = self.trackers.get(name)
            if tracker is None:
                continue
            for e in events:
                account = e.get("AccountCode")
                if account and e.get("Application") == "Dial":
                    call_id = tracker.call_id(e.get("Uniqueid", ""))
                    if not tracker.is_tracking(call_id):
                        tracker.adopt(e.get("Uniqueid", ""), account, e.get("Channel", ""),
                                      answered=e.get("ChannelStateDesc") == "Up")
                        report.adopted.append(call_id)
        return alive

    # -- 2. what Redis holds ---------------------------------------------------------------------------------

    async def _redis(self, report: ReconcileReport, alive: Mapping[str, set[str]],
                     snapshot: list[LiveState]) -> None:
        gone: dict[str, tuple[str, str]] = {}  # call id -> (account, record text or "")
        for state in snapshot:
            for call_id, text in state.ended.items():
                if self.writer.is_pending(call_id):
                    continue
                try:
                    rated = rate_call(decode_ended(text))
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("damaged ended call in Redis; left for an operator", call=call_id, error=str(exc))
                    continue
                if rated is not None:
                    self.writer.submit_rated(rated)
                    report.count("written", call_id)
            for call_id in state.holds:
                if call_id in state.ended or self.writer.is_pending(call_id):
                    continue
                server, _, uniqueid = call_id.rpartition("/")
                if server not in alive or uniqueid in alive[server]:
                    continue  # not ours to judge (unreachable / another daemon's server) or still up
                tracker = self.trackers.get(server)
                if tracker is not None and tracker.is_tracking(call_id) and not tracker.abandon(uniqueid):
                    continue  # its tracker is closing it (its Hangup or Cdr is in) or has closed it
                gone[call_id] = (state.number, state.records.get(call_id, ""))
        if gone:
            await self._settle_gone(report, gone)

    async def _settle_gone(self, report: ReconcileReport, gone: dict[str, tuple[str, str]]) -> None:
        # Settled meanwhile by its tracker (the snapshot is a few milliseconds old): not a fix.
        still = await self.store.still_reserved([(account, call_id) for call_id, (account, _) in gone.items()])
        gone = {call_id: item for call_id, item in gone.items() if call_id in still}
        if not gone:
            return
        day = utc_day(self.clock())
        async with self.pool.acquire() as conn:
            lines = await conn.fetch(
                "SELECT call_id, id, balance_after_micro FROM ledger WHERE kind = 'call' AND call_id = ANY($1)",
                list(gone),
            )
        for line in lines:
            account, _ = gone.pop(line["call_id"])
            await self.store.settle(account, line["id"], line["balance_after_micro"], day, [(line["call_id"], 0)])
            report.count("settled", line["call_id"])
        by_server: dict[str, dict[str, tuple[str, str]]] = {}
        for call_id, item in gone.items():
            by_server.setdefault(call_id.rpartition("/")[0], {})[call_id] = item
        for name, calls in by_server.items():
            server = self.servers.get(name)
            rows = await self._cdr_rows(server, [c.rpartition("/")[2] for c in calls]) if server else {}
            for call_id, (account, text) in calls.items():
                record = _record(text)
                row = rows.get(call_id.rpartition("/")[2])
                if row is not None and record is not None:
                    ended = _ended_from_cdr(record, row)
                    if ended.disposition == "ANSWERED":
                        self.writer.submit(ended)
                        report.count("rated_from_cdr", call_id)
                        continue
                await self.store.release(account, call_id)
                if record is not None and record.answered_ms is not None and row is None:
                    log.error("call ended unseen (AMI down, no CDR table row): released unbilled", call=call_id,
                              account=account, answered_ms=record.answered_ms)
                    report.count("unrated", call_id)
                else:
                    report.count("released", call_id)

    # -- 3. the CDR table ------------------------------------------------------------------------------------

    async def _cdr_rows(self, server: AsteriskServer, uniqueids: list[str]) -> dict[str, asyncpg.Record]:
        if not server.cdr_table or not uniqueids:
            return {}
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT uniqueid, accountcode, dst, disposition, billsec, answer, \"end\" FROM {server.cdr_table}"  # noqa: S608 - validated name
                " WHERE uniqueid = ANY($1) AND lastapp = 'Dial'",
                uniqueids,
            )
        return {r["uniqueid"]: r for r in rows}

    async def _cdr_sweep(self, report: ReconcileReport, server: AsteriskServer) -> None:
        billing = self.settings.billing
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT c.uniqueid, c.accountcode, c.dst, c.disposition, c.billsec, c.answer, c.\"end\""  # noqa: S608 - validated name
                f" FROM {server.cdr_table} c"
                " WHERE c.lastapp = 'Dial' AND c.disposition = 'ANSWERED' AND c.accountcode <> ''"
                " AND c.\"end\" > (now() AT TIME ZONE 'UTC') - make_interval(secs => $2)"
                " AND c.\"end\" < (now() AT TIME ZONE 'UTC') - make_interval(secs => $3)"
                " AND NOT EXISTS (SELECT 1 FROM ledger l"
                "                 WHERE l.kind = 'call' AND l.call_id = $1 || '/' || c.uniqueid)",
                server.name, float(billing.reconcile_cdr_window_s), float(billing.reconcile_cdr_age_s),
            )
        for row in rows:
            call_id = f"{server.name}/{row['uniqueid']}"
            if self.writer.is_pending(call_id):
                continue
            record = _record(await self.store.call_record(row["accountcode"], call_id) or "")
            if record is None:
                # Not provably a2bd's billed leg: a leg that only inherited the accountcode (a route through
                # a Local channel that runs its own Dial) has a Dial row too, and billing it would bill the
                # call twice. Only calls a2bd holds a record of are rated from the table.
                log.debug("CDR row with no call record in Redis left alone", call=call_id)
                continue
            self.writer.submit(_ended_from_cdr(record, row))
            report.count("rated_from_cdr", call_id)


def _record(text: str) -> CallRecord | None:
    if not text:
        return None
    try:
        return decode_record(text)
    except (ValueError, KeyError, TypeError):
        return None


def _utc(value: datetime) -> datetime:
    """cdr_pgsql writes UTC into columns without a time zone (asterisk_conf/cdr_pgsql.conf: timezone=UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _ended_from_cdr(record: CallRecord, row: asyncpg.Record) -> EndedCall:
    end = _utc(row["end"])
    ended_ms = int(end.timestamp() * 1000)
    duration_s = max(0, int(row["billsec"] or 0))  # a negative billsec (a clock step) bills nothing
    answered_ms = int(_utc(row["answer"]).timestamp() * 1000) if row["answer"] else ended_ms - duration_s * 1000
    if record.answered_ms is None:
        record = record.answered(answered_ms, record.channel, record.provider)
    return EndedCall(record, ended_ms, duration_s, row["disposition"], 16, False)
