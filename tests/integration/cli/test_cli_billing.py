"""Billing staff at the command line: previews, closes, drafts, issuers, services, packages, PDFs, a pass of
the scheduler; against the real PostgreSQL, Redis and an SMTP server on loopback."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import asyncpg
import pytest
from pypdf import PdfReader

from a2bd.adapters.redis_store import RedisStore
from tests.integration.cli.test_cli import a2bd, setup_tariff
from tests.smtp import SmtpServer, smtp_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration


async def new_account(capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert await a2bd("account", "add", "--tariff", "retail", "--balance", "20", "--vat", "20", "--name", "Ada",
                      "--last-name", "Lovelace", *extra) == 0
    return capsys.readouterr().out.strip()


async def test_preview_close_and_pdf(pg: asyncpg.Connection, store: RedisStore, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    await setup_tariff(capsys)
    number = await new_account(capsys)
    assert await a2bd("account", "pay", number, "-2.50", "--kind", "charge", "--note", "report fee") == 0
    capsys.readouterr()

    assert await a2bd("invoice", "preview", number, "--json") == 0
    preview = json.loads(capsys.readouterr().out)
    assert preview["status"] == "preview" and preview["carried_forward"] == "20.00"  # the opening balance
    assert preview["tax"] == "0.50" and preview["closing_balance"] == "17.00"  # 20 - 2.50 - 0.50 estimated

    assert await a2bd("invoice", "close", "--account", number) == 0
    out = capsys.readouterr().out
    assert "1 invoice(s) issued" in out and "INV-000001" in out
    assert await pg.fetchval("SELECT balance_micro FROM accounts WHERE number = $1", number) == 17_000_000
    assert (await store.credit(number)).balance_micro == 17_000_000  # the tax line reached Redis

    assert await a2bd("invoice", "pdf", "INV-000001", "-o", str(tmp_path / "inv.pdf")) == 0
    text = "".join(page.extract_text() for page in PdfReader(tmp_path / "inv.pdf").pages)
    assert "INV-000001" in text and "17.00" in text

    assert await a2bd("invoice", "preview", number) == 0
    assert "Balance carried forward" in capsys.readouterr().out


async def test_draft_issuer_confirm_and_discard(pg: asyncpg.Connection, store: RedisStore,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    await setup_tariff(capsys)
    assert await a2bd("issuer", "set", "--prefix", "F2026-", "--mode", "draft", "--name", "Example Telecom") == 0
    assert "next number F2026-000001" in capsys.readouterr().out
    number = await new_account(capsys)
    assert await a2bd("invoice", "close", "--filter", "tariff=retail", "--json") == 0
    assert json.loads(capsys.readouterr().out)["drafts"] == 1
    draft = await pg.fetchval("SELECT id FROM invoices WHERE status = 'draft'")
    assert await a2bd("invoice", "discard", str(draft)) == 0
    assert await a2bd("invoice", "close", "--account", number) == 0
    second = await pg.fetchval("SELECT id FROM invoices WHERE status = 'draft'")
    capsys.readouterr()
    assert await a2bd("invoice", "confirm", str(second)) == 0
    assert capsys.readouterr().out.strip() == "F2026-000001"
    assert await pg.fetchval("SELECT count(*) FROM invoice_documents WHERE invoice_id = $1", second) == 1

    assert await a2bd("issuer", "set", "--reseller", "nobody", "--prefix", "X-") == 1
    assert "reseller nobody does not exist" in capsys.readouterr().err
    assert await a2bd("invoice", "close", "--filter", "colour=blue") == 1
    assert "--filter" in capsys.readouterr().err


async def test_services_packages_and_a_scheduler_pass_that_mails_the_invoice(
    pg: asyncpg.Connection, store: RedisStore, smtp: SmtpServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("A2BD_MAIL_HOST", "127.0.0.1")
    monkeypatch.setenv("A2BD_MAIL_PORT", str(smtp.port))
    await setup_tariff(capsys)
    number = await new_account(capsys, "--email", "ada@example.net")
    assert await a2bd("service", "add", number, "--kind", "did", "--name", "DID 3361234567", "--amount", "5",
                      "--did", "3361234567") == 0
    assert "service 1" in capsys.readouterr().out
    assert await pg.fetchval("SELECT amount_micro FROM ledger WHERE kind = 'did'") == -5_000_000
    assert await a2bd("service", "list", number, "--json") == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["amount"], listed["status"]) == ("5.00", "active")
    assert await a2bd("package", "add", number, "--name", "France 100", "--minutes", "100", "--prefix", "33") == 0
    assert await pg.fetchval("SELECT free_s FROM packages") == 6000
    capsys.readouterr()

    # Make the account's invoice day come, then one pass: close, render, mail.
    await pg.execute("UPDATE accounts SET next_close_at = now()")
    assert await a2bd("billing", "run", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["invoices"]["issued"], report["documents"], report["mail"]["sent"]) == (1, 1, 1), report
    [mail] = smtp.handler.drain()
    message = mail.parsed()
    assert message["To"] == "ada@example.net" and "INV-000001" in message["Subject"]
    [attachment] = list(message.iter_attachments())
    assert attachment.get_content() == await pg.fetchval("SELECT pdf FROM invoice_documents")

    assert await a2bd("service", "cancel", "1") == 0
    assert await pg.fetchval("SELECT status FROM services") == "cancelled"
    assert await a2bd("service", "resume", "1") == 1  # only a suspended service resumes


async def test_account_set_moves_the_invoice_day_and_the_invoice_switch(pg: asyncpg.Connection, store: RedisStore,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    await setup_tariff(capsys)
    number = await new_account(capsys)
    await pg.execute("UPDATE accounts SET next_close_at = '2030-01-01T00:00Z'")
    assert await a2bd("account", "set", number, "--tax-mode", "payment") == 1  # its open period is taxed as is
    assert "close its preview first" in capsys.readouterr().err
    assert await a2bd("invoice", "close", "--account", number) == 0
    assert await a2bd("account", "set", number, "--invoice-day", "15", "--timezone", "Pacific/Auckland",
                      "--invoices", "off", "--tax-mode", "payment", "--email", "ada@example.net") == 0
    row = await pg.fetchrow("SELECT * FROM accounts WHERE number = $1", number)
    assert (row["invoice_day"], row["timezone"], row["invoices_enabled"], row["tax_mode"]) == (
        15, "Pacific/Auckland", False, "payment")
    assert row["next_close_at"] is None  # recomputed by the scheduler from the open period's start
    assert await a2bd("account", "set", number, "--invoice-day", "31") == 1
    assert "invoice_day" in capsys.readouterr().err
    assert await a2bd("account", "set", "99999999", "--invoices", "on") == 1
    assert "does not exist" in capsys.readouterr().err
    assert await pg.fetchval("SELECT balance_micro FROM accounts WHERE number = $1", number) == 20_000_000  # no tax


async def test_charge_report_and_invoice_search_as_csv_and_json(pg: asyncpg.Connection, store: RedisStore,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    await setup_tariff(capsys)
    number = await new_account(capsys)
    assert await a2bd("account", "pay", number, "-1.234567", "--kind", "charge") == 0
    assert await a2bd("invoice", "close", "--account", number) == 0
    capsys.readouterr()

    assert await a2bd("report", "charges", "--account", number, "--kind", "charge") == 0
    [row] = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert (row["amount"], row["invoice_number"], row["last_name"]) == ("-1.234567", "INV-000001", "Lovelace")

    assert await a2bd("invoice", "search", "--last-name", "love", "--format", "json") == 0
    [found] = json.loads(capsys.readouterr().out)
    assert found["number"] == "INV-000001" and found["tax"] == "0.25"  # 20 % of 1.234567, to the cent

    assert await a2bd("invoice", "search", "--number", "INV-*", "--since", "2020-01-01") == 0
    assert "INV-000001" in capsys.readouterr().out
    assert await a2bd("report", "charges", "--since", "2030-01-01", "--until", "2020-01-01") == 1
    assert "since" in capsys.readouterr().err
    assert await a2bd("report", "charges", "--since", "yesterday") == 1
    assert "ISO date" in capsys.readouterr().err
