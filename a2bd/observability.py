"""Structured logs and Prometheus metrics: one place that names every metric a2bd exports.

Metric names follow Prometheus conventions: a Counter named ``a2bd_x`` is exposed as ``a2bd_x_total``
(prometheus_client adds the suffix), durations are histograms in seconds (``_seconds``). Label values are
fixed sets (a status, a step, a configured server name), never text that a caller or peer chose.

Logs never carry a secret: `redact_secrets` runs on every line, after the exception is formatted.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Hashable, MutableMapping
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# FastAGI
AGI_SESSIONS = Counter(
    "a2bd_agi_sessions", "FastAGI sessions accepted, by script", ["script"], registry=REGISTRY
)
# Why a FastAGI connection was closed without an answer (or ended early). Shed at accept time, before a
# byte is read: peer (address not allowed), over_capacity (agi.max_connections reached), shed_slow (closed at
# capacity to make room: it waited agi.shed_after_s without sending its environment). While reading the
# environment: eof, overrun (past agi.max_env_bytes), timeout (not complete within agi.env_timeout_s),
# malformed, unknown_script. In a session: eof, overrun, timeout, malformed (Asterisk's replies),
# handler_error.
AGI_REJECT_REASONS = ("peer", "over_capacity", "shed_slow", "eof", "overrun", "timeout", "malformed",
                      "unknown_script", "handler_error")
AGI_REJECTED = Counter(
    "a2bd_agi_rejected",
    "FastAGI connections closed without an answer, by reason (" + ", ".join(AGI_REJECT_REASONS) + ")",
    ["reason"],
    registry=REGISTRY,
)
for _reason in AGI_REJECT_REASONS:
    AGI_REJECTED.labels(_reason)
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

# The event loop itself: how late a timer set for now+0.1 s runs. Every call's work shares this one loop,
# so its lag is a wait that every authorization (from accept on), AMI event and ledger batch also pays.
# uvloop's timers count whole milliseconds: a lag under 1 ms is their rounding, not the loop's.
LOOP_LAG_SECONDS = Histogram(
    "a2bd_loop_lag_seconds", "How late the event loop ran a timer (sampled every 0.1 s)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=REGISTRY,
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
LEDGER_REJECTED = Counter("a2bd_ledger_rejected", "Call lines PostgreSQL refused for good (unknown account, or "
                          "a line it will not take; named in the log, kept in Redis)",
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

# Billing scheduler (services/scheduler.py): one pass runs these steps in this order.
BILLING_STEPS = ("recurring", "invoices", "documents", "mail")
BILLING_PASSES = Counter(
    "a2bd_billing_passes",
    "Billing scheduler passes, by outcome (ran; busy: another daemon held the pass; failed: it could not "
    "start, PostgreSQL unreachable)",
    ["outcome"], registry=REGISTRY,
)
BILLING_LAST_PASS = Gauge(
    "a2bd_billing_last_pass_timestamp_seconds", "Unix time the last billing pass that ran ended "
    "(alert when it is older than a few scheduler intervals)", registry=REGISTRY,
)
BILLING_RUNS = Counter(
    "a2bd_billing_runs",
    "Billing steps run, by step (recurring, invoices, documents, mail) and outcome (ok; partial: done, but "
    "some accounts or items failed, see the log; error: the step raised)",
    ["step", "outcome"], registry=REGISTRY,
)
BILLING_STEP_SECONDS = Histogram(
    "a2bd_billing_step_seconds", "Time one billing step took, by step", ["step"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0), registry=REGISTRY,
)
INVOICES_ISSUED = Counter("a2bd_invoices_issued", "Invoices the scheduler closed and numbered (confirmed)",
                          registry=REGISTRY)
INVOICE_DRAFTS = Counter("a2bd_invoice_drafts", "Invoices the scheduler closed as drafts, waiting for review",
                         registry=REGISTRY)
INVOICE_CLOSE_ERRORS = Counter("a2bd_invoice_close_errors", "Accounts whose due invoice the scheduler could not "
                               "close (retried next pass)", registry=REGISTRY)
INVOICE_DOCUMENTS = Counter("a2bd_invoice_documents", "Invoice PDFs rendered and stored", registry=REGISTRY)
RECURRING_ACTIONS = Counter(
    "a2bd_recurring_actions", "Recurring-charge work done, by action (charged, suspended, reminded, expired)",
    ["action"], registry=REGISTRY,
)
EMAIL_OUTCOMES = ("sent", "deferred", "failed", "no_address")
EMAILS = Counter(
    "a2bd_emails", "Customer e-mails, by outcome (sent; deferred: the relay or network failed, retried later; "
    "failed: given up; no_address: the account has no e-mail address)", ["outcome"], registry=REGISTRY,
)
# Every series of a known label set exists from the start, at 0: rate() and alerts see the first increase.
for _outcome in ("ran", "busy", "failed"):
    BILLING_PASSES.labels(_outcome)
for _step in BILLING_STEPS:
    BILLING_STEP_SECONDS.labels(_step)
    for _outcome in ("ok", "partial", "error"):
        BILLING_RUNS.labels(_step, _outcome)
for _outcome in EMAIL_OUTCOMES:
    EMAILS.labels(_outcome)
for _action in ("charged", "suspended", "reminded", "expired"):
    RECURRING_ACTIONS.labels(_action)


# -- logs -------------------------------------------------------------------------------------------------

REDACTED = "***"
# Keys whose value is a secret whatever it looks like: the PIN a caller keys, the AMI secret, passwords.
_SECRET_KEYS = frozenset({"pin", "secret", "password", "passwd", "pwd", "passphrase"})
_SECRET_SUFFIXES = ("_pin", "_secret", "_password", "_passwd")
# In any text: the password of a URL (postgresql://user:pw@host, redis://:pw@host), and a secret written as
# a header or assignment (an AMI action's "Secret: ...", a libpq "password=..."). The password runs to the
# last "@" before the host, so an unescaped "@" in it is hidden too.
_IN_TEXT = re.compile(
    r"(?P<url>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*:)[^\s/?#]*(?=@)"
    r"|(?P<kv>(?i:\b(?:pin|secret|password|passwd|pwd)\b)\s*[:=]\s*)(?:\"[^\"]*\"|'[^']*'|[^\s,;&]+)"
)


class LogThrottle:
    """One log line per key (e.g. a reason and an address) every `every_s` seconds, so that a flood of bad
    requests from one place is one line, then one saying how many were held back; at most `keys` keys are
    remembered, the oldest forgotten first, so that a scan from many addresses stays bounded."""

    def __init__(self, every_s: float = 10.0, keys: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.keys, self._clock = every_s, keys, clock
        self._logged: dict[Hashable, tuple[float, int]] = {}  # key -> (when last logged, held back since)

    def allow(self, key: Hashable) -> int | None:
        """None: stay quiet (the event is counted as held back). Otherwise log now, saying how many were held
        back since the last line for this key."""
        now = self._clock()
        last = self._logged.get(key)
        if last is not None and now - last[0] < self.every_s:
            self._logged[key] = (last[0], last[1] + 1)
            return None
        self._logged.pop(key, None)  # re-inserted last: the dict stays ordered by when each key was logged
        if len(self._logged) >= self.keys:
            del self._logged[next(iter(self._logged))]
        self._logged[key] = (now, 0)
        return last[1] if last is not None else 0


def _hide(match: re.Match[str]) -> str:
    return (match.group("url") or match.group("kv")) + REDACTED


def redact_text(text: str) -> str:
    """`text` with a URL's password and any ``secret: x`` / ``password=x`` value masked."""
    return _IN_TEXT.sub(_hide, text)


