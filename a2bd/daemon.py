"""`a2bd serve`: the daemon's lifecycle.

Start: validate settings, reach PostgreSQL and Redis, check the schema, load tariffs, load Redis from
PostgreSQL, then open the FastAGI and metrics sockets. Stop (SIGTERM/SIGINT), in uvicorn's order: stop
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
from a2bd.services.sync import sync_redis

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
        self._spawn(tariffs.follow(self.stop), "tariff-follower")
        self._spawn(providers.follow(self.stop), "provider-follower")
        self.agi = AgiServer(s.agi, {"authorize": self.authorizer.handle})
        await self.agi.start()
        if s.metrics.port:
            self.metrics = await start_metrics_server(s.metrics.host, s.metrics.port)
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # "asyncio" or "uvloop"
        log.info("a2bd serving", agi=f"{s.agi.host}:{self.agi.port}", loop=loop,
                 metrics=f"{s.metrics.host}:{s.metrics.port}" if s.metrics.port else "off")
        self.ready.set()

    async def close(self, grace_s: float = 10.0) -> None:
        self.stop.set()
        if self.agi is not None:
            await self.agi.close(grace_s)
        if self.metrics is not None:
            self.metrics.close()
            await self.metrics.wait_closed()
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
