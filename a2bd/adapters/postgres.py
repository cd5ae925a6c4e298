"""PostgreSQL: connections, migrations, and the repositories of tariffs, providers and accounts.

The schema lives in sql/ as ordered plain-SQL files; `migrate` applies the missing ones, each in its own
transaction, under an advisory lock so two daemons starting together do not race.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from a2bd.domain.invoice import format_rate, tax_in_gross
from a2bd.domain.rating import SellRate, cost_with_free_micro
from a2bd.domain.tariff import BuyRate, RateEntry
from a2bd.errors import InputError, StoreUnavailable

_MIGRATION_LOCK = 0x61326264  # "a2bd": one migrator at a time


def sql_dir() -> Path:
    """sql/ of a checkout, or the copy a wheel carries inside the package."""
    packaged = Path(__file__).resolve().parent.parent / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent.parent / "sql"


async def connect(url: str, timeout_s: float = 5.0) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=timeout_s)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise StoreUnavailable(f"PostgreSQL at {_where(url)} is unreachable: {exc}") from exc


async def create_pool(url: str, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    try:
        return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, timeout=5.0)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise StoreUnavailable(f"PostgreSQL at {_where(url)} is unreachable: {exc}") from exc


def _where(url: str) -> str:
    return url.rsplit("@", 1)[-1]


# -- migrations ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    path: Path

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def migrations(directory: Path | None = None) -> list[Migration]:
    folder = directory or sql_dir()
    return [Migration(p.stem, p) for p in sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.sql"))]


# Once sql/0004_roles.sql has made a2bd_owner the owner of a2bd's tables (schema_migrations among them), every
# migration runs as it, so that what later migrations create is the owner's too (whoever of its members
# applies them).
_OWNED_SCHEMA = ("SELECT pg_get_userbyid(relowner) = 'a2bd_owner' FROM pg_class"
                 " WHERE oid = 'schema_migrations'::regclass")


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Apply the migrations not yet recorded; return the versions applied now (idempotent)."""
    # Created only when missing: a member of a2bd_owner may have no CREATE privilege of its own on the schema.
    if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NULL"):
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        done = {r["version"]: r["checksum"] for r in await conn.fetch("SELECT * FROM schema_migrations")}
        for mig in migrations(directory):
            if mig.version in done:
                if done[mig.version] != mig.checksum:
                    raise InputError(
                        f"migration {mig.version} was changed after it was applied; "
                        "add a new migration instead of editing an old one"
                    )
                continue
            async with conn.transaction():
                if await conn.fetchval(_OWNED_SCHEMA):
                    await _become_owner(conn)
                await conn.execute(mig.path.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    mig.version, mig.checksum,
                )
            applied.append(mig.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


async def _become_owner(conn: asyncpg.Connection) -> None:
    user = await conn.fetchval("SELECT current_user")
    try:
        await conn.execute("SET LOCAL ROLE a2bd_owner")
    except asyncpg.InsufficientPrivilegeError:
        raise InputError(f"migrations run as the schema's owner a2bd_owner, and role {user} is not a member of it:"
                         " connect as a member (see sql/0004_roles.sql), not as the daemon's a2bd_app") from None


# -- tariffs ------------------------------------------------------------------------------------------

_RATE_COLUMNS = (
    "tariff_id", "prefix", "destination", "rate_per_min_micro", "connect_micro", "disconnect_micro",
    "initial_block_s", "increment_s", "grace_s", "min_cost_micro", "provider_id",
    "buy_rate_per_min_micro", "buy_initial_block_s", "buy_increment_s", "week_start_min", "week_end_min",
    "start_date", "stop_date",
)


async def replace_tariff(
    conn: asyncpg.Connection, name: str, entries: Sequence[RateEntry], currency: str = "EUR"
) -> int:
    """Make `entries` the whole rate card of tariff `name` (created if new), in one transaction.

    Every provider named by an entry must exist; otherwise nothing is written.
    """
    async with conn.transaction():
        providers = {r["name"]: r["id"] for r in await conn.fetch("SELECT id, name FROM providers")}
        unknown = sorted({e.provider for e in entries if e.provider and e.provider not in providers})
        if unknown:
            raise InputError(
                f"unknown provider(s) {', '.join(unknown)}: add them first with `a2bd provider add`"
            )
        tariff_id = await conn.fetchval(
            "INSERT INTO tariffs (name, currency) VALUES ($1, $2)"
            " ON CONFLICT (name) DO UPDATE SET updated_at = now() RETURNING id",
            name, currency,
        )
        await conn.execute("DELETE FROM rates WHERE tariff_id = $1", tariff_id)
        records = [
            (
                tariff_id, e.prefix, e.destination, e.sell.rate_per_min_micro, e.sell.connect_micro,
                e.sell.disconnect_micro, e.sell.initial_block_s, e.sell.increment_s, e.sell.grace_s,
                e.sell.min_cost_micro, providers[e.provider] if e.provider else None,
                e.buy.rate_per_min_micro, e.buy.initial_block_s, e.buy.increment_s,
                e.week_start_min, e.week_end_min, e.start_date, e.stop_date,
            )
            for e in entries
        ]
        await conn.copy_records_to_table("rates", records=records, columns=_RATE_COLUMNS)
        # COPY fires the statement trigger that bumps the version; an empty card still counts as a change.
        if not records:
            await conn.execute("UPDATE tariffs SET version = version + 1 WHERE id = $1", tariff_id)
            await conn.execute("SELECT pg_notify('a2bd_tariffs', '')")
    return len(records)


async def tariff_versions(conn: asyncpg.Connection) -> dict[str, int]:
    return {r["name"]: r["version"] for r in await conn.fetch("SELECT name, version FROM tariffs")}


async def load_tariff_entries(conn: asyncpg.Connection, name: str) -> list[RateEntry]:
    """Every rate of one tariff as domain objects, in import order (Tariff.build groups by prefix).

    Ordered by id, not prefix: sorting a million text keys spilled to disk. Rows come 50,000 at a time
    through a cursor; identical sell/buy rates, destinations and provider names share one object.
    """
    sells: dict[tuple[int, ...], SellRate] = {}
    buys: dict[tuple[int, ...], BuyRate] = {}
    names: dict[str, str] = {}
    entries: list[RateEntry] = []
    async with conn.transaction():
        cursor = await conn.cursor(
            "SELECT r.prefix, r.destination, r.rate_per_min_micro, r.connect_micro, r.disconnect_micro,"
            " r.initial_block_s, r.increment_s, r.grace_s, r.min_cost_micro, p.name AS provider,"
            " r.buy_rate_per_min_micro, r.buy_initial_block_s, r.buy_increment_s,"
            " r.week_start_min, r.week_end_min, r.start_date, r.stop_date"
            " FROM rates r JOIN tariffs t ON t.id = r.tariff_id LEFT JOIN providers p ON p.id = r.provider_id"
            " WHERE t.name = $1 ORDER BY r.id",
            name,
        )
        while rows := await cursor.fetch(50_000):
            for r in rows:
                skey = (r[2], r[3], r[4], r[5], r[6], r[7], r[8])
                sell = sells.get(skey)
                if sell is None:
                    sell = sells[skey] = SellRate(*skey)
                bkey = (r[10], r[11], r[12])
                buy = buys.get(bkey)
                if buy is None:
                    buy = buys[bkey] = BuyRate(*bkey)
                provider = r[9] if r[9] is None else names.setdefault(r[9], r[9])
                entries.append(RateEntry(r[0], names.setdefault(r[1], r[1]), sell, provider, buy,
                                         r[13], r[14], r[15], r[16]))
    return entries


# -- providers ----------------------------------------------------------------------------------------


async def add_provider(
    conn: asyncpg.Connection, name: str, dial_template: str, *, balance_limit_micro: int = 0,
    daily_limit_s: int = 0, currency: str = "EUR",
) -> int:
    if "{number}" not in dial_template:
        raise InputError(f"dial template {dial_template!r} must contain {{number}}, e.g. PJSIP/{{number}}@carrier")
    try:
        provider_id: int = await conn.fetchval(
            "INSERT INTO providers (name, dial_template, balance_limit_micro, daily_limit_s, currency)"
            " VALUES ($1, $2, $3, $4, $5) RETURNING id",
            name, dial_template, balance_limit_micro, daily_limit_s, currency,
        )
    except asyncpg.UniqueViolationError:
        raise InputError(f"provider {name!r} already exists") from None
    except asyncpg.CheckViolationError as exc:
        raise InputError(f"provider {name!r} refused: {exc.message}") from None
    return provider_id


async def list_providers(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await conn.fetch("SELECT * FROM providers ORDER BY name"))


# -- accounts -----------------------------------------------------------------------------------------

ACCOUNT_FIELDS = (
    "number", "status", "tariff_id", "credit_limit_micro", "daily_limit_s", "currency", "timezone", "invoice_day",
    "vat_rate_ppm", "max_calls", "expires_at", "restrict_mode", "restrict_prefixes", "pin",
    "low_credit_threshold_micro", "name", "company", "address", "email", "language", "vat_number",
    "last_name", "tax_mode", "invoices_enabled", "autorefill", "expiry_mode", "expiry_days", "reseller_id",
)


async def create_account(
    conn: asyncpg.Connection, *, tariff: str, initial_balance_micro: int, callerids: Iterable[str] = (),
    **fields: Any,
) -> asyncpg.Record:
    """Insert an account and its opening ledger line (the initial balance is a line like any other)."""
    unknown = set(fields) - set(ACCOUNT_FIELDS)
    if unknown:
        raise InputError(f"unknown account field(s): {', '.join(sorted(unknown))}")
    async with conn.transaction():
        tariff_id = await conn.fetchval("SELECT id FROM tariffs WHERE name = $1", tariff)
        if tariff_id is None:
            raise InputError(f"tariff {tariff!r} does not exist: import it with `a2bd tariff import`")
        # The initial balance is also what autorefill tops the account up to (A2Billing's "initial balance").
        values = {"initial_balance_micro": max(initial_balance_micro, 0), **fields, "tariff_id": tariff_id}
        names = list(values)
        try:
            account_id = await conn.fetchval(
                f"INSERT INTO accounts ({', '.join(names)}) VALUES"  # noqa: S608 - names are ACCOUNT_FIELDS
                f" ({', '.join(f'${i + 1}' for i in range(len(names)))}) RETURNING id",
                *values.values(),
            )
            for callerid in callerids:
                await conn.execute(
                    "INSERT INTO account_callerids (callerid, account_id) VALUES ($1, $2)", callerid, account_id
                )
        except asyncpg.UniqueViolationError as exc:
            raise InputError(f"account refused: {exc.detail or exc.message}") from None
        except asyncpg.CheckViolationError as exc:
            raise InputError(f"account refused: {exc.constraint_name} ({exc.detail or exc.message})") from None
        if initial_balance_micro:
            await post(conn, account_id=account_id, kind="initial", amount_micro=initial_balance_micro,
                       description="initial balance")
        record = await fetch_account(conn, fields.get("number") or "", account_id=account_id)
        assert record is not None
        return record


_ACCOUNT_SELECT = (
    "SELECT a.*, t.name AS tariff,"
    " coalesce(array(SELECT callerid FROM account_callerids c WHERE c.account_id = a.id ORDER BY callerid),"
    " '{}') AS callerids FROM accounts a JOIN tariffs t ON t.id = a.tariff_id"
)


async def fetch_account(
    conn: asyncpg.Connection, number: str, *, account_id: int | None = None
) -> asyncpg.Record | None:
    if account_id is not None:
        row: asyncpg.Record | None = await conn.fetchrow(_ACCOUNT_SELECT + " WHERE a.id = $1", account_id)
    else:
        row = await conn.fetchrow(_ACCOUNT_SELECT + " WHERE a.number = $1", number)
    return row


SETTABLE_FIELDS = tuple(f for f in ACCOUNT_FIELDS if f not in ("number", "tariff_id", "reseller_id"))


async def update_account(conn: asyncpg.Connection, number: str, changes: dict[str, Any]) -> asyncpg.Record:
    """Change an account's settings (never its balance: that is the ledger's). A new invoice day or time
    zone moves its next close (recomputed by the scheduler from the start of its open period)."""
    unknown = set(changes) - set(SETTABLE_FIELDS)
    if unknown:
        raise InputError(f"unknown or fixed account field(s): {', '.join(sorted(unknown))}")
    if not changes:
        raise InputError("nothing to change")
    if "tax_mode" in changes:
        open_lines = await conn.fetchval(
            "SELECT count(*) FROM accounts a JOIN ledger l ON l.account_id = a.id AND l.id > a.invoiced_through_id"
            " AND l.invoice_id IS NULL WHERE a.number = $1 AND a.tax_mode <> $2", number, changes["tax_mode"])
        if open_lines:
            raise InputError(f"account {number} has {open_lines} line(s) since its last invoice, taxed as its "
                             f"current mode: close its preview first (a2bd invoice close --account {number})")
    names = list(changes)
    reschedule = ", next_close_at = NULL" if {"invoice_day", "timezone"} & set(changes) else ""
    try:
        account_id = await conn.fetchval(
            f"UPDATE accounts SET {', '.join(f'{n} = ${i + 2}' for i, n in enumerate(names))}{reschedule}"  # noqa: S608
            " WHERE number = $1 RETURNING id", number, *changes.values())
    except asyncpg.CheckViolationError as exc:
        raise InputError(f"account refused: {exc.constraint_name} ({exc.detail or exc.message})") from None
    if account_id is None:
        raise InputError(f"account {number} does not exist")
    record = await fetch_account(conn, number, account_id=account_id)
    assert record is not None
    return record


async def all_accounts(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await conn.fetch(_ACCOUNT_SELECT + " ORDER BY a.id"))


# For loading Redis: each balance with the id of the newest line it includes and today's (UTC) billed
# seconds, read in one statement so all three come from the same snapshot.
_SYNC_ACCOUNTS = _ACCOUNT_SELECT.replace(
    " FROM accounts a",
    ", coalesce((SELECT max(l.id) FROM ledger l WHERE l.account_id = a.id), 0) AS last_line_id,"
    " coalesce((SELECT sum(l.seconds) FROM ledger l WHERE l.account_id = a.id AND l.kind = 'call'"
    " AND l.created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'), 0) AS today_s"
    " FROM accounts a",
)
_SYNC_PROVIDERS = (
    "SELECT p.*, coalesce((SELECT max(l.id) FROM ledger l WHERE l.provider_id = p.id), 0) AS last_line_id,"
    " coalesce((SELECT sum(l.seconds) FROM ledger l WHERE l.provider_id = p.id AND l.kind = 'call'"
    " AND l.created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'), 0) AS today_s"
    " FROM providers p ORDER BY p.name"
)


async def accounts_for_sync(conn: asyncpg.Connection, ids: Sequence[int] | None = None) -> list[asyncpg.Record]:
    """What `RedisStore.put_accounts` needs, from one snapshot: every account, or those of `ids`."""
    if ids is None:
        return list(await conn.fetch(_SYNC_ACCOUNTS + " ORDER BY a.id"))
    return list(await conn.fetch(_SYNC_ACCOUNTS + " WHERE a.id = ANY($1::bigint[]) ORDER BY a.id", list(ids)))


async def providers_for_sync(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await conn.fetch(_SYNC_PROVIDERS))


async def add_package(conn: asyncpg.Connection, number: str, name: str, free_s: int,
                      prefixes: Sequence[str] = ()) -> asyncpg.Record:
    """A free-minute package: `free_s` seconds per billing period to `prefixes` (none: any destination),
    used before the account's credit when its calls are rated, counted afresh at each invoice close."""
    if free_s <= 0:
        raise InputError("a package gives at least one free second")
    bad = [p for p in prefixes if not p.isdigit()]
    if bad:
        raise InputError(f"package prefixes are digits: {', '.join(bad)}")
    account_id = await conn.fetchval("SELECT id FROM accounts WHERE number = $1", number)
    if account_id is None:
        raise InputError(f"account {number} does not exist")
    row: asyncpg.Record = await conn.fetchrow(
        "INSERT INTO packages (account_id, name, free_s, prefixes) VALUES ($1, $2, $3, $4) RETURNING *",
        account_id, name, free_s, list(prefixes))
    return row


async def number_taken(conn: asyncpg.Connection, number: str) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM accounts WHERE number = $1)", number))