def _is_secret_key(key: str) -> bool:
    key = key.lower()
    return key in _SECRET_KEYS or key.endswith(_SECRET_SUFFIXES)


def _scrub(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return _IN_TEXT.sub(_hide, value) if ("://" in value or "=" in value or ":" in value) else value
    if depth > 4:  # a deeply nested value is logged as it is; a2bd logs flat fields and small reports
        return value
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and _is_secret_key(k) else _scrub(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return type(value)(_scrub(v, depth + 1) for v in value)
    if isinstance(value, bytes | BaseException):
        # A raw protocol line (ProtocolError carries one) or an exception whose text holds a URL.
        text = value.decode("latin-1") if isinstance(value, bytes) else repr(value)
        scrubbed = _IN_TEXT.sub(_hide, text)
        return value if scrubbed == text else scrubbed
    return value


def redact_secrets(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: hide secret values before a line is rendered.

    A field named like a secret (``pin``, ``secret``, ``password``, ``*_password``...) is replaced whole; in
    every other value (strings, and those inside dicts, lists and tuples, bytes, exceptions) a URL's
    password and a ``secret: x`` / ``password=x`` pair are masked. The event text and a formatted
    traceback (``exception``) are values like any other.
    """
    for key, value in event_dict.items():
        event_dict[key] = REDACTED if _is_secret_key(key) and value is not None else _scrub(value)
    return event_dict


def _stderr_logger(*_: object) -> structlog.PrintLogger:
    # sys.stderr as it is now, not as it was at configuration (a test runner swaps it per test).
    return structlog.PrintLogger(sys.stderr)


def log_processors(json: bool = False) -> list[structlog.types.Processor]:
    """The processor chain every log line goes through, ending with its renderer."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    return [
        # A call's uniqueid, account and server, bound by the task serving it (agi/server.py, authorization.py).
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_secrets,  # after format_exc_info: a traceback's text is scrubbed too
        renderer,
    ]


def configure_logging(level: str = "info", json: bool = False) -> None:
    """structlog to stderr: key=value for people, JSON for journald/Loki when `json` is set."""
    structlog.configure(
        processors=log_processors(json),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_stderr_logger,
        # Not cached: a cached logger ignores later configuration, which would blind
        # structlog.testing.capture_logs() in every test that runs after a CLI test.
        cache_logger_on_first_use=False,
    )
