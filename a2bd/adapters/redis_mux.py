"""One Redis connection carrying many commands in flight: the authorization path's round trip.

Why not redis-py here (it serves everything else): its asyncio client checks a connection out of a pool
for every command: an HGETALL cost 149 µs of client CPU on this machine's cores, against 45 µs here
(bench/agi_authorize.py prints both, "Redis calls alone"; bench/RESULTS.md). Redis answers the
commands of one connection in order, so commands can be written back to back from any number of
coroutines and their replies matched first-in first-out. The bytes are packed and
parsed by hiredis, the same C parser redis-py uses; URLs are read by redis-py's own parse_url.

Timeouts cost one timer per connection, not one per command: if the oldest command in flight has waited
longer than `timeout_s`, Redis (or the path to it) is stuck, every command behind it is failed with
StoreUnavailable, and the connection is dropped. The next command reconnects. Single node only: a Redis
Cluster would need one of these per node, chosen by the key's slot (every key of an account already
shares one hash tag).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import time
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.connection import parse_url

from a2bd.errors import StoreUnavailable


class _Resp(asyncio.Protocol):
    """The connection: writes packed commands, feeds bytes to hiredis, resolves futures in order."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(encoding="utf-8", errors="replace")
        self.pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.lost: StoreUnavailable | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        # Commands written in one turn of the event loop go out in one write: on this VM a loopback send()
        # costs ~150 us of CPU, more than the command, and at a few thousand calls/s many calls' commands
        # meet in the same turn. The flush is the next callback of the loop: no timer, no added wait.
        self._out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Any loop's stream transport (uvloop's does not subclass asyncio.Transport).
        self.transport = transport  # type: ignore[assignment]

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        return self.send_many(1, packed)[0]

    def send_many(self, count: int, packed: bytes) -> list[asyncio.Future[Any]]:
        """`count` commands packed back to back, written at once: one future per reply, in order."""
        if self.lost is not None or self.transport is None:
            raise self.lost or StoreUnavailable("Redis connection is not open")
        deadline = time.monotonic() + self.timeout_s
        futures = [self._loop.create_future() for _ in range(count)]
        self._write(packed)
        self.pending.extend((future, deadline) for future in futures)
        if self._timer is None:
            self._timer = self._loop.call_later(self.timeout_s, self._check_deadline)
        return futures

    def _write(self, packed: bytes) -> None:
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(packed)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and self.lost is None:
            self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.pending:
                self._fail(StoreUnavailable("Redis sent a reply nobody asked for"))
                return
            future, _ = self.pending.popleft()
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(StoreUnavailable(f"Redis connection lost: {exc or 'closed by the server'}"))

    def _check_deadline(self) -> None:
        self._timer = None
        if not self.pending:
            return
        overdue = self.pending[0][1] - time.monotonic()
        if overdue <= 0:
            self._fail(StoreUnavailable(f"Redis did not answer within {self.timeout_s} s"))
        else:
            self._timer = self._loop.call_later(overdue, self._check_deadline)

    def _fail(self, error: StoreUnavailable) -> None:
        """Fail every command in flight and drop the connection (replies could no longer be matched)."""
        if self.lost is None:
            self.lost = error
        while self.pending:
            future, _ = self.pending.popleft()
            if not future.done():
                future.set_exception(error)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()


class RedisMux:
    def __init__(self, url: str, timeout_s: float) -> None:
        self.options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self.timeout_s = timeout_s
        self._resp: _Resp | None = None
        self._connecting: asyncio.Task[_Resp] | None = None
        # After a failed connect, calls fail at once for one timeout period instead of each waiting a
        # full timeout on a Redis that is not there: a call storm must not queue behind a dead server.
        self._down_until = 0.0
        self._down: StoreUnavailable | None = None

    async def execute(self, *args: str | int | bytes) -> Any:
        """Send one command and return its reply (str, int, list, None). A Redis error reply raises
        hiredis.ReplyError; an unreachable, closed or stuck Redis raises StoreUnavailable."""
        resp = self._resp
        if resp is None or resp.lost is not None:
            resp = await self._connect()
        return await resp.send(hiredis.pack_command(args))  # type: ignore[arg-type]  # stub says 1-tuple

    async def execute_many(self, commands: Sequence[Sequence[str | int | bytes]]) -> list[Any]:
        """Send many commands in one write and return their replies in order. A Redis error reply is
        returned in its place (hiredis.ReplyError), not raised; a lost or stuck Redis raises
        StoreUnavailable. No task per command: the ledger writer settles hundreds of accounts a batch."""
        if not commands:
            return []
        resp = self._resp
        if resp is None or resp.lost is not None:
            resp = await self._connect()
        packed = b"".join(hiredis.pack_command(tuple(c)) for c in commands)  # type: ignore[arg-type]
        futures = resp.send_many(len(commands), packed)
        replies: list[Any] = await asyncio.gather(*futures, return_exceptions=True)
        for reply in replies:
            if isinstance(reply, StoreUnavailable):
                raise reply
        return replies

    async def _connect(self) -> _Resp:
        if self._down is not None and time.monotonic() < self._down_until:
            raise self._down
        if self._connecting is None:
            # One attempt shared by every caller that needs the connection now.
            self._connecting = asyncio.get_running_loop().create_task(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, task: asyncio.Task[_Resp]) -> None:
        self._connecting = None
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            self._resp, self._down = task.result(), None
        elif isinstance(error, StoreUnavailable):
            self._down, self._down_until = error, time.monotonic() + self.timeout_s

    async def _open(self) -> _Resp:
        loop = asyncio.get_running_loop()
        opts = self.options
        try:
            async with asyncio.timeout(self.timeout_s):
                if "path" in opts:
                    _, resp = await loop.create_unix_connection(lambda: _Resp(self.timeout_s), opts["path"])
                else:
                    _, resp = await loop.create_connection(
                        lambda: _Resp(self.timeout_s), opts.get("host", "127.0.0.1"), opts.get("port", 6379)
                    )
                if opts.get("password"):
                    auth = [opts["username"], opts["password"]] if opts.get("username") else [opts["password"]]
                    await resp.send(hiredis.pack_command(("AUTH", *auth)))
                if opts.get("db"):
                    await resp.send(hiredis.pack_command(("SELECT", int(opts["db"]))))  # type: ignore[arg-type]
        except TimeoutError as exc:
            raise StoreUnavailable(f"Redis unreachable: no connection within {self.timeout_s} s") from exc
        except OSError as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc}") from exc
        except hiredis.ReplyError as exc:
            raise StoreUnavailable(f"Redis refused the connection setup: {exc}") from exc
        transport = resp.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None and "path" not in opts:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return resp

    def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._resp is not None and self._resp.transport is not None:
            self._resp.transport.close()
        self._resp = None
