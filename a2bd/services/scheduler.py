"""The billing scheduler: what must happen at a time rather than on a call.

Each pass, in this order: recurring charges, renewal reminders and account expiry (services/recurring.py);
invoice days that have begun in each account's time zone (services/invoicing.py); PDFs of newly issued
invoices; then the e-mail outbox (services/notify.py), so an invoice closed in this pass is rendered and
sent in it. Recurring charges go first so that a DID rented for the new month is on the new preview, not
on the invoice being closed (its line is dated after the period's end).

Several daemons may run the scheduler: a PostgreSQL advisory lock lets one pass run at a time, and every
step is safe to repeat anyway (row locks, idempotency keys). A step that fails is logged and counted; the
others still run, and the next pass tries again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from a2bd.adapters.mailer import Mailer
from a2bd.adapters.redis_store import RedisStore
from a2bd.config import Settings
from a2bd.domain.statement import InvoiceDocument
from a2bd.services import invoicing, notify, recurring

log = structlog.get_logger("a2bd.scheduler")

_LOCK = 0x61326263  # "a2bc": one scheduler pass at a time across daemons


class BillingScheduler:
    def __init__(self, pool: asyncpg.Pool, store: RedisStore | None, settings: Settings,
                 render: Callable[[InvoiceDocument], bytes] | None = None, mailer: Mailer | None = None) -> None:
        if render is None:
            from a2bd.adapters.pdf import render_invoice

            render = render_invoice
        self.pool = pool
        self.store = store
        self.settings = settings
        self.render = render
        self.mailer = mailer or Mailer(settings.mail)

    async def run_once(self, now: datetime | None = None) -> dict[str, Any]:
        """One pass; returns what each step did (or `busy` when another daemon holds the pass)."""
        now = now or datetime.now(UTC)
        report: dict[str, Any] = {}
        async with self.pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK):
                return {"busy": True}
            try:
                await self._step(report, "recurring", lambda: self._recurring(conn, now))
                await self._step(report, "invoices", lambda: self._invoices(conn, now))
                await self._step(report, "documents", lambda: self._documents(conn))
                # the clock again: notices recorded by this pass (an invoice's) are due from their commit
                await self._step(report, "mail", lambda: self._mail(conn, max(now, datetime.now(UTC))))
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK)
        return report

    async def _step(self, report: dict[str, Any], name: str, run: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            report[name] = await run()
        except Exception as exc:  # one failing step must not stop the others, nor the next pass
            log.exception("billing step failed", step=name)
            report[name] = {"error": repr(exc)}
        log.debug("billing step", step=name, seconds=round(time.perf_counter() - started, 3))

    async def _recurring(self, conn: asyncpg.Connection, now: datetime) -> dict[str, Any]:
        return (await recurring.run_due(conn, self.store, now)).summary()

    async def _invoices(self, conn: asyncpg.Connection, now: datetime) -> dict[str, Any]:
        done = await invoicing.close_due(conn, self.store, now)
        return {"issued": done.closed, "drafts": done.drafts, "empty": done.empty, "errors": len(done.errors)}

    async def _documents(self, conn: asyncpg.Connection) -> int:
        tried, failed = 0, set[int]()
        while True:
            batch = await invoicing.store_documents(conn, self.render, limit=200, skip=failed)
            tried += batch
            if batch < 200:
                return tried - len(failed)

    async def _mail(self, conn: asyncpg.Connection, now: datetime) -> dict[str, Any]:
        done = await notify.send_due(conn, self.mailer, self.settings.mail, now)
        return {key: getattr(done, key) for key in ("sent", "deferred", "failed")}

    async def run(self, stop: asyncio.Event) -> None:
        """Every `billing.scheduler_interval_s` until `stop`."""
        interval = self.settings.billing.scheduler_interval_s
        while not stop.is_set():
            try:
                report = await self.run_once()
                if any(v for k, v in report.items() if k != "busy"):
                    log.info("billing pass", **report)
            except Exception as exc:  # PostgreSQL away: try again next interval
                log.warning("billing pass failed; will try again", error=repr(exc))
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
