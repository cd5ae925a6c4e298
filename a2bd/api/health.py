"""Readiness: can this daemon do its work now? Redis, PostgreSQL and every configured AMI server.

A health check is an async callable returning one entry per dependency: its name → None when it is fine,
else why not (one line, for the operator reading ``curl /healthz``). `daemon_health` builds the daemon's;
the metrics endpoint (api/metrics.py) caches whatever it is given, so that a scraper asking many times a
second costs the stores at most one PING and one ``SELECT 1`` per cache period.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

import asyncpg

from a2bd.adapters.redis_store import RedisStore
from a2bd.ami.client import AmiClient
from a2bd.observability import redact_text

__all__ = ["CachedHealth", "HealthCheck", "HealthReport", "daemon_health"]

HealthReport = dict[str, str | None]
HealthCheck = Callable[[], Awaitable[HealthReport]]


def daemon_health(
    store: RedisStore,
    pool: asyncpg.Pool | None,
    ami_clients: Mapping[str, AmiClient],
    *,
    timeout_s: float = 1.0,
) -> HealthCheck:
    """The daemon's readiness: ``redis`` answers PING (on the authorization path's connection and on the
    pool the rest uses), ``postgresql`` answers ``SELECT 1`` on a pooled connection (omitted when `pool` is
    None), and each ``ami:<server>`` is logged in (the client's own Ping watchdog drops a silent link, so
    its state is current within ami.ping_interval_s + ping_timeout_s; no AMI traffic is added here).

    The store checks run concurrently, each bounded by `timeout_s`: a blackholed server costs one
    `timeout_s`, not a hang.
    """

    async def check() -> HealthReport:
        redis, postgresql = await asyncio.gather(
            _bounded("PING", timeout_s, _ping_redis(store)),
            _bounded("SELECT 1", timeout_s, _select_one(pool)) if pool is not None else _skipped(),
        )
        report: HealthReport = {"redis": redis}
        if pool is not None:
            report["postgresql"] = postgresql
        for name, client in ami_clients.items():
            report[f"ami:{name}"] = None if client.connected else f"not logged in (state {client.state})"
        return report

    return check


async def _ping_redis(store: RedisStore) -> None:
    # Both connections, so neither failure is left unretrieved in a task of its own.
    results = await asyncio.gather(store.mux.execute("PING"), store.client.ping(), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _select_one(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.fetchval("SELECT 1")


async def _skipped() -> None:
    return None


async def _bounded(what: str, timeout_s: float, probe: Awaitable[None]) -> str | None:
    try:
        async with asyncio.timeout(timeout_s):
            await probe
    except TimeoutError:
        return f"no answer to {what} within {timeout_s:g} s"
    except Exception as exc:  # any failure is the answer; CancelledError passes through
        return f"{what} failed: {_describe(exc)}"
    return None


def _describe(exc: BaseException) -> str:
    # The adapters' StoreUnavailable already reads well; a driver's exception is named by its type. Whoever
    # reaches the metrics port reads this: a URL's password in a driver's message is masked.
    text = redact_text(str(exc).splitlines()[0]) if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class CachedHealth:
    """`check` run at most once per `ttl_s` (concurrent callers share the run in flight), bounded by
    `timeout_s` as a whole; a check that raises or overruns is reported as the ``health`` entry."""

    def __init__(self, check: HealthCheck, *, ttl_s: float = 1.0, timeout_s: float = 2.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._check = check
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._last: tuple[float, HealthReport] | None = None
        self._running: asyncio.Task[HealthReport] | None = None

    async def __call__(self) -> HealthReport:
        last = self._last
        if last is not None and self._clock() - last[0] < self.ttl_s:
            return last[1]
        if self._running is None:
            self._running = asyncio.get_running_loop().create_task(self._run(), name="a2bd-health")
        # shield: a caller that goes away must not cancel the run the others wait for
        return await asyncio.shield(self._running)

    async def _run(self) -> HealthReport:
        try:
            async with asyncio.timeout(self.timeout_s):
                report = await self._check()
        except TimeoutError:
            report = {"health": f"the health check took longer than {self.timeout_s:g} s"}
        except Exception as exc:  # a broken check says so rather than failing the request
            report = {"health": f"the health check failed: {_describe(exc)}"}
        finally:
            self._running = None
        self._last = (self._clock(), report)
        return report
