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
