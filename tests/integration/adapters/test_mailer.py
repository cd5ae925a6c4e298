"""The mailer against a real SMTP server (aiosmtpd) on loopback: what arrives is what was built, and every
way the server can say no is sorted into MailDeferred (try again) or MailRejected (give up)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
import structlog

from a2bd.adapters.mailer import MailDeferred, Mailer, MailRejected, build_message
from a2bd.config import MailSettings
from a2bd.errors import InputError
from tests.smtp import PASSWORD, USER, SmtpServer, smtp_server  # noqa: F401 - the `smtp` fixture

pytestmark = pytest.mark.integration

PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n\x00\x01\x02\xff trailer\n%%EOF\n"
@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: a connection to it is refused, and no one can take it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def invoice(to: str = "Jean Dupont <jean@example.org>") -> EmailMessage:
    return build_message(
        sender="Example Billing <billing@example.net>", to=to, subject="Facture 2030-01 — compte 1000000001",
        text="Bonjour,\n\nvotre facture est jointe.\n", attachments=[("invoice-2030-01.pdf", "application/pdf", PDF)],
    )


async def test_message_with_a_pdf_arrives_intact(smtp: SmtpServer) -> None:
    reply = await Mailer(smtp.settings()).send(invoice())

    assert reply == "2.0.0 Ok: queued as TEST1"
    assert smtp.handler.connections == 1
    got = smtp.handler.received.get_nowait()  # DATA is answered only once the handler has run
    assert got.mail_from == "billing@example.net"
    assert got.rcpt_tos == ["jean@example.org"]
    assert got.login is None
    parsed = email.message_from_bytes(got.content, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["Subject"] == "Facture 2030-01 — compte 1000000001"
    assert parsed["To"] == "Jean Dupont <jean@example.org>"
    assert parsed["From"] == "Example Billing <billing@example.net>"
    assert parsed["Message-ID"].endswith("@example.net>")
    body = parsed.get_body(("plain",))
    assert body is not None
    assert body.get_content().splitlines() == ["Bonjour,", "", "votre facture est jointe."]  # CRLF on the wire
    attachments = list(parsed.iter_attachments())
    assert [(a.get_filename(), a.get_content_type()) for a in attachments] == [
        ("invoice-2030-01.pdf", "application/pdf")]
    assert attachments[0].get_content() == PDF


async def test_login_with_username_and_password(smtp: SmtpServer) -> None:
    mailer = Mailer(smtp.settings(username=USER, password=PASSWORD))
    with structlog.testing.capture_logs() as logs:
        await mailer.send(invoice())

    assert smtp.handler.received.get_nowait().login == USER.encode()
    assert PASSWORD not in repr(logs)
    assert PASSWORD not in repr(mailer) and PASSWORD not in repr(mailer.settings)


async def test_password_from_a_file(smtp: SmtpServer, tmp_path: Any) -> None:
    secret = tmp_path / "smtp.secret"
    secret.write_text(PASSWORD + "\n")
    await Mailer(smtp.settings(username=USER, password_file=str(secret))).send(invoice())
    assert smtp.handler.received.get_nowait().login == USER.encode()


async def test_wrong_password_is_deferred_and_not_shown(smtp: SmtpServer) -> None:
    with structlog.testing.capture_logs() as logs, pytest.raises(MailDeferred) as info:
        await Mailer(smtp.settings(username=USER, password="wrong-horse")).send(invoice())
    assert info.value.code == 535
    assert "refused the login of user 'a2bd'" in str(info.value)
    assert "wrong-horse" not in str(info.value) and "wrong-horse" not in repr(logs)
    assert smtp.handler.received.empty()


@pytest.mark.parametrize(("rcpt_reply", "data_reply", "error", "code"), [
    ("550 5.1.1 <jean@example.org>: Recipient address rejected: User unknown", "250 OK", MailRejected, 550),
    (None, "554 5.7.1 Message refused: spam", MailRejected, 554),
    ("450 4.2.0 <jean@example.org>: Recipient address rejected: Greylisted", "250 OK", MailDeferred, 450),
    (None, "451 4.3.0 Local error in processing, try again", MailDeferred, 451),
])
async def test_server_refusals_are_sorted(smtp: SmtpServer, rcpt_reply: str | None, data_reply: str,
                                          error: type[Exception], code: int) -> None:
    smtp.handler.rcpt_reply, smtp.handler.data_reply = rcpt_reply, data_reply
    with structlog.testing.capture_logs() as logs, pytest.raises(error) as info:
        await Mailer(smtp.settings()).send(invoice())

    assert getattr(info.value, "code", None) == code
    assert str(code) in str(info.value)
    assert [entry["event"] for entry in logs] == ["mail.not_sent"]


async def test_nothing_listening_is_deferred(closed_port: int) -> None:
    settings = MailSettings(host="127.0.0.1", port=closed_port, timeout_s=2.0)
    with pytest.raises(MailDeferred) as info:
        await Mailer(settings).send(invoice())
    assert info.value.code is None
    assert f"127.0.0.1:{closed_port}" in str(info.value)


async def test_a_server_that_never_answers_is_deferred() -> None:
    silent: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)  # says nothing: no 220 greeting ever comes

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        settings = MailSettings(host="127.0.0.1", port=server.sockets[0].getsockname()[1], timeout_s=0.2)
        with pytest.raises(MailDeferred, match=r"(?i)timed out"):
            await Mailer(settings).send(invoice())
    finally:
        for writer in silent:
            writer.close()
        server.close()
        async with asyncio.timeout(5):
            await server.wait_closed()


async def test_starttls_required_but_not_offered_is_deferred(smtp: SmtpServer) -> None:
    with pytest.raises(MailDeferred, match="STARTTLS"):
        await Mailer(smtp.settings(starttls=True)).send(invoice())
    assert smtp.handler.received.empty()


async def test_header_injection_is_refused_before_any_connection(smtp: SmtpServer) -> None:
    # Refused while the message is built: the mailer is never reached.
    with pytest.raises(InputError, match="CR or LF"):
        invoice(to="jean@example.org\r\nBcc: everyone@example.org")
    with pytest.raises(InputError, match="CR or LF"):
        build_message(sender="billing@example.net", to="jean@example.org", subject="Invoice\r\nBcc: x@y.z",
                      text="")
    assert smtp.handler.connections == 0
