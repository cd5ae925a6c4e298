"""E-mail delivery: build a message (stdlib `email`) and hand it to the SMTP relay of [mail] (aiosmtplib).

The relay's answer is sorted for whoever keeps the outbox:

- `MailDeferred`: try again later (next_attempt_delay_s) — the relay could not be reached or timed out, or
  answered 4xx (greylisting, mailbox busy, queue full), or refused the login (a configuration fault that an
  operator can fix without the message being lost).
- `MailRejected`: do not try again — a 5xx reply (unknown recipient, message refused, policy), or a message
  this relay cannot carry at all (non-ASCII address without SMTPUTF8).

Anything else raised here is a programming fault. The password is never logged nor put in an error.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from email.message import EmailMessage

import aiosmtplib
import structlog

from a2bd.config import MailSettings
from a2bd.errors import A2bdError, InputError

log = structlog.get_logger("a2bd.mailer")

Attachment = tuple[str, str, bytes]  # (filename, content type such as "application/pdf", content)

_ADDRESS = re.compile(r"[^@\s<>()\[\],;:\"]+@[A-Za-z0-9.-]+")
_CONTENT_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*", re.IGNORECASE)
_MAX_EXPONENT = 64  # 2**64 times any sane base is past every cap; keeps the float maths finite


class MailError(A2bdError):
    """A message the SMTP relay did not take. `code` is the relay's reply code (None: no reply at all)."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class MailDeferred(MailError):
    """Not delivered this time; the same message may be sent again later."""


class MailRejected(MailError):
    """Refused for good: sending the same message again will not help."""


def build_message(
    *,
    sender: str,
    to: str,
    subject: str,
    text: str,
    attachments: Iterable[Attachment] = (),
) -> EmailMessage:
    """A text/plain message (UTF-8), with a Date (UTC) and a Message-ID on the sender's domain, and the
    attachments after it. `to` is one address or several separated by commas, each `user@domain` or
    `Name <user@domain>`. A CR or LF in any header value raises InputError: it would end the header and
    let the rest be read as headers of its own (Bcc: ...), so nothing is built."""
    _header_value("sender", sender)
    _header_value("to", to)
    _header_value("subject", subject)
    sender_address = _addresses("sender", sender)
    if len(sender_address) != 1:
        raise InputError(f"mail sender: expected one address, got {sender!r}")
    _addresses("to", to)

    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = email.utils.format_datetime(datetime.now(UTC))
    msg["Message-ID"] = email.utils.make_msgid(domain=sender_address[0].rpartition("@")[2])
    msg.set_content(text)
    for filename, content_type, data in attachments:
        _header_value("attachment filename", filename)
        if not filename:
            raise InputError("mail attachment: the filename must not be empty")
        if not _CONTENT_TYPE.fullmatch(content_type):
            raise InputError(f"mail attachment {filename!r}: content type must be type/subtype, got {content_type!r}")
        maintype, _, subtype = content_type.lower().partition("/")
        msg.add_attachment(bytes(data), maintype=maintype, subtype=subtype, filename=filename)
    return msg


def next_attempt_delay_s(attempts: int, settings: MailSettings) -> float:
    """Seconds to wait before the next try of a message already tried `attempts` times (>= 1):
    retry_base_s * 2**(attempts - 1), at most retry_max_s. No jitter: the caller adds any it wants."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    exponent = min(attempts - 1, _MAX_EXPONENT)
    return float(min(settings.retry_max_s, settings.retry_base_s * 2.0**exponent))


class Mailer:
    """Sends one message per SMTP connection through the relay of `settings`. The password (password or
    password_file) is read once, here: a missing file is a ConfigError at start, not at the first send."""

    def __init__(self, settings: MailSettings) -> None:
        self.settings = settings
        self._password = settings.read_password()

    def __repr__(self) -> str:
        return f"Mailer(host={self.settings.host!r}, port={self.settings.port})"

    async def send(self, msg: EmailMessage) -> str:
        """Deliver `msg` to the recipients of its To/Cc/Bcc headers; return the relay's final reply text
        (e.g. "2.0.0 Ok: queued as 4Xk2"), for the record. Raises MailDeferred or MailRejected."""
        s = self.settings
        msgid = str(msg.get("Message-ID", ""))
        try:
            refused, reply = await aiosmtplib.send(
                msg,
                hostname=s.host,
                port=s.port,
                username=s.username or None,
                password=self._password if s.username else None,
                use_tls=s.use_tls,
                start_tls=s.starttls,  # False: never upgrade on its own (aiosmtplib's None would)
                timeout=s.timeout_s,
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            error = _classify(exc, s)
            log.warning("mail.not_sent", msgid=msgid, host=s.host, port=s.port,
                        outcome="rejected" if isinstance(error, MailRejected) else "deferred", error=str(error))
            raise error from exc
        if refused:  # some recipients refused, the others took it: it is sent, and must not be sent again
            log.warning("mail.recipients_refused", msgid=msgid,
                        refused={rcpt: f"{r.code} {r.message}" for rcpt, r in refused.items()})
        log.info("mail.sent", msgid=msgid, host=s.host, port=s.port, reply=reply)
        return reply


def _classify(exc: Exception, s: MailSettings) -> MailError:
    where = f"SMTP {s.host}:{s.port}"
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):  # every recipient refused
        codes = [r.code for r in exc.recipients]
        details = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
        if any(400 <= code < 500 for code in codes):
            return MailDeferred(f"{where} deferred the recipients: {details}", code=min(codes))
        return MailRejected(f"{where} refused the recipients: {details}", code=max(codes))
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return MailDeferred(
            f"{where} refused the login of user {s.username!r} ({exc.code} {exc.message}): "
            f"fix mail.username and the password", code=exc.code)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if 500 <= exc.code < 600:
            return MailRejected(f"{where} refused the message: {exc.code} {exc.message}", code=exc.code)
        return MailDeferred(f"{where} deferred the message: {exc.code} {exc.message}", code=exc.code)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):  # SMTPUTF8 needed by this message, not offered
        return MailRejected(f"{where} cannot carry this message: {exc.message}")
    if isinstance(exc, aiosmtplib.SMTPException):  # connect, timeout, disconnect, no STARTTLS or AUTH offered
        return MailDeferred(f"{where}: {exc.message}")
    return MailDeferred(f"{where}: {type(exc).__name__}: {exc}")  # TLS handshake, name resolution, socket


def _header_value(what: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise InputError(f"mail {what}: a CR or LF in a header value is refused (header injection): {value!r}")


def _addresses(what: str, value: str) -> list[str]:
    found = [address for _, address in email.utils.getaddresses([value])]
    if not found or not all(_ADDRESS.fullmatch(address) for address in found):
        raise InputError(f"mail {what}: expected user@domain or Name <user@domain>, got {value!r}")
    return found
