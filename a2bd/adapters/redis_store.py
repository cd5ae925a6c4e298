"""Redis: the hot state authorization reads and reserves against.

Keys (every key of one account carries the hash tag {acct:N}, so its scripts stay in one slot of a
Redis Cluster):

    a2b:{acct:N}           hash   number, status, tariff, balance, credit_limit, max_calls, expires_at,
                                  restrict_mode, restrict_prefixes (comma-separated), timezone, currency,
                                  held (the live calls' holds and the parked prices: written only by Lua),
                                  lid (newest ledger line the balance includes), day + today_s (billed
                                  seconds of the UTC day), daily_limit_s,
                                  v (version: bumped by every load from PostgreSQL, so a daemon that
                                  keeps the account's static fields in memory knows when they changed)
    a2b:{acct:N}:calls     hash   live calls: call id -> hold_micro
    a2b:{acct:N}:expiry    zset   live calls by expiry (Unix ms): a call never settled stops counting
    a2b:{acct:N}:call      hash   live calls: call id -> JSON record (rate, routes, destination; the answer
                                  time and channel once answered): what any daemon needs to rate or guard it
    a2b:{acct:N}:ended     hash   ended calls, rated, whose ledger line is not yet written: call id -> JSON
                                  (survives a daemon killed while PostgreSQL is away; removed by the settle)
    a2b:{acct:N}:parked    hash   the same calls' prices, counted in `held` in place of their slots, so
                                  an outage neither takes slots from the account nor forgets what it owes
    a2b:cid:<callerid>     string account number owning this caller ID
    a2b:pin:<pin>          string account number owning this PIN
    a2b:prov:<name>        hash   name, dial, enabled, balance, lid, balance_limit, daily_limit_s, day, today_s
    a2b:providers          set    provider names
    a2b:synced             string Unix time of the last load from PostgreSQL (gone: Redis must be reloaded)
    a2b:changed            pub/sub channel: account numbers (comma-separated) whose credit or live calls
                                  changed (every daemon re-checks the credit guard of those accounts)

Money is integer micro-units in decimal text. Every call is bounded by the client's socket timeout.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from a2bd.adapters.redis_mux import RedisMux
from a2bd.domain.authorize import (
    AccountStatus,
    AccountView,
    ProviderState,
    Reservation,
    ReserveOutcome,
    RestrictMode,
)
from a2bd.errors import StoreUnavailable

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)


def account_key(number: str) -> str:
    return f"a2b:{{acct:{number}}}"


def calls_key(number: str) -> str:
    return f"a2b:{{acct:{number}}}:calls"


def expiry_key(number: str) -> str:
    return f"a2b:{{acct:{number}}}:expiry"


def record_key(number: str) -> str:
    return f"a2b:{{acct:{number}}}:call"


def ended_key(number: str) -> str:
    return f"a2b:{{acct:{number}}}:ended"


def parked_key(number: str) -> str:
    return f"a2b:{{acct:{number}}}:parked"


def live_keys(number: str) -> list[str]:
    """KEYS of the reserve/release scripts, in their order."""
    return [account_key(number), calls_key(number), expiry_key(number), record_key(number)]


def settle_keys(number: str) -> list[str]:
    """KEYS of settle.lua and park.lua, in their order."""
    return [*live_keys(number), ended_key(number), parked_key(number)]


def number_of(key: str) -> str:
    """The account number in one of its keys (a2b:{acct:N}...)."""
    return key[key.index("{acct:") + 6 : key.index("}")]


def callerid_key(callerid: str) -> str:
    return f"a2b:cid:{callerid}"


def pin_key(pin: str) -> str:
    return f"a2b:pin:{pin}"


def provider_key(name: str) -> str:
    return f"a2b:prov:{name}"


PROVIDERS_KEY = "a2b:providers"
CHANGED_CHANNEL = "a2b:changed"
SYNCED_KEY = "a2b:synced"  # written last by every sync from PostgreSQL: its absence means Redis forgot all


def utc_day(now_s: float) -> str:
    """The UTC day of a Unix time as YYYYMMDD: the day daily minute limits count in."""
    return time.strftime("%Y%m%d", time.gmtime(now_s))


@dataclass(frozen=True, slots=True)
class AccountCredit:
    """What the credit guard needs of an account: its money and its live calls' records."""

    number: str
    balance_micro: int
    credit_limit_micro: int
    records: dict[str, str]  # live calls: call id -> JSON record
    ended: dict[str, str]  # ended calls not yet in the ledger (not yet in the balance): call id -> JSON


