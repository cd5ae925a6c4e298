"""`a2bd serve`: the daemon's lifecycle.

Start: validate settings, reach PostgreSQL and Redis, check the schema, load tariffs, load Redis from
PostgreSQL, start following calls on the configured Asterisk servers (AMI: tracker, ledger writer, credit
guard, reconciler), then open the FastAGI and metrics sockets. Stop (SIGTERM/SIGINT), in uvicorn's order: stop
accepting, let sessions in flight finish up to a bound, stop background tasks, close the stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from typing import Any

import asyncpg
import structlog

from a2bd.adapters import postgres
from a2bd.adapters.redis_store import RedisStore
from a2bd.agi.server import AgiServer
from a2bd.api.metrics import start_metrics_server
from a2bd.config import Settings
from a2bd.errors import ConfigError
from a2bd.services.authorization import Authorizer
from a2bd.services.catalog import ProviderCatalog, TariffCatalog
from a2bd.services.lifecycle import CallLifecycle
from a2bd.services.sync import needs_sync, sync_redis

log = structlog.get_logger("a2bd.daemon")


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.agi: AgiServer | None = None
        self.metrics: asyncio.Server | None = None
        self.store: RedisStore | None = None
        self.authorizer: Authorizer | None = None
        self.pool: asyncpg.Pool | None = None
        self.lifecycle: CallLifecycle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        s = self.settings
        conn = await postgres.connect(s.postgres.url)
        try:
            pending = {m.version for m in postgres.migrations()} - {
                r["version"] for r in await _applied(conn)
            }
            if pending:
                raise ConfigError(f"database schema is behind ({', '.join(sorted(pending))} not applied): "
                                  "run `a2bd db migrate`")
            self.store = RedisStore.from_url(s.redis.url, s.redis.timeout_s, s.redis.max_connections)
            await self.store.ping()
            tariffs = TariffCatalog(s.postgres.url)
            await tariffs.refresh(conn)
            report = await sync_redis(conn, self.store)
            log.info("redis loaded from postgresql", accounts=report.accounts, providers=report.providers)
        finally:
            await conn.close()
        providers = ProviderCatalog(self.store)
        await providers.refresh()
        self.authorizer = Authorizer(self.store, tariffs, providers, s)
        if s.asterisk:
            # Calls are followed over AMI, rated, written to the ledger and guarded (services/lifecycle.py).
            self.pool = await postgres.create_pool(s.postgres.url, s.postgres.min_pool, s.postgres.max_pool)
            self.lifecycle = CallLifecycle(s, self.store, self.pool)
            self.authorizer.on_reserved = self.lifecycle.recent.put
            await self.lifecycle.start()
        else:
            log.warning("no [[asterisk]] server configured: calls are authorized but not followed, rated or guarded")
        if s.billing.scheduler_interval_s:
            from a2bd.services.scheduler import BillingScheduler

            if self.pool is None:
                self.pool = await postgres.create_pool(s.postgres.url, 1, 2)
            self._spawn(BillingScheduler(self.pool, self.store, s).run(self.stop), "billing-scheduler")
        self._spawn(tariffs.follow(self.stop), "tariff-follower")
        self._spawn(self._watch_redis(), "redis-watch")
        self._spawn(providers.follow(self.stop), "provider-follower")
        self.agi = AgiServer(s.agi, {"authorize": self.authorizer.handle})
        await self.agi.start()
        if s.metrics.port:
            self.metrics = await start_metrics_server(s.metrics.host, s.metrics.port)
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # "asyncio" or "uvloop"
        log.info("a2bd serving", agi=f"{s.agi.host}:{self.agi.port}", loop=loop,
                 metrics=f"{s.metrics.host}:{s.metrics.port}" if s.metrics.port else "off")
        self.ready.set()

    async def _watch_redis(self, interval_s: float = 1.0) -> None:
        """Redis restarted empty: reload it from PostgreSQL within a second (authorizations fail closed
        meanwhile, NOACCOUNT/ERROR), then let the reconciler find the live calls again."""
        assert self.store is not None
        while not self.stop.is_set():
            await asyncio.sleep(interval_s)
            try:
                if not await needs_sync(self.store):
                    continue
                if self.lifecycle is not None:
                    await self.lifecycle.reconciler.run_once()  # syncs first, then reconciles
                else:
                    conn = await postgres.connect(self.settings.postgres.url)
                    try:
                        await sync_redis(conn, self.store)
                    finally:
                        await conn.close()
                    log.warning("Redis had lost its state: reloaded from PostgreSQL")
            except Exception as exc:  # Redis or PostgreSQL away, or anything else: never stop watching
                log.warning("Redis or PostgreSQL unavailable; will check again", error=repr(exc))

    async def close(self, grace_s: float = 10.0) -> None:
        self.stop.set()
        if self.agi is not None:
            await self.agi.close(grace_s)
        if self.metrics is not None:
            self.metrics.close()
            await self.metrics.wait_closed()
        if self.lifecycle is not None:
            await self.lifecycle.close()  # flushes the ledger writer (bounded)
        if self.pool is not None:
            await self.pool.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.store is not None:
            await self.store.close()
        log.info("a2bd stopped")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self.stop.set)
        try:
            await self.start()
            await self.stop.wait()
        finally:
            await self.close()


async def _applied(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    try:
        return list(await conn.fetch("SELECT version FROM schema_migrations"))
    except asyncpg.UndefinedTableError:  # the database was never migrated
        return []