# -- the ledger ---------------------------------------------------------------------------------------
#
# Every line states the balance after it; the ledger_apply trigger (sql/0002) moves the balances once per
# statement and refuses lines that do not chain. So a writer locks the rows it moves (FOR UPDATE, in id
# order so two writers never deadlock), reads their balances, and states them forward.


async def post(
    conn: asyncpg.Connection, *, kind: str, amount_micro: int = 0, account_id: int | None = None,
    provider_id: int | None = None, provider_amount_micro: int = 0, call_id: str | None = None,
    description: str = "", at: datetime | None = None, tax_class: str | None = None,
) -> asyncpg.Record:
    """Append one ledger line and return it (with its balance_after). `amount_micro` moves the account's
    balance, `provider_amount_micro` the provider's (what we owe the carrier)."""
    async with conn.transaction():
        balance_after = provider_after = None
        if account_id is not None:
            balance = await conn.fetchval("SELECT balance_micro FROM accounts WHERE id = $1 FOR UPDATE", account_id)
            if balance is None:
                raise InputError(f"account id {account_id} does not exist")
            balance_after = balance + amount_micro
        if provider_id is not None:
            balance = await conn.fetchval("SELECT balance_micro FROM providers WHERE id = $1 FOR UPDATE", provider_id)
            if balance is None:
                raise InputError(f"provider id {provider_id} does not exist")
            provider_after = balance + provider_amount_micro
        row: asyncpg.Record = await conn.fetchrow(
            "INSERT INTO ledger (account_id, provider_id, kind, amount_micro, provider_amount_micro,"
            " balance_after_micro, provider_balance_after_micro, call_id, description, created_at, tax_class)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, coalesce($10, now()), $11) RETURNING *",
            account_id, provider_id, kind, amount_micro, provider_amount_micro, balance_after, provider_after,
            call_id, description, at, tax_class,
        )
        await note_low_credit(conn, [account_id] if account_id is not None else [])
    return row


