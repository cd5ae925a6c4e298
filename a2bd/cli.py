"""The `a2bd` command: serve, db migrate, tariff import, account add/show, provider add, sync, explain.

Errors a2bd raises on purpose print as one line on stderr and exit 1; argparse usage errors exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import io
import json
import secrets
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg

from a2bd.adapters import postgres
from a2bd.adapters.redis_store import RedisStore
from a2bd.config import Settings, load_settings
from a2bd.domain.invoice import format_rate
from a2bd.domain.money import format_amount, parse_amount
from a2bd.domain.ratecard import parse_ratecard
from a2bd.errors import A2bdError, ConfigError, InputError
from a2bd.observability import configure_logging
from a2bd.sim.faults import FAULTS

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        configure_logging(settings.log.level, settings.log.json)
        command: Command = args.command
        # The daemon, and the storm's simulated Asterisk (a C program in real life), take runtime.loop.
        fast = command is cmd_serve or command is cmd_storm
        with asyncio.Runner(loop_factory=_loop_factory(settings) if fast else None) as runner:
            return runner.run(command(args, settings))
    except A2bdError as exc:
        print(f"a2bd: {exc}", file=sys.stderr)
        return 1
    except asyncpg.DataError as exc:
        # A value its column cannot hold (--max-calls 3000000000: "value out of int32 range"): nothing was
        # written. Checked before the statement is sent, or refused by PostgreSQL as a whole.
        print(f"a2bd: a value is out of range: {exc}", file=sys.stderr)
        return 1
    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError) as exc:
        # The connection went away mid-command: a posting may or may not have been committed.
        print(f"a2bd: the connection to PostgreSQL was lost ({type(exc).__name__}: {exc}); if this command "
              "posts or changes something, check whether it did before running it again", file=sys.stderr)
        return 1
    except asyncpg.PostgresError as exc:
        print(f"a2bd: PostgreSQL refused: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    config_help = "settings file (default /etc/a2bd/a2bd.toml when present); A2BD_* override it"
    parser = argparse.ArgumentParser(prog="a2bd", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", type=Path, default=None, help=config_help)
    # `--config` is accepted after the command too (`a2bd serve --config X`), as operators type it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=config_help)
    sub = _Subparsers(parser.add_subparsers(required=True, metavar="COMMAND"), common)

    p = sub.add_parser("serve", help="run the daemon")
    p.set_defaults(command=cmd_serve)

    db = _Subparsers(sub.add_parser("db", help="database schema").add_subparsers(required=True, metavar="ACTION"),
                     common)
    p = db.add_parser("migrate", help="apply the missing migrations of sql/ (idempotent)")
    p.set_defaults(command=cmd_migrate)

    tariff = _Subparsers(sub.add_parser("tariff", help="tariffs").add_subparsers(required=True,
                                                                                metavar="ACTION"), common)
    p = tariff.add_parser("import", help="replace a tariff's rates with an A2Billing-style rate card CSV")
    p.add_argument("file", type=Path)
    p.add_argument("--tariff", required=True, help="tariff name (created if new)")
    p.add_argument("--currency", default="EUR")
    p.add_argument("--default-provider", default=None,
                   help="carrier for rows without a provider column (A2Billing exports name trunks by id)")
    p.set_defaults(command=cmd_tariff_import)

    account = _Subparsers(sub.add_parser("account", help="accounts").add_subparsers(required=True,
                                                                                metavar="ACTION"), common)
    p = account.add_parser("add", help="create an account (its initial balance is a ledger line)")
    p.add_argument("--number", help="account number, 4-20 digits (default: a random 10-digit one)")
    p.add_argument("--tariff", required=True)
    p.add_argument("--balance", default="0", help="initial balance, e.g. 10.00")
    p.add_argument("--credit-limit", default="0", help="post-paid credit limit (0 = pre-paid)")
    p.add_argument("--max-calls", type=int, default=0, help="concurrent calls (0 = unlimited)")
    p.add_argument("--daily-minutes", type=int, default=0, help="billed minutes per UTC day (0 = unlimited)")
    p.add_argument("--status", choices=("active", "blocked", "closed"), default="active")
    p.add_argument("--callerid", action="append", default=[], help="caller ID identifying it (repeatable)")
    # A secret is never an argument (ps and shell history show those): the PIN comes from a file or stdin.
    p.add_argument("--pin-file", type=Path, help="file holding the PIN for calling-card access (4-32 digits); "
                                                 "'-' reads it from standard input")
    p.add_argument("--expires", help="expiry, ISO date or date-time (UTC unless it says otherwise)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--deny", help="comma-separated prefixes it may not call")
    group.add_argument("--allow", help="comma-separated prefixes, the only ones it may call")
    p.add_argument("--currency", default="EUR")
    p.add_argument("--timezone", default="UTC")
    p.add_argument("--invoice-day", type=int, default=1)
    p.add_argument("--vat", default="0", help="VAT rate in percent, e.g. 20 or 7.7")
    p.add_argument("--low-credit", default="0", help="low-credit notice threshold")
    p.add_argument("--tax-mode", choices=("invoice", "payment"), default="invoice",
                   help="taxed on its invoices (post-paid style) or at each payment (pre-paid)")
    p.add_argument("--no-invoices", action="store_true", help="never close its previews into invoices")
    p.add_argument("--autorefill", action="store_true", help="top up to the initial balance at each invoice day")
    p.add_argument("--expiry", choices=("none", "date", "after_first_use", "after_creation"), default=None,
                   help="A2Billing's expiry modes: a date (--expires), N days (--expiry-days) after first use "
                        "or after creation")
    p.add_argument("--expiry-days", type=int, default=0)
    for name in ("name", "last-name", "company", "address", "email", "language", "vat-number"):
        p.add_argument(f"--{name}", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(command=cmd_account_add)
    p = account.add_parser("pay", help="post money to an account: a payment, refill, charge or correction")
    p.add_argument("number")
    p.add_argument("amount", help="credits the account when positive, debits it when negative")
    p.add_argument("--kind", choices=("payment", "refill", "charge", "correction"), default="payment")
    p.add_argument("--note", default="")
    p.set_defaults(command=cmd_account_pay)

    p = account.add_parser("set", help="change an account's settings (its balance changes only by posting)")
    p.add_argument("number")
    p.add_argument("--status", choices=("active", "blocked", "closed"))
    p.add_argument("--credit-limit")
    p.add_argument("--max-calls", type=int)
    p.add_argument("--timezone")
    p.add_argument("--invoice-day", type=int)
    p.add_argument("--vat", help="VAT rate in percent")
    p.add_argument("--tax-mode", choices=("invoice", "payment"))
    p.add_argument("--invoices", choices=("on", "off"), help="off: never close its previews into invoices")
    p.add_argument("--autorefill", choices=("on", "off"))
    p.add_argument("--expiry", choices=("none", "date", "after_first_use", "after_creation"))
    p.add_argument("--expiry-days", type=int)
    p.add_argument("--expires", help="expiry date (with --expiry date)")
    p.add_argument("--low-credit", help="low-credit notice threshold")
    for name in ("name", "last-name", "company", "address", "email", "language", "vat-number"):
        p.add_argument(f"--{name}", default=None)
    p.set_defaults(command=cmd_account_set)

    p = account.add_parser("show", help="an account, its balance, available credit and live calls")
    p.add_argument("number")
    p.add_argument("--json", action="store_true")
    p.set_defaults(command=cmd_account_show)

    provider = _Subparsers(sub.add_parser("provider", help="carriers").add_subparsers(required=True,
                                                                                metavar="ACTION"), common)
    p = provider.add_parser("add", help="add a carrier with a dial-string template")
    p.add_argument("name")
    p.add_argument("--dial", required=True, help="dial string template, e.g. 'PJSIP/{number}@carrier-a'")
    p.add_argument("--balance-limit", default="0", help="stop routing when we owe it this much (0 = none)")
    p.add_argument("--daily-minutes", type=int, default=0, help="stop routing past this many minutes a day")
    p.add_argument("--currency", default="EUR")
    p.set_defaults(command=cmd_provider_add)
    p = provider.add_parser("pay", help="record a payment to a carrier (positive lowers what we owe it, "
                                        "negative raises it)")
    p.add_argument("name")
    p.add_argument("amount", help="e.g. 500.00 or -12.50")
    p.add_argument("--note", default="", help="what it is for (shown on the provider's statement)")
    p.set_defaults(command=cmd_provider_pay)

    p = sub.add_parser("sync", help="load Redis from PostgreSQL (accounts, caller IDs, PINs, providers)")
    p.set_defaults(command=cmd_sync)

    p = sub.add_parser("reconcile", help="settle calls that ended unseen: compare live reservations with "
                                         "Asterisk's channels and rate CDRs missing from the ledger")
    p.add_argument("--json", action="store_true")
    p.set_defaults(command=cmd_reconcile)

    p = sub.add_parser("explain", help="what authorize would answer now, and why (places no call)")
    p.add_argument("number")
    p.add_argument("destination")
    p.add_argument("--json", action="store_true")
    p.set_defaults(command=cmd_explain)

    p = sub.add_parser("storm", help="a call storm from a simulated Asterisk against a real daemon, then the "
                                     "books checked (scratch database and Redis db, dropped afterwards)")
    p.add_argument("--rate", type=float, default=100.0, help="calls started per second")
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--accounts", type=int, default=200)
    p.add_argument("--mean-talk", type=float, default=3.0, help="mean talk time, seconds (exponential)")
    p.add_argument("--max-talk", type=float, default=30.0)
    p.add_argument("--answer-ratio", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=20261123)
    p.add_argument("--csv", type=Path, help="calls to place instead: start_s,account,destination,talk_s[,outcome]")
    p.add_argument("--plot", type=Path, help="write calls/s, live calls and latency over time to this PNG")
    p.add_argument("--json", action="store_true")
    p.add_argument("--fault", choices=FAULTS, help="inject a fault: kill (SIGKILL the daemon, then start it "
                   "again), redis (restart the storm's own Redis empty), postgres (cut the daemon's connections), "
                   "ami (cut the AMI connection), twin (two daemons, the first killed for good); "
                   "see docs/reliability.md")
    p.add_argument("--fault-at", type=float, default=10.0, help="seconds after the first call")
    p.add_argument("--fault-for", type=float, default=5.0, help="seconds the part stays down")
    p.set_defaults(command=cmd_storm)

    from a2bd import cli_billing

    cli_billing.add_commands(sub)
    return parser


class _Subparsers:
    """add_parser() that gives every command the common options."""

    def __init__(self, action: Any, common: argparse.ArgumentParser) -> None:
        self.action = action
        self.common = common

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self.action.add_parser(name, parents=[self.common], **kwargs)
        return parser


# -- commands -------------------------------------------------------------------------------------


async def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.daemon import Daemon  # the daemon pulls in the AGI server; other commands do not need it

    # SIGHUP re-reads the same file (and environment) the daemon started from.
    await Daemon(settings, reload_settings=lambda: load_settings(args.config)).run()
    return 0


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    conn = await postgres.connect(settings.postgres.url)
    try:
        applied = await postgres.migrate(conn)
    finally:
        await conn.close()
    print(f"applied {', '.join(applied)}" if applied else "schema is up to date")
    return 0


async def cmd_tariff_import(args: argparse.Namespace, settings: Settings) -> int:
    try:
        raw = args.file.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {args.file}: {exc.strerror}") from exc
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        at = bom + exc.start  # the codec counts from after the byte order mark
        line = raw.count(b"\n", 0, at) + 1
        raise InputError(f"{args.file}:{line}: not UTF-8 text (byte {at} of the file, 0x{raw[at]:02x}); "
                         "export the rate card as UTF-8") from exc
    entries, errors = parse_ratecard(io.StringIO(text, newline=""), default_provider=args.default_provider)
    if errors:
        for err in errors[:50]:
            print(f"{args.file}:{err.line}: {err.column}: {err.message}", file=sys.stderr)
        more = " (first 50 shown)" if len(errors) > 50 else ""
        raise InputError(f"{len(errors)} bad row(s) in {args.file}{more}; nothing was imported")
    conn = await postgres.connect(settings.postgres.url)
    try:
        count = await postgres.replace_tariff(conn, args.tariff, entries, args.currency.upper())
    finally:
        await conn.close()
    print(f"tariff {args.tariff}: {count} rates imported from {args.file}")
    return 0


async def cmd_account_add(args: argparse.Namespace, settings: Settings) -> int:
    fields: dict[str, Any] = {
        "status": args.status,
        "credit_limit_micro": _money(args.credit_limit, field="--credit-limit"),
        "max_calls": args.max_calls,
        "daily_limit_s": args.daily_minutes * 60,
        "currency": args.currency.upper(),
        "timezone": _timezone(args.timezone),
        "invoice_day": args.invoice_day,
        "vat_rate_ppm": _vat_ppm(args.vat),
        "low_credit_threshold_micro": _money(args.low_credit, field="--low-credit"),
    }
    if args.pin_file:
        fields["pin"] = _pin(args.pin_file)
    if args.expires:
        fields["expires_at"] = _datetime(args.expires)
    if args.deny or args.allow:
        fields["restrict_mode"] = "deny" if args.deny else "allow"
        fields["restrict_prefixes"] = _prefixes(args.deny or args.allow)
    fields.update(tax_mode=args.tax_mode, invoices_enabled=not args.no_invoices, autorefill=args.autorefill)
    if args.expiry or args.expires:
        fields["expiry_mode"] = args.expiry or "date"
        fields["expiry_days"] = args.expiry_days
    for name in ("name", "last_name", "company", "address", "email", "language", "vat_number"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    balance = _money(args.balance, field="--balance")
    conn = await postgres.connect(settings.postgres.url)
    try:
        number = args.number or await _free_number(conn)
        record = await postgres.create_account(
            conn, number=number, tariff=args.tariff, initial_balance_micro=balance,
            callerids=args.callerid, **fields,
        )
    finally:
        await conn.close()
    await _push_accounts(settings, [dict(record)])
    if args.json:
        print(json.dumps(_account_json(record, {}, {}), indent=2))
    else:
        print(record["number"])
    return 0


async def cmd_storm(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.sim.faults import Fault
    from a2bd.sim.storm import StormPlan, storm_main

    if not (0 < args.rate <= 20_000 and 1 <= args.calls <= 1_000_000 and 1 <= args.accounts <= 100_000
            and 0 <= args.answer_ratio <= 1 and 0 <= args.mean_talk <= args.max_talk <= 3600):
        raise InputError("storm bounds: rate 0..20000, calls 1..1e6, accounts 1..1e5, answer ratio 0..1, "
                         "0 <= mean talk <= max talk <= 3600")
    plan = StormPlan(rate=args.rate, calls=args.calls, accounts=args.accounts, mean_talk_s=args.mean_talk,
                     max_talk_s=args.max_talk, answer_ratio=args.answer_ratio, seed=args.seed)
    fault = Fault(args.fault, args.fault_at, args.fault_for) if args.fault else None
    report = await storm_main(plan, args.csv, args.plot, fault=fault)
    summary = report.summary()
    if args.json:
        print(json.dumps({**summary, "discrepancy_list": report.verdict.discrepancies[:100]}, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:<18} {value}")
        for line in report.verdict.discrepancies[:50]:
            print(f"  discrepancy: {line}")
        if args.plot:
            print(f"plot               {args.plot}")
    recovered = report.fault is None or report.fault["recover_s"] is not None
    if not recovered:
        print(f"a2bd storm: the daemon did not recover from the {args.fault} fault before the storm ended",
              file=sys.stderr)
    return 0 if report.verdict.ok and recovered else 1


async def cmd_account_set(args: argparse.Namespace, settings: Settings) -> int:
    changes: dict[str, Any] = {}
    for name in ("status", "max_calls", "invoice_day", "tax_mode", "expiry_days", "name", "last_name", "company",
                 "address", "email", "language", "vat_number"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.credit_limit is not None:
        changes["credit_limit_micro"] = _money(args.credit_limit, field="--credit-limit")
    if args.low_credit is not None:
        changes["low_credit_threshold_micro"] = _money(args.low_credit, field="--low-credit")
    if args.timezone is not None:
        changes["timezone"] = _timezone(args.timezone)
    if args.vat is not None:
        changes["vat_rate_ppm"] = _vat_ppm(args.vat)
    if args.invoices is not None:
        changes["invoices_enabled"] = args.invoices == "on"
    if args.autorefill is not None:
        changes["autorefill"] = args.autorefill == "on"
    if args.expiry is not None:
        changes["expiry_mode"] = args.expiry
    if args.expires is not None:
        changes["expires_at"] = _datetime(args.expires)
    conn = await postgres.connect(settings.postgres.url)
    try:
        record = await postgres.update_account(conn, args.number, changes)
    finally:
        await conn.close()
    await _push_accounts(settings, [dict(record)])
    print(f"account {args.number}: {', '.join(sorted(changes))} changed")
    return 0


async def cmd_account_show(args: argparse.Namespace, settings: Settings) -> int:
    conn = await postgres.connect(settings.postgres.url)
    try:
        record = await postgres.fetch_account(conn, args.number)
    finally:
        await conn.close()
    if record is None:
        raise InputError(f"account {args.number} does not exist")
    store = RedisStore.from_url(settings.redis.url, settings.redis.timeout_s)
    try:
        calls = await store.live_calls(args.number, int(datetime.now(UTC).timestamp() * 1000))
        parked = await store.parked(args.number)
    finally:
        await store.close()
    data = _account_json(record, calls, parked)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    width = max(len(k) for k in data)
    for key, value in data.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{key.replace('_', ' '):<{width}}  {shown if shown not in (None, '') else '-'}")
    return 0


async def cmd_provider_add(args: argparse.Namespace, settings: Settings) -> int:
    conn = await postgres.connect(settings.postgres.url)
    try:
        await postgres.add_provider(
            conn, args.name, args.dial,
            balance_limit_micro=_money(args.balance_limit, field="--balance-limit"),
            daily_limit_s=args.daily_minutes * 60, currency=args.currency.upper(),
        )
        providers = await postgres.list_providers(conn)
    finally:
        await conn.close()
    store = RedisStore.from_url(settings.redis.url, settings.redis.timeout_s)
    try:
        await store.put_providers([dict(p) for p in providers])
    finally:
        await store.close()
    print(f"provider {args.name}: {args.dial}")
    return 0


async def cmd_provider_pay(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.services.posting import pay_provider

    amount = _money(args.amount, field="amount")
    conn = await postgres.connect(settings.postgres.url)
    store = RedisStore.from_url(settings.redis.url, settings.redis.timeout_s)
    try:
        line = await pay_provider(conn, store, args.name, amount, args.note)
    finally:
        await conn.close()
        await store.close()
    print(f"provider {args.name}: paid {format_amount(amount)}, we now owe "
          f"{format_amount(line['provider_balance_after_micro'])}")
    return 0


async def cmd_account_pay(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.services.posting import post_to_account

    amount = _money(args.amount, field="amount")
    conn = await postgres.connect(settings.postgres.url)
    store = RedisStore.from_url(settings.redis.url, settings.redis.timeout_s)
    try:
        line = await post_to_account(conn, store, args.number, args.kind, amount, args.note)
    finally:
        await conn.close()
        await store.close()
    balance = format_amount(line["balance_after_micro"])
    taxed = " (VAT included: the balance takes its net part)" if line["kind"] == "tax" else ""
    print(f"account {args.number}: {args.kind} {format_amount(amount)}, balance {balance}{taxed}")
    return 0


async def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.services.charging import LedgerWriter
    from a2bd.services.lifecycle import ami_client, list_channels
    from a2bd.services.reconcile import Reconciler

    pool = await postgres.create_pool(settings.postgres.url, 1, 2)
    store = RedisStore.from_url(settings.redis.url, settings.redis.timeout_s)
    clients = {s.name: ami_client(s, settings) for s in settings.asterisk}
    writer = LedgerWriter(pool, store)
    try:
        for client in clients.values():
            with contextlib.suppress(A2bdError):  # unreachable: its calls are left alone and reported
                await client.start(wait=True)

        async def channels(name: str) -> Any:
            return await list_channels(clients[name])

        writer.start()
        report = await Reconciler(settings, store, pool, writer, list_channels=channels).run_once()
        if not await writer.drain(60.0):
            raise InputError("PostgreSQL did not take the reconciled lines within 60 s; run it again")
    finally:
        await writer.close()
        for client in clients.values():
            await client.close()
        await store.close()
        await pool.close()
    summary = report.summary()
    if args.json:
        print(json.dumps({**summary, "calls": {k: getattr(report, k) for k in
                                               ("written", "settled", "rated_from_cdr", "released", "unrated")}},
                         indent=2))
    else:
        for key, value in summary.items():
            print(f"{key.replace('_', ' '):<20} {value if not isinstance(value, list) else ', '.join(value) or '-'}")
    return 0 if not report.unrated else 4


async def cmd_sync(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.services.sync import sync_redis

    conn = await postgres.connect(settings.postgres.url)
    store = RedisStore.from_url(settings.redis.url, settings.redis.timeout_s)
    try:
        report = await sync_redis(conn, store)
    finally:
        await conn.close()
        await store.close()
    print(f"synced {report.accounts} accounts and {report.providers} providers into Redis"
          f" ({report.stale_keys_removed} stale index keys removed)")
    return 0


async def cmd_explain(args: argparse.Namespace, settings: Settings) -> int:
    from a2bd.services.authorization import Authorizer
    from a2bd.services.catalog import ProviderCatalog, TariffCatalog

    store = RedisStore.from_url(settings.redis.url, settings.redis.timeout_s)
    conn = await postgres.connect(settings.postgres.url)
    try:
        tariffs = TariffCatalog(settings.postgres.url)
        await tariffs.refresh(conn)
        providers = ProviderCatalog(store)
        await providers.refresh()
        decision = await Authorizer(store, tariffs, providers, settings).explain(args.number, args.destination)
    finally:
        await conn.close()
        await store.close()
    plan = decision.plan
    out: dict[str, Any] = {
        "status": decision.status.value,
        "hangup_cause": decision.hangup_cause,
        "reason": decision.reason,
        "account": decision.account or args.number,
        "destination": args.destination,
    }
    if plan is not None:
        sell = plan.sell
        out |= {
            "prefix": plan.match.prefix,
            "rate_destination": plan.match.destination,
            "rate_per_min": format_amount(sell.rate_per_min_micro),
            "connect_charge": format_amount(sell.connect_micro),
            "initial_block_s": sell.initial_block_s,
            "increment_s": sell.increment_s,
            "first_block_cost": format_amount(plan.hold_micro),
            "credit_for_this_call": format_amount(decision.available_micro or 0),
        }
    out["limit_ms"] = decision.limit_ms
    out["routes"] = [r.dial for r in decision.routes]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        width = max(len(k) for k in out)
        for key, value in out.items():
            shown = ", ".join(value) if isinstance(value, list) else value
            print(f"{key.replace('_', ' '):<{width}}  {shown}")
    return 0 if decision.ok else 3


# -- helpers --------------------------------------------------------------------------------------


async def _push_accounts(settings: Settings, accounts: list[dict[str, Any]]) -> None:
    store = RedisStore.from_url(settings.redis.url, settings.redis.timeout_s)
    try:
        await store.put_accounts(accounts)
    except A2bdError as exc:
        raise InputError(f"saved in PostgreSQL but Redis was not updated ({exc}); run `a2bd sync`") from exc
    finally:
        await store.close()


async def _free_number(conn: Any) -> str:
    for _ in range(20):
        number = str(secrets.randbelow(9 * 10**9) + 10**9)  # 10 digits, never a leading zero
        if not await postgres.number_taken(conn, number):
            return number
    raise InputError("could not find a free account number; give one with --number")


def _account_json(record: Any, calls: dict[str, int], parked: dict[str, int]) -> dict[str, Any]:
    available = record["balance_micro"] + record["credit_limit_micro"]
    return {
        "number": record["number"],
        "status": record["status"],
        "tariff": record["tariff"],
        "currency": record["currency"],
        "balance": format_amount(record["balance_micro"]),
        "credit_limit": format_amount(record["credit_limit_micro"]),
        "available_credit": format_amount(available),
        "held_by_live_calls": format_amount(sum(calls.values())),
        "live_calls": len(calls),
        # Ended while PostgreSQL was away: their prices are held until their ledger lines are written.
        "held_by_ended_calls": format_amount(sum(parked.values())),
        "ended_calls_waiting": len(parked),
        "max_calls": record["max_calls"],
        "expires_at": record["expires_at"].isoformat() if record["expires_at"] else None,
        "restrict_mode": record["restrict_mode"],
        "restrict_prefixes": list(record["restrict_prefixes"]),
        "callerids": list(record["callerids"]),
        "pin_set": record["pin"] is not None,
        "timezone": record["timezone"],
        "invoice_day": record["invoice_day"],
        "vat_rate": format_rate(record["vat_rate_ppm"]),
        "name": record["name"],
        "company": record["company"],
        "email": record["email"],
    }


def _loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    choice = settings.runtime.loop
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("runtime.loop: uvloop is not installed (pip install uvloop)") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _money(text: str, *, field: str) -> int:
    try:
        return parse_amount(text, field=field)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _vat_ppm(text: str) -> int:
    """A VAT rate in percent ("20", "7.7") as parts per million: at most 4 decimals, 0 to 100, never rounded."""
    micro = _money(text, field="--vat")  # percent in millionths of a percent; 100 of them make one ppm
    ppm, rest = divmod(micro, 100)
    if rest or not 0 <= ppm <= 1_000_000:
        raise InputError(f"--vat: {text!r} is not a rate of 0 to 100 percent with at most 4 decimals")
    return ppm


def _pin(path: Path) -> str:
    """The PIN in `path` ('-': standard input), checked here so that no error message ever repeats it."""
    try:
        text = sys.stdin.readline() if str(path) == "-" else path.read_text()
    except OSError as exc:  # the path is not repeated: `--pin 1234` (argparse takes --pin for --pin-file) gets here
        raise InputError(f"--pin-file: cannot read the file: {exc.strerror}") from None
    pin = text.strip()
    if not (pin.isascii() and pin.isdigit() and 4 <= len(pin) <= 32):
        raise InputError("--pin-file: the file must hold a PIN of 4 to 32 digits")
    return pin


def _timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InputError(f"--timezone: {name!r} is not an IANA time zone (e.g. Europe/Paris)") from None
    return name


def _datetime(text: str, option: str = "--expires") -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InputError(f"{option}: {text!r} is not an ISO date or date-time") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _prefixes(text: str) -> list[str]:
    prefixes = [p.strip().lstrip("+") for p in text.split(",") if p.strip()]
    bad = [p for p in prefixes if not p.isdigit()]
    if bad or not prefixes:
        raise InputError(f"prefix list {text!r}: prefixes are digits, comma-separated")
    return prefixes


if __name__ == "__main__":
    sys.exit(main())
