"""The daemon's HTTP endpoint on port 0: /metrics in Prometheus conventions, /healthz cached and bounded,
/livez; bad requests get 4xx. The scheduler's metrics are scraped after a real billing pass."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from a2bd.adapters import postgres
from a2bd.api.health import CachedHealth, HealthReport
from a2bd.api.metrics import start_metrics_server
from a2bd.config import MailSettings, Settings
from a2bd.observability import AUTHORIZATIONS
from a2bd.services import scheduler as scheduler_module
from a2bd.services.scheduler import BillingScheduler

pytestmark = pytest.mark.e2e

Health = Callable[[], Awaitable[HealthReport]]


async def http(port: int, request: bytes) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    async with asyncio.timeout(5):
        data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), body


async def get(port: int, path: str) -> tuple[str, str]:
    status, body = await http(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return status, body.decode()


async def serve(health: Health | None = None, **options: Any) -> AsyncIterator[int]:
    server = await start_metrics_server("127.0.0.1", 0, health, **options)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async for port in serve():
        yield port


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in an exposition, e.g. sample(text, "a2bd_emails_total", 'outcome="sent"')."""
    line = f"{name}{{{labels}}}" if labels else name
    match = re.search(rf"^{re.escape(line)} (\S+)$", text, re.MULTILINE)
    assert match, f"no sample {line}"
    return float(match.group(1))


async def test_metrics_exposes_authorizations_by_status(port: int) -> None:
    AUTHORIZATIONS.labels("NOFUNDS").inc()
    status, text = await get(port, "/metrics")
    assert status == "HTTP/1.1 200 OK"
    assert 'a2bd_authorizations_total{status="NOFUNDS"}' in text
    assert "a2bd_authorize_seconds_bucket" in text
    assert "# TYPE a2bd_agi_rejected_total counter" in text
    assert "# TYPE a2bd_agi_active_sessions gauge" in text


# Every family the operator's dashboards and alerts rely on, as scraped.
EXPECTED = {
    "a2bd_authorizations_total": "counter",  # by status
    "a2bd_authorize_seconds": "histogram",
    "a2bd_loop_lag_seconds": "histogram",
    "a2bd_agi_rejected_total": "counter",  # FastAGI connections shed, by reason
    "a2bd_agi_active_sessions": "gauge",
    "a2bd_live_calls": "gauge",
    "a2bd_calls_rated_total": "counter",
    "a2bd_ledger_commit_seconds": "histogram",
    "a2bd_ledger_backlog": "gauge",
    "a2bd_guard_hangups_total": "counter",
    "a2bd_guard_lateness_seconds": "histogram",
    "a2bd_ami_connected": "gauge",  # per server
    "a2bd_reconcile_fixes_total": "counter",
    "a2bd_billing_passes_total": "counter",
    "a2bd_billing_runs_total": "counter",  # by step and outcome
    "a2bd_billing_step_seconds": "histogram",
    "a2bd_billing_last_pass_timestamp_seconds": "gauge",
    "a2bd_invoices_issued_total": "counter",
    "a2bd_invoice_drafts_total": "counter",
    "a2bd_invoice_close_errors_total": "counter",
    "a2bd_invoice_documents_total": "counter",
    "a2bd_recurring_actions_total": "counter",
    "a2bd_emails_total": "counter",  # sent, deferred, failed, no_address
}


async def test_metric_names_follow_prometheus_conventions(port: int) -> None:
    _, text = await get(port, "/metrics")
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    for name, kind in EXPECTED.items():
        assert types.get(name) == kind, f"{name}: {types.get(name)}"
    for name, kind in types.items():
        assert name.startswith("a2bd_")
        if kind == "counter":
            assert name.endswith("_total") and not name.endswith("_total_total"), name
        if kind == "histogram" and name != "a2bd_ledger_batch_lines":  # lines per batch, not a duration
            assert name.endswith("_seconds"), name
    # Labelled series of the scheduler exist before its first pass, at zero.
    for step in ("recurring", "invoices", "documents", "mail"):
        assert f'a2bd_billing_runs_total{{outcome="error",step="{step}"}}' in text
        assert f'a2bd_billing_step_seconds_count{{step="{step}"}}' in text
    for outcome in ("sent", "deferred", "failed"):
        assert f'a2bd_emails_total{{outcome="{outcome}"}}' in text


