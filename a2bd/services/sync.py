"""Load Redis from PostgreSQL, the system of record: accounts, their caller IDs and PINs, providers.

Run at every daemon start and by `a2bd sync`. Balances are copied from PostgreSQL with the id of the newest
ledger line they include, and applied only where Redis is not already ahead (a daemon settling calls
meanwhile); live reservations are left untouched (the reconciler settles those whose call has ended). The
snapshot is read twice, and what moved between the reads written again: that levels calls committed
while the first was written (a storm with Redis restarted empty found three such balances left behind).
Index keys (caller ID, PIN) that no longer belong to any account are removed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from a2bd.adapters import postgres
from a2bd.adapters.redis_store import RedisStore, callerid_key, pin_key


@dataclass(frozen=True, slots=True)
class SyncReport:
    accounts: int
    providers: int
    stale_keys_removed: int


async def sync_redis(conn: asyncpg.Connection, store: RedisStore) -> SyncReport:
    accounts = await postgres.accounts_for_sync(conn)
    providers = await postgres.providers_for_sync(conn)
    wanted = {callerid_key(c) for a in accounts for c in a["callerids"]}
    wanted |= {pin_key(a["pin"]) for a in accounts if a["pin"]}
    n_accounts = await store.put_accounts([dict(a) for a in accounts])
    n_providers = await store.put_providers([dict(p) for p in providers])
    # A call committed after the snapshot above was read, whose settle came before its account was written
    # back into an emptied Redis, found nothing to settle (settle.lua skips a missing account). Read the
    # snapshot once more, now that every account is in Redis, and write again what moved meanwhile:
    # rebase.lua applies only what is newer, and any later commit settles normally.
    await _level(accounts, await postgres.accounts_for_sync(conn), store.put_accounts, "number")
    await _level(providers, await postgres.providers_for_sync(conn), store.put_providers, "name")
    stale: list[str] = []
    for pattern in ("a2b:cid:*", "a2b:pin:*"):
        stale += [key for key in await store.scan(pattern) if key not in wanted]
    if stale:
        await store.delete(stale)
    await store.mark_synced(time.time())
    return SyncReport(n_accounts, n_providers, len(stale))


async def _level(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]],
                 put: Callable[[list[dict[str, Any]]], Awaitable[int]], key: str) -> None:
    """Write the rows of `after` whose newest ledger line moved since `before` was read."""
    seen = {row[key]: row["last_line_id"] for row in before}
    moved = [dict(row) for row in after if seen.get(row[key]) != row["last_line_id"]]
    if moved:
        await put(moved)


async def needs_sync(store: RedisStore) -> bool:
    """True when Redis lost what sync wrote (restarted empty, flushed): the marker key is gone."""
    return not await store.is_synced()
