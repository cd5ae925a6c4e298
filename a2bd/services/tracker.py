"""The call tracker: follows each authorized call through one Asterisk's AMI events and ends it exactly once.

Which leg, which events (../shared/asterisk/README.md, seen in every capture):

- The billed leg is the AGI channel: its Uniqueid is the reservation's (call id = "<server>/<uniqueid>"). It
  is the `Channel` of DialBegin/DialEnd (the Originate's own DialBegin has no Channel and is ignored), and it
  carries the AccountCode a2bd set, so its account is known from any of its events.
- Answered: DialEnd with DialStatus ANSWER (Newstate Up and BridgeEnter come in the same millisecond). The
  carrier that answered is the DialBegin of the same DestUniqueid (`DialString`), not the Cdr's LastData.
- Ended: its Hangup (cause) and its Cdr with LastApplication Dial (Disposition, BillableSeconds =
  floor(end − answer)) arrive in one burst IN EITHER ORDER. The call is closed when both are in, or
  `cdr_wait_s` after the first (a Cdr that never comes: cdr_manager off, events lost). Busy and no-answer add
  a second Cdr (LastApplication Hangup) for the same leg: it finds the call closed and is ignored.
- A calling-card leg was answered (Answer()) before its Dial: its Cdr counts PIN entry and ringing, so it is
  billed from DialEnd ANSWER to Hangup instead. DialBegin tells: its ChannelStateDesc is already Up.
- A leg that never dialled (denied, caller hung up during the AGI) has only a Cdr of another application:
  its reservation, if any, is released.

Events are handled in order, synchronously; Redis reads and writes they cause run as tracked tasks.

Logs: one task follows every call of the server, so a call's identity cannot be bound to that task's
context; its lines name it (``call``, ``uniqueid``, ``account``, ``server``). A task spawned for one call runs
in a context with those bound (structlog contextvars), so whatever logs inside it, the store included, says
which call it was about.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from a2bd.adapters.redis_store import RedisStore
from a2bd.ami.client import AmiConnected, AmiDisconnected
from a2bd.ami.protocol import AmiMessage
from a2bd.domain.calls import CallRecord, EndedCall, decode_record, encode_record
from a2bd.errors import StoreUnavailable
from a2bd.observability import CALLS_ENDED, LIVE_CALLS

log = structlog.get_logger("a2bd.tracker")

_RECENT_S = 600  # a reservation handed over in memory is forgotten after this if its call never dialled
_DONE_MEMORY = 20_000  # closed calls remembered, so late or replayed events of them are ignored
MAX_CALL_SECONDS = 7 * 86_400  # no call lasts a week (billing.max_call_s caps it at the Dial's L() limit)


class RecentCalls:
    """Calls this daemon reserved, handed to its tracker in memory (no Redis read at DialBegin)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._calls: OrderedDict[str, tuple[float, CallRecord]] = OrderedDict()
        self._clock = clock

    def put(self, record: CallRecord) -> None:
        now = self._clock()
        self._calls[record.call_id] = (now, record)
        while self._calls:
            first = next(iter(self._calls.values()))
            if now - first[0] < _RECENT_S:
                break
            self._calls.popitem(last=False)

    def take(self, call_id: str) -> CallRecord | None:
        item = self._calls.pop(call_id, None)
        return item[1] if item else None


@dataclass(slots=True)
class LiveCall:
    """What the tracker knows of one billed leg so far."""

    call_id: str
    uniqueid: str
    account: str
    channel: str
    record: CallRecord | None = None
    fetching: bool = False
    pre_answered: bool = False
    dial_strings: dict[str, str] = field(default_factory=dict)  # DestUniqueid -> DialString
    answered_ms: int | None = None
    answered_dial: str = ""  # the DialString of the attempt that answered (which route, hence which carrier)
    provider: str | None = None
    hangup_ms: int | None = None
    cause: int = 16
    cdr: AmiMessage | None = None  # its Dial Cdr
    other_cdr: bool = False
    closing: bool = False
    cut_by_guard: bool = False
    timer: asyncio.TimerHandle | None = None


Sink = Callable[[EndedCall], None]


# The AMI events the tracker reads: the AMI client decodes no other (services/lifecycle.py).
TRACKED_EVENTS = frozenset({"DialBegin", "DialEnd", "Hangup", "Cdr"})


