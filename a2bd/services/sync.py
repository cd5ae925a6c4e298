"""Load Redis from PostgreSQL, the system of record: accounts, their caller IDs and PINs, providers.

Run at every daemon start and by `a2bd sync`. Balances are copied from PostgreSQL; live reservations
are left untouched. Index keys (caller ID, PIN) that no longer belong to any account are removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from a2bd.adapters import postgres
from a2bd.adapters.redis_store import RedisStore, callerid_key, pin_key


@dataclass(frozen=True, slots=True)
class SyncReport:
    accounts: int
    providers: int
    stale_keys_removed: int


async def sync_redis(conn: asyncpg.Connection, store: RedisStore) -> SyncReport:
    accounts = await postgres.all_accounts(conn)
    providers = await postgres.list_providers(conn)
    wanted = {callerid_key(c) for a in accounts for c in a["callerids"]}
    wanted |= {pin_key(a["pin"]) for a in accounts if a["pin"]}
    n_accounts = await store.put_accounts([dict(a) for a in accounts])
    n_providers = await store.put_providers([dict(p) for p in providers])
    stale: list[str] = []
    for pattern in ("a2b:cid:*", "a2b:pin:*"):
        async for key in store.client.scan_iter(match=pattern, count=1000):
            if key not in wanted:
                stale.append(key)
    if stale:
        await store.client.delete(*stale)
    return SyncReport(n_accounts, n_providers, len(stale))
