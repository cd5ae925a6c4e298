"""The outbox: customer notices (table `notices`) become e-mails, sent through the mail adapter.

A notice is recorded in the transaction that decides it (an invoice issued, credit crossing its threshold,
a renewal ahead, a service suspended, an account expired); `send_due` sends the ones that are due. Each
notice ends either sent (`sent_at`, with the relay's reply and the Message-ID) or failed (`failed_at`, with
`last_error` saying why); until then it waits for its `next_attempt_at`. Nothing is deleted.

Claiming. Several daemons may run `send_due` against one database. Each notice is claimed on its own in a
one-statement transaction: the oldest due notice is locked with `FOR UPDATE SKIP LOCKED` and its
`next_attempt_at` pushed a *lease* ahead (`lease_s`), then the lock is released and the e-mail is sent with
no transaction open, and the outcome is written by a second statement. A daemon that reads the row while it
is claimed either skips it (locked) or sees the lease (not due): two daemons never send the same notice at
the same time, and no transaction stays open across an SMTP conversation. The send itself is bounded by
`send_bound_s` and a run stops claiming after `run_budget_s`, both inside the lease, so a lease runs out
only when its daemon died (or its clock is off by more than a lease).

At-least-once, not at-most-once. A daemon that crashes (or loses PostgreSQL) after the relay's 250 and before
the outcome is written leaves the notice unsent with its lease; once the lease runs out, the notice is sent
again. A customer may then get the same e-mail twice, which is better than an invoice never sent (at-most-
once would mark the notice sent *before* the SMTP conversation and lose it on any crash or 4xx in between).
To let mail programs recognise such a duplicate, a notice keeps one Message-ID for all its attempts: it is
stored before the first send and reused.

Retries. A relay that defers (4xx, unreachable, timed out) costs an attempt and moves `next_attempt_at` by
`next_attempt_delay_s(attempts)`; after `max_attempts` attempts the notice fails. A refusal (5xx) fails it at
once; so does a notice without an address or whose message cannot be built. An invoice notice whose PDF is
not rendered yet waits (`retry_base_s`) without costing an attempt.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
import structlog

from a2bd.adapters.mailer import Attachment, MailDeferred, Mailer, MailRejected, build_message, next_attempt_delay_s
from a2bd.config import MailSettings
from a2bd.domain.money import format_amount
from a2bd.errors import InputError

log = structlog.get_logger("a2bd.notify")

NO_ADDRESS = "no e-mail address"
SMTP_ROUND_TRIPS = 8  # connect, EHLO, STARTTLS + EHLO or AUTH, MAIL, RCPT, DATA, end of data: each <= timeout_s
LEASE_SLACK_S = 60.0  # the database work around one send

Outcome = Literal["sent", "deferred", "failed", "waiting_for_document", "no_address"]


@dataclass(slots=True)
class OutboxReport:
    """What one `send_due` run did; each notice it claimed is in exactly one count. `failed` does not include
    the notices failed for want of an address (`no_address`)."""

    sent: int = 0
    deferred: int = 0
    failed: int = 0
    waiting_for_document: int = 0
    no_address: int = 0
    errors: dict[int, str] = field(default_factory=dict)  # notice id -> why it was deferred or failed

    def count(self, outcome: Outcome) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)

    @property
    def handled(self) -> int:
        return self.sent + self.deferred + self.failed + self.waiting_for_document + self.no_address


def send_bound_s(settings: MailSettings) -> float:
    """The longest one SMTP conversation may take (seconds) before it is abandoned as deferred."""
    return SMTP_ROUND_TRIPS * settings.timeout_s


def run_budget_s(settings: MailSettings) -> float:
    """How long one `send_due` run goes on claiming notices (seconds)."""
    return send_bound_s(settings)


def lease_s(settings: MailSettings) -> float:
    """How long a claimed notice stays hidden from other senders (seconds), counted from the run's `now`:
    the run's budget, then a whole send, the QUIT aiosmtplib still tries when a send is cut off at its bound
    (one more timeout_s), then the database work around it."""
    return run_budget_s(settings) + send_bound_s(settings) + settings.timeout_s + LEASE_SLACK_S


# -- what the customer reads ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Customer:
    """The account a notice is about, as its e-mail needs it."""

    number: str
    name: str
    currency: str
    timezone: str
    expires_at: datetime | None = None

    def money(self, micro: int, currency: str | None = None) -> str:
        return f"{format_amount(micro)} {currency or self.currency}"

    def zone(self) -> tzinfo:
        return _zone(self.timezone)


@dataclass(frozen=True, slots=True)
class InvoiceFacts:
    number: str
    closing_micro: int  # ledger sign: negative = the customer owes it
    period_start: datetime
    period_end: datetime  # exclusive
    timezone: str
    currency: str
    pdf: bytes


@dataclass(frozen=True, slots=True)
class ServiceFacts:
    """The recurring service a renewal or suspension notice is about, from the `services` table."""

    name: str
    did: str | None
    amount_micro: int
    next_charge_at: datetime | None


@dataclass(frozen=True, slots=True)
class Letter:
    subject: str
    text: str
    attachments: tuple[Attachment, ...] = ()


class Unsendable(Exception):
    """A notice that no retry can send (its invoice is gone, belongs to another account...): failed at once."""


def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def _day(d: date) -> str:
    return f"{d.day} {d:%B %Y}"


def _when(at: datetime, tz: tzinfo) -> str:
    local = at.astimezone(tz)
    if (local.hour, local.minute) == (0, 0):
        return _day(local.date())
    return f"{_day(local.date())} at {local:%H:%M} ({local.tzname() or 'UTC'})"


def _greeting(c: Customer) -> str:
    return f"Dear {c.name}," if c.name else "Dear customer,"


def _closing(signature: str) -> str:
    return f"\nKind regards,\n{signature}\n"


def invoice_letter(c: Customer, inv: InvoiceFacts, signature: str) -> Letter:
    """`Invoice <number>`: the period (local dates, both inclusive), what to pay (max(0, -closing)) or the
    credit left, and the PDF attached as `<number>.pdf`."""
    tz = _zone(inv.timezone)
    first = inv.period_start.astimezone(tz).date()
    last = max(first, (inv.period_end.astimezone(tz) - timedelta(microseconds=1)).date())
    due_micro = max(0, -inv.closing_micro)
    if due_micro:
        to_pay = f"Amount to pay: {c.money(due_micro, inv.currency)}"
    elif inv.closing_micro > 0:
        to_pay = f"Amount to pay: nothing — your account is {c.money(inv.closing_micro, inv.currency)} in credit."
    else:
        to_pay = f"Amount to pay: nothing (balance {c.money(0, inv.currency)})."
    filename = f"{inv.number}.pdf"
    text = "\n".join([
        _greeting(c), "",
        f"Please find attached invoice {inv.number} for your account {c.number} ({filename}).", "",
        f"Period: {_day(first)} to {_day(last)}",
        to_pay,
        _closing(signature),
    ])
    return Letter(f"Invoice {inv.number}", text, ((filename, "application/pdf", inv.pdf),))


def low_credit_letter(c: Customer, detail: Mapping[str, Any], signature: str) -> Letter:
    """The credit available (balance + credit limit) when it went below the account's alert threshold."""
    available = _int(detail, "available_micro")
    threshold = _int(detail, "threshold_micro")
    lines = [_greeting(c), ""]
    if available is not None and threshold is not None:
        lines.append(f"The credit available on your account {c.number} is {c.money(available)}, below your alert "
                     f"threshold of {c.money(threshold)}.")
    elif available is not None:
        lines.append(f"The credit available on your account {c.number} is low: {c.money(available)}.")
    else:
        lines.append(f"The credit available on your account {c.number} is below your alert threshold.")
    lines += ["", "Calls stop when no credit is left: please top up your account in time.", _closing(signature)]
    return Letter(f"Low credit on your account {c.number}", "\n".join(lines))