@dataclass(frozen=True, slots=True)
class AccountLine:
    """One line of money without a call, for `post_lines` (several lines of one account, one transaction)."""

    kind: str
    amount_micro: int  # + credits the account, - debits it
    description: str = ""
    tax_class: str | None = None  # None: the class of its kind
    service_id: int | None = None
    invoice_id: int | None = None  # a tax line posted for this invoice
    tax_rate_ppm: int | None = None  # tax lines: the rate and the net base
    tax_base_micro: int | None = None
    call_id: str | None = None  # an idempotency key: (call_id, kind) is written once ever
    at: datetime | None = None


def credit_lines(kind: str, amount_micro: int, description: str, *, tax_mode: str, vat_rate_ppm: int,
                 **extra: Any) -> list[AccountLine]:
    """The lines of money received (a payment, a refill) or given back (a negative one). An account taxed
    at payment is credited only the net part: a tax line carries the tax contained in the gross amount,
    rounded once to the cent (domain/invoice.py), and a refund gives that tax back the same way."""
    lines = [AccountLine(kind, amount_micro, description, **extra)]
    if kind in ("payment", "refill") and amount_micro and tax_mode == "payment" and vat_rate_ppm:
        tax = tax_in_gross(amount_micro, vat_rate_ppm)
        if tax:
            what = f"VAT {format_rate(vat_rate_ppm)} included in the {kind}"
            lines.append(AccountLine("tax", -tax, what if tax > 0 else what + " refunded", tax_class="standard",
                                     tax_rate_ppm=vat_rate_ppm, tax_base_micro=amount_micro - tax))
    return lines


