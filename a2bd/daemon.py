"""`a2bd serve`: the daemon's lifecycle.

Start: validate settings, reach PostgreSQL and Redis, check the schema, load tariffs, load Redis from
PostgreSQL, start following calls on the configured Asterisk servers (AMI: tracker, ledger writer, credit
guard, reconciler), then open the FastAGI and metrics sockets. Stop (SIGTERM/SIGINT), in uvicorn's order: stop
accepting, let sessions in flight finish up to a bound, stop background tasks, close the stores.

Under systemd (Type=notify, see systemd/a2bd.service) `run()` also tells the service manager what happens:
READY=1 once every socket listens, RELOADING=1 ... READY=1 around a SIGHUP reload, STOPPING=1 at SIGTERM,
WATCHDOG=1 while the event loop turns, and a STATUS= line for `systemctl status`.

SIGHUP reloads what can change under a running daemon: the tariffs (from PostgreSQL, now rather than at the
next NOTIFY or poll), the providers' state (from Redis), and the settings file, of which only LIVE_KEYS are
applied; any other key that changed is logged as waiting for a restart. A settings file that does not load
is one error in the log and the running settings stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import structlog

from a2bd import systemd
from a2bd.adapters import postgres
from a2bd.adapters.redis_store import RedisStore
from a2bd.agi.server import AgiServer
from a2bd.api.health import daemon_health
from a2bd.api.metrics import start_metrics_server
from a2bd.config import Settings
from a2bd.errors import ConfigError
from a2bd.observability import LOOP_LAG_SECONDS, configure_logging
from a2bd.services.authorization import Authorizer
from a2bd.services.catalog import ProviderCatalog, TariffCatalog
from a2bd.services.lifecycle import CallLifecycle
from a2bd.services.sync import needs_sync, sync_redis

log = structlog.get_logger("a2bd.daemon")

# Settings a SIGHUP applies to the running daemon. Most are read where they are used, per call or per log
# line (the Authorizer reads agi.pin_* and billing.fail_open_limit_ms from its `settings` at every call), so
# swapping the value is the whole change; agi.allow and agi.shed_after_s are handed to the FastAGI server
# (AgiServer.reconfigure), and log.* to configure_logging. Everything else is bound at start (sockets,
# pools, AMI clients, the guard's horizon, the scheduler's mailer) or must agree across components
# (billing.max_call_s is both the Authorizer's cap and the guard's horizon): those wait for a restart.
LIVE_KEYS = frozenset({
    "log.level", "log.json",
    "billing.fail_open_limit_ms",
    "agi.pin_prompt", "agi.pin_timeout_ms", "agi.pin_max_digits", "agi.pin_attempts",
    "agi.allow", "agi.shed_after_s",  # handed to the FastAGI server (AgiServer.reconfigure)
})


class Daemon:
    def __init__(self, settings: Settings, *, reload_settings: Callable[[], Settings] | None = None) -> None:
        """`reload_settings` reads the settings again as they were read at start (the same file and
        environment); without it a SIGHUP refreshes tariffs and providers but not the settings."""
        self.settings = settings
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.agi: AgiServer | None = None
        self.metrics: asyncio.Server | None = None
        self.store: RedisStore | None = None
        self.authorizer: Authorizer | None = None
        self.tariffs: TariffCatalog | None = None
        self.providers: ProviderCatalog | None = None
        self.pool: asyncpg.Pool | None = None
        self.lifecycle: CallLifecycle | None = None
        self._reload_settings = reload_settings
        self._reload_requested = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        # What STATUS= adds to "serving FastAGI on ...", by topic ("stores", "reload", "restart").
        self._notes: dict[str, str] = {}

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_report_death)

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
            self.tariffs = tariffs = TariffCatalog(s.postgres.url)
            await tariffs.refresh(conn)
            report = await sync_redis(conn, self.store)
            log.info("redis loaded from postgresql", accounts=report.accounts, providers=report.providers)
        finally:
            await conn.close()
        self.providers = providers = ProviderCatalog(self.store)
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
        self._spawn(measure_loop_lag(), "loop-lag")
        self._spawn(providers.follow(self.stop), "provider-follower")
        # Besides loopback and agi.allow, FastAGI is taken only from the [[asterisk]] servers' addresses.
        self.agi = AgiServer(s.agi, {"authorize": self.authorizer.handle}, peers=tuple(s.server_for_agi_peer()))
        await self.agi.start()
        if s.metrics.port:
            clients = self.lifecycle.clients if self.lifecycle is not None else {}
            self.metrics = await start_metrics_server(s.metrics.host, s.metrics.port,
                                                      daemon_health(self.store, self.pool, clients),
                                                      token=s.metrics.read_token())
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
                if await needs_sync(self.store):
                    if self.lifecycle is not None:
                        await self.lifecycle.reconciler.run_once()  # syncs first, then reconciles
                    else:
                        conn = await postgres.connect(self.settings.postgres.url)
                        try:
                            await sync_redis(conn, self.store)
                        finally:
                            await conn.close()
                        log.warning("Redis had lost its state: reloaded from PostgreSQL")
                self._note("stores", None)
            except Exception as exc:  # Redis or PostgreSQL away, or anything else: never stop watching
                log.warning("Redis or PostgreSQL unavailable; will check again", error=repr(exc))
                self._note("stores", "Redis or PostgreSQL unavailable, answering fail-closed")

    async def reload(self) -> None:
        """SIGHUP: the settings file (LIVE_KEYS only), then tariffs and providers. Never raises: whatever
        cannot be reloaded is logged and the running state stays."""
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}", "STATUS=reloading")
        log.info("reloading (SIGHUP)")
        try:
            self._reload_file()
            await self._refresh_catalogs()
        finally:
            if not self.stop.is_set():
                systemd.notify("READY=1", self._status())

    def _reload_file(self) -> None:
        if self._reload_settings is None:
            log.info("settings not re-read: this daemon was not told where they come from")
            return
        try:
            new = self._reload_settings()
            changed = changed_keys(self.settings, new)
            live = [key for key in changed if key in LIVE_KEYS]
            later = [key for key in changed if key not in LIVE_KEYS]
            effective = with_keys(self.settings, new, live)
        except Exception as exc:  # ConfigError above all, or an unreadable file: a reload never stops us
            log.error("settings not reloaded, the running ones stay", error=str(exc))
            self._notes["reload"] = "the last reload rejected the settings file (see the log)"
            return
        self._notes.pop("reload", None)
        if later:
            log.warning("changed settings take effect at the next restart", keys=later)
            self._notes["restart"] = f"restart to apply {', '.join(later)}"
        else:
            self._notes.pop("restart", None)
        if live:
            self.settings = effective
            if self.authorizer is not None:
                self.authorizer.settings = effective
            if any(key.startswith("log.") for key in live):
                configure_logging(effective.log.level, effective.log.json)
            if self.agi is not None and {"agi.allow", "agi.shed_after_s"} & set(live):
                self.agi.reconfigure(effective.agi)
        log.info("settings reloaded", applied=live)

    async def _refresh_catalogs(self) -> None:
        if self.tariffs is not None:
            try:
                conn = await postgres.connect(self.settings.postgres.url)
                try:
                    changed = await self.tariffs.refresh(conn)
                finally:
                    await conn.close()
                log.info("tariffs refreshed", changed=changed)
            except Exception as exc:  # PostgreSQL away: the tariff follower keeps trying on its own
                log.warning("tariffs not refreshed, the loaded ones stay", error=str(exc))
        if self.providers is not None:
            try:
                await self.providers.refresh()
            except Exception as exc:  # Redis away: the provider follower keeps trying every second
                log.warning("providers not refreshed, the last known state stays", error=str(exc))

    async def _reloads(self) -> None:
        """One reload at a time; signals arriving during a reload are folded into one more."""
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            await self.reload()

    async def _feed_watchdog(self, every_s: float) -> None:
        """WATCHDOG=1 every `every_s` seconds for as long as the event loop turns.

        What only a watchdog can catch is a loop that stopped turning (a blocking call, a C extension
        spinning): then no call is answered, and a restart is the cure. Redis or PostgreSQL being away is
        deliberately not a reason to starve it: the daemon still answers every call (fail-closed, or
        fail-open within billing.fail_open_limit_ms), a restart would not bring a store back, and killing
        the daemon would cut the sessions in flight and the ledger lines not yet written. That state shows
        in STATUS=, the log and the metrics instead.
        """
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(every_s)

    def _note(self, topic: str, text: str | None) -> None:
        """Change one part of STATUS=; tell systemd only when it changed and while serving."""
        if self._notes.get(topic) == text:
            return
        if text is None:
            del self._notes[topic]
        else:
            self._notes[topic] = text
        if self.ready.is_set() and not self.stop.is_set():
            systemd.notify(self._status())

    def _status(self) -> str:
        where = f"{self.settings.agi.host}:{self.agi.port}" if self.agi is not None else "?"
        return "; ".join([f"STATUS=serving FastAGI on {where}", *self._notes.values()])

    def _terminate(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            return
        log.info("stopping", signal=sig.name)
        systemd.notify("STOPPING=1", "STATUS=stopping: draining FastAGI sessions, flushing the ledger")
        self.stop.set()

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
        """The process under a service manager: signals, READY/RELOADING/STOPPING and the watchdog.

        SIGHUP is handled from before start() so that an early one cannot kill the process (Python's
        default); with Type=notify systemd sends none before READY=1 anyway. The reload waits for start().
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._terminate, sig)
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        try:
            await self.start()
            if not self.stop.is_set():
                self._spawn(self._reloads(), "reloader")
                timeout_s = systemd.watchdog_interval_s()
                if timeout_s:
                    self._spawn(self._feed_watchdog(timeout_s / 2), "watchdog")
                systemd.notify("READY=1", self._status())
            await self.stop.wait()
        finally:
            await self.close()


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """`section.key` of every setting that differs ("asterisk" for the server list as a whole)."""
    keys: list[str] = []
    for f in dataclasses.fields(old):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if f.name == "asterisk":
            if before != after:
                keys.append("asterisk")
            continue
        keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(before)
                 if getattr(before, g.name) != getattr(after, g.name)]
    return keys


def with_keys(base: Settings, new: Settings, keys: list[str]) -> Settings:
    """`base` with the values of `keys` (`section.key`) taken from `new`."""
    result = base
    for key in keys:
        section, _, name = key.partition(".")
        value = getattr(getattr(new, section), name)
        result = dataclasses.replace(result, **{section: dataclasses.replace(getattr(result, section),
                                                                             **{name: value})})
    return result.validate()


async def measure_loop_lag(every_s: float = 0.1) -> None:
    """Observe how late the loop wakes a sleep of `every_s` (a2bd_loop_lag_seconds), for ever: a busy loop
    (CPU saturated, a long callback, a GC pause) delays every call's work by as much."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + every_s
        await asyncio.sleep(every_s)
        LOOP_LAG_SECONDS.observe(max(loop.time() - due, 0.0))


def _report_death(task: asyncio.Task[Any]) -> None:
    """A background task is meant to live as long as the daemon: say so when one ends in an exception
    (otherwise it vanishes from the set with nobody retrieving the error)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background task died", task=task.get_name(), error=repr(exc), exc_info=exc)


async def _applied(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    try:
        return list(await conn.fetch("SELECT version FROM schema_migrations"))
    except asyncpg.UndefinedTableError:  # the database was never migrated
        return []
