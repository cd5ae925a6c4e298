"""Posting money that is not a call: one ledger line, then the hot state, then every guard is told.

The only way an operator moves a balance (DESIGN §1.5). The line is committed first; Redis is then set to
the balance the line states (settle.lua / provider_settle.lua: newest line wins), and `a2b:changed` makes
every daemon's credit guard recompute the account's instant (a payment pushes it later, a charge sooner).
"""

from __future__ import annotations

import time

import asyncpg
import structlog

from a2bd.adapters import postgres
from a2bd.adapters.redis_store import RedisStore, utc_day
from a2bd.errors import InputError, StoreUnavailable

log = structlog.get_logger("a2bd.posting")

ACCOUNT_KINDS = ("payment", "refill", "charge", "correction")


async def post_to_account(
    conn: asyncpg.Connection, store: RedisStore, number: str, kind: str, amount_micro: int, description: str = ""
) -> asyncpg.Record:
    """`amount_micro` credits the account when positive (a payment), debits it when negative (a charge).
    Returns the newest line written (with a payment taxed at payment, its tax line: the balance after both)."""
    if kind not in ACCOUNT_KINDS:
        raise InputError(f"kind must be one of {', '.join(ACCOUNT_KINDS)}")
    acct = await conn.fetchrow("SELECT id, tax_mode, vat_rate_ppm FROM accounts WHERE number = $1", number)
    if acct is None:
        raise InputError(f"account {number} does not exist")
    lines = postgres.credit_lines(kind, amount_micro, description, tax_mode=acct["tax_mode"],
                                  vat_rate_ppm=acct["vat_rate_ppm"])
    written = await postgres.post_lines(conn, acct["id"], lines)
    await tell_redis(store, number, written[-1])
    return written[-1]


async def tell_redis(store: RedisStore, number: str, newest_line: asyncpg.Record) -> None:
    """After a commit: set the account's hot balance to what its newest line states, and wake every guard.
    Redis being away loses nothing (it lags; the daemon's resync or `a2bd sync` catches up)."""
    try:
        await store.settle(number, newest_line["id"], newest_line["balance_after_micro"], utc_day(time.time()), [])
        await store.publish_changed([number])
    except StoreUnavailable as exc:
        log.warning("posted in PostgreSQL; Redis not updated (run `a2bd sync`)", account=number, error=str(exc))


async def pay_provider(
    conn: asyncpg.Connection, store: RedisStore, name: str, amount_micro: int, description: str = ""
) -> asyncpg.Record:
    """A payment to a carrier: a positive amount lowers what we owe it, a negative one raises it."""
    provider_id = await conn.fetchval("SELECT id FROM providers WHERE name = $1", name)
    if provider_id is None:
        raise InputError(f"provider {name} does not exist")
    line = await postgres.post(conn, kind="provider_payment", provider_id=provider_id,
                               provider_amount_micro=-amount_micro, description=description)
    try:
        await store.settle_provider(name, line["id"], line["provider_balance_after_micro"], utc_day(time.time()), 0)
    except StoreUnavailable as exc:
        log.warning("posted in PostgreSQL; Redis not updated (run `a2bd sync`)", provider=name, error=str(exc))
    return line
