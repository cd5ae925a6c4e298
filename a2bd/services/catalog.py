"""What every daemon holds in memory for authorization: tariffs (from PostgreSQL) and providers (Redis).

Tariffs are reloaded when PostgreSQL says a tariff changed (LISTEN a2bd_tariffs, sent by a trigger on
rates), after a lost listener connection, and every `poll_s` as a backstop. A reload builds a new
TariffBook and swaps it in whole: a lookup never sees half a tariff.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from typing import Any

import asyncpg
import structlog

from a2bd.adapters import postgres
from a2bd.adapters.redis_store import RedisStore
from a2bd.domain.authorize import ProviderState
from a2bd.domain.tariff import Tariff, TariffBook
from a2bd.errors import StoreUnavailable
from a2bd.observability import TARIFF_PREFIXES, TARIFF_RELOADS

log = structlog.get_logger("a2bd.catalog")


class TariffCatalog:
    def __init__(self, pg_url: str, *, poll_s: float = 60.0) -> None:
        self.pg_url = pg_url
        self.poll_s = poll_s
        self.book = TariffBook()
        self.versions: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()

    def get(self, name: str) -> Tariff | None:
        return self.book.get(name)

    async def refresh(self, conn: asyncpg.Connection) -> list[str]:
        """Load the tariffs whose version moved since the last load; return their names."""
        async with self._lock:
            versions = await postgres.tariff_versions(conn)
            changed = [n for n, v in versions.items() if self.versions.get(n) != v]
            if not changed and versions.keys() == self.versions.keys():
                return []
            tariffs = {n: t for n, t in self.book.tariffs.items() if n in versions}
            for name in changed:
                started = time.perf_counter()
                # A tariff is a million small objects and no reference cycles: the cyclic collector
                # would only rescan them, again and again, while they are created.
                gc.disable()
                try:
                    entries = await postgres.load_tariff_entries(conn, name)
                    tariffs[name] = Tariff.build(name, entries)
                finally:
                    gc.enable()
                TARIFF_PREFIXES.labels(name).set(len(tariffs[name]))
                log.info("tariff loaded", tariff=name, prefixes=len(tariffs[name]), rates=len(entries),
                         seconds=round(time.perf_counter() - started, 3))
            self.book = TariffBook(tariffs)
            # Out of the collector's sight from now on: a full collection with a million-prefix tariff
            # held took 0.2 s, a pause of every call in flight. Freed objects are still freed (by their
            # reference counts, as tariffs hold no cycles): replaced tariffs do not leak. Unfreezing first
            # hands back to the collector whatever the previous freeze caught in flight.
            gc.unfreeze()
            gc.freeze()
            self.versions = versions
            TARIFF_RELOADS.inc()
            return changed

    async def follow(self, stop: asyncio.Event) -> None:
        """Reload on NOTIFY until `stop`; reconnect with backoff when PostgreSQL goes away."""
        backoff = 0.5
        while not stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await postgres.connect(self.pg_url)
                await conn.add_listener("a2bd_tariffs", self._notified)
                await self.refresh(conn)  # anything missed while not listening
                backoff = 0.5
                while not stop.is_set() and not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.poll_s):
                            await self._changed.wait()
                    self._changed.clear()
                    await asyncio.sleep(0.2)  # one reload for a burst of imports
                    await self.refresh(conn)
            except (StoreUnavailable, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("tariff listener lost PostgreSQL; retrying", error=str(exc), retry_s=backoff)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff):
                        await stop.wait()
                backoff = min(backoff * 2, 30.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=2)

    def _notified(self, *_: Any) -> None:
        self._changed.set()


class ProviderCatalog:
    """Carriers and their live usage, refreshed from Redis every `poll_s` (routing may lag by that)."""

    def __init__(self, store: RedisStore, *, poll_s: float = 1.0) -> None:
        self.store = store
        self.poll_s = poll_s
        self.providers: dict[str, ProviderState] = {}

    async def refresh(self) -> None:
        fresh = await self.store.providers()
        if not fresh and self.providers and not await self.store.is_synced():
            return  # Redis restarted empty: keep routing on the last known state until it is reloaded
        self.providers = fresh

    async def follow(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.refresh()
            except StoreUnavailable as exc:
                log.warning("provider refresh failed; keeping the last known state", error=str(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await stop.wait()
