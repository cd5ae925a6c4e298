"""Redis: the hot state authorization reads and reserves against.

Keys (every key of one account carries the hash tag {acct:N}, so its scripts stay in one slot of a
Redis Cluster):

    a2b:{acct:N}           hash   number, status, tariff, balance, credit_limit, max_calls, expires_at,
                                  restrict_mode, restrict_prefixes (comma-separated), timezone, currency,
                                  held (sum of the live calls' holds: written only by the Lua scripts),
                                  v (version: bumped by every load from PostgreSQL, so a daemon that
                                  keeps the account's static fields in memory knows when they changed)
    a2b:{acct:N}:calls     hash   live calls: call id -> hold_micro
    a2b:{acct:N}:expiry    zset   live calls by expiry (Unix ms): a call never settled stops counting
    a2b:cid:<callerid>     string account number owning this caller ID
    a2b:pin:<pin>          string account number owning this PIN
    a2b:prov:<name>        hash   name, dial, enabled, balance, balance_limit, daily_limit_s, today_s
    a2b:providers          set    provider names

Money is integer micro-units in decimal text. Every call is bounded by the client's socket timeout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
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


def live_keys(number: str) -> list[str]:
    """KEYS of the reserve/release scripts, in their order."""
    return [account_key(number), calls_key(number), expiry_key(number)]


def callerid_key(callerid: str) -> str:
    return f"a2b:cid:{callerid}"


def pin_key(pin: str) -> str:
    return f"a2b:pin:{pin}"


def provider_key(name: str) -> str:
    return f"a2b:prov:{name}"


PROVIDERS_KEY = "a2b:providers"


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


class RedisStore:
    """`client` (redis-py) for everything but the authorization path, which goes through `mux`."""

    def __init__(self, client: aioredis.Redis, mux: RedisMux) -> None:
        self.client = client
        self.mux = mux
        self._reserve = Script("reserve")
        self._release = Script("release")

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
        for script in (self._reserve, self._release):
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
        data = dict(zip(flat[::2], flat[1::2], strict=True))
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
        self, number: str, call_id: str, hold_micro: int, now_ms: int, expires_ms: int, version: str = ""
    ) -> Reservation | None:
        """Reserve atomically (reserve.lua). None: the account is no longer at `version`; nothing was
        reserved."""
        reply = await self._guard(
            self._reserve(self.mux, live_keys(number), [call_id, hold_micro, now_ms, expires_ms, version])
        )
        outcome, credit, live = reply
        if outcome == "STALE":
            return None
        return Reservation(ReserveOutcome(outcome), int(credit), int(live))

    async def release(self, number: str, call_id: str) -> bool:
        """Drop a reservation whose call will never be billed (the caller hung up during the AGI)."""
        return bool(await self._guard(self._release(self.mux, live_keys(number), [call_id])))

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

    async def put_accounts(self, accounts: Iterable[Mapping[str, Any]]) -> int:
        """Write account hashes and their caller-ID/PIN indexes. Live calls are left as they are."""
        pipe = self.client.pipeline(transaction=False)
        count = 0
        for acct in accounts:
            number = acct["number"]
            fields: dict[Any, Any] = account_to_hash(acct)  # redis-py's Mapping type is invariant in str
            pipe.hset(account_key(number), mapping=fields)
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

    async def put_providers(self, providers: Iterable[Mapping[str, Any]]) -> int:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(PROVIDERS_KEY)
        count = 0
        for prov in providers:
            name = prov["name"]
            pipe.hset(provider_key(name), mapping={
                "name": name,
                "dial": prov["dial_template"],
                "enabled": "1" if prov["enabled"] else "0",
                "balance": str(prov["balance_micro"]),
                "balance_limit": str(prov["balance_limit_micro"]),
                "daily_limit_s": str(prov["daily_limit_s"]),
            })
            pipe.hsetnx(provider_key(name), "today_s", "0")
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
        "expires_at": str(int(expires.timestamp())) if expires else "0",
        "restrict_mode": acct["restrict_mode"],
        "restrict_prefixes": ",".join(acct.get("restrict_prefixes") or ()),
        "timezone": acct["timezone"],
        "currency": acct["currency"],
    }


def account_from_hash(data: Mapping[str, str]) -> AccountView:
    prefixes = data.get("restrict_prefixes", "")
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
    )


def provider_from_hash(data: Mapping[str, str]) -> ProviderState:
    return ProviderState(
        name=data["name"],
        dial_template=data["dial"],
        enabled=data.get("enabled", "1") == "1",
        balance_micro=int(data.get("balance", "0")),
        balance_limit_micro=int(data.get("balance_limit", "0")),
        minutes_today_s=int(data.get("today_s", "0")),
        daily_limit_s=int(data.get("daily_limit_s", "0")),
    )
