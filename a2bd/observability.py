"""Structured logs and Prometheus metrics: one place that names every metric a2bd exports."""

from __future__ import annotations

import logging
import sys

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# FastAGI
AGI_SESSIONS = Counter(
    "a2bd_agi_sessions", "FastAGI sessions accepted, by script", ["script"], registry=REGISTRY
)
AGI_REJECTED = Counter(
    "a2bd_agi_rejected",
    "FastAGI connections closed without an answer, by reason "
    "(eof, overrun, timeout, malformed, unknown_script, over_capacity, handler_error)",
    ["reason"],
    registry=REGISTRY,
)
AGI_ACTIVE = Gauge("a2bd_agi_active_sessions", "FastAGI sessions in progress", registry=REGISTRY)

# Authorization
AUTHORIZATIONS = Counter(
    "a2bd_authorizations", "Authorization answers, by A2B_STATUS", ["status"], registry=REGISTRY
)
AUTHORIZE_SECONDS = Histogram(
    "a2bd_authorize_seconds",
    "Time from a complete AGI environment to the answer being written",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)

# Calls, the ledger and the credit guard
LIVE_CALLS = Gauge("a2bd_live_calls", "Calls this daemon is tracking, by Asterisk server and state "
                   "(dialling, answered)", ["server", "state"], registry=REGISTRY)
CALLS_ENDED = Counter("a2bd_calls_ended", "Tracked calls that ended, by disposition", ["disposition"],
                      registry=REGISTRY)
CALLS_RATED = Counter("a2bd_calls_rated", "Call lines written to the ledger (fresh, not replays)", registry=REGISTRY)
LEDGER_BATCH_LINES = Histogram(
    "a2bd_ledger_batch_lines", "Lines per ledger commit",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000), registry=REGISTRY,
)
LEDGER_COMMIT_SECONDS = Histogram(
    "a2bd_ledger_commit_seconds", "Time to commit one batch of ledger lines",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0), registry=REGISTRY,
)
LEDGER_BACKLOG = Gauge("a2bd_ledger_backlog", "Rated calls waiting to be written to the ledger", registry=REGISTRY)
LEDGER_RETRIES = Counter("a2bd_ledger_retries", "Ledger batches retried, by reason (unavailable, race)",
                         ["reason"], registry=REGISTRY)
LEDGER_REJECTED = Counter("a2bd_ledger_rejected", "Call lines PostgreSQL refused for good (unknown account)",
                          registry=REGISTRY)
GUARD_HANGUPS = Counter("a2bd_guard_hangups", "Calls the credit guard hung up", registry=REGISTRY)
GUARD_LATENESS_SECONDS = Histogram(
    "a2bd_guard_lateness_seconds", "How late a guard hangup was sent after the credit ran out",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0), registry=REGISTRY,
)
GUARD_WATCHED = Gauge("a2bd_guard_accounts", "Accounts with answered calls the credit guard watches",
                      registry=REGISTRY)
RECONCILE_FIXES = Counter("a2bd_reconcile_fixes", "Calls settled by the reconciler, by what was done "
                          "(written, settled, released, rated_from_cdr, unrated)", ["action"], registry=REGISTRY)
NOTICES = Counter("a2bd_notices", "Customer notices recorded, by kind", ["kind"], registry=REGISTRY)

# Tariffs
TARIFF_PREFIXES = Gauge("a2bd_tariff_prefixes", "Prefixes held in memory, by tariff", ["tariff"], registry=REGISTRY)
TARIFF_RELOADS = Counter("a2bd_tariff_reloads", "Tariff reloads from PostgreSQL", registry=REGISTRY)


def _stderr_logger(*_: object) -> structlog.PrintLogger:
    # sys.stderr as it is now, not as it was at configuration (a test runner swaps it per test).
    return structlog.PrintLogger(sys.stderr)


def configure_logging(level: str = "info", json: bool = False) -> None:
    """structlog to stderr: key=value for people, JSON for journald/Loki when `json` is set."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_stderr_logger,
        # Not cached: a cached logger ignores later configuration, which would blind
        # structlog.testing.capture_logs() in every test that runs after a CLI test.
        cache_logger_on_first_use=False,
    )

# AMI (one client per Asterisk server; `server` is the name given in the settings)
AMI_CONNECTED = Gauge(
    "a2bd_ami_connected", "1 while logged in to the AMI server, 0 otherwise", ["server"], registry=REGISTRY
)
AMI_RECONNECTS = Counter(
    "a2bd_ami_reconnects", "Logins to the AMI server after a lost connection", ["server"], registry=REGISTRY
)
AMI_DISCONNECTS = Counter(
    "a2bd_ami_disconnects",
    "AMI connections lost, by reason (eof, ping_timeout, protocol_error, error)",
    ["server", "reason"],
    registry=REGISTRY,
)
AMI_BACKPRESSURE_WAITS = Counter(
    "a2bd_ami_backpressure_waits",
    "Times the AMI reader waited because the event queue was full (the consumer is too slow)",
    ["server"],
    registry=REGISTRY,
)