def renewal_letter(c: Customer, detail: Mapping[str, Any], service: ServiceFacts | None, signature: str) -> Letter:
    """The service that renews, the amount it will charge and the date it renews on (services/recurring.py
    records service, did, amount_micro, currency, renews_at and renewal_date, the local date)."""
    name = _service_name(detail, service)
    amount = _amount(detail, service)
    at = _instant(detail, "renews_at")
    if at is None and service is not None:
        at = service.next_charge_at
    day = _date(detail, "renewal_date") or (at.astimezone(c.zone()).date() if at is not None else None)
    sentence = f"Your service {name}" if name else "A service of yours"
    sentence += f" on account {c.number} renews"
    sentence += f" on {_day(day)}" if day is not None else " soon"
    sentence += f": {c.money(amount, _currency(detail))} will be charged to your account." if amount is not None \
        else "; its price will be charged to your account."
    text = "\n".join([_greeting(c), "", sentence, "",
                      "Please make sure your account has enough credit by then, or the service will be suspended.",
                      _closing(signature)])
    subject = f"Renewal of {name}" if name else f"Renewal of a service on account {c.number}"
    if day is not None:
        subject += f" on {_day(day)}"
    return Letter(subject, text)


def suspended_letter(c: Customer, detail: Mapping[str, Any], service: ServiceFacts | None, signature: str) -> Letter:
    """The service suspended and why: the amount its renewal needed against the credit available (services/
    recurring.py records amount_micro, available_micro, short_micro, due_at and reason 'credit' or
    'account_closed')."""
    name = _service_name(detail, service)
    currency = _currency(detail)
    amount = _amount(detail, service)
    available = _int(detail, "available_micro")
    short = _int(detail, "short_micro")
    due = _instant(detail, "due_at")
    lines = [_greeting(c), ""]
    opening = f"Your service {name}" if name else "A service of yours"
    opening += f" on account {c.number} has been suspended"
    if detail.get("reason") == "account_closed":
        lines += [f"{opening} because the account is closed.", ""]
    else:
        renewal = f"its renewal on {_when(due, c.zone())}" if due is not None else "its renewal"
        if amount is not None:
            because = f"{renewal} needed {c.money(amount, currency)}"
            if available is not None:
                because += f", and the credit available on your account was {c.money(available, currency)}"
            if short is not None and short > 0:
                because += f" ({c.money(short, currency)} short)"
            lines.append(f"{opening}: {because}.")
        else:
            lines.append(f"{opening}: the credit on your account did not cover {renewal}.")
        top_up = f" with at least {c.money(short, currency)}" if short is not None and short > 0 else ""
        lines += ["", f"Please top up your account{top_up} and contact us to have the service resumed."]
    lines.append(_closing(signature))
    subject = f"Service suspended: {name}" if name else f"Service suspended on account {c.number}"
    return Letter(subject, "\n".join(lines))


