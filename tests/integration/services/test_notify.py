"""The outbox against the real PostgreSQL and a real SMTP server (aiosmtpd on loopback): every kind of notice
arrives as an e-mail a customer can read, with the exact amounts and the invoice's own PDF; a deferral is
retried, a refusal or a missing address fails with the reason, and two senders never send one notice twice."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import asyncpg
import pytest

from a2bd.adapters import postgres
from a2bd.adapters.mailer import Mailer, next_attempt_delay_s
from a2bd.config import MailSettings
from a2bd.services.notify import OutboxReport, lease_s, send_due
from tests.smtp import Received, SmtpServer, smtp_server  # noqa: F401 - the `smtp` fixture

pytestmark = pytest.mark.integration

NOW = datetime(2030, 4, 2, 8, 0, tzinfo=UTC)
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n\x00\x01\x02\xff trailer\n%%EOF\n"
RUN_TIMEOUT_S = 20.0


# -- the world ------------------------------------------------------------------------------------------


async def account(pg: asyncpg.Connection, number: str, email: str = "jean@example.org", **fields: Any) -> int:
    if await pg.fetchval("SELECT id FROM tariffs WHERE name = 't'") is None:
        await postgres.replace_tariff(pg, "t", [])
    last_name = fields.pop("last_name", "")  # not a field `account create` takes
    values: dict[str, Any] = {"name": "Jean Dupont", "currency": "EUR", "timezone": "Europe/Paris", **fields}
    acct = await postgres.create_account(pg, number=number, tariff="t", initial_balance_micro=0, email=email,
                                         **values)
    await pg.execute("UPDATE accounts SET last_name = $2 WHERE id = $1", acct["id"], last_name)
    return int(acct["id"])


async def notice(pg: asyncpg.Connection, account_id: int, kind: str, detail: dict[str, Any],
                 to_address: str | None = None, next_attempt_at: datetime = NOW) -> int:
    return int(await pg.fetchval(
        "INSERT INTO notices (account_id, kind, detail, to_address, next_attempt_at) VALUES ($1, $2, $3, $4, $5)"
        " RETURNING id", account_id, kind, json.dumps(detail), to_address, next_attempt_at))


async def invoice(pg: asyncpg.Connection, account_id: int, seq: int, *, lines_micro: int, tax_micro: int,
                  opening_micro: int = 0, document: bytes | None = PDF) -> tuple[int, str]:
    """A confirmed invoice of the admin issuer for March 2030 (Europe/Paris), and its PDF unless None."""
    number = f"INV-{seq:06d}"
    invoice_id = await pg.fetchval(
        "INSERT INTO invoices (account_id, issuer_id, status, number, seq, period_start, period_end, from_line_id,"
        " through_line_id, opening_micro, lines_micro, tax_micro, closing_micro, net_micro, payments_micro,"
        " line_count, currency, timezone, confirmed_at)"
        " VALUES ($1, 1, 'confirmed', $2, $3, $4, $5, 0, 0, $6::bigint, $7::bigint, $8::bigint, $6 + $7 - $8, 0, 0, 0,"
        " 'EUR', 'Europe/Paris', $9) RETURNING id",
        account_id, number, seq, datetime(2030, 2, 28, 23, tzinfo=UTC), datetime(2030, 3, 31, 22, tzinfo=UTC),
        opening_micro, lines_micro, tax_micro, NOW)
    if document is not None:
        await add_document(pg, invoice_id, document)
    return int(invoice_id), number


async def add_document(pg: asyncpg.Connection, invoice_id: int, pdf: bytes) -> None:
    await pg.execute("INSERT INTO invoice_documents (invoice_id, pdf, sha256) VALUES ($1, $2, $3)",
                     invoice_id, pdf, hashlib.sha256(pdf).hexdigest())


async def row(pg: asyncpg.Connection, notice_id: int) -> asyncpg.Record:
    record = await pg.fetchrow("SELECT * FROM notices WHERE id = $1", notice_id)
    assert record is not None
    return record


async def run(conn: asyncpg.Connection, settings: MailSettings, now: datetime = NOW, limit: int = 100) -> OutboxReport:
    async with asyncio.timeout(RUN_TIMEOUT_S):
        return await send_due(conn, Mailer(settings), settings, now, limit)


def body(msg: EmailMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")  # CRLF on the wire


async def one_message(smtp: SmtpServer) -> EmailMessage:
    got = smtp.handler.drain()
    assert len(got) == 1
    return got[0].parsed()


@pytest.fixture
async def other_pg(pg_url: str, pg: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """A second connection to the same (emptied) database: another daemon."""
    conn = await asyncpg.connect(pg_url)
    try:
        yield conn
    finally:
        await conn.close()


# -- each kind, as the customer reads it ----------------------------------------------------------------


async def test_invoice_arrives_with_its_pdf(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    acct = await account(pg, "1000000001", name="Jean", last_name="Dupont")
    invoice_id, number = await invoice(pg, acct, 123, lines_micro=-12_345_600, tax_micro=2_469_120)
    nid = await notice(pg, acct, "invoice", {"invoice_id": invoice_id, "number": number},
                       to_address="Jean Dupont <jean@example.org>")

    report = await run(pg, smtp.settings())

    assert (report.sent, report.handled) == (1, 1)
    msg = await one_message(smtp)
    assert msg["Subject"] == "Invoice INV-000123"
    assert msg["To"] == "Jean Dupont <jean@example.org>"
    assert msg["From"] == "Example Billing <billing@example.net>"
    text = body(msg)
    assert text.startswith("Dear Jean Dupont,\n")
    assert "Amount to pay: 14.81472 EUR" in text  # -(0 - 12.3456 - 2.46912), every digit
    assert "Period: 1 March 2030 to 31 March 2030" in text  # the invoice's own time zone, end exclusive
    assert "account 1000000001" in text
    assert "Example Billing" in text
    attachments = list(msg.iter_attachments())
    assert [(a.get_filename(), a.get_content_type()) for a in attachments] == [("INV-000123.pdf", "application/pdf")]
    stored = await pg.fetchval("SELECT pdf FROM invoice_documents WHERE invoice_id = $1", invoice_id)
    assert attachments[0].get_content() == bytes(stored) == PDF

    r = await row(pg, nid)
    assert r["sent_at"] == NOW
    assert r["failed_at"] is None
    assert r["subject"] == "Invoice INV-000123"
    assert r["to_address"] == "Jean Dupont <jean@example.org>"
    assert r["smtp_reply"] == "2.0.0 Ok: queued as TEST1"
    assert r["message_id"] == msg["Message-ID"]
    assert r["attempts"] == 1


async def test_invoice_in_credit_says_nothing_to_pay(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    acct = await account(pg, "1000000002")
    invoice_id, number = await invoice(pg, acct, 7, opening_micro=20_000_000, lines_micro=-1_000_001, tax_micro=0)
    await notice(pg, acct, "invoice", {"invoice_id": invoice_id, "number": number})

    assert (await run(pg, smtp.settings())).sent == 1

    msg = await one_message(smtp)
    assert msg["To"] == "jean@example.org"  # no to_address recorded: the account's e-mail
    assert "Amount to pay: nothing — your account is 18.999999 EUR in credit." in body(msg)


async def test_invoice_waits_for_its_document(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    acct = await account(pg, "1000000003")
    invoice_id, number = await invoice(pg, acct, 8, lines_micro=-5_000_000, tax_micro=0, document=None)
    nid = await notice(pg, acct, "invoice", {"invoice_id": invoice_id, "number": number})
    settings = smtp.settings()

    report = await run(pg, settings)

    assert (report.waiting_for_document, report.handled) == (1, 1)
    assert smtp.handler.connections == 0
    r = await row(pg, nid)
    assert (r["attempts"], r["sent_at"], r["failed_at"]) == (0, None, None)  # waiting costs no attempt
    assert NOW + timedelta(seconds=settings.retry_base_s) <= r["next_attempt_at"] < NOW + timedelta(minutes=5)
    assert (await run(pg, settings)).handled == 0  # not due again at once

    await add_document(pg, invoice_id, PDF)
    later = r["next_attempt_at"]
    assert (await run(pg, settings, later)).sent == 1
    msg = await one_message(smtp)
    assert [a.get_content() for a in msg.iter_attachments()] == [PDF]
    assert "Amount to pay: 5.00 EUR" in body(msg)
    assert (await row(pg, nid))["sent_at"] == later


async def test_low_credit(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    acct = await account(pg, "1000000004", currency="USD", name="", company="Acme Ltd")
    nid = await notice(pg, acct, "low_credit", {"available_micro": 4_500_001, "threshold_micro": 5_000_000})

    assert (await run(pg, smtp.settings())).sent == 1

    msg = await one_message(smtp)
    assert msg["Subject"] == "Low credit on your account 1000000004"
    text = body(msg)
    assert text.startswith("Dear Acme Ltd,\n")
    assert "4.500001 USD" in text and "5.00 USD" in text
    assert (await row(pg, nid))["subject"] == "Low credit on your account 1000000004"


async def test_renewal_reminder_and_suspension(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    """With the details services/recurring.py records."""
    acct = await account(pg, "1000000005")
    renews = datetime(2030, 4, 30, 22, tzinfo=UTC)  # 1 May 2030, 00:00 in Paris
    service_id = await pg.fetchval(
        "INSERT INTO services (account_id, kind, name, did, amount_micro, anchor_day, next_charge_at)"
        " VALUES ($1, 'did', 'Paris number', '33123456789', 2990000, 1, $2) RETURNING id", acct, renews)
    service = {"service_id": service_id, "service": "Paris number", "kind": "did", "did": "33123456789",
               "amount_micro": 2_990_000, "currency": "EUR"}
    await notice(pg, acct, "renewal_reminder", {**service, "renews_at": renews.isoformat(),
                                                "renewal_date": "2030-05-01"})
    await notice(pg, acct, "service_suspended", {**service, "reason": "credit", "due_at": renews.isoformat(),
                                                 "available_micro": 1_250_000, "short_micro": 1_740_000})
    await notice(pg, acct, "service_suspended", {**service, "reason": "account_closed", "due_at": renews.isoformat(),
                                                 "available_micro": 0, "short_micro": 0})

    assert (await run(pg, smtp.settings())).sent == 3

    reminder, suspended, closed = [m.parsed() for m in smtp.handler.drain()]
    assert reminder["Subject"] == "Renewal of Paris number (number 33123456789) on 1 May 2030"
    assert ("Your service Paris number (number 33123456789) on account 1000000005 renews on 1 May 2030: 2.99 EUR"
            " will be charged to your account.") in body(reminder)
    assert suspended["Subject"] == "Service suspended: Paris number (number 33123456789)"
    text = body(suspended)
    assert ("has been suspended: its renewal on 1 May 2030 needed 2.99 EUR, and the credit available on your"
            " account was 1.25 EUR (1.74 EUR short).") in text
    assert "top up your account with at least 1.74 EUR" in text
    assert "has been suspended because the account is closed." in body(closed)


async def test_service_notices_from_the_service_row(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    """A detail naming only the service: its name, price and renewal come from the services table."""
    acct = await account(pg, "1000000008")
    service_id = await pg.fetchval(
        "INSERT INTO services (account_id, kind, name, amount_micro, anchor_day, next_charge_at)"
        " VALUES ($1, 'subscription', 'Unlimited France', 19990000, 1, $2) RETURNING id",
        acct, datetime(2030, 5, 31, 22, tzinfo=UTC))
    await notice(pg, acct, "renewal_reminder", {"service_id": service_id})
    await notice(pg, acct, "service_suspended", {"service_id": service_id})

    assert (await run(pg, smtp.settings())).sent == 2

    reminder, suspended = [m.parsed() for m in smtp.handler.drain()]
    assert reminder["Subject"] == "Renewal of Unlimited France on 1 June 2030"
    assert "renews on 1 June 2030: 19.99 EUR will be charged" in body(reminder)
    assert "has been suspended: its renewal needed 19.99 EUR." in body(suspended)


async def test_expired(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    acct = await account(pg, "1000000006", expires_at=datetime(2030, 4, 1, 12, 30, tzinfo=UTC))
    await notice(pg, acct, "expired", {})

    assert (await run(pg, smtp.settings())).sent == 1

    msg = await one_message(smtp)
    assert msg["Subject"] == "Your account 1000000006 has expired"
    assert "expired on 1 April 2030 at 14:30 (CEST)" in body(msg)


async def test_unknown_detail_keys_still_make_a_readable_mail(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    acct = await account(pg, "1000000007")
    await notice(pg, acct, "service_suspended", {"whatever": [1, 2]})
    await notice(pg, acct, "low_credit", {})

    assert (await run(pg, smtp.settings())).sent == 2
    suspended, low = [m.parsed() for m in smtp.handler.drain()]
    assert suspended["Subject"] == "Service suspended on account 1000000007"
    assert "did not cover its renewal" in body(suspended)
    assert "below your alert threshold" in body(low)


# -- retries and failures -------------------------------------------------------------------------------


async def test_deferred_then_sent_on_a_later_run(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    acct = await account(pg, "1000000010")
    nid = await notice(pg, acct, "low_credit", {"available_micro": 1, "threshold_micro": 2})
    settings = smtp.settings(retry_base_s=60.0)
    smtp.handler.data_reply = "451 4.3.0 Local error in processing, try again"

    report = await run(pg, settings)

    assert (report.deferred, report.handled) == (1, 1)
    first = await row(pg, nid)
    assert (first["attempts"], first["sent_at"], first["failed_at"]) == (1, None, None)
    assert "451" in first["last_error"] and "try again" in first["last_error"]
    delay = timedelta(seconds=next_attempt_delay_s(1, settings))
    assert NOW + delay <= first["next_attempt_at"] < NOW + delay + timedelta(seconds=10)
    assert (await run(pg, settings, NOW + delay / 2)).handled == 0  # not due yet

    smtp.handler.data_reply = "250 2.0.0 Ok: queued as TEST2"
    assert (await run(pg, settings, first["next_attempt_at"])).sent == 1

    msg = await one_message(smtp)
    final = await row(pg, nid)
    assert final["sent_at"] == first["next_attempt_at"]
    assert final["attempts"] == 2
    assert final["smtp_reply"] == "2.0.0 Ok: queued as TEST2"
    assert final["message_id"] == first["message_id"] == msg["Message-ID"]  # one Message-ID for every attempt


async def test_refusal_fails_at_once_with_the_reply(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    acct = await account(pg, "1000000011", email="nobody@example.org")
    nid = await notice(pg, acct, "low_credit", {"available_micro": 1, "threshold_micro": 2})
    smtp.handler.rcpt_reply = "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown"

    report = await run(pg, smtp.settings())

    assert (report.failed, report.handled) == (1, 1)
    r = await row(pg, nid)
    assert r["failed_at"] == NOW and r["sent_at"] is None
    assert "550 5.1.1" in r["last_error"] and "User unknown" in r["last_error"]
    assert r["attempts"] == 1
    assert report.errors == {nid: r["last_error"]}
    assert (await run(pg, smtp.settings(), NOW + timedelta(days=30))).handled == 0  # never tried again


async def test_no_address_fails_without_a_connection(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    acct = await account(pg, "1000000012", email="")
    nid = await notice(pg, acct, "low_credit", {"available_micro": 1, "threshold_micro": 2})

    report = await run(pg, smtp.settings())

    assert (report.no_address, report.failed, report.handled) == (1, 0, 1)
    assert smtp.handler.connections == 0
    r = await row(pg, nid)
    assert (r["failed_at"], r["last_error"], r["attempts"]) == (NOW, "no e-mail address", 0)


async def test_unusable_address_fails(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    acct = await account(pg, "1000000013")
    nid = await notice(pg, acct, "low_credit", {"available_micro": 1, "threshold_micro": 2},
                       to_address="jean at example dot org")

    assert (await run(pg, smtp.settings())).failed == 1
    assert smtp.handler.connections == 0
    r = await row(pg, nid)
    assert r["failed_at"] == NOW and "expected user@domain" in r["last_error"]


async def test_someone_elses_invoice_is_never_sent(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    owner = await account(pg, "1000000014")
    other = await account(pg, "1000000015", email="other@example.org")
    invoice_id, number = await invoice(pg, owner, 9, lines_micro=-1, tax_micro=0)
    nid = await notice(pg, other, "invoice", {"invoice_id": invoice_id, "number": number})

    assert (await run(pg, smtp.settings())).failed == 1
    assert smtp.handler.connections == 0
    assert "belongs to another account" in (await row(pg, nid))["last_error"]


async def test_gives_up_after_max_attempts(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    acct = await account(pg, "1000000016")
    nid = await notice(pg, acct, "low_credit", {"available_micro": 1, "threshold_micro": 2})
    settings = smtp.settings(max_attempts=3, retry_base_s=10.0, retry_max_s=15.0)
    smtp.handler.rcpt_reply = "450 4.2.0 <jean@example.org>: Recipient address rejected: Greylisted"

    at = NOW
    outcomes = []
    for _ in range(3):
        report = await run(pg, settings, at)
        outcomes.append((report.deferred, report.failed))
        at = (await row(pg, nid))["next_attempt_at"]

    assert outcomes == [(1, 0), (1, 0), (0, 1)]
    r = await row(pg, nid)
    assert r["attempts"] == 3 and r["sent_at"] is None and r["failed_at"] is not None
    assert r["last_error"].startswith("gave up after 3 attempts: ") and "450 4.2.0" in r["last_error"]
    assert smtp.handler.connections == 3
    assert (await run(pg, settings, at + timedelta(days=1))).handled == 0


async def test_relay_down_is_deferred(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    acct = await account(pg, "1000000017")
    nid = await notice(pg, acct, "low_credit", {"available_micro": 1, "threshold_micro": 2})
    with socket.socket() as sock:  # bound, not listening: the connection is refused
        sock.bind(("127.0.0.1", 0))
        settings = smtp.settings(port=sock.getsockname()[1])
        assert (await run(pg, settings)).deferred == 1
    r = await row(pg, nid)
    assert r["attempts"] == 1 and r["sent_at"] is None and r["failed_at"] is None


# -- order, limit and concurrency -----------------------------------------------------------------------


async def test_oldest_first_up_to_the_limit(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    acct = await account(pg, "1000000020")
    ids = [await notice(pg, acct, "low_credit", {"available_micro": i, "threshold_micro": 10}) for i in range(3)]
    later = await notice(pg, acct, "low_credit", {"available_micro": 9, "threshold_micro": 10},
                         next_attempt_at=NOW + timedelta(hours=1))

    assert (await run(pg, smtp.settings(), limit=2)).sent == 2
    assert [(await row(pg, i))["sent_at"] is not None for i in [*ids, later]] == [True, True, False, False]
    assert (await run(pg, smtp.settings())).sent == 1
    assert (await row(pg, later))["sent_at"] is None


async def test_a_sender_that_dies_mid_send_leaves_a_lease(pg: asyncpg.Connection, smtp: SmtpServer) -> None:
    """A run cut off during the SMTP conversation leaves its claim: other runs wait for the lease to run out,
    then send the notice again, with the same Message-ID (at least once)."""
    acct = await account(pg, "1000000021")
    nid = await notice(pg, acct, "low_credit", {"available_micro": 1, "threshold_micro": 2})
    settings = smtp.settings(timeout_s=1.0)  # aiosmtplib, cancelled, still tries a QUIT for up to timeout_s
    lease = timedelta(seconds=lease_s(settings))
    smtp.handler.data_delay_s = 5.0  # the relay is slow to answer DATA, and the daemon dies meanwhile

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await send_due(pg, Mailer(settings), settings, NOW)

    claimed = await row(pg, nid)
    assert (claimed["sent_at"], claimed["failed_at"], claimed["attempts"]) == (None, None, 0)
    assert claimed["next_attempt_at"] == NOW + lease
    smtp.handler.data_delay_s = 0.0
    assert (await run(pg, settings, NOW + lease / 2)).handled == 0
    assert (await run(pg, settings, NOW + lease)).sent == 1
    msg = await one_message(smtp)
    sent = await row(pg, nid)
    assert sent["sent_at"] == NOW + lease
    assert sent["message_id"] == claimed["message_id"] == msg["Message-ID"]


async def test_two_senders_send_each_notice_once(pg: asyncpg.Connection, other_pg: asyncpg.Connection,
                                                 smtp: SmtpServer) -> None:
    accounts = [await account(pg, f"10000001{n:02d}", email=f"c{n}@example.org") for n in range(6)]
    ids = [await notice(pg, a, "low_credit", {"available_micro": i, "threshold_micro": 100})
           for i, a in enumerate(accounts * 4)]
    smtp.handler.data_delay_s = 0.01  # each send takes a while: the two runs overlap
    settings = smtp.settings()

    one, two = await asyncio.gather(run(pg, settings), run(other_pg, settings))

    assert one.sent + two.sent == len(ids)
    assert one.handled + two.handled == len(ids)
    assert one.sent > 0 and two.sent > 0  # both took part
    got: list[Received] = smtp.handler.drain()
    assert len(got) == len(ids)
    rows = await pg.fetch("SELECT message_id, sent_at FROM notices ORDER BY id")
    assert all(r["sent_at"] is not None for r in rows)
    received_ids = Counter(m.parsed()["Message-ID"] for m in got)
    assert received_ids == Counter(r["message_id"] for r in rows)
    assert set(received_ids.values()) == {1}
