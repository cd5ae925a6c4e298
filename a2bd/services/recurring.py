"""Recurring services (DID rentals, subscriptions, trunk channels...) and account expiry: the scheduler's work.

A service is charged in advance, one ledger line per period, on the local midnight its period begins
(domain/recurring.py says when). `run_due` does everything that is due at `now`:

1. Renewals. Each due service in its own transaction: the service row is locked `FOR UPDATE SKIP LOCKED`
   (a second scheduler skips it, then finds it no longer due), then the account row; every period due is
   charged while the available credit (balance + credit limit) pays for it, each period its own line,
   and the service moves on to its next renewal. A period is keyed in the ledger by
   `call_id = "service:<id>:<period start, UTC ISO>"`: the ledger's unique (call_id, kind) index makes the
   charge of one period happen once ever, whatever races or replays. When the credit does not pay for a
   period, the service is suspended and a `service_suspended` notice recorded. Redis is told after commit.
2. Reminders: a `renewal_reminder` notice once per renewal, `reminder_days` days before it.
3. Expiry (A2Billing's modes): the first use of 'after_first_use' accounts is taken from their first call
   line, `expires_at` is set from the account's mode, changed accounts are pushed to Redis (authorization
   refuses an expired account from there), and an `expired` notice is recorded once per expiry.

One bad service does not stop the run: its error is reported and the next service is charged.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from a2bd.adapters import postgres
from a2bd.adapters.postgres import AccountLine
from a2bd.adapters.redis_store import RedisStore
from a2bd.domain.money import format_amount
from a2bd.domain.recurring import (
    PERIODS,
    day_start,
    expires_at_for,
    first_charge_at,
    local_date,
    next_renewal,
    period_dates,
    reminder_due,
    zone,
)
from a2bd.errors import InputError, StoreUnavailable
from a2bd.observability import NOTICES
from a2bd.services.posting import tell_redis

log = structlog.get_logger("a2bd.recurring")

SERVICE_KINDS = ("did", "subscription", "service")  # also the ledger kind of their charges
MAX_PERIODS_PER_RUN = 1000  # periods one service is charged in one run; the rest in the next run
_EXPIRY_LOCK = 0x61326265  # one expiry pass at a time across daemons (its notices are recorded once)


@dataclass(frozen=True, slots=True)
class RecurringError:
    """Why one service (or, with service_id None, one account's expiry or the Redis push) was not done."""

    service_id: int | None
    message: str
    account: str | None = None


@dataclass(slots=True)
class RecurringReport:
    """What one `run_due` did."""

    charged: int = 0  # ledger lines written: one per period charged
    suspended: int = 0  # services suspended for want of credit
    reminded: int = 0  # renewal reminders recorded
    expired: int = 0  # 'expired' notices recorded
    expiry_set: int = 0  # accounts whose expires_at was set or moved
    errors: list[RecurringError] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {"charged": self.charged, "suspended": self.suspended, "reminded": self.reminded,
                "expired": self.expired, "expiry_set": self.expiry_set, "errors": len(self.errors)}


# -- charging one service -----------------------------------------------------------------------------

_ACCOUNT_COLUMNS = "SELECT id, number, status, balance_micro, credit_limit_micro, timezone, currency FROM accounts"
_LOCK_ACCOUNT = _ACCOUNT_COLUMNS + " WHERE id = $1 FOR UPDATE"
_LOCK_ACCOUNT_BY_NUMBER = _ACCOUNT_COLUMNS + " WHERE number = $1 FOR UPDATE"


def period_key(service_id: int, period_start: datetime) -> str:
    """The ledger call_id of one period of one service: its idempotency key."""
    return f"service:{service_id}:{period_start.astimezone(UTC).isoformat()}"


def describe(service: Mapping[str, Any], start: datetime, end: datetime, tz: str) -> str:
    """The ledger description of the period [start, end), e.g. "DID 3612345678 rental 2026-11-01 – 2026-11-30"."""
    first, last = period_dates(start, end, tz)
    span = f"{first.isoformat()} – {last.isoformat()}"
    if service["kind"] == "did":
        return f"DID {service['did'] or service['name']} rental {span}"
    if service["kind"] == "subscription":
        return f"Subscription {service['name']} {span}"
    return f"{service['name']} {span}"


@dataclass(frozen=True, slots=True)
class _Charged:
    lines: list[asyncpg.Record]  # the lines written, oldest first
    next_charge_at: datetime  # the first period not charged
    short_micro: int  # > 0: the credit did not pay for the period starting at next_charge_at, by this much
    available_micro: int  # the account's available credit after the lines


async def _charge(
    conn: asyncpg.Connection, service: Mapping[str, Any], account: Mapping[str, Any], until: datetime
) -> _Charged:
    """Charge `service` every period that begins at or before `until`, from its next_charge_at, while the
    available credit pays for it. The caller holds the service's and the account's row locks in its
    transaction and stores next_charge_at. A period the ledger holds already (its key) is passed over."""
    tz = account["timezone"]
    every, anchor, period = service["every"], service["anchor_day"], service["period"]
    periods: list[tuple[datetime, datetime]] = []
    start: datetime = service["next_charge_at"]
    while start <= until and len(periods) < MAX_PERIODS_PER_RUN:
        end = next_renewal(start, period, every, anchor, tz)
        periods.append((start, end))
        start = end
    keys = [period_key(service["id"], s) for s, _ in periods]
    done = {r["call_id"] for r in await conn.fetch(
        "SELECT call_id FROM ledger WHERE kind = $1 AND call_id = ANY($2::text[])", service["kind"], keys)}
    available = account["balance_micro"] + account["credit_limit_micro"]
    amount = service["amount_micro"]
    lines: list[AccountLine] = []
    next_at = start
    short = 0
    for (begin, end), key in zip(periods, keys, strict=True):
        if key not in done:
            if amount > 0 and available < amount:
                next_at, short = begin, amount - available
                break
            lines.append(AccountLine(
                kind=service["kind"], amount_micro=-amount, description=describe(service, begin, end, tz),
                tax_class=service["tax_class"], service_id=service["id"], call_id=key,
            ))
            available -= amount
    written = await postgres.post_lines(conn, account["id"], lines) if lines else []
    return _Charged(written, next_at, short, available)


@dataclass(frozen=True, slots=True)
class _Renewed:
    number: str
    lines: list[asyncpg.Record]
    suspended: bool


async def _renew(conn: asyncpg.Connection, service_id: int, now: datetime) -> _Renewed | None:
    """Charge one due service in one transaction; None when it is not due any more or another run holds it."""
    async with conn.transaction():
        service = await conn.fetchrow(
            "SELECT * FROM services WHERE id = $1 AND status = 'active' AND next_charge_at <= $2"
            " FOR UPDATE SKIP LOCKED", service_id, now)
        if service is None:
            return None
        account = await conn.fetchrow(_LOCK_ACCOUNT, service["account_id"])
        available = account["balance_micro"] + account["credit_limit_micro"]
        if account["status"] == "closed":  # nothing more is charged to a closed account
            charged = _Charged([], service["next_charge_at"], 0, available)
            reason = "account_closed"
        else:
            charged = await _charge(conn, service, account, now)
            reason = "credit"
        suspended = reason == "account_closed" or charged.short_micro > 0
        await conn.execute(
            "UPDATE services SET next_charge_at = $2, status = $3 WHERE id = $1",
            service_id, charged.next_charge_at, "suspended" if suspended else "active")
        if suspended:
            await _notice(conn, account["id"], "service_suspended", {
                **_service_detail(service, account), "reason": reason,
                "due_at": charged.next_charge_at.astimezone(UTC).isoformat(),
                "available_micro": charged.available_micro, "short_micro": charged.short_micro,
            })
    return _Renewed(account["number"], charged.lines, suspended)


def _service_detail(service: Mapping[str, Any], account: Mapping[str, Any]) -> dict[str, Any]:
    return {"service_id": service["id"], "service": service["name"], "kind": service["kind"], "did": service["did"],
            "amount_micro": service["amount_micro"], "currency": account["currency"].strip()}


async def _notice(conn: asyncpg.Connection, account_id: int, kind: str, detail: Mapping[str, Any]) -> None:
    await conn.execute("INSERT INTO notices (account_id, kind, detail) VALUES ($1, $2, $3::jsonb)",
                       account_id, kind, json.dumps(detail))
    NOTICES.labels(kind).inc()


# -- the operator's verbs -----------------------------------------------------------------------------


async def add_service(
    conn: asyncpg.Connection, *, store: RedisStore | None, account_number: str, kind: str, name: str,
    amount_micro: int, period: str = "month", every: int = 1, start: datetime | None = None,
    did: str | None = None, tax_class: str | None = None, reminder_days: int = 0, charge_now: bool = True,
) -> asyncpg.Record:
    """Create a recurring service on an account and return its row.

    `amount_micro` is the net price per period (>= 0). The schedule is anchored on `start`'s local day in
    the account's time zone (default: now), the first period beginning at that day's start. With
    `charge_now` the first period is charged at once, in advance (a DID rental), by the same charge as
    the renewals; when the credit does not pay for it nothing is created (InputError saying by how much
    it is short). Without it the first charge is left to the scheduler (`run_due`), which suspends the
    service instead when the credit is short. `store`: the Redis to tell of the charge (None: Redis
    catches up at the next `a2bd sync`).
    """
    if kind not in SERVICE_KINDS:
        raise InputError(f"service kind must be one of {', '.join(SERVICE_KINDS)}, not {kind!r}")
    if period not in PERIODS:
        raise InputError(f"period must be one of {', '.join(PERIODS)}, not {period!r}")
    if not 1 <= every <= 120:
        raise InputError(f"every must be between 1 and 120 periods, not {every}")
    if amount_micro < 0:
        raise InputError(f"a service's price must be 0 or more, not {format_amount(amount_micro)}")
    if not name.strip():
        raise InputError("a service needs a name, e.g. 'DID 3612345678' or 'Trunk channels x4'")
    if did is not None and not (did.isascii() and did.isdigit() and 3 <= len(did) <= 32):
        raise InputError(f"DID {did!r} must be 3 to 32 digits")
    if not 0 <= reminder_days <= 365:
        raise InputError(f"reminder days must be between 0 and 365, not {reminder_days}")
    if start is not None and start.tzinfo is None:
        raise InputError(f"start {start.isoformat()} needs a time zone")
    begin = start or datetime.now(UTC)
    async with conn.transaction():
        account = await conn.fetchrow(_LOCK_ACCOUNT_BY_NUMBER, account_number)
        if account is None:
            raise InputError(f"account {account_number} does not exist: create it with `a2bd account add`")
        if account["status"] == "closed":
            raise InputError(f"account {account_number} is closed: services cannot be added to it")
        tz = zone(account["timezone"])
        anchor = local_date(begin, tz).day
        try:
            async with conn.transaction():  # a savepoint: the transaction stays usable to say who holds the DID
                service = await conn.fetchrow(
                    "INSERT INTO services (account_id, kind, name, did, amount_micro, tax_class, period, every,"
                    " anchor_day, next_charge_at, reminder_days)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING *",
                    account["id"], kind, name.strip(), did, amount_micro, tax_class, period, every, anchor,
                    first_charge_at(begin, period, every, anchor, tz), reminder_days)
        except asyncpg.UniqueViolationError:
            holder = await conn.fetchval(
                "SELECT a.number FROM services s JOIN accounts a ON a.id = s.account_id"
                " WHERE s.did = $1 AND s.status <> 'cancelled'", did)
            raise InputError(f"DID {did} is already rented (account {holder}); cancel that service first") from None
        except asyncpg.ForeignKeyViolationError:
            raise InputError(f"tax class {tax_class!r} does not exist") from None
        except asyncpg.CheckViolationError as exc:
            raise InputError(f"service refused: {exc.constraint_name} ({exc.detail or exc.message})") from None
        lines: list[asyncpg.Record] = []
        if charge_now:
            charged = await _charge(conn, service, account, service["next_charge_at"])
            if charged.short_micro:
                raise InputError(
                    f"account {account_number} cannot pay the first period of {name.strip()!r}: it costs"
                    f" {format_amount(amount_micro)} {account['currency'].strip()} and the credit is short by"
                    f" {format_amount(charged.short_micro)}; record a payment first, or add it with charge_now"
                    " off to let the scheduler suspend it until paid")
            lines = charged.lines
            service = await conn.fetchrow(
                "UPDATE services SET next_charge_at = $2 WHERE id = $1 RETURNING *",
                service["id"], charged.next_charge_at)
    if lines and store is not None:
        await tell_redis(store, account_number, lines[-1])
    log.info("service added", service=service["id"], account=account_number, kind=kind, name=service["name"],
             charged=len(lines), next_charge_at=service["next_charge_at"].isoformat())
    return service


async def resume_service(conn: asyncpg.Connection, store: RedisStore | None, service_id: int,
                         now: datetime) -> asyncpg.Record:
    """Make a suspended service active again and charge it at once: a new period begins at the start of
    `now`'s local day (monthly and yearly services are re-anchored on that day) and the next renewal
    follows from it. The periods missed while suspended are not charged. When the credit does not pay
    for the period, InputError says by how much it is short and nothing changes. Returns the service row."""
    async with conn.transaction():
        service = await conn.fetchrow("SELECT * FROM services WHERE id = $1 FOR UPDATE", service_id)
        if service is None:
            raise InputError(f"service {service_id} does not exist")
        if service["status"] != "suspended":
            raise InputError(f"service {service_id} is {service['status']}; only a suspended service is resumed")
        account = await conn.fetchrow(_LOCK_ACCOUNT, service["account_id"])
        if account["status"] == "closed":
            raise InputError(f"account {account['number']} is closed: its services cannot be resumed")
        tz = zone(account["timezone"])
        today = local_date(now, tz)
        anchor = today.day if service["period"] in ("month", "year") else service["anchor_day"]
        restart = {**dict(service), "anchor_day": anchor, "next_charge_at": day_start(today, tz)}
        charged = await _charge(conn, restart, account, restart["next_charge_at"])
        if charged.short_micro:
            raise InputError(
                f"service {service_id} ({service['name']}) stays suspended: a period costs"
                f" {format_amount(service['amount_micro'])} {account['currency'].strip()} and the credit of account"
                f" {account['number']} is short by {format_amount(charged.short_micro)}; record a payment first")
        row = await conn.fetchrow(
            "UPDATE services SET status = 'active', anchor_day = $2, next_charge_at = $3 WHERE id = $1 RETURNING *",
            service_id, anchor, charged.next_charge_at)
    if charged.lines and store is not None:
        await tell_redis(store, account["number"], charged.lines[-1])
    log.info("service resumed", service=service_id, account=account["number"], charged=len(charged.lines))
    return row


async def cancel_service(conn: asyncpg.Connection, service_id: int) -> asyncpg.Record:
    """Stop a service for good: it is never charged again and its DID may be rented to someone else.

    No refund line is posted: the period already paid runs out unused (post a correction to refund part
    of it). Cancelling a cancelled service changes nothing. Returns the service row."""
    row = await conn.fetchrow(
        "UPDATE services SET status = 'cancelled' WHERE id = $1 RETURNING *", service_id)
    if row is None:
        raise InputError(f"service {service_id} does not exist")
    log.info("service cancelled", service=service_id)
    return row


async def services_of(conn: asyncpg.Connection, account_number: str) -> list[asyncpg.Record]:
    """Every service of one account, oldest first (for listings)."""
    return list(await conn.fetch(
        "SELECT s.* FROM services s JOIN accounts a ON a.id = s.account_id WHERE a.number = $1 ORDER BY s.id",
        account_number))


# -- the scheduler ------------------------------------------------------------------------------------


@asynccontextmanager
async def _connection(db: asyncpg.Connection | asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            yield conn
    else:
        yield db


async def run_due(db: asyncpg.Connection | asyncpg.Pool, store: RedisStore | None, now: datetime) -> RecurringReport:
    """Charge the renewals due at `now`, record the reminders and expiries due: see the module docstring.
    Safe to run from several daemons at once and to repeat: nothing is charged or noticed twice.
    `store`: the Redis to tell of new balances and expiry dates (None: it catches up at `a2bd sync`)."""
    if now.tzinfo is None:
        raise InputError(f"now {now.isoformat()} needs a time zone")
    report = RecurringReport()
    async with _connection(db) as conn:
        due = await conn.fetch(
            "SELECT id FROM services WHERE status = 'active' AND next_charge_at <= $1 ORDER BY next_charge_at, id",
            now)
    for row in due:
        try:
            async with _connection(db) as conn:
                renewed = await _renew(conn, row["id"], now)
        except Exception as exc:  # one bad service does not stop the run
            log.exception("service not charged", service=row["id"])
            report.errors.append(RecurringError(row["id"], f"not charged: {exc}"))
            continue
        if renewed is None:
            continue
        report.charged += len(renewed.lines)
        report.suspended += renewed.suspended
        if renewed.lines and store is not None:
            try:
                await tell_redis(store, renewed.number, renewed.lines[-1])
            except Exception as exc:  # committed: only Redis lags (the next sync catches up)
                log.exception("service charged; Redis not told", service=row["id"])
                report.errors.append(RecurringError(row["id"], f"charged; Redis not told (run `a2bd sync`): {exc}",
                                                    renewed.number))
    await _remind(db, now, report)
    await _expire(db, store, now, report)
    log.info("recurring run", **report.summary())
    return report


_REMINDER_CANDIDATES = """
SELECT s.id, s.account_id, s.kind, s.name, s.did, s.amount_micro, s.next_charge_at, s.reminder_days,
       s.reminded_for, a.timezone, a.currency
FROM services s JOIN accounts a ON a.id = s.account_id
WHERE s.status = 'active' AND s.reminder_days > 0 AND s.next_charge_at > $1
  AND s.next_charge_at <= $1 + s.reminder_days * interval '24 hours'
  AND s.reminded_for IS DISTINCT FROM s.next_charge_at
ORDER BY s.id
"""
# Once per renewal, even with two schedulers: the second UPDATE waits for the first and then finds
# reminded_for set, so it inserts nothing.
_REMIND = """
WITH s AS (
    UPDATE services SET reminded_for = next_charge_at
    WHERE id = $1 AND status = 'active' AND next_charge_at = $2 AND reminded_for IS DISTINCT FROM next_charge_at
    RETURNING account_id
)
INSERT INTO notices (account_id, kind, detail) SELECT account_id, 'renewal_reminder', $3::jsonb FROM s
RETURNING id
"""


async def _remind(db: asyncpg.Connection | asyncpg.Pool, now: datetime, report: RecurringReport) -> None:
    async with _connection(db) as conn:
        candidates = await conn.fetch(_REMINDER_CANDIDATES, now)
        for s in candidates:
            try:
                if not reminder_due(now, s["next_charge_at"], s["reminder_days"], s["reminded_for"]):
                    continue
                detail = {
                    **_service_detail(s, s), "renews_at": s["next_charge_at"].astimezone(UTC).isoformat(),
                    "renewal_date": local_date(s["next_charge_at"], s["timezone"]).isoformat(),
                }
                if await conn.fetchval(_REMIND, s["id"], s["next_charge_at"], json.dumps(detail)) is not None:
                    report.reminded += 1
                    NOTICES.labels("renewal_reminder").inc()
            except Exception as exc:  # one bad service does not stop the run
                log.exception("renewal reminder not recorded", service=s["id"])
                report.errors.append(RecurringError(s["id"], f"reminder not recorded: {exc}"))


# First use of an 'after_first_use' account: its earliest call line.
_FIRST_USE = """
UPDATE accounts a SET first_use_at = f.at
FROM (
    SELECT x.id, (SELECT min(l.created_at) FROM ledger l WHERE l.account_id = x.id AND l.kind = 'call') AS at
    FROM accounts x WHERE x.expiry_mode = 'after_first_use' AND x.first_use_at IS NULL
) f
WHERE a.id = f.id AND f.at IS NOT NULL
"""
# Accounts whose expires_at may not follow from their mode. The rule is expires_at_for's; this is only a
# filter so that a run does not read every account, and Python decides.
_EXPIRY_CANDIDATES = """
SELECT id, number, expiry_mode, expiry_days, created_at, first_use_at, expires_at FROM accounts
WHERE expiry_mode IN ('after_first_use', 'after_creation') AND expiry_days > 0
  AND (expiry_mode = 'after_creation' OR first_use_at IS NOT NULL)
  AND expires_at IS DISTINCT FROM
      (CASE expiry_mode WHEN 'after_creation' THEN created_at ELSE first_use_at END) + expiry_days * interval '24 hours'
ORDER BY id
"""
_SET_EXPIRY = """
UPDATE accounts a SET expires_at = v.at FROM unnest($1::bigint[], $2::timestamptz[]) AS v(id, at)
WHERE a.id = v.id AND a.expires_at IS DISTINCT FROM v.at
RETURNING a.id
"""
_NEWLY_EXPIRED = """
SELECT a.id, a.number, a.expires_at, a.expiry_mode FROM accounts a
WHERE a.status = 'active' AND a.expires_at <= $1
  AND NOT EXISTS (SELECT 1 FROM notices n WHERE n.account_id = a.id AND n.kind = 'expired'
                  AND (n.detail->>'expires_at')::timestamptz = a.expires_at)
ORDER BY a.id
"""
async def _expire(db: asyncpg.Connection | asyncpg.Pool, store: RedisStore | None, now: datetime,
                  report: RecurringReport) -> None:
    try:
        async with _connection(db) as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _EXPIRY_LOCK)
                await conn.execute(_FIRST_USE)
                ids: list[int] = []
                ats: list[datetime] = []
                for a in await conn.fetch(_EXPIRY_CANDIDATES):
                    try:
                        at = expires_at_for(a["expiry_mode"], a["expiry_days"], a["created_at"], a["first_use_at"],
                                            a["expires_at"])
                    except ValueError as exc:
                        report.errors.append(RecurringError(None, f"expiry not set: {exc}", a["number"]))
                        continue
                    if at is not None and at != a["expires_at"]:
                        ids.append(a["id"])
                        ats.append(at)
                changed = [r["id"] for r in await conn.fetch(_SET_EXPIRY, ids, ats)] if ids else []
                for a in await conn.fetch(_NEWLY_EXPIRED, now):
                    await _notice(conn, a["id"], "expired", {
                        "expires_at": a["expires_at"].astimezone(UTC).isoformat(), "expiry_mode": a["expiry_mode"]})
                    report.expired += 1
            report.expiry_set += len(changed)
            fresh = [dict(r) for r in await postgres.accounts_for_sync(conn, changed)] if changed and store else []
    except Exception as exc:  # the renewals are done; report and let the next run try the expiry again
        log.exception("expiry pass failed")
        report.errors.append(RecurringError(None, f"expiry not updated: {exc}"))
        return
    if fresh and store is not None:
        try:
            await store.put_accounts(fresh)
        except StoreUnavailable as exc:
            log.warning("expiry set in PostgreSQL; Redis not updated (run `a2bd sync`)", error=str(exc))
            report.errors.append(RecurringError(None, f"Redis not updated (run `a2bd sync`): {exc}"))
