#!/usr/bin/env python3
"""a2bd-balance: tell the caller the available credit of their account (classic AGI, run by Asterisk).

Asterisk runs this file itself, `AGI(a2bd-balance.py)`: the agi_* block arrives on stdin, each command
goes out on stdout and its `200 result=...` reply comes back on stdin. Install and dialplan: README.md
beside this file.

The account is found as a2bd finds it for a call: the channel's accountcode (`agi_accountcode`) when
set, else the caller ID (`agi_callerid`) through the caller-ID index. Its available credit is the
balance plus the credit limit (AccountView.available_micro), less the prices of calls that ended while
PostgreSQL was away and are not yet in the balance (`:parked`), in integer micro-units; it is voiced as
whole units then cents, both truncated toward zero (12.345678 EUR is "12 euros 34 cents", -0.999999 is
"you owe 0 euros 99 cents"), so the caller never hears more credit, or more debt, than there is.

Commands, in order (each one reply):
    SET VARIABLE "A2B_BALANCE_MICRO" "<micro>"    only when the credit was read
    SET VARIABLE "A2B_BALANCE_STATUS" "<status>"  OK | NOACCOUNT | ERROR, always, after the amount
    VERBOSE "a2bd-balance: <why>" 1               NOACCOUNT and ERROR only
    STREAM FILE <prompt> "" 0                     a2b/your-balance-is (a2b/you-owe when negative), or
                                                  a2b/account-unknown, or a2b/balance-unavailable
    SAY NUMBER "<units>" ""  + STREAM FILE <unit sound> "" 0
    SAY NUMBER "<cents>" ""  + STREAM FILE <cent sound> "" 0     only when there are cents

The variables go first: a caller who hangs up during the announcement, or a sound file that is
missing, still leaves them for the dialplan (and the `h` extension). Exit status: 0, or 1 when Redis
could not answer or held a malformed account (Asterisk then sets AGISTATUS=FAILURE). A hangup at any
point (SIGHUP, a `HANGUP` line, EOF, `200 result=-1`, `511`) ends the script quietly with 0. Nothing but
AGI commands is ever written to stdout.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import redis
from asterisk.agi import AGI, AGIAppError, AGIError, AGIHangup
from redis.backoff import NoBackoff
from redis.retry import Retry

from a2bd.adapters.redis_store import account_key, callerid_key, parked_key
from a2bd.contract import Status
from a2bd.domain.money import MICRO

# Sounds (paths under Asterisk's sounds directory, without extension).
PROMPT_BALANCE = "a2b/your-balance-is"
PROMPT_OWED = "a2b/you-owe"
PROMPT_NO_ACCOUNT = "a2b/account-unknown"
PROMPT_UNAVAILABLE = "a2b/balance-unavailable"

# Channel variables this script sets.
VAR_BALANCE_MICRO = "A2B_BALANCE_MICRO"  # available credit, micro-units, may be negative
VAR_BALANCE_STATUS = "A2B_BALANCE_STATUS"  # Status.OK / Status.NOACCOUNT / Status.ERROR

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_TIMEOUT_S = 1.0  # per connect and per command: the caller waits in silence meanwhile
VERBOSE_LEVEL = 1

MICRO_PER_CENT = 10_000

_MICRO = re.compile(r"-?[0-9]+")  # int() alone would also take " 12", "1_000" and "١٢"


@dataclass(frozen=True, slots=True)
class CurrencySounds:
    units: str
    unit: str  # said after exactly 1
    cents: str
    cent: str


CURRENCY_SOUNDS: dict[str, CurrencySounds] = {
    "EUR": CurrencySounds("a2b/euros", "a2b/euro", "a2b/cents", "a2b/cent"),
    "USD": CurrencySounds("a2b/dollars", "a2b/dollar", "a2b/cents", "a2b/cent"),
    "GBP": CurrencySounds("a2b/pounds", "a2b/pound", "a2b/pence", "a2b/penny"),
}
OTHER_CURRENCY = CurrencySounds("a2b/units", "a2b/unit", "a2b/cents", "a2b/cent")  # any other code


class BalanceUnavailable(Exception):
    """Redis could not answer, or the account's hash cannot be read as money. The message says which."""


