"""The billing scheduler: what must happen at a time rather than on a call.

Each pass, in this order: recurring charges, renewal reminders and account expiry (services/recurring.py);
invoice days that have begun in each account's time zone (services/invoicing.py); PDFs of newly issued
invoices; then the e-mail outbox (services/notify.py), so an invoice closed in this pass is rendered and
sent in it. Recurring charges go first so that a DID rented for the new month is on the new preview, not
on the invoice being closed (its line is dated after the period's end).

Several daemons may run the scheduler: a PostgreSQL advisory lock lets one pass run at a time, and every
step is safe to repeat anyway (row locks, idempotency keys). A step that fails is logged and counted; the
others still run, and the next pass tries again.

Metrics (observability.py): each pass counts in ``a2bd_billing_passes_total{outcome}``; each step in
``a2bd_billing_runs_total{step,outcome}`` and ``a2bd_billing_step_seconds{step}``; what the steps did in
``a2bd_invoices_issued_total``, ``a2bd_invoice_drafts_total``, ``a2bd_invoice_close_errors_total``,
``a2bd_invoice_documents_total``, ``a2bd_recurring_actions_total{action}`` and ``a2bd_emails_total{outcome}``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from a2bd.adapters.mailer import Mailer
from a2bd.adapters.redis_store import RedisStore
from a2bd.config import Settings
from a2bd.domain.statement import InvoiceDocument
from a2bd.observability import (
    BILLING_LAST_PASS,
    BILLING_PASSES,
    BILLING_RUNS,
    BILLING_STEP_SECONDS,
    EMAILS,
    INVOICE_CLOSE_ERRORS,
    INVOICE_DOCUMENTS,
    INVOICE_DRAFTS,
    INVOICES_ISSUED,
    RECURRING_ACTIONS,
)
from a2bd.services import invoicing, notify, recurring

log = structlog.get_logger("a2bd.scheduler")

_LOCK = 0x61326263  # "a2bc": one scheduler pass at a time across daemons

# A step returns what it did (for the pass's report) and how many of its items failed (0: outcome "ok").
Step = Callable[[], Awaitable[tuple[Any, int]]]


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
        try:
            async with self.pool.acquire() as conn:
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK):
                    BILLING_PASSES.labels("busy").inc()
                    return {"busy": True}
                try:
                    await self._step(report, "recurring", lambda: self._recurring(conn, now))
                    await self._step(report, "invoices", lambda: self._invoices(conn, now))
                    await self._step(report, "documents", lambda: self._documents(conn))
                    # the clock again: notices recorded by this pass (an invoice's) are due from their commit
                    await self._step(report, "mail", lambda: self._mail(conn, max(now, datetime.now(UTC))))
                finally:
                    await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK)
        except Exception:
            BILLING_PASSES.labels("failed").inc()
            raise
        BILLING_PASSES.labels("ran").inc()
        BILLING_LAST_PASS.set(time.time())
        return report

    async def _step(self, report: dict[str, Any], name: str, run: Step) -> None:
        started = time.perf_counter()
        try:
            report[name], failures = await run()
            outcome = "partial" if failures else "ok"
        except Exception as exc:  # one failing step must not stop the others, nor the next pass
            log.exception("billing step failed", step=name)
            report[name] = {"error": repr(exc)}
            outcome = "error"
        elapsed = time.perf_counter() - started
        BILLING_STEP_SECONDS.labels(name).observe(elapsed)
        BILLING_RUNS.labels(name, outcome).inc()
        log.debug("billing step", step=name, outcome=outcome, seconds=round(elapsed, 3))

    async def _recurring(self, conn: asyncpg.Connection, now: datetime) -> tuple[dict[str, Any], int]:
        summary = (await recurring.run_due(conn, self.store, now)).summary()
        for action in ("charged", "suspended", "reminded", "expired"):
            RECURRING_ACTIONS.labels(action).inc(summary[action])
        return summary, summary["errors"]

    async def _invoices(self, conn: asyncpg.Connection, now: datetime) -> tuple[dict[str, Any], int]:
        done = await invoicing.close_due(conn, self.store, now)
        INVOICES_ISSUED.inc(done.closed)
        INVOICE_DRAFTS.inc(done.drafts)
        INVOICE_CLOSE_ERRORS.inc(len(done.errors))
        report = {"issued": done.closed, "drafts": done.drafts, "empty": done.empty, "errors": len(done.errors)}
        return report, len(done.errors)

    async def _documents(self, conn: asyncpg.Connection) -> tuple[int, int]:
        tried, failed = 0, set[int]()
        while True:
            batch = await invoicing.store_documents(conn, self.render, limit=200, skip=failed)
            tried += batch
            if batch < 200:
                INVOICE_DOCUMENTS.inc(tried - len(failed))
                return tried - len(failed), len(failed)

    async def _mail(self, conn: asyncpg.Connection, now: datetime) -> tuple[dict[str, Any], int]:
        done = await notify.send_due(conn, self.mailer, self.settings.mail, now)
        for outcome in ("sent", "deferred", "failed", "no_address"):
            EMAILS.labels(outcome).inc(getattr(done, outcome))
        # a deferred e-mail is retried next pass; one given up (or with no address to go to) is a failure
        return {key: getattr(done, key) for key in ("sent", "deferred", "failed")}, done.failed + done.no_address

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
