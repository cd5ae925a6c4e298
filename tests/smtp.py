"""A real SMTP server (aiosmtpd) on loopback for the tests that send mail: the `smtp` fixture serves it in the
test's own event loop on an ephemeral port and closes it afterwards. Every accepted message goes on a queue
the test reads; the replies to RCPT and DATA can be set to refusals."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from a2bd.config import MailSettings

USER, PASSWORD = "a2bd", "s3cret-pa55"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    login: bytes | None

    def parsed(self) -> EmailMessage:
        """The message as a reader's mail program sees it (the modern policy: headers decoded)."""
        msg = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass
class Recorder:
    """aiosmtpd handler: each accepted message goes on `received` for the test to read; the replies to RCPT
    and DATA can be set to refusals. `data_delay_s` holds every DATA that long before answering (to make two
    senders overlap)."""

    received: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)
    rcpt_reply: str | None = None
    connections: int = 0
    data_reply: str = "250 2.0.0 Ok: queued as TEST1"
    data_delay_s: float = 0.0

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if self.rcpt_reply is not None:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay_s:
            await asyncio.sleep(self.data_delay_s)
        if self.data_reply.startswith("250"):
            assert isinstance(envelope.content, bytes)
            login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
            self.received.put_nowait(Received(str(envelope.mail_from), list(envelope.rcpt_tos),
                                              envelope.content, login))
        return self.data_reply

    def drain(self) -> list[Received]:
        """Every message received so far, in order, taken off the queue."""
        out = []
        while not self.received.empty():
            out.append(self.received.get_nowait())
        return out


def authenticate(server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USER.encode(), PASSWORD.encode())
    # handled=False: aiosmtpd then answers a failure with 535 itself (True means "I already replied")
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


@dataclass
class SmtpServer:
    handler: Recorder
    port: int

    def settings(self, **overrides: Any) -> MailSettings:
        values: dict[str, Any] = {"host": "127.0.0.1", "port": self.port, "timeout_s": 2.0,
                                  "sender": "Example Billing <billing@example.net>"}
        values.update(overrides)
        settings = MailSettings(**values)
        settings.validate()
        return settings


@pytest.fixture(name="smtp")  # imported as smtp_server: a test's `smtp` argument shadows no name
async def smtp_server() -> AsyncIterator[SmtpServer]:
    """aiosmtpd's SMTP protocol served in the test's own loop on an ephemeral loopback port (the threaded
    Controller cannot take port 0). AUTH is offered without TLS, on loopback only, to test the login."""
    handler = Recorder()
    loop = asyncio.get_running_loop()

    def connection() -> SMTP:
        handler.connections += 1
        return SMTP(handler, hostname="mx.test", loop=loop, authenticator=authenticate, auth_require_tls=False)

    server = await loop.create_server(connection, "127.0.0.1", 0)
    try:
        yield SmtpServer(handler, server.sockets[0].getsockname()[1])
    finally:
        server.close()
        async with asyncio.timeout(5):
            await server.wait_closed()