@dataclass(frozen=True, slots=True)
class Balance:
    number: str
    available_micro: int  # balance + credit limit - prices of ended calls not yet in the balance
    currency: str


# -- reading the account (pure but for the Redis client passed in) -------------------------------------


def _account_number(value: str | None) -> str | None:
    """An account number as a2bd accepts one (ASCII digits), else None."""
    return value if value and value.isascii() and value.isdigit() else None


def balance_from_hash(number: str, data: Mapping[str, str], parked: Sequence[str] = ()) -> Balance:
    """The available credit in an account hash (fields as account_to_hash writes them), less the `parked`
    prices (park.lua: ended calls whose ledger line waits)."""
    fields = {}
    for name in ("balance", "credit_limit"):
        text = data.get(name)
        if text is None or not _MICRO.fullmatch(text):
            raise BalanceUnavailable(f"account {number}: field {name} is {text!r}, not integer micro-units")
        fields[name] = int(text)
    owed = 0
    for text in parked:
        if not _MICRO.fullmatch(text):
            raise BalanceUnavailable(f"account {number}: a parked price is {text!r}, not integer micro-units")
        owed += int(text)
    return Balance(number, fields["balance"] + fields["credit_limit"] - owed,
                   data.get("currency", "").strip().upper())


def find_balance(client: Any, accountcode: str, callerid: str) -> Balance | None:
    """The account's balance, or None when neither the accountcode nor the caller ID names a known account.

    Like a2bd's authorize: a set accountcode is the account, with no fallback to the caller ID; the caller
    ID counts only when it is all digits. `client` is a synchronous redis.Redis with decoded replies.
    """
    number = accountcode or None
    if number is None and _account_number(callerid):
        number = client.get(callerid_key(callerid))
    number = _account_number(number)
    if number is None:
        return None
    data = client.hgetall(account_key(number))
    return balance_from_hash(number, data, client.hvals(parked_key(number))) if data else None


def read_balance(redis_url: str, accountcode: str, callerid: str) -> Balance | None:
    """find_balance over a fresh connection, one attempt, each step bounded by REDIS_TIMEOUT_S."""
    try:
        client = redis.Redis.from_url(
            redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0), decode_responses=True,
        )
    except ValueError as exc:
        raise BalanceUnavailable(f"A2BD_REDIS_URL is not a Redis URL: {exc}") from exc
    try:
        return find_balance(client, accountcode, callerid)
    except (redis.RedisError, OSError) as exc:
        raise BalanceUnavailable(f"Redis unavailable: {type(exc).__name__}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise BalanceUnavailable(f"account hash is not UTF-8: {exc}") from exc
    finally:
        client.close()


# -- what to say (pure) ----------------------------------------------------------------------------------


def split_amount(micro: int) -> tuple[bool, int, int]:
    """(owed, whole units, cents) of an amount in micro-units. Both parts are of the absolute value,
    truncated toward zero: 12_345_678 -> (False, 12, 34); -999_999 -> (True, 0, 99)."""
    whole, rest = divmod(abs(micro), MICRO)
    return micro < 0, whole, rest // MICRO_PER_CENT


def announcement(balance: Balance) -> list[tuple[str, str]]:
    """The playback, as (command, argument) steps: ("STREAM FILE", sound) or ("SAY NUMBER", digits)."""
    owed, whole, cents = split_amount(balance.available_micro)
    sounds = CURRENCY_SOUNDS.get(balance.currency, OTHER_CURRENCY)
    steps = [
        ("STREAM FILE", PROMPT_OWED if owed else PROMPT_BALANCE),
        ("SAY NUMBER", str(whole)),
        ("STREAM FILE", sounds.unit if whole == 1 else sounds.units),
    ]
    if cents:
        steps += [("SAY NUMBER", str(cents)), ("STREAM FILE", sounds.cent if cents == 1 else sounds.cents)]
    return steps


def verbose_text(message: str) -> str:
    """One VERBOSE argument: printable ASCII without double quotes (pyst2 quotes but does not escape)."""
    text = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in message)
    return f"a2bd-balance: {text}"[:400]