async def post_lines(conn: asyncpg.Connection, account_id: int, lines: Sequence[AccountLine]) -> list[asyncpg.Record]:
    """Append lines to one account in order, in the caller's transaction or one of their own, under the
    account's row lock (each states the balance after it). Returns the written lines."""
    async with conn.transaction():
        balance = await conn.fetchval("SELECT balance_micro FROM accounts WHERE id = $1 FOR UPDATE", account_id)
        if balance is None:
            raise InputError(f"account id {account_id} does not exist")
        afters = []
        for line in lines:
            balance += line.amount_micro
            afters.append(balance)
        rows = await conn.fetch(
            _POST_LINES, account_id, [x.kind for x in lines], [x.amount_micro for x in lines], afters,
            [x.description for x in lines], [x.tax_class for x in lines], [x.service_id for x in lines],
            [x.invoice_id for x in lines], [x.tax_rate_ppm for x in lines], [x.tax_base_micro for x in lines],
            [x.call_id for x in lines], [x.at for x in lines],
        )
        await note_low_credit(conn, [account_id])
    return list(rows)


_POST_LINES = """
INSERT INTO ledger (account_id, kind, amount_micro, balance_after_micro, description, tax_class, service_id,
                    invoice_id, tax_rate_ppm, tax_base_micro, call_id, created_at)
SELECT $1, kind, amount, after, description, tax_class, service_id, invoice_id, rate, base, call_id,
       coalesce(at, now())
FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::bigint[], $8::bigint[],
            $9::integer[], $10::bigint[], $11::text[], $12::timestamptz[])
    WITH ORDINALITY AS t(kind, amount, after, description, tax_class, service_id, invoice_id, rate, base, call_id,
                         at, ord)
ORDER BY ord
RETURNING *
"""


