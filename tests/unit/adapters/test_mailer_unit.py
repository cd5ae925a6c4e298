"""The mailer's pure parts: the message it builds (no server) and the retry schedule (a table)."""

from __future__ import annotations

import email
import email.policy
import email.utils
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import pytest

from a2bd.adapters.mailer import build_message, next_attempt_delay_s
from a2bd.config import MailSettings
from a2bd.errors import InputError

SENDER = "Example Billing <billing@example.net>"


def roundtrip(msg: EmailMessage) -> EmailMessage:
    """What a receiver parses out of the bytes that would go on the wire."""
    parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_headers_body_and_attachments() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    msg = roundtrip(build_message(
        sender=SENDER, to="Zoë Müller <zoe@example.org>, ops@example.org", subject="Facture n° 12 — janvier",
        text="Montant dû : 12,50 €\n",
        attachments=[("facture-12.pdf", "application/pdf", b"%PDF-1.4\x00\xff"),
                     ("calls.csv", "text/csv", b"a,b\r\n1,2\r\n")],
    ))

    assert msg["From"] == SENDER
    assert msg["To"] == "Zoë Müller <zoe@example.org>, ops@example.org"
    assert [a.addr_spec for a in msg["To"].addresses] == ["zoe@example.org", "ops@example.org"]
    assert msg["Subject"] == "Facture n° 12 — janvier"
    sent = email.utils.parsedate_to_datetime(msg["Date"])
    assert before <= sent <= before + timedelta(minutes=1)
    assert sent.utcoffset() == timedelta(0)
    left, _, right = msg["Message-ID"].strip("<>").partition("@")
    assert left and right == "example.net"
    body = msg.get_body(("plain",))
    assert body is not None
    assert body.get_content() == "Montant dû : 12,50 €\n"
    attachments = [(a.get_filename(), a.get_content_type(), a.get_content()) for a in msg.iter_attachments()]
    assert attachments == [("facture-12.pdf", "application/pdf", b"%PDF-1.4\x00\xff"),
                           ("calls.csv", "text/csv", "a,b\r\n1,2\r\n")]


def test_without_attachments_it_is_plain_text() -> None:
    msg = roundtrip(build_message(sender="billing@localhost", to="a@example.org", subject="", text="hi"))
    assert msg.get_content_type() == "text/plain"
    assert msg["Message-ID"].endswith("@localhost>")


def test_each_message_has_its_own_id() -> None:
    ids = {build_message(sender=SENDER, to="a@example.org", subject="s", text="t")["Message-ID"] for _ in range(50)}
    assert len(ids) == 50


@pytest.mark.parametrize(("field", "value"), [
    ("to", "a@example.org\r\nBcc: victim@example.org"),
    ("to", "a@example.org\nBcc: victim@example.org"),
    ("to", "a@example.org\r"),
    ("subject", "Invoice\r\nBcc: victim@example.org"),
    ("subject", "Invoice\n\nInjected body"),
    ("sender", "billing@example.net\r\nReply-To: evil@example.org"),
])
def test_cr_or_lf_in_a_header_is_refused(field: str, value: str) -> None:
    fields = {"sender": SENDER, "to": "a@example.org", "subject": "Invoice"} | {field: value}
    with pytest.raises(InputError, match=f"mail {field}: a CR or LF in a header value is refused"):
        build_message(**fields, text="body")


def test_cr_or_lf_in_an_attachment_filename_is_refused() -> None:
    with pytest.raises(InputError, match="CR or LF"):
        build_message(sender=SENDER, to="a@example.org", subject="s", text="t",
                      attachments=[("x.pdf\r\nContent-Type: text/html", "application/pdf", b"")])


@pytest.mark.parametrize(("fields", "message"), [
    ({"to": "not an address"}, "mail to: expected user@domain"),
    ({"to": ""}, "mail to: expected user@domain"),
    ({"to": "a@example.org, oops"}, "mail to: expected user@domain"),
    ({"sender": "billing"}, "mail sender: expected user@domain"),
    ({"sender": "a@example.net, b@example.net"}, "mail sender: expected one address"),
])
def test_bad_addresses_are_refused(fields: dict[str, str], message: str) -> None:
    with pytest.raises(InputError, match=message):
        build_message(**({"sender": SENDER, "to": "a@example.org", "subject": "s", "text": "t"} | fields))


@pytest.mark.parametrize(("attachment", "message"), [
    (("x.pdf", "pdf", b""), "content type must be type/subtype"),
    (("x.pdf", "application/pdf; name=y", b""), "content type must be type/subtype"),
    (("", "application/pdf", b""), "filename must not be empty"),
])
def test_bad_attachments_are_refused(attachment: tuple[str, str, bytes], message: str) -> None:
    with pytest.raises(InputError, match=message):
        build_message(sender=SENDER, to="a@example.org", subject="s", text="t", attachments=[attachment])


@pytest.mark.parametrize(("attempts", "delay_s"), [
    (1, 30.0),
    (2, 60.0),
    (3, 120.0),
    (7, 1920.0),
    (8, 3600.0),  # 3840 capped
    (9, 3600.0),
    (10_000, 3600.0),  # no overflow however long a message has been retried
])
def test_backoff_doubles_up_to_the_cap(attempts: int, delay_s: float) -> None:
    assert next_attempt_delay_s(attempts, MailSettings()) == delay_s


@pytest.mark.parametrize(("base_s", "max_s", "attempts", "delay_s"), [
    (0.5, 0.5, 1, 0.5),
    (0.5, 0.5, 5, 0.5),
    (1.5, 100.0, 4, 12.0),
    (10.0, 25.0, 2, 20.0),
    (10.0, 25.0, 3, 25.0),
])
def test_backoff_follows_the_settings(base_s: float, max_s: float, attempts: int, delay_s: float) -> None:
    settings = MailSettings(retry_base_s=base_s, retry_max_s=max_s)
    assert next_attempt_delay_s(attempts, settings) == delay_s


def test_backoff_never_decreases() -> None:
    settings = MailSettings()
    delays = [next_attempt_delay_s(n, settings) for n in range(1, 40)]
    assert delays == sorted(delays)
    assert all(0 < d <= settings.retry_max_s for d in delays)


@pytest.mark.parametrize("attempts", [0, -1])
def test_backoff_needs_at_least_one_attempt(attempts: int) -> None:
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        next_attempt_delay_s(attempts, MailSettings())
