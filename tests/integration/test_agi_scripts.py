"""agi_scripts/a2bd_balance.py run as Asterisk runs a classic AGI script, against the real Redis.

The script is a subprocess (`sys.executable agi_scripts/a2bd_balance.py`). The test plays Asterisk: it
writes the agi_* block of a recorded call (tests/fixtures/asterisk/01-answered-callee-hangup.agi.txt,
turned into a classic AGI's block) on the script's stdin, reads each command from its stdout and answers
`200 result=0`, or a hangup. Every read is bounded; the process is killed by PID if it outlives the test.
The pure parts (amount split, announcement, hash parsing) are table tests on the imported module.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from a2bd.adapters.redis_store import RedisStore, account_key
from tests.transcripts import FIXTURES, load_capture

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "agi_scripts" / "a2bd_balance.py"
READ_TIMEOUT_S = 10.0  # per line: the script's start-up (imports) is most of it
MAX_COMMANDS = 20  # the longest dialogue is 7 commands
OK = "200 result=0"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("a2bd_balance", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


balance_script = _load_script()


def agi_env(*, accountcode: str = "", callerid: str = "5551234") -> bytes:
    """The agi_* block of the recorded call 01, as Asterisk sends it to a classic script: no agi_network
    lines, agi_request is the script's name."""
    capture = load_capture(FIXTURES / "01-answered-callee-hangup.agi.txt")[0]
    block = capture.received.partition(b"\n\n")[0].decode()
    fields = dict(line.partition(": ")[::2] for line in block.split("\n"))
    assert fields["agi_accountcode"] == "" and fields["agi_callerid"] == "5551234"  # the recording's own
    del fields["agi_network"], fields["agi_network_script"]
    fields.update(agi_request="a2bd-balance.py", agi_accountcode=accountcode, agi_callerid=callerid)
    return "".join(f"{key}: {value}\n" for key, value in fields.items()).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class Dialogue:
    commands: list[str]
    returncode: int
    stderr: str


Reply = Callable[[int, str], str | None]  # (index, command) -> the reply line; None: close stdin (EOF)


def always_ok(index: int, command: str) -> str | None:
    return OK