@dataclass(frozen=True, slots=True)
class CallLine:
    """A rated call as the ledger stores it (one line carries the customer's debit and the carrier's cost)."""

    call_id: str
    account: str  # account number
    amount_micro: int  # <= 0: the price of the call, debited
    seconds: int  # answered seconds as Asterisk bills them (BillableSeconds); the price applies the rate's rules
    destination: str
    description: str
    answered_at: datetime
    ended_at: datetime
    provider: str | None = None
    provider_amount_micro: int = 0  # >= 0: the buy cost, added to what we owe the carrier
    sell: SellRate | None = None  # the rate it was priced at (a free-minute package re-prices the call)
    free_s: int = 0  # seconds a package covered (set by write_calls)


@dataclass(frozen=True, slots=True)
class WrittenLine:
    """A call line as it stands in the ledger after a batch: `fresh` when this batch wrote it, False when it
    was there already (a replayed event, a restart): then nothing moved and nothing must move again."""

    call_id: str
    line_id: int
    account: str
    balance_after_micro: int
    provider: str | None
    provider_balance_after_micro: int | None
    seconds: int
    fresh: bool


_WRITE_CALLS = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::integer[],
                         $7::text[], $8::text[], $9::timestamptz[], $10::timestamptz[], $11::integer[])
        WITH ORDINALITY AS b(call_id, account, provider, amount, provider_amount, seconds, destination,
                             description, answered_at, created_at, free_s, ord)
), fresh AS (
    -- One probe of the unique (call_id, kind) index per line, whatever the statistics say: an anti-join
    -- planned from stale statistics scanned every call line of the ledger for each batch.
    SELECT b.* FROM batch b
    LEFT JOIN LATERAL (SELECT 1 AS hit FROM ledger l WHERE l.call_id = b.call_id AND l.kind = 'call' LIMIT 1) w
        ON true
    WHERE w.hit IS NULL
), acc AS (
    SELECT id, number, balance_micro FROM accounts
    WHERE number IN (SELECT account FROM fresh) ORDER BY id FOR UPDATE
), prov AS (
    SELECT id, name, balance_micro FROM providers
    WHERE name IN (SELECT provider FROM fresh) ORDER BY id FOR UPDATE
)
INSERT INTO ledger (account_id, provider_id, kind, amount_micro, provider_amount_micro, balance_after_micro,
                    provider_balance_after_micro, call_id, seconds, destination, description, answered_at,
                    created_at, free_s)