# -- the AGI dialogue ------------------------------------------------------------------------------------


class AsteriskInput:
    """stdin as pyst2 reads it (`readline`), where the end of the dialogue is a hangup.

    pyst2 would read EOF as a blank line (ending the agi_* block early, or failing on int('') for a
    reply), and a `HANGUP` line (FastAGI's notice, also sent to classic scripts by some versions) the same
    way. Bytes are decoded here as UTF-8 with replacement, whatever the locale Asterisk runs in.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def readline(self) -> str:
        raw = self._stream.readline()
        if not raw:
            raise AGIHangup("Asterisk closed the AGI pipe")
        line = raw.decode("utf-8", "replace")
        if line.strip() == "HANGUP":
            raise AGIHangup("Asterisk reported the hangup")
        return line


class _Discard:
    """pyst2 traces every line it reads and writes on stderr, which Asterisk's console shows: drop it."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _refuse(agi: AGI, status: Status, reason: str, prompt: str) -> None:
    agi.set_variable(VAR_BALANCE_STATUS, status.value)
    agi.verbose(verbose_text(reason), VERBOSE_LEVEL)
    agi.stream_file(prompt)


def run(agi: AGI, redis_url: str) -> int:
    """One balance announcement over an AGI whose agi_* block has been read. Returns the exit status.

    pyst2 raises AGIHangup (SIGHUP, or a `HANGUP`/EOF from AsteriskInput), AGIAppError (`200 result=-1`)
    or AGIError (510/511/520): main() handles them.
    """
    accountcode = agi.env.get("agi_accountcode", "")
    callerid = agi.env.get("agi_callerid", "")
    try:
        balance = read_balance(redis_url, accountcode, callerid)
    except BalanceUnavailable as exc:
        _refuse(agi, Status.ERROR, str(exc), PROMPT_UNAVAILABLE)
        return 1
    if balance is None:
        who = f"accountcode {accountcode!r}" if accountcode else f"caller ID {callerid!r}"
        _refuse(agi, Status.NOACCOUNT, f"no account for {who}", PROMPT_NO_ACCOUNT)
        return 0
    agi.set_variable(VAR_BALANCE_MICRO, str(balance.available_micro))
    agi.set_variable(VAR_BALANCE_STATUS, Status.OK.value)
    for command, argument in announcement(balance):
        if command == "SAY NUMBER":
            agi.say_number(argument)
        else:
            agi.stream_file(argument)
    return 0


def main() -> int:
    agi: AGI | None = None
    try:
        agi = AGI(stdin=AsteriskInput(sys.stdin.buffer), stdout=sys.stdout, stderr=_Discard())
        return run(agi, os.environ.get("A2BD_REDIS_URL") or DEFAULT_REDIS_URL)
    except AGIHangup:
        return 0  # the caller left: nothing to say, nobody to say it to
    except AGIAppError:
        # `200 result=-1`: a hangup (without SIGHUP: AGISIGHUP=no), or a sound file that is missing.
        # VERBOSE works on a dead channel too, so the operator hears of it either way.
        try:
            if agi is not None:
                agi.verbose(verbose_text("playback failed (result=-1): the caller hung up or a sound file is "
                                         "missing"), VERBOSE_LEVEL)
        except AGIError:
            pass
        return 0
    except AGIError:
        return 0  # 511 (dead channel) or a command this Asterisk refuses: the dialogue cannot go on
    except Exception as exc:  # a bug: one line on stderr (Asterisk's console), never a traceback on stdout
        sys.stderr.write(f"a2bd-balance: unexpected {type(exc).__name__}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
