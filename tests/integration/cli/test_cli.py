"""The `a2bd` command against the real PostgreSQL and Redis, as an operator uses it."""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from pathlib import Path

import asyncpg
import pytest

from a2bd.adapters.redis_store import RedisStore, account_key
from a2bd.cli import main
from a2bd.domain.rating import SellRate, max_duration_s
from a2bd.services import posting

pytestmark = pytest.mark.integration
SAMPLE = Path(__file__).resolve().parents[3] / "examples" / "sample_tariff.csv"


async def a2bd(*argv: str) -> int:
    """Run the CLI as a user would; it owns its event loop, so it runs in a thread."""
    return await asyncio.to_thread(main, list(argv))


async def setup_tariff(capsys: pytest.CaptureFixture[str]) -> None:
    assert await a2bd("provider", "add", "carrier-a", "--dial", "PJSIP/{number}@carrier-a") == 0
    assert await a2bd("provider", "add", "carrier-b", "--dial", "PJSIP/{number}@carrier-b",
                      "--daily-minutes", "600", "--balance-limit", "1000") == 0
    assert await a2bd("tariff", "import", str(SAMPLE), "--tariff", "retail") == 0
    assert "11 rates imported" in capsys.readouterr().out


async def test_account_add_show_and_explain(pg: asyncpg.Connection, store: RedisStore, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    await setup_tariff(capsys)
    (tmp_path / "pin").write_text("8080\n")  # a secret is never an argument
    assert await a2bd("account", "add", "--tariff", "retail", "--balance", "12.50", "--credit-limit", "5",
                      "--max-calls", "3", "--callerid", "33123456789", "--pin-file", str(tmp_path / "pin"),
                      "--deny", "1900,+4490",
                      "--timezone", "Europe/Paris", "--vat", "20", "--name", "Ada") == 0
    number = capsys.readouterr().out.strip()
    assert len(number) == 10 and number.isdigit() and number[0] != "0"

    assert await a2bd("account", "show", number, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown | {"number": number} == shown
    assert (shown["balance"], shown["credit_limit"], shown["available_credit"]) == ("12.50", "5.00", "17.50")
    assert (shown["live_calls"], shown["restrict_prefixes"], shown["vat_rate"]) == (0, ["1900", "4490"], "20%")
    assert shown["callerids"] == ["33123456789"] and shown["pin_set"] is True

    # the initial balance is a ledger line; Redis got the account at once
    assert await pg.fetchval("SELECT amount_micro FROM ledger WHERE kind = 'initial'") == 12_500_000
    assert await store.client.hget(account_key(number), "balance") == "12500000"
    assert await store.number_for_pin("8080") == number

    assert await a2bd("account", "show", number) == 0
    table = capsys.readouterr().out
    assert "available credit" in table and "17.50" in table

    assert await a2bd("explain", number, "33612345678", "--json") == 0
    explained = json.loads(capsys.readouterr().out)
    assert (explained["status"], explained["prefix"], explained["rate_per_min"]) == ("OK", "336", "0.12")
    assert explained["routes"] == ["PJSIP/33612345678@carrier-a"]
    assert explained["first_block_cost"] == "0.06"
    mobile = SellRate(120_000, initial_block_s=30, increment_s=6, grace_s=3)
    assert explained["limit_ms"] == max_duration_s(mobile, 17_500_000, 14400) * 1000 == 8_748_000

    assert await a2bd("explain", number, "19005550100") == 3  # refused: exit status says so
    assert "BLOCKED" in capsys.readouterr().out

    # A call that ended while PostgreSQL was away holds its price until its line is written: shown, and
    # counted by explain as authorization counts it (0.05 left, under the 0.06 first block).
    now_ms = int(time.time() * 1000)
    await store.reserve(number, "ast1/1795000000.1", 60_000, now_ms, now_ms + 3_600_000)
    await store.record_ended(number, "ast1/1795000000.1", "{}", 17_450_000)
    assert await a2bd("account", "show", number, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["live_calls"], shown["ended_calls_waiting"], shown["held_by_ended_calls"]) == (0, 1, "17.45")
    assert await a2bd("explain", number, "33612345678") == 3
    assert "NOFUNDS" in capsys.readouterr().out


async def test_bad_ratecard_reports_lines_and_imports_nothing(pg: asyncpg.Connection, store: RedisStore,
                                                             tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    await setup_tariff(capsys)
    bad = tmp_path / "bad.csv"
    bad.write_text("dialprefix,destination,rateinitial\n44,UK,0.01\n4x4,Bad,0.01\n45,Denmark,cheap\n")
    assert await a2bd("tariff", "import", str(bad), "--tariff", "retail") == 1
    err = capsys.readouterr().err
    assert f"{bad}:3: dialprefix" in err
    assert f"{bad}:4: rateinitial" in err
    assert "2 bad row(s)" in err and "nothing was imported" in err
    assert await pg.fetchval("SELECT count(*) FROM rates") == 11  # the previous card is intact


async def test_default_provider_fills_rows_without_one(pg: asyncpg.Connection, store: RedisStore,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await setup_tariff(capsys)
    card = tmp_path / "a2billing-export.csv"
    card.write_text("id,idtariffplan,dialprefix,destination,rateinitial,id_trunk\n1,1,44,UK,0.01,3\n")
    assert await a2bd("tariff", "import", str(card), "--tariff", "export", "--default-provider", "carrier-b") == 0
    providers = await pg.fetch("SELECT p.name FROM rates r JOIN providers p ON p.id = r.provider_id"
                               " JOIN tariffs t ON t.id = r.tariff_id WHERE t.name = 'export'")
    assert [r["name"] for r in providers] == ["carrier-b"]


async def test_a_rate_card_that_is_not_utf8_names_the_line_and_byte(pg: asyncpg.Connection, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rows = "".join(f"{33000 + i},France {i},0.0{i % 10}\n" for i in range(20_000))  # past any read chunk
    card = tmp_path / "latin1.csv"
    body = ("dialprefix,destination,rateinitial\n" + rows).encode()
    card.write_bytes(codecs.BOM_UTF8 + body + "44,Royaume-Uni (caf\xe9),0.01\n".encode("latin-1"))
    assert await a2bd("tariff", "import", str(card), "--tariff", "x") == 1
    at = len(codecs.BOM_UTF8) + len(body) + len("44,Royaume-Uni (caf")
    assert capsys.readouterr().err == (f"a2bd: {card}:20002: not UTF-8 text (byte {at} of the file, 0xe9); "
                                       "export the rate card as UTF-8\n")
    assert await pg.fetchval("SELECT count(*) FROM tariffs") == 0


async def test_import_naming_an_unknown_provider_is_refused(pg: asyncpg.Connection, store: RedisStore,
                                                           tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    card = tmp_path / "card.csv"
    card.write_text("dialprefix,rateinitial,provider\n44,0.01,ghost\n")
    assert await a2bd("tariff", "import", str(card), "--tariff", "x") == 1
    assert "unknown provider(s) ghost" in capsys.readouterr().err
    assert await pg.fetchval("SELECT count(*) FROM tariffs") == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["account", "add", "--tariff", "nope"], "tariff 'nope' does not exist"),
    (["account", "add", "--tariff", "retail", "--balance", "1.0000001"], "more than 6 decimal places"),
    (["account", "add", "--tariff", "retail", "--number", "12"], "account refused"),
    (["account", "add", "--tariff", "retail", "--timezone", "Mars/Olympus"], "not an IANA time zone"),
    (["account", "add", "--tariff", "retail", "--deny", "19x"], "prefixes are digits"),
    (["account", "show", "4040404040"], "account 4040404040 does not exist"),
    (["provider", "add", "x", "--dial", "PJSIP/carrier"], "must contain {number}"),
    (["tariff", "import", "/nonexistent.csv", "--tariff", "t"], "cannot read /nonexistent.csv"),
    (["account", "add", "--tariff", "retail", "--expires", "next tuesday"],
     "--expires: 'next tuesday' is not an ISO date or date-time"),
    (["package", "add", "4040404040", "--name", "none", "--minutes", "0"], "at least one free second"),
    (["package", "add", "4040404040", "--name", "fr", "--minutes", "9", "--prefix", "3x"],
     "package prefixes are digits: 3x"),
    (["account", "add", "--tariff", "retail", "--vat", "7.77777"], "--vat: '7.77777' is not a rate of 0 to 100"),
    (["account", "add", "--tariff", "retail", "--vat", "120"], "--vat: '120' is not a rate of 0 to 100"),
    (["account", "add", "--tariff", "retail", "--vat", "-1"], "--vat: '-1' is not a rate of 0 to 100"),
    (["account", "add", "--tariff", "retail", "--max-calls", "3000000000"], "a value is out of range: "),
    (["account", "add", "--tariff", "retail", "--invoice-day", "40000"], "40000 (value out of int16 range)"),
])
async def test_operator_mistakes_get_one_clear_line(pg: asyncpg.Connection, store: RedisStore,
                                                   capsys: pytest.CaptureFixture[str],
                                                   argv: list[str], message: str) -> None:
    await setup_tariff(capsys)
    assert await a2bd(*argv) == 1
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("a2bd: ")


async def test_sync_rebuilds_redis_from_postgresql(pg: asyncpg.Connection, store: RedisStore,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    await setup_tariff(capsys)
    assert await a2bd("account", "add", "--tariff", "retail", "--number", "5550001", "--balance", "3",
                      "--callerid", "4420000001") == 0
    capsys.readouterr()
    await store.client.flushdb()
    await store.client.set("a2b:cid:999", "5550001")  # stale index key of a removed caller ID
    assert await a2bd("sync") == 0
    assert "synced 1 accounts and 2 providers" in capsys.readouterr().out
    assert await store.client.hget(account_key("5550001"), "balance") == "3000000"
    assert await store.number_for_callerid("4420000001") == "5550001"
    assert await store.number_for_callerid("999") is None
    providers = await store.providers()
    assert (providers["carrier-b"].daily_limit_s, providers["carrier-b"].balance_limit_micro) == (36000, 1_000_000_000)


async def test_migrate_twice(pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]) -> None:
    assert await a2bd("db", "migrate") == 0
    assert capsys.readouterr().out == "schema is up to date\n"


async def test_a_connection_lost_mid_payment_is_one_line_that_says_to_check(
        pg: asyncpg.Connection, store: RedisStore, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    await setup_tariff(capsys)
    assert await a2bd("account", "add", "--tariff", "retail", "--number", "5550002", "--balance", "1") == 0
    capsys.readouterr()
    real = posting.post_to_account

    async def drop_then_post(conn: asyncpg.Connection, *args: object) -> object:
        await conn.close()  # the server went away under the command
        return await real(conn, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(posting, "post_to_account", drop_then_post)
    assert await a2bd("account", "pay", "5550002", "10") == 1
    err = capsys.readouterr().err
    assert err.startswith("a2bd: the connection to PostgreSQL was lost (InterfaceError: ")
    assert err.endswith("check whether it did before running it again\n") and err.count("\n") == 1
    assert await pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'payment'") == 0


async def test_unreachable_servers_are_one_line(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("A2BD_PG_URL", "postgresql://postgres@127.0.0.1:1/a2bd")
    assert await a2bd("db", "migrate") == 1
    err = capsys.readouterr().err
    assert err.startswith("a2bd: PostgreSQL at 127.0.0.1:1/a2bd is unreachable")


async def test_provider_pay_and_account_pay_are_ledger_lines_that_reach_redis(
    pg: asyncpg.Connection, store: RedisStore, capsys: pytest.CaptureFixture[str],
) -> None:
    await setup_tariff(capsys)
    assert await a2bd("account", "add", "--tariff", "retail", "--number", "5550001", "--balance", "1.00") == 0
    capsys.readouterr()
    # We owe carrier-a nothing yet; paying 500.00 in advance puts it at -500.00; a correction of -20 raises it.
    assert await a2bd("provider", "pay", "carrier-a", "500.00", "--note", "wire 2026-11") == 0
    assert "we now owe -500.00" in capsys.readouterr().out
    assert await a2bd("provider", "pay", "carrier-a", "-20") == 0
    owed = await pg.fetchval("SELECT balance_micro FROM providers WHERE name = 'carrier-a'")
    assert owed == -480_000_000
    assert await store.client.hget("a2b:prov:carrier-a", "balance") == str(owed)
    kinds = [r["kind"] for r in await pg.fetch("SELECT kind FROM ledger WHERE provider_id IS NOT NULL ORDER BY id")]
    assert kinds == ["provider_payment", "provider_payment"]
    assert await a2bd("account", "pay", "5550001", "2.50") == 0
    assert "balance 3.50" in capsys.readouterr().out
    assert await a2bd("account", "pay", "5550001", "-0.50", "--kind", "charge", "--note", "report fee") == 0
    assert await store.client.hget(account_key("5550001"), "balance") == "3000000"
    assert await pg.fetchval("SELECT balance_micro FROM accounts WHERE number = '5550001'") == 3_000_000


@pytest.mark.parametrize(("argv", "message"), [
    (["provider", "pay", "nope", "1"], "provider nope does not exist"),
    (["account", "pay", "999999", "1"], "account 999999 does not exist"),
    (["account", "pay", "999999", "1.0000001"], "amount"),
])
async def test_paying_what_does_not_exist_or_an_unexact_amount_is_one_clear_line(
    pg: asyncpg.Connection, store: RedisStore, capsys: pytest.CaptureFixture[str], argv: list[str], message: str,
) -> None:
    assert await a2bd(*argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


async def test_reconcile_reports_what_it_fixed(pg: asyncpg.Connection, store: RedisStore, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from a2bd.sim.ami import SimAsterisk

    await setup_tariff(capsys)
    assert await a2bd("account", "add", "--tariff", "retail", "--number", "5550002", "--balance", "1.00") == 0
    now = int(time.time() * 1000)
    # A reservation whose call Asterisk no longer has and nobody saw end: released, reported.
    await store.reserve("5550002", "pbx1/1795000001.1", 10_000, now, now + 60_000)
    async with SimAsterisk(username="a2bd", secret="pw", auth_fail_delay_s=0) as sim:
        config = tmp_path / "a2bd.toml"
        config.write_text(f'[[asterisk]]\nname = "pbx1"\nport = {sim.port}\nsecret_file = "{tmp_path}/s"\n')
        (tmp_path / "s").write_text("pw\n")
        capsys.readouterr()
        assert await a2bd("reconcile", "--json", "--config", str(config)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["released"] == 1 and report["calls"]["released"] == ["pbx1/1795000001.1"]
    assert report["servers_unreachable"] == []