def expired_letter(c: Customer, detail: Mapping[str, Any], signature: str) -> Letter:
    """The account's expiry: when it expired, and that calls are refused from then on."""
    at = _instant(detail, "expires_at") or c.expires_at
    when = f" on {_when(at, c.zone())}" if at is not None else ""
    text = "\n".join([_greeting(c), "",
                      f"Your account {c.number} expired{when}. Calls from it are no longer possible.", "",
                      "Please contact us if you wish to renew it.", _closing(signature)])
    return Letter(f"Your account {c.number} has expired", text)


def _int(detail: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = detail.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
    return None


def _instant(detail: Mapping[str, Any], *keys: str) -> datetime | None:
    for key in keys:
        value = detail.get(key)
        if not isinstance(value, str) or not value:
            continue
        try:
            at = datetime.fromisoformat(value)
        except ValueError:
            continue
        return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return None


def _date(detail: Mapping[str, Any], key: str) -> date | None:
    value = detail.get(key)
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            return None
    return None


def _currency(detail: Mapping[str, Any]) -> str | None:
    value = detail.get("currency")
    return value if isinstance(value, str) and value else None


def _service_name(detail: Mapping[str, Any], service: ServiceFacts | None) -> str:
    value = detail.get("service")
    if isinstance(value, str) and value.strip():
        name = value.strip()
    else:
        name = service.name if service is not None else ""
    did = detail.get("did") or (service.did if service is not None else None)
    if did and str(did) not in name:
        name = f"{name} (number {did})" if name else f"number {did}"
    return name


def _amount(detail: Mapping[str, Any], service: ServiceFacts | None) -> int | None:
    amount = _int(detail, "amount_micro")
    if amount is None and service is not None:
        amount = service.amount_micro
    return amount


def _signature(sender: str) -> str:
    name, _ = email.utils.parseaddr(sender)
    return name or "Billing"


# -- the database side ----------------------------------------------------------------------------------

_CLAIM = """
WITH due AS (
    SELECT id FROM notices
    WHERE sent_at IS NULL AND failed_at IS NULL AND next_attempt_at <= $1
    ORDER BY id LIMIT 1
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE notices n SET next_attempt_at = $2 FROM due WHERE n.id = due.id
    RETURNING n.id, n.account_id, n.kind, n.detail, n.to_address, n.attempts, n.message_id, n.created_at
)
SELECT c.*, a.number, a.email, a.name, a.last_name, a.company, a.currency, a.timezone, a.expires_at
FROM claimed c JOIN accounts a ON a.id = c.account_id
"""

_INVOICE = """
SELECT i.account_id, i.status, i.number, i.closing_micro, i.period_start, i.period_end, i.timezone, i.currency,
       d.pdf
FROM invoices i LEFT JOIN invoice_documents d ON d.invoice_id = i.id
WHERE i.id = $1
"""

_SENT = """
UPDATE notices SET sent_at = $2, failed_at = NULL, to_address = $3, subject = $4, smtp_reply = $5,
                   message_id = $6, attempts = attempts + 1, next_attempt_at = $2
WHERE id = $1 AND sent_at IS NULL
"""

_DEFERRED = """
UPDATE notices SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3,
                   to_address = coalesce($4, to_address), subject = coalesce($5, subject)
WHERE id = $1 AND sent_at IS NULL AND failed_at IS NULL
"""

_FAILED = """
UPDATE notices SET attempts = attempts + $6, failed_at = $2, last_error = $3, next_attempt_at = $2,
                   to_address = coalesce($4, to_address), subject = coalesce($5, subject)
WHERE id = $1 AND sent_at IS NULL AND failed_at IS NULL
"""


def _detail(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = json.loads(value)
    return dict(value) if isinstance(value, Mapping) else {}


def _customer(row: asyncpg.Record) -> Customer:
    name = " ".join(part for part in (row["name"], row["last_name"]) if part).strip() or row["company"]
    return Customer(number=row["number"], name=name, currency=row["currency"].strip(), timezone=row["timezone"],
                    expires_at=row["expires_at"])


async def _invoice(conn: asyncpg.Connection, account_id: int, detail: Mapping[str, Any]) -> InvoiceFacts | None:
    """The invoice of an invoice notice; None while its PDF is not rendered."""
    invoice_id = _int(detail, "invoice_id")
    number = detail.get("number")
    if invoice_id is None and isinstance(number, str):
        invoice_id = await conn.fetchval("SELECT id FROM invoices WHERE number = $1", number)
    if invoice_id is None:
        raise Unsendable(f"invoice notice without an invoice (detail {dict(detail)!r})")
    row = await conn.fetchrow(_INVOICE, invoice_id)
    if row is None:
        raise Unsendable(f"invoice {invoice_id} does not exist")
    if row["account_id"] != account_id:  # never mail one customer's invoice to another
        raise Unsendable(f"invoice {invoice_id} belongs to another account")
    if row["status"] == "discarded":
        raise Unsendable(f"invoice {invoice_id} was discarded")
    if row["status"] != "confirmed" or row["pdf"] is None:
        return None
    return InvoiceFacts(number=row["number"], closing_micro=row["closing_micro"], period_start=row["period_start"],
                        period_end=row["period_end"], timezone=row["timezone"], currency=row["currency"].strip(),
                        pdf=bytes(row["pdf"]))


async def _service(conn: asyncpg.Connection, account_id: int, detail: Mapping[str, Any]) -> ServiceFacts | None:
    service_id = _int(detail, "service_id")
    if service_id is None:
        return None
    row = await conn.fetchrow(
        "SELECT name, did, amount_micro, next_charge_at FROM services WHERE id = $1 AND account_id = $2",
        service_id, account_id)
    if row is None:
        return None
    return ServiceFacts(row["name"], row["did"], row["amount_micro"], row["next_charge_at"])


async def compose(conn: asyncpg.Connection, notice: asyncpg.Record, signature: str) -> Letter | None:
    """The e-mail of a claimed notice (row of _CLAIM); None: not ready (an invoice whose PDF is not rendered).
    Raises Unsendable for a notice no retry can send."""
    c = _customer(notice)
    detail = _detail(notice["detail"])
    kind = notice["kind"]
    if kind == "invoice":
        inv = await _invoice(conn, notice["account_id"], detail)
        return None if inv is None else invoice_letter(c, inv, signature)
    if kind == "low_credit":
        return low_credit_letter(c, detail, signature)
    if kind == "renewal_reminder":
        return renewal_letter(c, detail, await _service(conn, notice["account_id"], detail), signature)
    if kind == "service_suspended":
        return suspended_letter(c, detail, await _service(conn, notice["account_id"], detail), signature)
    if kind == "expired":
        return expired_letter(c, detail, signature)
    raise Unsendable(f"unknown notice kind {kind!r}")


# -- the run --------------------------------------------------------------------------------------------


async def send_due(conn: asyncpg.Connection, mailer: Mailer, settings: MailSettings, now: datetime,
                   limit: int = 100) -> OutboxReport:
    """Send up to `limit` due notices (unsent, not failed, next_attempt_at <= now), oldest first, one claim at
    a time (see the module's docstring for the claim, the lease and why a crash may send twice).

    Everything the run records is stamped with `now`: sent_at = now, a retry at now + the back-off. The run
    stops claiming once it has lasted `run_budget_s` (the next run carries on), so that every lease it took,
    now + lease_s, still covers a whole send when the send begins. `now` must come from a clock the other
    senders share to well within a lease (NTP).
    """
    report = OutboxReport()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + run_budget_s(settings)
    lease_until = now + timedelta(seconds=lease_s(settings))
    signature = _signature(settings.sender)
    for _ in range(limit):
        if loop.time() > deadline:
            log.info("outbox.run_budget_spent", handled=report.handled)
            break
        notice = await conn.fetchrow(_CLAIM, now, lease_until)
        if notice is None:
            break
        outcome, why = await _handle(conn, mailer, settings, notice, now, signature)
        report.count(outcome)
        if why:
            report.errors[notice["id"]] = why
    if report.handled:
        log.info("outbox.run", sent=report.sent, deferred=report.deferred, failed=report.failed,
                 waiting_for_document=report.waiting_for_document, no_address=report.no_address)
    return report


async def _handle(conn: asyncpg.Connection, mailer: Mailer, settings: MailSettings, notice: asyncpg.Record,
                  now: datetime, signature: str) -> tuple[Outcome, str]:
    nid, kind = notice["id"], notice["kind"]
    address = (notice["to_address"] or "").strip() or (notice["email"] or "").strip()
    if not address:
        await _fail(conn, nid, now, NO_ADDRESS, attempted=False)
        log.warning("notice.failed", notice=nid, kind=kind, account=notice["number"], error=NO_ADDRESS)
        return "no_address", NO_ADDRESS

    try:
        letter = await compose(conn, notice, signature)
    except Unsendable as exc:
        return await _give_up(conn, notice, now, f"cannot be sent: {exc}", address=address)
    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
        raise  # the store is gone: the lease runs out and the notice is tried again, no attempt counted
    except Exception as exc:  # a fault of ours with this notice: it costs an attempt, so it ends failed
        log.exception("notice.compose_error", notice=nid, kind=kind)
        return await _defer(conn, settings, notice, now, f"cannot compose: {type(exc).__name__}: {exc}", address, None)
    if letter is None:
        await conn.execute(
            "UPDATE notices SET next_attempt_at = $2, last_error = $3 WHERE id = $1 AND sent_at IS NULL",
            nid, now + timedelta(seconds=settings.retry_base_s), "waiting for the invoice's PDF to be rendered")
        if now - notice["created_at"] > timedelta(days=1):
            log.warning("notice.waiting_long", notice=nid, account=notice["number"], since=notice["created_at"])
        return "waiting_for_document", ""

    try:
        msg = build_message(sender=settings.sender, to=address, subject=letter.subject, text=letter.text,
                            attachments=letter.attachments)
    except InputError as exc:  # the address (or the subject) cannot go in a header: no retry will help
        return await _give_up(conn, notice, now, str(exc), address=address, subject=letter.subject)
    if notice["message_id"]:  # the same Message-ID on every attempt: a resend after a crash can be recognised
        msg.replace_header("Message-ID", notice["message_id"])
    else:
        await conn.execute("UPDATE notices SET message_id = $2 WHERE id = $1", nid, msg["Message-ID"])
    message_id = str(msg["Message-ID"])

    try:
        async with asyncio.timeout(send_bound_s(settings)):  # inside the lease, whatever the relay does
            reply = await mailer.send(msg)
    except MailRejected as exc:
        return await _give_up(conn, notice, now, str(exc), address=address, subject=letter.subject, attempted=True)
    except MailDeferred as exc:
        return await _defer(conn, settings, notice, now, str(exc), address, letter.subject)
    except TimeoutError:
        why = f"SMTP {settings.host}:{settings.port}: no outcome within {send_bound_s(settings):g} s"
        return await _defer(conn, settings, notice, now, why, address, letter.subject)
    except Exception as exc:  # a fault of ours: retried like a deferral, so it ends failed, never stuck
        log.exception("notice.send_error", notice=nid)
        return await _defer(conn, settings, notice, now, f"{type(exc).__name__}: {exc}", address, letter.subject)

    status = await conn.execute(_SENT, nid, now, address, letter.subject, reply, message_id)
    if status != "UPDATE 1":  # its lease ran out mid-send and another daemon sent it too
        log.warning("notice.sent_twice", notice=nid, kind=kind, account=notice["number"])
    log.info("notice.sent", notice=nid, kind=kind, account=notice["number"], msgid=message_id)
    return "sent", ""


async def _defer(conn: asyncpg.Connection, settings: MailSettings, notice: asyncpg.Record, now: datetime,
                 why: str, address: str, subject: str | None) -> tuple[Outcome, str]:
    attempts = notice["attempts"] + 1
    if attempts >= settings.max_attempts:
        return await _give_up(conn, notice, now, f"gave up after {attempts} attempts: {why}", address=address,
                              subject=subject, attempted=True)
    retry_at = now + timedelta(seconds=next_attempt_delay_s(attempts, settings))
    await conn.execute(_DEFERRED, notice["id"], why, retry_at, address, subject)
    log.warning("notice.deferred", notice=notice["id"], kind=notice["kind"], account=notice["number"],
                attempts=attempts, retry_at=retry_at.isoformat(), error=why)
    return "deferred", why


async def _give_up(conn: asyncpg.Connection, notice: asyncpg.Record, now: datetime, why: str, *,
                   address: str | None = None, subject: str | None = None, attempted: bool = False
                   ) -> tuple[Outcome, str]:
    await _fail(conn, notice["id"], now, why, address=address, subject=subject, attempted=attempted)
    log.warning("notice.failed", notice=notice["id"], kind=notice["kind"], account=notice["number"], error=why)
    return "failed", why


async def _fail(conn: asyncpg.Connection, nid: int, now: datetime, why: str, *, address: str | None = None,
                subject: str | None = None, attempted: bool) -> None:
    await conn.execute(_FAILED, nid, now, why, address, subject, 1 if attempted else 0)

