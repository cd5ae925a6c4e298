"""The `authorize` FastAGI route: identify the account, decide, reserve atomically, answer.

Per call, for an account seen before: one EVALSHA of reserve.lua (plus a GET to identify a caller by
caller ID or PIN); tariffs, carriers and the account's static fields come from memory, and the script
refuses to reserve against a version of the account that is no longer current. PostgreSQL is never
touched on this path. When Redis cannot answer within redis.timeout_s (bounded by the Redis clients
themselves) the call fails closed (A2B_STATUS=ERROR), unless the operator set a fail-open limit and
the account was last seen post-paid.

Every log line of a call carries its ``uniqueid``, ``server`` and ``account`` (structlog contextvars,
bound in `handle`, which runs in the call's own FastAGI task). The PIN a caller keys is never logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog

from a2bd.adapters.redis_store import RedisStore
from a2bd.agi.protocol import set_variable
from a2bd.agi.server import AgiSession
from a2bd.config import Settings
from a2bd.contract import (
    VAR_ACCOUNT,
    VAR_ACCOUNTCODE,
    VAR_HANGUPCAUSE,
    VAR_LIMIT_MS,
    VAR_ROUTE_PREFIX,
    VAR_ROUTES,
    VAR_STATUS,
    Status,
)
from a2bd.domain.authorize import (
    AccountView,
    Decision,
    Plan,
    Reservation,
    ReserveOutcome,
    finish,
    plan,
    refuse,
)
from a2bd.domain.calls import CallRecord, encode_record
from a2bd.errors import ProtocolError, StoreUnavailable
from a2bd.observability import AUTHORIZATIONS, AUTHORIZE_SECONDS
from a2bd.services.catalog import ProviderCatalog, TariffCatalog

log = structlog.get_logger("a2bd.authorize")
_ACCOUNT_MEMORY = 100_000  # accounts kept in memory; the oldest is forgotten first
_BY_STATUS = {status: AUTHORIZATIONS.labels(status.value) for status in Status}  # .labels() costs a lookup


def call_identity(asterisk: str, uniqueid: str) -> str:
    """A call is known by the Asterisk that runs it and the AGI channel's Uniqueid there."""
    return f"{asterisk}/{uniqueid}"


@lru_cache(maxsize=512)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        log.warning("unknown time zone on an account; using UTC", timezone=name)
        return ZoneInfo("UTC")


def answer_commands(decision: Decision) -> list[bytes]:
    """The SET VARIABLE lines of an answer. A2B_STATUS goes last: a dialplan that sees it set knows
    every other variable was set before it."""
    commands: list[bytes] = []
    if decision.account:
        commands.append(set_variable(VAR_ACCOUNTCODE, decision.account))
        commands.append(set_variable(VAR_ACCOUNT, decision.account))
    if decision.ok:
        commands.append(set_variable(VAR_LIMIT_MS, str(decision.limit_ms)))
        commands.append(set_variable(VAR_ROUTES, str(len(decision.routes))))
        for i, route in enumerate(decision.routes, 1):
            commands.append(set_variable(f"{VAR_ROUTE_PREFIX}{i}", route.dial))
    else:
        commands.append(set_variable(VAR_HANGUPCAUSE, str(decision.hangup_cause)))
    commands.append(set_variable(VAR_STATUS, decision.status.value))
    return commands