SELECT acc.id, prov.id, 'call', f.amount, CASE WHEN prov.id IS NULL THEN 0 ELSE f.provider_amount END,
       acc.balance_micro + sum(f.amount) OVER (PARTITION BY acc.id ORDER BY f.ord),
       prov.balance_micro + sum(f.provider_amount) OVER (PARTITION BY prov.id ORDER BY f.ord),
       f.call_id, f.seconds, f.destination, f.description, f.answered_at, f.created_at, nullif(f.free_s, 0)
FROM fresh f JOIN acc ON acc.number = f.account LEFT JOIN prov ON prov.name = f.provider
ORDER BY f.ord
RETURNING id, call_id, balance_after_micro, provider_balance_after_micro, account_id
"""

_PACKAGED = """
SELECT 1 FROM packages p JOIN accounts a ON a.id = p.account_id
WHERE a.number = ANY($1::text[]) AND p.active LIMIT 1
"""
# The batch's accounts, locked in id order as every writer and the invoice close lock them (then the
# packages): the statement that writes the lines locks the same rows again, already held.
_LOCK_ACCOUNTS = """
SELECT id, number, coalesce(period_start, created_at) AS period_start, next_close_at FROM accounts
WHERE number = ANY($1::text[]) ORDER BY id FOR UPDATE
"""
# Packages restricted to some destinations first: a call to France uses the France package before the
# one that covers anything.
_PACKAGES = """
SELECT id, account_id, free_s, used_s, period, prefixes FROM packages
WHERE account_id = ANY($1::bigint[]) AND active
ORDER BY cardinality(prefixes) = 0, id
FOR UPDATE
"""


def _package_left(package: dict[str, Any], period: datetime) -> int:
    """Seconds a package has left in `period`: all of them in a period it has not counted in yet, none for a
    call of an older period written after the package moved on (that period's count is gone)."""
    if package["period"] == period:
        return max(int(package["free_s"]) - int(package["used_s"]), 0)
    if package["period"] is None or package["period"] < period:
        return int(package["free_s"])
    return 0


async def _use_packages(conn: asyncpg.Connection, batch: list[CallLine]) -> list[CallLine]:
    """Free-minute packages are used first: re-price the batch's new calls of accounts that have a package,
    in batch order, and count the seconds in the batch's transaction (a replayed call is not new; a writer
    that loses a race rolls its counts back). A package counts per period of its account: a call belongs
    to the period its line will be invoiced in (the next one when it ended after the account's next close),
    and a package's count starts afresh in each period. Costs one unlocked indexed query per batch when no
    account of the batch has a package."""
    numbers = list({x.account for x in batch if x.sell is not None})
    if not numbers or await conn.fetchval(_PACKAGED, numbers) is None:
        return batch
    accounts = {r["number"]: r for r in await conn.fetch(_LOCK_ACCOUNTS, list({x.account for x in batch}))}
    packages: dict[int, list[dict[str, Any]]] = {}
    for row in await conn.fetch(_PACKAGES, [a["id"] for a in accounts.values()]):
        packages.setdefault(row["account_id"], []).append(dict(row))
    candidates = [x.call_id for x in batch if x.account in accounts and accounts[x.account]["id"] in packages]
    written = {r["call_id"] for r in await conn.fetch(
        "SELECT call_id FROM ledger WHERE kind = 'call' AND call_id = ANY($1::text[])", candidates)}
    touched: dict[int, dict[str, Any]] = {}
    priced: list[CallLine] = []
    for line in batch:
        acct = accounts.get(line.account)
        own = packages.get(acct["id"], []) if acct is not None else []
        if not own or line.sell is None or line.call_id in written:
            priced.append(line)
            continue
        assert acct is not None
        ends_next = acct["next_close_at"] is not None and line.ended_at >= acct["next_close_at"]
        period = acct["next_close_at"] if ends_next else acct["period_start"]
        matching = [p for p in own if not p["prefixes"] or line.destination.startswith(tuple(p["prefixes"]))]
        left = [_package_left(p, period) for p in matching]
        amount, covered = cost_with_free_micro(line.sell, line.seconds, sum(left))
        if covered:
            line = replace(line, amount_micro=-amount, free_s=covered)
            for package, available in zip(matching, left, strict=True):
                take = min(available, covered)
                if take == 0:
                    continue
                if package["period"] != period:
                    package["period"], package["used_s"] = period, 0
                package["used_s"] += take
                touched[package["id"]] = package
                covered -= take
        priced.append(line)
    if touched:
        await conn.execute(
            "UPDATE packages p SET used_s = u.used, period = u.period"
            " FROM unnest($1::bigint[], $2::integer[], $3::timestamptz[]) AS u(id, used, period) WHERE p.id = u.id",
            list(touched), [p["used_s"] for p in touched.values()], [p["period"] for p in touched.values()])
    return priced


_EXISTING_CALLS = """
SELECT l.id, l.call_id, a.number, l.balance_after_micro, p.name AS provider, l.provider_balance_after_micro,
       l.seconds, l.account_id
FROM ledger l JOIN accounts a ON a.id = l.account_id LEFT JOIN providers p ON p.id = l.provider_id
WHERE l.kind = 'call' AND l.call_id = ANY($1::text[])
"""


async def write_calls(conn: asyncpg.Connection, lines: Sequence[CallLine]) -> list[WrittenLine]:
    """Write a batch of call lines in one transaction, each call at most once ever (idempotent on call_id).

    Returns one WrittenLine per call found in the ledger afterwards, fresh or not. A call whose account
    does not exist in PostgreSQL is not written and not returned: the caller keeps it and reports it.
    Two writers racing on the same call: the loser's statement fails on the unique index and is retried
    by the caller; its fresh-filter then sees the winner's line.
    """
    unique: dict[str, CallLine] = {}
    for line in lines:
        unique.setdefault(line.call_id, line)
    batch = list(unique.values())
    async with conn.transaction():
        # A plan for these very arrays: the generic plan asyncpg's prepared statement falls back to after five
        # runs took twice as long (it cannot see how many lines and accounts a batch has).
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        batch = await _use_packages(conn, batch)
        inserted = await conn.fetch(
            _WRITE_CALLS,
            [x.call_id for x in batch], [x.account for x in batch], [x.provider for x in batch],
            [x.amount_micro for x in batch], [x.provider_amount_micro for x in batch],
            [x.seconds for x in batch], [x.destination for x in batch], [x.description for x in batch],
            [x.answered_at for x in batch], [x.ended_at for x in batch], [x.free_s for x in batch],
        )
        await note_low_credit(conn, list({r["account_id"] for r in inserted}))
    written: list[WrittenLine] = []
    by_id = {r["call_id"]: r for r in inserted}
    for r in inserted:
        src = unique[r["call_id"]]
        written.append(WrittenLine(
            src.call_id, r["id"], src.account, r["balance_after_micro"],
            src.provider if r["provider_balance_after_micro"] is not None else None,
            r["provider_balance_after_micro"], src.seconds, True,
        ))
    missing = [c for c in unique if c not in by_id]
    if missing:
        for r in await conn.fetch(_EXISTING_CALLS, missing):
            written.append(WrittenLine(
                r["call_id"], r["id"], r["number"], r["balance_after_micro"], r["provider"],
                r["provider_balance_after_micro"], r["seconds"] or 0, False,
            ))
    return written


_LOW_CREDIT = """
WITH flip AS (
    UPDATE accounts SET low_credit = NOT low_credit
    WHERE id = ANY($1::bigint[]) AND low_credit_threshold_micro > 0
      AND low_credit <> (balance_micro + credit_limit_micro < low_credit_threshold_micro)
    RETURNING id, low_credit, balance_micro, credit_limit_micro, low_credit_threshold_micro
)
INSERT INTO notices (account_id, kind, detail)
SELECT id, 'low_credit', jsonb_build_object('available_micro', balance_micro + credit_limit_micro,
                                            'threshold_micro', low_credit_threshold_micro)
FROM flip WHERE low_credit
"""


async def note_low_credit(conn: asyncpg.Connection, account_ids: Sequence[int]) -> None:
    """Record a low-credit notice for each account whose available credit just went below its threshold
    (once per crossing: the flag is cleared when credit is back above it)."""
    if account_ids:
        await conn.execute(_LOW_CREDIT, list(account_ids))


async def notices(conn: asyncpg.Connection, account_id: int) -> list[asyncpg.Record]:
    return list(await conn.fetch("SELECT * FROM notices WHERE account_id = $1 ORDER BY id", account_id))