@dataclass(frozen=True, slots=True)
class LiveState:
    """One account's live reservations, their records, and its ended calls waiting for the ledger."""

    number: str
    holds: dict[str, int]
    records: dict[str, str]
    ended: dict[str, str]


class Script:
    """A Lua file of adapters/lua, loaded once and called by SHA (loaded again if Redis forgot it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = resources.files("a2bd.adapters").joinpath("lua", f"{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1

    async def __call__(self, mux: RedisMux, keys: list[str], args: list[str | int]) -> Any:
        try:
            return await mux.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except hiredis.ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await mux.execute("SCRIPT", "LOAD", self.source)  # Redis restarted or SCRIPT FLUSH: once more
        return await mux.execute("EVALSHA", self.sha, len(keys), *keys, *args)


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    """A HGETALL reply as the pipelined connection gives it (field, value, field, value...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisStore:
    """`client` (redis-py) for everything but the authorization path, which goes through `mux`."""

    def __init__(self, client: aioredis.Redis, mux: RedisMux) -> None:
        self.client = client
        self.mux = mux
        self._reserve = Script("reserve")
        self._release = Script("release")
        self._settle = Script("settle")
        self._park = Script("park")
        self._rebase = Script("rebase")
        self._provider_settle = Script("provider_settle")
        self._update_call = Script("update_call")

    @classmethod
    def from_url(cls, url: str, timeout_s: float, max_connections: int = 64) -> RedisStore:
        # A blocking pool: past `max_connections` a command waits (up to the timeout) for a free
        # connection instead of failing, so a burst of calls queues for microseconds, not errors.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, decode_responses=True, health_check_interval=30,
        )
        client = aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it
        return cls(client, RedisMux(url, timeout_s))

    async def close(self) -> None:
        self.mux.close()
        await self.client.aclose()

    async def ping(self) -> None:
        """Check Redis answers and load the scripts, so the first call pays no SCRIPT LOAD."""
        await self._guard(self.client.ping())
        for script in (self._reserve, self._release, self._settle, self._park, self._rebase,
                       self._provider_settle, self._update_call):
            await self._guard(self.mux.execute("SCRIPT", "LOAD", script.source))

    async def _guard(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"Redis unavailable: {exc}") from exc
        except (RedisError, hiredis.ReplyError) as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc

    # -- authorization path (one connection, commands in flight together) -----------------------

    async def account(self, number: str) -> tuple[AccountView, str] | None:
        """The account and its version, or None when Redis does not know it."""
        flat: list[str] = await self._guard(self.mux.execute("HGETALL", account_key(number)))
        if not flat:
            return None
        data = _pairs(flat)
        return account_from_hash(data), data.get("v", "")

    async def account_version(self, number: str) -> str | None:
        version: str | None = await self._guard(self.mux.execute("HGET", account_key(number), "v"))
        return version

    async def number_for_callerid(self, callerid: str) -> str | None:
        number: str | None = await self._guard(self.mux.execute("GET", callerid_key(callerid)))
        return number

    async def number_for_pin(self, pin: str) -> str | None:
        number: str | None = await self._guard(self.mux.execute("GET", pin_key(pin)))
        return number

    async def reserve(
        self, number: str, call_id: str, hold_micro: int, now_ms: int, expires_ms: int, version: str = "",
        record: str = "",
    ) -> Reservation | None:
        """Reserve atomically (reserve.lua), storing the call's `record` beside its hold. None: the account is
        no longer at `version`; nothing was reserved."""
        reply = await self._guard(
            self._reserve(self.mux, live_keys(number),
                          [call_id, hold_micro, now_ms, expires_ms, version, record, utc_day(now_ms / 1000)])
        )
        outcome, credit, live, daily_left = reply
        if outcome == "STALE":
            return None
        left = int(daily_left)
        return Reservation(ReserveOutcome(outcome), int(credit), int(live), None if left < 0 else left)

    async def release(self, number: str, call_id: str) -> bool:
        """Drop a reservation whose call will never be billed (the caller hung up during the AGI)."""
        return bool(await self._guard(self._release(self.mux, live_keys(number), [call_id])))

    # -- the call lifecycle (tracker, ledger writer, guard, reconciler) -------------------------------

    async def update_record(self, number: str, call_id: str, record: str) -> bool:
        """Replace a live call's record (the tracker adds the answer); False when the call is no longer live,
        so a late event never resurrects a settled call."""
        return bool(await self._guard(self._update_call(self.mux, [calls_key(number), record_key(number)],
                                                        [call_id, record])))

    async def call_record(self, number: str, call_id: str) -> str | None:
        record: str | None = await self._guard(self.mux.execute("HGET", record_key(number), call_id))
        return record

    async def record_ended(self, number: str, call_id: str, record: str, price_micro: int) -> None:
        """Keep an ended call in Redis until its ledger line is written (crash safety of the write queue). If
        it still holds a slot of an account Redis has, the slot is freed and its price held instead
        (park.lua); its live record goes, so the credit guard counts it at its final price, no longer as a
        running call."""
        await self.record_ended_many([(number, call_id, record, price_micro)])

    async def record_ended_many(self, calls: Sequence[tuple[str, str, str, int]]) -> None:
        """record_ended for many (account, call id, record, price): one park.lua per account, one write."""
        by_account: dict[str, list[str | int]] = {}
        for number, call_id, record, price in calls:
            by_account.setdefault(number, []).extend((call_id, record, price))
        commands: list[list[str | int]] = []
        for number, args in by_account.items():
            keys = settle_keys(number)
            commands.append(["EVALSHA", self._park.sha, len(keys), *keys, *args])
        await self._scripts_many(commands, (self._park,), "to keep an ended call")

    async def parked(self, number: str) -> dict[str, int]:
        """Ended calls of an account waiting for their ledger line: call id -> the price held for each."""
        flat: list[str] = await self._guard(self.mux.execute("HGETALL", parked_key(number)))
        return {call_id: int(price) for call_id, price in _pairs(flat).items()}

    async def settle(
        self, number: str, line_id: int, balance_micro: int, day: str, calls: Sequence[tuple[str, int]]
    ) -> tuple[int, bool]:
        """settle.lua: free the calls' slots, count their seconds, set the balance to the newest line's.
        Returns (calls freed, whether the account hash exists)."""
        (reply,) = await self._settle_batch([(number, line_id, balance_micro, calls)], [], day)
        freed, _balance, exists = reply
        return int(freed), bool(exists)

    async def settle_many(
        self,
        accounts: Sequence[tuple[str, int, int, Sequence[tuple[str, int]]]],
        providers: Sequence[tuple[str, int, int, int]],
        day: str,
    ) -> list[str]:
        """settle.lua for each (account, line id, balance, [(call id, seconds)]) and provider_settle.lua for
        each (provider, line id, balance, seconds), in one write. Returns the accounts whose hash is missing
        (Redis lost them: `a2bd sync` brings them back)."""
        replies = await self._settle_batch(accounts, providers, day)
        return [number for (number, *_), reply in zip(accounts, replies, strict=False) if not reply[2]]

    async def _settle_batch(
        self,
        accounts: Sequence[tuple[str, int, int, Sequence[tuple[str, int]]]],
        providers: Sequence[tuple[str, int, int, int]],
        day: str,
    ) -> list[Any]:
        commands: list[list[str | int]] = []
        for number, line_id, balance, calls in accounts:
            keys = settle_keys(number)
            args: list[str | int] = [line_id, balance, day]
            for call_id, seconds in calls:
                args += [call_id, seconds]
            commands.append(["EVALSHA", self._settle.sha, len(keys), *keys, *args])
        for name, line_id, balance, seconds in providers:
            commands.append(["EVALSHA", self._provider_settle.sha, 1, provider_key(name), line_id, balance, day,
                             seconds, "0"])
        return await self._scripts_many(commands, (self._settle, self._provider_settle), "a settle")

    async def _scripts_many(self, commands: list[list[str | int]], scripts: Sequence[Script], what: str) -> list[Any]:
        """EVALSHA `commands` of `scripts` in one write. If Redis restarted or flushed its scripts, load them
        and resend only the commands it refused: one that ran must not run twice (a settle adds the day's
        seconds). Any other error reply raises StoreUnavailable naming `what`."""
        replies: list[Any] = await self._guard(self.mux.execute_many(commands))
        again = [i for i, r in enumerate(replies)
                 if isinstance(r, hiredis.ReplyError) and str(r).startswith("NOSCRIPT")]
        if again:
            for script in scripts:
                await self._guard(self.mux.execute("SCRIPT", "LOAD", script.source))
            for i, reply in zip(again, await self._guard(self.mux.execute_many([commands[i] for i in again])),
                                strict=True):
                replies[i] = reply
        errors = [r for r in replies if isinstance(r, hiredis.ReplyError)]
        if errors:
            raise StoreUnavailable(f"Redis refused {what}: {errors[0]}")
        return replies

    async def settle_provider(self, name: str, line_id: int, balance_micro: int, day: str, seconds: int) -> None:
        await self._settle_batch([], [(name, line_id, balance_micro, seconds)], day)

    async def credit(self, number: str) -> AccountCredit | None:
        """Balance, credit limit and live call records of one account, read together."""
        # One write on the pipelined connection (the credit guard reads this for every answer and end): a
        # MULTI block sent whole cannot interleave with other commands on that connection.
        replies = await self._guard(self.mux.execute_many([
            ["MULTI"], ["HMGET", account_key(number), "balance", "credit_limit"], ["HGETALL", record_key(number)],
            ["HGETALL", ended_key(number)], ["EXEC"],
        ]))
        (balance, limit), records, ended = replies[-1]
        if balance is None:
            return None
        return AccountCredit(number, int(balance), int(limit or 0), _pairs(records), _pairs(ended))

    async def live_state(self) -> AsyncIterator[LiveState]:
        """Every account with live reservations or ended calls waiting (for reconciliation: SCAN, not KEYS)."""
        seen: set[str] = set()
        numbers: list[str] = []
        for pattern in ("a2b:{acct:*}:calls", "a2b:{acct:*}:ended"):
            keys: list[str] = await self._guard(self._scan(pattern))
            for key in keys:
                number = number_of(key)
                if number not in seen:
                    seen.add(number)
                    numbers.append(number)
        for number in numbers:
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(calls_key(number))
            pipe.hgetall(record_key(number))
            pipe.hgetall(ended_key(number))
            holds, records, ended = await self._guard(pipe.execute())
            yield LiveState(number, {k: int(v) for k, v in holds.items()}, records, ended)

    async def still_reserved(self, calls: Sequence[tuple[str, str]]) -> set[str]:
        """Which of these (account, call id) still hold a reservation."""
        pipe = self.client.pipeline(transaction=False)
        for number, call_id in calls:
            pipe.hexists(calls_key(number), call_id)
        found = await self._guard(pipe.execute())
        return {call_id for (_, call_id), there in zip(calls, found, strict=True) if there}

    async def _scan(self, pattern: str) -> list[str]:
        return [key async for key in self.client.scan_iter(match=pattern, count=1000)]

    async def scan(self, pattern: str) -> list[str]:
        """Every key matching `pattern` (SCAN, not KEYS: Redis keeps answering others meanwhile)."""
        keys: list[str] = await self._guard(self._scan(pattern))
        return keys

    async def delete(self, keys: Sequence[str]) -> None:
        await self._guard(self.client.delete(*keys))

    async def publish_changed(self, numbers: Iterable[str]) -> None:
        """Tell every daemon (and this one) that these accounts' credit or live calls changed: one message,
        the numbers joined by commas."""
        message = ",".join(numbers)
        if message:
            await self._guard(self.mux.execute("PUBLISH", CHANGED_CHANNEL, message))

    # -- reads for operators and routing ----------------------------------------------------------

    async def providers(self) -> dict[str, ProviderState]:
        names: set[str] = await self._guard(self.client.smembers(PROVIDERS_KEY))
        if not names:
            return {}
        pipe = self.client.pipeline(transaction=False)
        ordered = sorted(names)
        for name in ordered:
            pipe.hgetall(provider_key(name))
        rows = await self._guard(pipe.execute())
        return {name: provider_from_hash(row) for name, row in zip(ordered, rows, strict=True) if row}

    async def live_calls(self, number: str, now_ms: int) -> dict[str, int]:
        """Live (unexpired) reservations of an account: call id -> hold in micro-units."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(calls_key(number))
        pipe.zrangebyscore(expiry_key(number), f"({now_ms}", "+inf")  # as reserve.lua: expired at now
        calls, live = await self._guard(pipe.execute())
        alive = set(live)
        return {call: int(hold) for call, hold in calls.items() if call in alive}

    # -- loading from PostgreSQL ----------------------------------------------------------------

    async def put_accounts(self, accounts: Iterable[Mapping[str, Any]], now_s: float | None = None) -> int:
        """Write account hashes and their caller-ID/PIN indexes. Live calls are left as they are.

        Each account's balance and today's seconds go through rebase.lua with the id of its newest ledger
        line (`last_line_id`), so a daemon settling calls meanwhile is never overwritten by an older
        snapshot. MULTI/EXEC per chunk: no reader ever sees a new account's hash without its balance.
        """
        day = utc_day(time.time() if now_s is None else now_s)
        await self._guard(self.client.script_load(self._rebase.source))  # EVALSHA inside MULTI cannot reload
        pipe = self.client.pipeline(transaction=True)
        count = 0
        for acct in accounts:
            number = acct["number"]
            fields: dict[Any, Any] = account_to_hash(acct)  # redis-py's Mapping type is invariant in str
            del fields["balance"]  # rebase.lua writes it, only if this snapshot is not older than Redis
            pipe.hset(account_key(number), mapping=fields)
            pipe.evalsha(self._rebase.sha, 1, account_key(number), acct.get("last_line_id") or 0,
                         acct["balance_micro"], day, acct.get("today_s") or 0)
            pipe.hincrby(account_key(number), "v", 1)
            for callerid in acct.get("callerids") or ():
                pipe.set(callerid_key(callerid), number)
            if acct.get("pin"):
                pipe.set(pin_key(acct["pin"]), number)
            count += 1
            if count % 1000 == 0:
                await self._guard(pipe.execute())
        await self._guard(pipe.execute())
        return count

    async def mark_synced(self, now_s: float) -> None:
        await self._guard(self.client.set(SYNCED_KEY, str(int(now_s))))

    async def is_synced(self) -> bool:
        return bool(await self._guard(self.client.exists(SYNCED_KEY)))

    async def put_providers(self, providers: Iterable[Mapping[str, Any]], now_s: float | None = None) -> int:
        day = utc_day(time.time() if now_s is None else now_s)
        await self._guard(self.client.script_load(self._provider_settle.source))
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(PROVIDERS_KEY)
        count = 0
        for prov in providers:
            name = prov["name"]
            pipe.hset(provider_key(name), mapping={
                "name": name,
                "dial": prov["dial_template"],
                "enabled": "1" if prov["enabled"] else "0",
                "balance_limit": str(prov["balance_limit_micro"]),
                "daily_limit_s": str(prov["daily_limit_s"]),
            })
            pipe.evalsha(self._provider_settle.sha, 1, provider_key(name), prov.get("last_line_id") or 0,
                         prov["balance_micro"], day, prov.get("today_s") or 0, "1")
            pipe.sadd(PROVIDERS_KEY, name)
            count += 1
        await self._guard(pipe.execute())
        return count


def account_to_hash(acct: Mapping[str, Any]) -> dict[str, str]:
    expires = acct.get("expires_at")
    return {
        "number": acct["number"],
        "status": acct["status"],
        "tariff": acct["tariff"],
        "balance": str(acct["balance_micro"]),
        "credit_limit": str(acct["credit_limit_micro"]),
        "max_calls": str(acct["max_calls"]),
        "daily_limit_s": str(acct.get("daily_limit_s") or 0),
        "expires_at": str(int(expires.timestamp())) if expires else "0",
        "restrict_mode": acct["restrict_mode"],
        "restrict_prefixes": ",".join(acct.get("restrict_prefixes") or ()),
        "timezone": acct["timezone"],
        "currency": acct["currency"],
    }


def account_from_hash(data: Mapping[str, str], today: str | None = None) -> AccountView:
    prefixes = data.get("restrict_prefixes", "")
    today = today or utc_day(time.time())
    return AccountView(
        number=data["number"],
        status=AccountStatus(data["status"]),
        tariff=data["tariff"],
        balance_micro=int(data["balance"]),
        credit_limit_micro=int(data["credit_limit"]),
        max_calls=int(data.get("max_calls", "0")),
        expires_at_s=int(data.get("expires_at", "0")),
        restrict_mode=RestrictMode(data.get("restrict_mode", "none")),
        restrict_prefixes=tuple(prefixes.split(",")) if prefixes else (),
        timezone=data.get("timezone", "UTC"),
        daily_limit_s=int(data.get("daily_limit_s", "0")),
        today_s=int(data.get("today_s", "0")) if data.get("day") == today else 0,
    )


def provider_from_hash(data: Mapping[str, str], today: str | None = None) -> ProviderState:
    today = today or utc_day(time.time())
    return ProviderState(
        name=data["name"],
        dial_template=data["dial"],
        enabled=data.get("enabled", "1") == "1",
        balance_micro=int(data.get("balance", "0")),
        balance_limit_micro=int(data.get("balance_limit", "0")),
        minutes_today_s=int(data.get("today_s", "0")) if data.get("day") == today else 0,
        daily_limit_s=int(data.get("daily_limit_s", "0")),
    )