async def converse(env: bytes, redis_url: str, reply: Reply = always_ok, *, sighup_at: int | None = None,
                   eof_after_env: bool = False) -> Dialogue:
    """Run the script as Asterisk would and answer each command it writes with `reply`. `sighup_at`: send
    SIGHUP (Asterisk's hangup notice to a classic script) before answering that command. `eof_after_env`:
    close stdin right after `env`."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), env={**os.environ, "A2BD_REDIS_URL": redis_url},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    commands: list[str] = []
    try:
        proc.stdin.write(env)
        await proc.stdin.drain()
        if eof_after_env:
            proc.stdin.close()
        for index in range(MAX_COMMANDS + 1):
            async with asyncio.timeout(READ_TIMEOUT_S):
                line = await proc.stdout.readline()
            if not line:
                break
            assert index < MAX_COMMANDS, f"the script goes on past {MAX_COMMANDS} commands: {commands}"
            assert line.endswith(b"\n"), line
            commands.append(line.decode()[:-1])
            if sighup_at == index:
                os.kill(proc.pid, signal.SIGHUP)
            answer = reply(index, commands[-1])
            if answer is None:
                proc.stdin.close()
            elif not proc.stdin.is_closing():
                proc.stdin.write(answer.encode() + b"\n")
                await proc.stdin.drain()
        async with asyncio.timeout(READ_TIMEOUT_S):
            stderr = await proc.stderr.read()
            returncode = await proc.wait()
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
        if not proc.stdin.is_closing():
            proc.stdin.close()
    return Dialogue(commands, returncode, stderr.decode())


async def put_account(store: RedisStore, number: str, *, balance: int, credit_limit: int = 0,
                      currency: str = "EUR", callerids: tuple[str, ...] = ()) -> None:
    await store.put_accounts([{
        "number": number, "status": "active", "tariff": "t", "balance_micro": balance,
        "credit_limit_micro": credit_limit, "max_calls": 0, "expires_at": None, "restrict_mode": "none",
        "restrict_prefixes": [], "timezone": "UTC", "currency": currency, "callerids": list(callerids),
    }])


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refusal(status: str, prompt: str) -> list[str]:
    """The dialogue of NOACCOUNT / ERROR, but for the VERBOSE line (checked apart)."""
    return [f'SET VARIABLE "A2B_BALANCE_STATUS" "{status}"', "VERBOSE", f'STREAM FILE {prompt} "" 0']


def without_verbose_text(commands: list[str]) -> list[str]:
    return ["VERBOSE" if c.startswith("VERBOSE ") else c for c in commands]


# -- the dialogues ------------------------------------------------------------------------------------------


async def test_accountcode_is_announced_in_units_and_truncated_cents(store: RedisStore, redis_url: str) -> None:
    await put_account(store, "1000000001", balance=12_345_678)
    await put_account(store, "1000000002", balance=99_000_000, callerids=("5551234",))  # not asked: accountcode wins
    dialogue = await converse(agi_env(accountcode="1000000001"), redis_url)
    assert dialogue.commands == [
        'SET VARIABLE "A2B_BALANCE_MICRO" "12345678"',
        'SET VARIABLE "A2B_BALANCE_STATUS" "OK"',
        'STREAM FILE a2b/your-balance-is "" 0',
        'SAY NUMBER "12" ""',
        'STREAM FILE a2b/euros "" 0',
        'SAY NUMBER "34" ""',
        'STREAM FILE a2b/cents "" 0',
    ]
    assert dialogue.returncode == 0
    assert "Traceback" not in dialogue.stderr


async def test_caller_id_finds_the_account_and_the_credit_limit_counts(store: RedisStore, redis_url: str) -> None:
    await put_account(store, "1000000003", balance=-500_000, credit_limit=1_500_000, currency="USD",
                      callerids=("5551234",))
    dialogue = await converse(agi_env(accountcode="", callerid="5551234"), redis_url)
    assert dialogue.commands == [
        'SET VARIABLE "A2B_BALANCE_MICRO" "1000000"',
        'SET VARIABLE "A2B_BALANCE_STATUS" "OK"',
        'STREAM FILE a2b/your-balance-is "" 0',
        'SAY NUMBER "1" ""',
        'STREAM FILE a2b/dollar "" 0',
    ]
    assert dialogue.returncode == 0


async def test_calls_ended_while_postgresql_was_away_are_not_announced_as_credit(store: RedisStore,
                                                                                 redis_url: str) -> None:
    await put_account(store, "1000000005", balance=12_345_678)
    now_ms = int(time.time() * 1000)
    await store.reserve("1000000005", "ast1/1795000000.9", 60_000, now_ms, now_ms + 3_600_000)
    await store.record_ended("1000000005", "ast1/1795000000.9", "{}", 2_000_000)  # its line waits: parked
    dialogue = await converse(agi_env(accountcode="1000000005"), redis_url)
    assert dialogue.commands[:2] == ['SET VARIABLE "A2B_BALANCE_MICRO" "10345678"',
                                     'SET VARIABLE "A2B_BALANCE_STATUS" "OK"']
    assert dialogue.commands[3:5] == ['SAY NUMBER "10" ""', 'STREAM FILE a2b/euros "" 0']


async def test_negative_credit_is_announced_as_owed(store: RedisStore, redis_url: str) -> None:
    # -5.000000 + 2.654322 = -2.345678: owed 2 euros 34 cents (truncated toward zero, as credit is)
    await put_account(store, "1000000004", balance=-5_000_000, credit_limit=2_654_322)
    dialogue = await converse(agi_env(accountcode="1000000004"), redis_url)
    assert dialogue.commands == [
        'SET VARIABLE "A2B_BALANCE_MICRO" "-2345678"',
        'SET VARIABLE "A2B_BALANCE_STATUS" "OK"',
        'STREAM FILE a2b/you-owe "" 0',
        'SAY NUMBER "2" ""',
        'STREAM FILE a2b/euros "" 0',
        'SAY NUMBER "34" ""',
        'STREAM FILE a2b/cents "" 0',
    ]
    assert dialogue.returncode == 0


@pytest.mark.parametrize(("accountcode", "callerid", "reason"), [
    ("", "5559999", "no account for caller ID '5559999'"),  # caller ID not in the index
    ("", "unknown", "no account for caller ID 'unknown'"),  # what Asterisk sends without a caller ID
    ("1000000099", "5551234", "no account for accountcode '1000000099'"),  # no fallback to the caller ID
    ("ACME", "5551234", "no account for accountcode 'ACME'"),  # not an account number
])
async def test_unknown_account_says_so_and_sets_noaccount(store: RedisStore, redis_url: str, accountcode: str,
                                                          callerid: str, reason: str) -> None:
    await put_account(store, "1000000001", balance=12_345_678, callerids=("5551234",))
    dialogue = await converse(agi_env(accountcode=accountcode, callerid=callerid), redis_url)
    assert without_verbose_text(dialogue.commands) == refusal("NOACCOUNT", "a2b/account-unknown")
    assert dialogue.commands[1] == f'VERBOSE "a2bd-balance: {reason}" 1'
    assert dialogue.returncode == 0


async def test_redis_unreachable_says_unavailable_and_exits_1() -> None:
    dialogue = await converse(agi_env(accountcode="1000000001"), f"redis://127.0.0.1:{closed_port()}/0")
    assert without_verbose_text(dialogue.commands) == refusal("ERROR", "a2b/balance-unavailable")
    assert dialogue.commands[1].startswith('VERBOSE "a2bd-balance: Redis unavailable: ConnectionError: ')
    assert dialogue.returncode == 1  # Asterisk sets AGISTATUS=FAILURE
    assert "Traceback" not in dialogue.stderr


@pytest.mark.parametrize(("field", "value"), [("balance", "12.5"), ("credit_limit", "1_000"), ("balance", " 12")])
async def test_malformed_account_says_unavailable(store: RedisStore, redis_url: str, field: str, value: str) -> None:
    await put_account(store, "1000000001", balance=12_345_678)
    await store.client.hset(account_key("1000000001"), field, value)
    dialogue = await converse(agi_env(accountcode="1000000001"), redis_url)
    assert without_verbose_text(dialogue.commands) == refusal("ERROR", "a2b/balance-unavailable")
    assert dialogue.commands[1] == (f'VERBOSE "a2bd-balance: account 1000000001: field {field} is '
                                    f"'{value}', not integer micro-units\" 1")
    assert dialogue.returncode == 1


ANNOUNCED_UP_TO_12 = [
    'SET VARIABLE "A2B_BALANCE_MICRO" "12345678"',
    'SET VARIABLE "A2B_BALANCE_STATUS" "OK"',
    'STREAM FILE a2b/your-balance-is "" 0',
    'SAY NUMBER "12" ""',
]


@pytest.mark.parametrize(("hangup", "after"), [
    ("HANGUP", []),  # the FastAGI-style notice line
    (None, []),  # Asterisk closes the pipe (EOF)
    ("200 result=-1", ['VERBOSE "a2bd-balance: playback failed (result=-1): the caller hung up or a sound file '
                       'is missing" 1']),  # AGISIGHUP=no: the hangup shows as -1, VERBOSE still works
])
async def test_hangup_mid_announcement_ends_the_script_cleanly(store: RedisStore, redis_url: str,
                                                               hangup: str | None, after: list[str]) -> None:
    await put_account(store, "1000000001", balance=12_345_678)

    def reply(index: int, command: str) -> str | None:
        return hangup if command == 'SAY NUMBER "12" ""' else "200 result=1"

    dialogue = await converse(agi_env(accountcode="1000000001"), redis_url, reply)
    assert dialogue.commands == ANNOUNCED_UP_TO_12 + after
    assert dialogue.returncode == 0
    assert "Traceback" not in dialogue.stderr


async def test_sighup_mid_announcement_ends_the_script_before_its_next_command(store: RedisStore,
                                                                               redis_url: str) -> None:
    # Asterisk's default for a classic script: SIGHUP on hangup; the command in flight still gets its reply.
    await put_account(store, "1000000001", balance=12_345_678)
    dialogue = await converse(agi_env(accountcode="1000000001"), redis_url, sighup_at=3)
    assert dialogue.commands == ANNOUNCED_UP_TO_12
    assert dialogue.returncode == 0
    assert "Traceback" not in dialogue.stderr


async def test_eof_inside_the_agi_block_sends_nothing(redis_url: str) -> None:
    dialogue = await converse(agi_env(accountcode="1000000001")[:40], redis_url, eof_after_env=True)
    assert (dialogue.commands, dialogue.returncode) == ([], 0)


# -- the pure parts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("micro", "expected"), [
    (0, (False, 0, 0)),
    (9_999, (False, 0, 0)),  # less than a cent is no cent
    (10_000, (False, 0, 1)),
    (12_345_678, (False, 12, 34)),
    (12_999_999, (False, 12, 99)),  # never rounded up to 13
    (1_000_000, (False, 1, 0)),
    (-1, (True, 0, 0)),
    (-999_999, (True, 0, 99)),
    (-2_345_678, (True, 2, 34)),  # toward zero: owed 2.34, not 2.35
    (123_456_789_012_345, (False, 123_456_789, 1)),
])
def test_split_amount_truncates_toward_zero(micro: int, expected: tuple[bool, int, int]) -> None:
    assert balance_script.split_amount(micro) == expected


@pytest.mark.parametrize(("micro", "currency", "expected"), [
    (1_010_000, "EUR", [("STREAM FILE", "a2b/your-balance-is"), ("SAY NUMBER", "1"), ("STREAM FILE", "a2b/euro"),
                        ("SAY NUMBER", "1"), ("STREAM FILE", "a2b/cent")]),
    (0, "GBP", [("STREAM FILE", "a2b/your-balance-is"), ("SAY NUMBER", "0"), ("STREAM FILE", "a2b/pounds")]),
    (-50_000, "GBP", [("STREAM FILE", "a2b/you-owe"), ("SAY NUMBER", "0"), ("STREAM FILE", "a2b/pounds"),
                      ("SAY NUMBER", "5"), ("STREAM FILE", "a2b/pence")]),
    (3_000_000, "CHF", [("STREAM FILE", "a2b/your-balance-is"), ("SAY NUMBER", "3"), ("STREAM FILE", "a2b/units")]),
])
def test_announcement(micro: int, currency: str, expected: list[tuple[str, str]]) -> None:
    assert balance_script.announcement(balance_script.Balance("1", micro, currency)) == expected


@pytest.mark.parametrize("data", [
    {"credit_limit": "0"},  # no balance
    {"balance": "1e6", "credit_limit": "0"},
    {"balance": "", "credit_limit": "0"},
    {"balance": "5", "credit_limit": "+5"},
    {"balance": "5", "credit_limit": "٥"},  # int() would take an Arabic-Indic five
])
def test_balance_from_hash_rejects_what_is_not_integer_micro_units(data: dict[str, str]) -> None:
    with pytest.raises(balance_script.BalanceUnavailable):
        balance_script.balance_from_hash("1", data)


def test_a_parked_price_that_is_not_integer_micro_units_is_refused() -> None:
    with pytest.raises(balance_script.BalanceUnavailable, match="parked price"):
        balance_script.balance_from_hash("1", {"balance": "5", "credit_limit": "0"}, ["1.5"])


def test_verbose_text_cannot_break_the_agi_quoting() -> None:
    assert balance_script.verbose_text('x"y\\z\né') == "a2bd-balance: x?y?z??"
