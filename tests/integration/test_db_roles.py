"""The database itself keeps the books from the application: a2bd_app (sql/0004_roles.sql) may add ledger lines,
invoices, tax rows and documents, but never rewrite or remove one, nor set a balance; and everything a2bd
does still works when it connects as that role.

The tests log in as real LOGIN roles (trust on loopback, as the test server is set up) that are members of
a2bd_app or a2bd_owner, created here and dropped at the end; the books are read back as the superuser.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from a2bd.adapters import postgres
from a2bd.adapters.postgres import CallLine
from a2bd.adapters.redis_store import RedisStore
from a2bd.domain.rating import SellRate
from a2bd.errors import InputError
from tests.integration.cli.test_cli import a2bd, setup_tariff

pytestmark = pytest.mark.integration

APP_LOGIN = f"a2bd_app_test_{os.getpid()}"
ADMIN_LOGIN = f"a2bd_admin_test_{os.getpid()}"
# The privilege system's own refusals; the schema's triggers say something else ("append-only", "only through
# a ledger line", "never changes"), so a refusal matching this comes from the role, not from a trigger.
PRIVILEGE = r"^(permission denied|must be owner)"


def _as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


@pytest.fixture(scope="module")
def logins(pg_url: str) -> Iterator[dict[str, str]]:
    """A login in a2bd_app (the daemon's) and one in a2bd_owner (an operator who migrates); dropped after."""

    async def run(*statements: str) -> None:
        admin = await asyncpg.connect(pg_url)
        try:
            for statement in statements:
                await admin.execute(statement)
        finally:
            await admin.close()

    drop = [f"DROP ROLE IF EXISTS {APP_LOGIN}", f"DROP ROLE IF EXISTS {ADMIN_LOGIN}"]
    asyncio.run(run(*drop, f"CREATE ROLE {APP_LOGIN} LOGIN IN ROLE a2bd_app",
                    f"CREATE ROLE {ADMIN_LOGIN} LOGIN IN ROLE a2bd_owner"))
    try:
        yield {"app": _as_user(pg_url, APP_LOGIN), "admin": _as_user(pg_url, ADMIN_LOGIN)}
    finally:
        asyncio.run(run(*drop))


@pytest.fixture
async def app(logins: dict[str, str]) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(logins["app"])
    try:
        assert await conn.fetchval("SELECT current_user") == APP_LOGIN
        yield conn
    finally:
        await conn.close()


def call(call_id: str, account: str, *, seconds: int = 60) -> CallLine:
    ended = datetime.now(UTC)
    return CallLine(call_id=call_id, account=account, amount_micro=-120_000, seconds=seconds,
                    destination="33612345678", description="France mobile",
                    answered_at=ended - timedelta(seconds=seconds), ended_at=ended,
                    provider="carrier-a", provider_amount_micro=50_000, sell=SellRate(120_000))


async def books(pg: asyncpg.Connection) -> dict[str, list[tuple[object, ...]]]:
    """Everything the application must not be able to change, read as the superuser."""
    queries = {
        "ledger": "SELECT * FROM ledger ORDER BY id",
        "invoices": "SELECT * FROM invoices ORDER BY id",
        "invoice_taxes": "SELECT * FROM invoice_taxes ORDER BY invoice_id, tax_class, rate_ppm",
        "invoice_documents": "SELECT invoice_id, sha256, md5(pdf) FROM invoice_documents ORDER BY invoice_id",
        "balances": "SELECT 'a', id, balance_micro FROM accounts UNION ALL SELECT 'p', id, balance_micro"
                    " FROM providers ORDER BY 1, 2",
    }
    return {name: [tuple(r) for r in await pg.fetch(sql)] for name, sql in queries.items()}


async def test_the_daemon_and_the_cli_work_as_the_app_role(
    pg: asyncpg.Connection, store: RedisStore, redis_url: str, app: asyncpg.Connection, logins: dict[str, str],
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    monkeypatch.setenv("A2BD_PG_URL", logins["app"])
    monkeypatch.setenv("A2BD_REDIS_URL", redis_url)
    # the admin CLI: carriers, a tariff, accounts and their settings
    await setup_tariff(capsys)
    assert await a2bd("account", "add", "--tariff", "retail", "--balance", "20", "--vat", "20",
                      "--callerid", "33123456789", "--name", "Ada") == 0
    number = capsys.readouterr().out.strip()
    assert await a2bd("account", "set", number, "--max-calls", "2", "--low-credit", "19") == 0
    # posting: a payment, through a2bd's own code
    assert await a2bd("account", "pay", number, "5.00", "--note", "bank transfer") == 0
    assert await a2bd("package", "add", number, "--name", "France 1", "--minutes", "1", "--prefix", "33") == 0
    assert await a2bd("service", "add", number, "--kind", "did", "--name", "DID 33184000000",
                      "--did", "33184000000", "--amount", "1.00") == 0
    # the daemon's ledger writer: a batch of calls (the first one covered by the package), idempotent
    written = await postgres.write_calls(app, [call("ast1/1.1", number), call("ast1/1.2", number)])
    assert [w.fresh for w in written] == [True, True]
    assert [w.fresh for w in await postgres.write_calls(app, [call("ast1/1.2", number)])] == [False]
    assert await pg.fetchval("SELECT used_s FROM packages") == 60
    # the scheduler, invoices, their PDF; Redis reloaded from PostgreSQL
    assert await a2bd("billing", "run", "--json") == 0
    assert await a2bd("invoice", "close", "--account", number) == 0
    assert await a2bd("invoice", "pdf", "INV-000001", "-o", str(tmp_path / "inv.pdf")) == 0
    assert await a2bd("issuer", "set", "--mode", "draft") == 0
    assert await a2bd("account", "pay", number, "-1.00", "--kind", "charge") == 0
    assert await a2bd("invoice", "close", "--account", number) == 0
    draft = await pg.fetchval("SELECT id FROM invoices WHERE status = 'draft'")
    assert await a2bd("invoice", "discard", str(draft)) == 0
    assert await a2bd("invoice", "close", "--account", number) == 0
    draft = await pg.fetchval("SELECT id FROM invoices WHERE status = 'draft'")
    assert await a2bd("invoice", "confirm", str(draft)) == 0
    assert await a2bd("sync") == 0
    capsys.readouterr()

    # what the superuser reads back: every move is a line, and the lines add up to the balance
    account = await pg.fetchrow("SELECT id, balance_micro, max_calls FROM accounts WHERE number = $1", number)
    kinds = [r["kind"] for r in await pg.fetch("SELECT kind FROM ledger WHERE account_id = $1 ORDER BY id",
                                               account["id"])]
    assert kinds[:3] == ["initial", "payment", "did"] and kinds.count("call") == 2 and "tax" in kinds
    assert account["balance_micro"] == await pg.fetchval(
        "SELECT sum(amount_micro) FROM ledger WHERE account_id = $1", account["id"])
    assert account["max_calls"] == 2
    assert await pg.fetchval("SELECT count(*) FROM invoices WHERE status = 'confirmed'") == 2
    assert await pg.fetchval("SELECT count(*) FROM invoices WHERE status = 'discarded'") == 1
    assert await pg.fetchval("SELECT count(*) FROM invoice_documents") == 2
    assert (tmp_path / "inv.pdf").read_bytes().startswith(b"%PDF")
    assert (await store.credit(number)).balance_micro == account["balance_micro"]
    provider_balance = await pg.fetchval("SELECT balance_micro FROM providers WHERE name = 'carrier-a'")
    assert provider_balance == 100_000


@pytest.fixture
async def closed_books(pg: asyncpg.Connection, store: RedisStore, pg_url: str, redis_url: str, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """An account with lines, a call on a carrier, and a closed invoice with its tax rows and PDF."""
    monkeypatch.setenv("A2BD_PG_URL", pg_url)
    monkeypatch.setenv("A2BD_REDIS_URL", redis_url)
    await setup_tariff(capsys)
    assert await a2bd("account", "add", "--tariff", "retail", "--balance", "20", "--vat", "20") == 0
    number = capsys.readouterr().out.strip()
    await postgres.write_calls(pg, [call("ast1/9.1", number)])
    assert await a2bd("invoice", "close", "--account", number) == 0
    assert await a2bd("invoice", "pdf", "INV-000001", "-o", str(tmp_path / "inv.pdf")) == 0  # stored once made
    assert await pg.fetchval("SELECT count(*) FROM invoice_taxes") == 1
    assert await pg.fetchval("SELECT count(*) FROM invoice_documents") == 1
    return number


@pytest.mark.parametrize("statement", [
    "UPDATE ledger SET amount_micro = amount_micro + 1000000",
    "UPDATE ledger SET description = 'nothing happened'",
    "DELETE FROM ledger",
    "TRUNCATE ledger",
    "UPDATE invoices SET closing_micro = 0, opening_micro = 0, lines_micro = 0",
    "DELETE FROM invoices",
    "TRUNCATE invoices CASCADE",
    "UPDATE invoice_taxes SET tax_micro = 0",
    "DELETE FROM invoice_taxes",
    "TRUNCATE invoice_taxes",
    "UPDATE invoice_documents SET pdf = ''",
    "DELETE FROM invoice_documents",
    "TRUNCATE invoice_documents",
    "UPDATE accounts SET balance_micro = balance_micro + 1000000",
    "UPDATE providers SET balance_micro = 0",
    # the flag the ledger trigger raises is a plain setting anyone may set: it opens nothing to this role
    "SET a2bd.posting = 'on'; UPDATE accounts SET balance_micro = balance_micro + 1000000",
    "INSERT INTO accounts (number, tariff_id, balance_micro) SELECT '2000000002', id, 1000000 FROM tariffs LIMIT 1",
    "ALTER TABLE ledger DISABLE TRIGGER ledger_no_update",
    "SET session_replication_role = replica",
    "SET ROLE a2bd_owner",
])
async def test_the_app_role_cannot_rewrite_the_books(pg: asyncpg.Connection, app: asyncpg.Connection,
                                                     closed_books: str, statement: str) -> None:
    before = await books(pg)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match=PRIVILEGE):
        await app.execute(statement)
    assert await books(pg) == before
    assert before["ledger"] and before["invoices"] and before["invoice_taxes"] and before["invoice_documents"]


async def test_a_closed_invoice_stays_closed_for_the_columns_the_app_may_update(
    pg: asyncpg.Connection, app: asyncpg.Connection, closed_books: str,
) -> None:
    before = await books(pg)
    # a draft becomes confirmed or discarded through these columns; an issued invoice refuses them all
    for change in ("status = 'discarded', discarded_at = now()", "number = 'INV-999999'", "seq = seq + 1"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="never changes"):
            await app.execute(f"UPDATE invoices SET {change}")  # noqa: S608 - fixed strings
    assert await books(pg) == before


async def test_the_app_role_cannot_migrate(pg: asyncpg.Connection, app: asyncpg.Connection,
                                           tmp_path: Path) -> None:
    for mig in postgres.migrations():
        (tmp_path / mig.path.name).write_bytes(mig.path.read_bytes())
    (tmp_path / "9999_test_more.sql").write_text("CREATE TABLE test_more (id int);\n")
    with pytest.raises(InputError, match="not a member of it"):
        await postgres.migrate(app, tmp_path)
    assert await pg.fetchval("SELECT to_regclass('test_more')") is None


async def test_a_member_of_the_owner_migrates_as_the_owner(pg: asyncpg.Connection, app: asyncpg.Connection,
                                                          logins: dict[str, str], tmp_path: Path) -> None:
    for mig in postgres.migrations():
        (tmp_path / mig.path.name).write_bytes(mig.path.read_bytes())
    (tmp_path / "9999_test_more.sql").write_text("CREATE TABLE test_more (id serial PRIMARY KEY, note text);\n")
    admin = await asyncpg.connect(logins["admin"])
    try:
        assert await postgres.migrate(admin, tmp_path) == ["9999_test_more"]
        # a new table is the owner's, readable by the application and nothing more until a migration says so
        assert await pg.fetchval("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'test_more'") \
            == "a2bd_owner"
        assert await app.fetch("SELECT * FROM test_more") == []
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=PRIVILEGE):
            await app.execute("INSERT INTO test_more (note) VALUES ('x')")
    finally:
        await admin.close()
        await pg.execute("DROP TABLE IF EXISTS test_more")
        await pg.execute("DELETE FROM schema_migrations WHERE version = '9999_test_more'")