class CallTracker:
    """One per Asterisk server. `charge` receives every ended call (answered or not) of this server."""

    def __init__(
        self,
        server: str,
        store: RedisStore,
        charge: Sink,
        *,
        recent: RecentCalls | None = None,
        cdr_wait_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        on_answered: Callable[[LiveCall], None] | None = None,
        on_ended: Callable[[LiveCall], None] | None = None,
        on_reconnected: Callable[[str], None] | None = None,
    ) -> None:
        self.server = server
        self.store = store
        self.charge = charge
        self.recent = recent or RecentCalls()
        self.cdr_wait_s = cdr_wait_s
        self.clock = clock
        self.on_answered = on_answered
        self.on_ended = on_ended
        self.on_reconnected = on_reconnected
        self.live: dict[str, LiveCall] = {}  # by uniqueid of the billed leg
        self._done: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._prefix = server + "/"
        self._gauge_dialling = LIVE_CALLS.labels(server, "dialling")
        self._gauge_answered = LIVE_CALLS.labels(server, "answered")
        self._handlers: dict[str, Callable[[AmiMessage], None]] = {
            "DialBegin": self._dial_begin,
            "DialEnd": self._dial_end,
            "Hangup": self._hangup,
            "Cdr": self._cdr,
        }

    # -- input -------------------------------------------------------------------------------------------

    def handle(self, item: AmiMessage | AmiConnected | AmiDisconnected) -> None:
        if isinstance(item, AmiMessage):
            handler = self._handlers.get(item.event or "")
            if handler is not None:
                handler(item)
        elif isinstance(item, AmiConnected):
            log.info("AMI connected", server=self.server, first=item.first)
            if self.on_reconnected is not None:
                self.on_reconnected(self.server)  # events may have been lost: compare with Asterisk
        else:
            log.warning("AMI connection lost; calls stay tracked until it is back", server=self.server,
                        reason=item.reason, live=len(self.live))

    def adopt(self, uniqueid: str, account: str, channel: str, answered: bool) -> None:
        """Track a call found alive in CoreShowChannels that this tracker has not seen start (a restart, a
        reconnect). Its answer time comes from its Redis record when the tracker that saw it wrote it there."""
        if uniqueid in self.live or uniqueid in self._done:
            return
        call = LiveCall(self._prefix + uniqueid, uniqueid, account, channel)
        self.live[uniqueid] = call
        self._fetch(call, adopt_answered=answered)

    def call_id(self, uniqueid: str) -> str:
        return self._prefix + uniqueid

    def mark_cut(self, uniqueid: str) -> None:
        call = self.live.get(uniqueid)
        if call is not None:
            call.cut_by_guard = True

    def discard(self, uniqueid: str) -> None:
        """Stop following a call settled by other means (the reconciler, another daemon): no charge here."""
        call = self.live.get(uniqueid)
        if call is None:
            return
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        self._forget(call)
        if self.on_ended is not None:
            self.on_ended(call)

    def abandon(self, uniqueid: str) -> bool:
        """Asterisk no longer has this call's channel and none of its end was seen (the events were lost
        while AMI was down): hand it to the reconciler. False when its end is in hand here."""
        call = self.live.get(uniqueid)
        if call is None or call.hangup_ms is not None or call.cdr is not None or call.other_cdr:
            return False
        log.warning("call ended unseen (AMI events lost); the reconciler settles it", **self._about(call))
        self.discard(uniqueid)
        return True

    def is_tracking(self, call_id: str) -> bool:
        """Whether this tracker is following the call now. A call it closed is not: if its reservation is
        still there (a settle that failed), the reconciler settles it from its ledger line."""
        if not call_id.startswith(self._prefix):
            return False
        return call_id[len(self._prefix):] in self.live

    def flush(self) -> None:
        """At shutdown: close every call whose end is already in hand (its Hangup or Cdr came), with what
        came, rather than leave it to a reconciler that may have no CDR table to price it from."""
        for call in list(self.live.values()):
            if call.hangup_ms is not None or call.cdr is not None or call.other_cdr:
                self._close(call)

    async def close(self) -> None:
        for call in self.live.values():
            if call.timer is not None:
                call.timer.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)

    # -- events ------------------------------------------------------------------------------------------

    def _ms(self, msg: AmiMessage) -> int:
        return int((msg.received_at or self.clock()) * 1000)

    def _dial_begin(self, msg: AmiMessage) -> None:
        channel = msg.get("Channel")
        account = msg.get("AccountCode")
        if not channel or not account:
            return  # the Originate's own DialBegin (no Channel), or a leg a2bd never authorized
        uniqueid = msg.get("Uniqueid", "")
        if uniqueid in self._done:
            return
        call = self.live.get(uniqueid)
        if call is None:
            call = LiveCall(self._prefix + uniqueid, uniqueid, account, channel,
                            pre_answered=msg.get("ChannelStateDesc") == "Up")
            self.live[uniqueid] = call
            record = self.recent.take(call.call_id)
            if record is not None:
                call.record = record
            else:
                self._fetch(call)
            self._gauge_dialling.inc()
        call.dial_strings[msg.get("DestUniqueid", "")] = msg.get("DialString", "")

    def _dial_end(self, msg: AmiMessage) -> None:
        call = self.live.get(msg.get("Uniqueid", ""))
        if call is None or msg.get("DialStatus") != "ANSWER" or call.answered_ms is not None:
            return
        call.answered_ms = self._ms(msg)
        self._gauge_dialling.dec()
        self._gauge_answered.inc()
        call.answered_dial = call.dial_strings.get(msg.get("DestUniqueid", ""), "")
        if call.record is not None:
            self._stamp_answer(call, call.record)
        # else: stamped when its record arrives from Redis (_fetch_record)

    def _stamp_answer(self, call: LiveCall, record: CallRecord) -> None:
        """The answer seen on AMI goes into the call's record (Redis, for every daemon) and to the guard."""
        assert call.answered_ms is not None
        route = record.route_for(call.answered_dial)
        call.provider = route.provider if route else None
        call.record = record.answered(call.answered_ms, call.channel, call.provider)
        self._spawn(self._store_answer(call, call.record), call.uniqueid, call.account)
        if self.on_answered is not None:
            self.on_answered(call)

    def _hangup(self, msg: AmiMessage) -> None:
        call = self.live.get(msg.get("Uniqueid", ""))
        if call is None or call.hangup_ms is not None:
            return
        call.hangup_ms = self._ms(msg)
        try:
            call.cause = int(msg.get("Cause", "16"))
        except ValueError:
            call.cause = 0
        self._progress(call)

    def _cdr(self, msg: AmiMessage) -> None:
        uniqueid = msg.get("UniqueID", "")
        if uniqueid in self._done:
            return  # the second Cdr of a busy or unanswered leg, or a replay
        call = self.live.get(uniqueid)
        dialled = msg.get("LastApplication") == "Dial"
        if call is None:
            account = msg.get("AccountCode")
            if not account:
                return  # never authorized by a2bd (no accountcode was set)
            if not dialled:
                # Denied, or the caller left before Dial: nothing to bill; free a reservation if one was taken.
                self._remember_done(uniqueid)
                self._spawn(self._release(account, self._prefix + uniqueid), uniqueid, account)
                return
            # A Dial Cdr of a call whose start this tracker missed (reconnect, restart): bill it from the Cdr.
            call = LiveCall(self._prefix + uniqueid, uniqueid, account, msg.get("Channel", ""))
            call.hangup_ms = self._ms(msg)
            self.live[uniqueid] = call
            self._gauge_dialling.inc()
            self._fetch(call)
        if dialled:
            call.cdr = msg
        else:
            call.other_cdr = True
        self._progress(call)

    # -- closing a call ----------------------------------------------------------------------------------

    def _progress(self, call: LiveCall) -> None:
        has_cdr = call.cdr is not None or call.other_cdr
        if call.hangup_ms is not None and has_cdr:
            self._close(call)
        elif call.timer is None:
            call.timer = asyncio.get_running_loop().call_later(self.cdr_wait_s, self._close, call)

    def _close(self, call: LiveCall) -> None:
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        if call.record is None:
            call.closing = True
            if not call.fetching:
                self._forget(call)  # not a2bd's call after all (no reservation record)
            return  # else the fetch closes it when the record arrives
        self._forget(call)
        ended = self._ended(call, call.record)
        CALLS_ENDED.labels(ended.disposition).inc()
        if self.on_ended is not None:
            self.on_ended(call)
        self.charge(ended)

    def _forget(self, call: LiveCall) -> None:
        if self.live.pop(call.uniqueid, None) is not None:
            (self._gauge_answered if call.answered_ms is not None else self._gauge_dialling).dec()
        self._remember_done(call.uniqueid)

    def _remember_done(self, uniqueid: str) -> None:
        self._done[uniqueid] = None
        if len(self._done) > _DONE_MEMORY:
            self._done.popitem(last=False)

    def _ended(self, call: LiveCall, record: CallRecord) -> EndedCall:
        now_ms = int(self.clock() * 1000)
        ended_ms = call.hangup_ms or now_ms
        cdr = call.cdr
        answered_ms = call.answered_ms
        if cdr is not None:
            disposition = cdr.get("Disposition", "")
            text = cdr.get("BillableSeconds", "0")
            if text.isascii() and text.isdigit() and int(text) <= MAX_CALL_SECONDS:
                duration_s = int(text)
            else:  # not Asterisk's non-negative whole seconds, or longer than any call (a garbled event)
                log.error("Cdr with a malformed BillableSeconds; billed from the events", **self._about(call),
                          value=text)
                duration_s = max(0, (ended_ms - answered_ms) // 1000) if answered_ms is not None else 0
            if call.pre_answered and answered_ms is not None:
                duration_s = max(0, (ended_ms - answered_ms) // 1000)
        elif answered_ms is not None:
            disposition = "ANSWERED"
            duration_s = max(0, (ended_ms - answered_ms) // 1000)
        else:
            disposition = "NO ANSWER"
            duration_s = 0
        if disposition == "ANSWERED" and answered_ms is None:
            answered_ms = ended_ms - duration_s * 1000  # the answer was not seen (events lost)
        if record.answered_ms is None and answered_ms is not None:
            route = record.route_for(call.answered_dial)
            record = record.answered(answered_ms, call.channel, route.provider if route else None)
        return EndedCall(record, ended_ms, duration_s, disposition, call.cause, call.cut_by_guard)

    # -- Redis side effects ------------------------------------------------------------------------------

    def _about(self, call: LiveCall) -> dict[str, str]:
        """The fields that name a call on a log line written outside its own context."""
        return {"call": call.call_id, "uniqueid": call.uniqueid, "account": call.account, "server": self.server}

    def _spawn(self, coro: Coroutine[Any, Any, Any], uniqueid: str, account: str) -> None:
        """Run `coro` as a tracked task whose log lines carry the call's uniqueid, account and server."""
        context = contextvars.copy_context()
        context.run(structlog.contextvars.bind_contextvars, uniqueid=uniqueid, account=account, server=self.server)
        task = asyncio.get_running_loop().create_task(coro, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fetch(self, call: LiveCall, adopt_answered: bool = False) -> None:
        call.fetching = True
        self._spawn(self._fetch_record(call, adopt_answered), call.uniqueid, call.account)

    async def _fetch_record(self, call: LiveCall, adopt_answered: bool) -> None:
        record: CallRecord | None = None
        delay = 0.2
        # Until Redis answers, whatever it takes: a call given up while Redis is away would never be billed
        # nor guarded. Only "no such record" (or a damaged one) means the leg is not a2bd's to bill.
        while call.uniqueid in self.live:
            try:
                text = await self.store.call_record(call.account, call.call_id)
                record = decode_record(text) if text else None
                break
            except StoreUnavailable as exc:
                log.warning("Redis unavailable while looking up a call; retrying", call=call.call_id,
                            error=str(exc))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("damaged call record in Redis", call=call.call_id, error=str(exc))
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        call.fetching = False
        if call.uniqueid not in self.live:
            return  # discarded or abandoned meanwhile (settled by other means): nothing more to do
        if record is None:
            self._forget(call)  # a leg a2bd holds no reservation for (a callee leg, another system)
            return
        call.record = record
        if adopt_answered and call.answered_ms is None:
            # Found alive and Up after a gap: its answer time is in the record if a tracker saw it, else the
            # reservation time (earlier than the real answer: the guard errs on the operator's side).
            call.answered_ms = record.answered_ms or record.reserved_ms
            call.provider = record.provider
            self._gauge_dialling.dec()
            self._gauge_answered.inc()
            call.record = record.answered(call.answered_ms, call.channel or record.channel, call.provider)
            if self.on_answered is not None:
                self.on_answered(call)
        elif call.answered_ms is not None and record.answered_ms is None:
            self._stamp_answer(call, record)
        if call.closing or (call.hangup_ms is not None and (call.cdr is not None or call.other_cdr)):
            self._close(call)

    async def _store_answer(self, call: LiveCall, record: CallRecord) -> None:
        try:
            if await self.store.update_record(call.account, call.call_id, encode_record(record)):
                await self.store.publish_changed([call.account])
        except StoreUnavailable as exc:
            log.warning("could not record an answer in Redis; this daemon still guards the call",
                        call=call.call_id, error=str(exc))

    async def _release(self, account: str, call_id: str) -> None:
        try:
            await self.store.release(account, call_id)
        except StoreUnavailable as exc:
            log.warning("could not release a reservation; the reconciler will", call=call_id, error=str(exc))
