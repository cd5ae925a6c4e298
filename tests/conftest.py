"""Shared fixtures: the real PostgreSQL and Redis of the machine.

A fresh database per test session (created, migrated, dropped), every table emptied before each test;
Redis db 15 (A2BD_TEST_REDIS_URL to change it), flushed before each test. Without servers, integration
tests skip with the reason; under CI=true they fail instead.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from a2bd.adapters import postgres
from a2bd.adapters.redis_store import RedisStore
from a2bd.devservers import Servers, find_servers

CI = os.environ.get("CI", "").lower() == "true"
TABLES = ("ledger", "account_callerids", "accounts", "rates", "tariffs", "providers", "resellers", "notices",
          "invoice_documents", "invoice_taxes", "invoices", "services", "packages", "invoice_prefixes", "issuers")
# What the migrations seed and the tables above lose: the admin issuer and its prefix.
SEED = ("INSERT INTO issuers (reseller_id, name, invoice_prefix) VALUES (NULL, 'a2bd', 'INV-');"
        " INSERT INTO invoice_prefixes (prefix, issuer_id) SELECT 'INV-', id FROM issuers")


def _missing(reason: str) -> None:
    if CI:
        pytest.fail(f"CI requires the real servers: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def servers() -> Servers:
    os.environ.setdefault("A2BD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        return find_servers(pg_env="A2BD_TEST_PG_URL", redis_env="A2BD_TEST_REDIS_URL")
    except Exception as exc:  # any reason the servers cannot be had is reported the same way
        _missing(str(exc))
        raise


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def pg_url(servers: Servers) -> Iterator[str]:
    import asyncio

    name = f"a2bd_test_{os.getpid()}"

    async def create() -> None:
        admin = await asyncpg.connect(servers.pg_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(_with_database(servers.pg_url, name))
        try:
            await postgres.migrate(conn)
        finally:
            await conn.close()

    async def drop() -> None:
        admin = await asyncpg.connect(servers.pg_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(create())
    yield _with_database(servers.pg_url, name)
    asyncio.run(drop())


async def empty_database(conn: asyncpg.Connection) -> None:
    """Every table as the migrations left it."""
    # Emptying the append-only ledger needs its triggers off: replica mode, for the test's cleanup only.
    await conn.execute("SET session_replication_role = replica")
    await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    await conn.execute(SEED)
    await conn.execute("SET session_replication_role = DEFAULT")


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_url)
    await empty_database(conn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def redis_url(servers: Servers) -> str:
    return servers.redis_url


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_url, timeout_s=2.0)
    await store.client.flushdb()
    try:
        yield store
    finally:
        await store.client.flushdb()
        await store.close()