class Authorizer:
    def __init__(
        self,
        store: RedisStore,
        tariffs: TariffCatalog,
        providers: ProviderCatalog,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.tariffs = tariffs
        self.providers = providers
        self.settings = settings
        self.clock = clock
        # Accounts seen lately, with their version: the fast path, and fail-open's memory.
        self._accounts: dict[str, tuple[AccountView, str]] = {}
        self._servers = settings.server_for_agi_peer()  # FastAGI peer address -> Asterisk server name
        # Calls reserved here, handed to this daemon's call tracker without a Redis read (optional).
        self.on_reserved: Callable[[CallRecord], None] | None = None

    # -- the FastAGI route ----------------------------------------------------------------------

    async def handle(self, session: AgiSession) -> None:
        started = time.perf_counter()
        env = session.env
        arguments = env.arguments  # a property that builds its tuple: read it once
        destination = arguments[0] if arguments and arguments[0] else env.extension
        peer = session.peer[0]
        server = self._servers.get(peer, peer)
        call_id = call_identity(server, env.uniqueid)
        number = env.accountcode or None
        # The session's task has its own context (agi/server.py): these stay with this call's log lines.
        structlog.contextvars.bind_contextvars(uniqueid=env.uniqueid, server=server, account=number)
        try:
            if number is None:
                number = await self._identify(session)
                structlog.contextvars.bind_contextvars(account=number)
            decision = (
                await self.authorize(number, destination, call_id)
                if number
                else refuse(Status.NOACCOUNT, f"caller {env.callerid!r} is no account and gave no valid PIN")
            )
        except StoreUnavailable as exc:
            decision = self._unavailable(number, destination, str(exc))
        try:
            await session.execute(*answer_commands(decision))
        except (ProtocolError, TimeoutError):
            # Asterisk never got the answer, so the call will not be placed: free its slot and hold.
            if decision.ok and decision.account:
                await self._release(decision.account, call_id)
            raise
        elapsed = time.perf_counter() - started
        AUTHORIZE_SECONDS.observe(elapsed)
        _BY_STATUS[decision.status].inc()
        # A refusal is news for the operator; an OK is the usual case and the ledger records the call.
        (log.debug if decision.ok else log.info)(
            "authorize", call=call_id, account=decision.account or number, destination=destination,
            status=decision.status.value, limit_ms=decision.limit_ms, routes=len(decision.routes),
            reason=decision.reason, ms=round(elapsed * 1000, 3),
        )
        if session.hungup and decision.ok and decision.account:
            # The caller left during the AGI: this call will never dial, so it must not hold a slot.
            await self._release(decision.account, call_id)

    async def _release(self, number: str, call_id: str) -> None:
        try:
            await self.store.release(number, call_id)
        except StoreUnavailable as exc:
            log.warning("could not release a reservation; it will expire", call=call_id, error=str(exc))

    async def _identify(self, session: AgiSession) -> str | None:
        env = session.env
        if env.callerid and env.callerid.isdigit():
            number = await self.store.number_for_callerid(env.callerid)
            if number:
                return number
        agi = self.settings.agi
        for _ in range(agi.pin_attempts):
            if session.hungup:
                return None
            # GET DATA returns when the caller has keyed the PIN or after pin_timeout_ms of silence.
            try:
                reply = await session.command("GET", "DATA", agi.pin_prompt, str(agi.pin_timeout_ms),
                                              str(agi.pin_max_digits),
                                              timeout_s=agi.pin_timeout_ms / 1000 + agi.command_timeout_s)
            except ProtocolError as exc:
                # Its raw bytes would be logged, and a malformed reply to GET DATA may hold the keyed PIN.
                raise ProtocolError(f"{exc.args[0]} (the reply to GET DATA is not shown: it may hold a PIN)") from None
            digits = reply.result or ""
            if digits.isdigit():
                number = await self.store.number_for_pin(digits)
                if number:
                    return number
        return None

    # -- the decision -------------------------------------------------------------------------------

    async def authorize(self, number: str, destination: str, call_id: str) -> Decision:
        """Decide and, when the answer is OK, hold the call's slot and first block in Redis.

        The account's static fields come from memory when its version is known: then the whole
        decision is one Redis call (reserve.lua checks the version; STALE means read it again). A
        refusal decided from memory is confirmed against the version before it is given.
        """
        if not number.isascii() or not number.isdigit():
            return refuse(Status.NOACCOUNT, f"account code {number!r} is not an account number")
        known = self._accounts.get(number)
        for _ in range(2):
            if known is None:
                known = await self._load_account(number)
                if known is None:
                    return refuse(Status.NOACCOUNT, f"account {number} is unknown")
            account, version = known
            first = self._plan(account, destination)
            if isinstance(first, Decision):
                if await self.store.account_version(number) == version:
                    return first
            else:
                now_ms = int(self.clock() * 1000)
                billing = self.settings.billing
                expires_ms = now_ms + (billing.max_call_s + billing.reservation_slack_s) * 1000
                record = CallRecord(
                    call_id, number, first.destination, first.match.destination, first.match.prefix, first.sell,
                    first.routes, now_ms,
                )
                reservation = await self.store.reserve(number, call_id, first.hold_micro, now_ms, expires_ms,
                                                       version, encode_record(record))
                if reservation is not None and reservation.outcome is ReserveOutcome.NOACCOUNT:
                    reservation = None  # gone from Redis: read it again (an emptied Redis is an ERROR)
                if reservation is not None:
                    decision = finish(first, reservation, billing.max_call_s)
                    if decision.ok:
                        if self.on_reserved is not None:
                            self.on_reserved(record)
                    elif reservation.outcome is ReserveOutcome.OK:
                        # Reserved, yet no billed second fits (the daily limit is nearly used up).
                        await self._release(number, call_id)
                    return decision
            known = None  # the account changed since it was read: read it again, once
        raise StoreUnavailable(f"account {number} changed twice during one authorization")

    async def explain(self, number: str, destination: str) -> Decision:
        """What authorize would answer now, without reserving anything."""
        known = await self._load_account(number)
        if known is None:
            return refuse(Status.NOACCOUNT, f"account {number} is unknown")
        first = self._plan(known[0], destination)
        if isinstance(first, Decision):
            return first
        calls = await self.store.live_calls(number, int(self.clock() * 1000))
        live = len(calls)
        owed = sum((await self.store.parked(number)).values())  # ended, line not yet written (park.lua)
        credit = first.account.available_micro - sum(calls.values()) - owed
        max_calls = first.account.max_calls
        if max_calls and live >= max_calls:
            outcome = ReserveOutcome.MAXCALLS
        elif credit < first.hold_micro:
            outcome = ReserveOutcome.NOFUNDS
        else:
            outcome = ReserveOutcome.OK
        return finish(first, Reservation(outcome, credit, live), self.settings.billing.max_call_s)

    def _plan(self, account: AccountView, destination: str) -> Decision | Plan:
        now_local = datetime.fromtimestamp(self.clock(), _zone(account.timezone))
        return plan(account, destination, self.tariffs.get(account.tariff), self.providers.providers, now_local)

    async def _load_account(self, number: str) -> tuple[AccountView, str] | None:
        """Read the account from Redis and remember it (bounded: the oldest is forgotten first)."""
        known = await self.store.account(number)
        if known is None and not await self.store.is_synced():
            # Redis restarted empty (or was never loaded): "no such account" would be a lie. Fail closed
            # with ERROR (or fail open where allowed) until the daemon's watcher has reloaded it.
            raise StoreUnavailable("Redis holds no accounts (restarted empty?): waiting for the reload from "
                                   "PostgreSQL")
        memory = self._accounts
        memory.pop(number, None)
        if known is not None:
            memory[number] = known
            if len(memory) > _ACCOUNT_MEMORY:
                del memory[next(iter(memory))]
        return known

    # -- when Redis cannot answer -------------------------------------------------------------------

    def _unavailable(self, number: str | None, destination: str, why: str) -> Decision:
        limit_ms = self.settings.billing.fail_open_limit_ms
        known = self._accounts.get(number) if number and limit_ms else None
        account = known[0] if known is not None else None
        if account is not None and account.credit_limit_micro > 0:
            first = self._plan(account, destination)
            if isinstance(first, Plan):
                log.warning("Redis unavailable; post-paid account let through (fail-open)",
                            account=number, limit_ms=limit_ms, error=why)
                return Decision(Status.OK, f"fail-open: {why}", account=account.number,
                                limit_ms=min(limit_ms, self.settings.billing.max_call_s * 1000),
                                routes=first.routes, plan=first)
        return refuse(Status.ERROR, f"cannot decide: {why}", number or "")