@pytest.mark.parametrize(("request_bytes", "expected"), [
    (b"GET /healthz HTTP/1.1\r\n\r\n", "HTTP/1.1 200 OK"),  # no health hook: the loop answers
    (b"GET /livez HTTP/1.1\r\n\r\n", "HTTP/1.1 200 OK"),
    (b"GET /metrics?name[]=x HTTP/1.1\r\n\r\n", "HTTP/1.1 200 OK"),
    (b"GET /nope HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
    (b"POST /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 405 Method Not Allowed"),
    (b"garbage\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"),
])
async def test_other_requests(port: int, request_bytes: bytes, expected: str) -> None:
    status, _ = await http(port, request_bytes)
    assert status == expected


# -- /healthz with a health hook ---------------------------------------------------------------------


class Hook:
    """A health check that answers `report` (after `delay_s`), counting its runs."""

    def __init__(self, report: HealthReport, delay_s: float = 0.0) -> None:
        self.report = report
        self.delay_s = delay_s
        self.runs = 0

    async def __call__(self) -> HealthReport:
        self.runs += 1
        await asyncio.sleep(self.delay_s)
        return dict(self.report)


async def test_healthz_lists_each_check_and_is_503_with_the_reason_of_the_one_that_failed() -> None:
    hook = Hook({"redis": None, "postgresql": None, "ami:pbx1": None})
    async for port in serve(hook, health_ttl_s=0):
        assert await get(port, "/healthz") == ("HTTP/1.1 200 OK", "redis: ok\npostgresql: ok\nami:pbx1: ok\n")
        hook.report["ami:pbx1"] = "not logged in (state disconnected)"
        status, body = await get(port, "/healthz")
        assert status == "HTTP/1.1 503 Service Unavailable"
        assert body == "redis: ok\npostgresql: ok\nami:pbx1: not logged in (state disconnected)\n"
        assert await get(port, "/livez") == ("HTTP/1.1 200 OK", "ok\n")  # liveness ignores the stores


async def test_healthz_is_cached_so_a_scraper_hammering_it_runs_one_check() -> None:
    hook = Hook({"redis": None}, delay_s=0.05)
    async for port in serve(hook, health_ttl_s=60):
        replies = await asyncio.gather(*(get(port, "/healthz") for _ in range(50)))
        assert {status for status, _ in replies} == {"HTTP/1.1 200 OK"}
        assert hook.runs == 1  # the 50 requests shared one run (in flight, then cached)
        await get(port, "/healthz")
        assert hook.runs == 1


async def test_the_health_cache_runs_the_check_again_once_its_ttl_has_passed() -> None:
    hook = Hook({"redis": None})
    now = [1000.0]
    cached = CachedHealth(hook, ttl_s=1.0, clock=lambda: now[0])
    assert await cached() == {"redis": None}
    now[0] += 0.99
    await cached()
    assert hook.runs == 1
    now[0] += 0.02
    await cached()
    assert hook.runs == 2  # the cache expired


@pytest.mark.parametrize("trouble", ["hangs", "raises"])
async def test_a_health_check_that_hangs_or_raises_is_a_503_in_bounded_time(trouble: str) -> None:
    async def check() -> HealthReport:
        if trouble == "hangs":
            await asyncio.sleep(60)
        raise RuntimeError("boom")

    async for port in serve(check, health_timeout_s=0.3):
        status, body = await get(port, "/healthz")  # the body says which bound ended a check that hung
        assert status == "HTTP/1.1 503 Service Unavailable"
        assert body.startswith("health: ")
        assert ("longer than 0.3 s" if trouble == "hangs" else "RuntimeError: boom") in body


# -- the scheduler's metrics after a real pass -------------------------------------------------------


async def due_invoice(pg: asyncpg.Connection) -> None:
    """One account whose invoice day has come, with a charge to invoice and an e-mail address."""
    await postgres.replace_tariff(pg, "t", [])
    acct = await postgres.create_account(pg, number="5550001", tariff="t", initial_balance_micro=0,
                                         email="ada@example.net")
    past = datetime.now(UTC) - timedelta(days=20)
    await pg.execute("UPDATE accounts SET period_start = $2 WHERE id = $1", acct["id"], past - timedelta(days=1))
    await postgres.post(pg, kind="charge", amount_micro=-1_000_000, account_id=acct["id"], at=past,
                        description="a charge")
    await pg.execute("UPDATE accounts SET next_close_at = now() - interval '1 minute'")


@pytest.mark.integration
async def test_a_billing_pass_is_counted_by_step_and_outcome(
    pg: asyncpg.Connection, pg_url: str, port: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    await due_invoice(pg)
    _, before = await get(port, "/metrics")
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=2)
    try:
        with socket.socket() as unused:  # a port nobody listens on: the relay is down, the e-mail deferred
            unused.bind(("127.0.0.1", 0))
            relay = MailSettings(host="127.0.0.1", port=unused.getsockname()[1], timeout_s=1.0)
        billing = BillingScheduler(pool, None, Settings(mail=relay), render=lambda doc: b"%PDF-1.4 test")
        report = await billing.run_once()
        assert report["invoices"]["issued"] == 1 and report["documents"] == 1, report

        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("the invoice step broke")

        monkeypatch.setattr(scheduler_module.invoicing, "close_due", broken)
        report = await billing.run_once()
        assert "error" in report["invoices"]
    finally:
        await pool.close()
    _, after = await get(port, "/metrics")

    def grew(name: str, labels: str = "") -> float:
        return sample(after, name, labels) - sample(before, name, labels)

    assert grew("a2bd_billing_passes_total", 'outcome="ran"') == 2
    assert grew("a2bd_billing_runs_total", 'outcome="ok",step="invoices"') == 1
    assert grew("a2bd_billing_runs_total", 'outcome="error",step="invoices"') == 1
    for step in ("recurring", "documents", "mail"):
        assert grew("a2bd_billing_step_seconds_count", f'step="{step}"') == 2
    for step in ("recurring", "documents"):
        assert grew("a2bd_billing_runs_total", f'outcome="ok",step="{step}"') == 2
    assert grew("a2bd_invoices_issued_total") == 1
    assert grew("a2bd_invoice_documents_total") == 1
    assert abs(sample(after, "a2bd_billing_last_pass_timestamp_seconds") - time.time()) < 60
    # The invoice's e-mail could not be handed to the relay: deferred (retried later), not a failed step.
    assert grew("a2bd_emails_total", 'outcome="deferred"') == 1
    assert grew("a2bd_emails_total", 'outcome="sent"') == 0
    assert grew("a2bd_billing_runs_total", 'outcome="ok",step="mail"') == 2
