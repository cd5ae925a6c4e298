"""The FastAGI server: owns the sockets, limits and timeouts around the sans-I/O protocol.

One task per connection: read the environment (bounded in bytes and time), pick the handler by
``agi_network_script``, let it run commands, close at once. Anything odd (EOF, an over-long or stalled
header, garbage, an unknown script, too many connections, a failing handler) ends that one connection
with a warning line and an ``a2bd_agi_rejected{reason}`` count, and never blocks the loop or other calls.

Each connection's task runs in its own copy of the contextvars: what a session binds with
``structlog.contextvars.bind_contextvars`` (its uniqueid and peer here, its account and server in the
handler) is on every log line of that call, and on no other call's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Self

import structlog
from structlog.typing import FilteringBoundLogger

from a2bd.agi.protocol import AgiEnvironment, AgiReply, Hangup, ReplyReader, format_command, parse_environment
from a2bd.config import AgiSettings
from a2bd.errors import ProtocolError
from a2bd.observability import AGI_ACTIVE, AGI_REJECTED, AGI_SESSIONS

__all__ = ["AgiServer", "AgiSession", "Handler"]

# How long close() waits for cancelled sessions to unwind (they only run finally blocks by then).
_CANCEL_WAIT_S = 1.0


class AgiSession:
    """One FastAGI connection whose environment has been read: what a handler talks to.

    `env` is the parsed environment, `peer` the (host, port) of the Asterisk that connected, `hungup`
    becomes True once Asterisk has written ``HANGUP`` (the caller hung up; dead-safe commands such as
    SET VARIABLE still work). `failure` names what broke the session (``eof``, ``timeout``, ``overrun``,
    ``malformed``) after execute() raised because of Asterisk, else None.
    """

    __slots__ = ("_limit", "_pending", "_reader", "_replies", "_timeout_s", "_writer", "env", "failure", "hungup",
                 "peer")

    def __init__(
        self,
        env: AgiEnvironment,
        peer: tuple[str, int],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        command_timeout_s: float,
        limit: int = 16384,
    ) -> None:
        self.env = env
        self.peer = peer
        self.hungup = False
        self.failure: str | None = None
        self._reader = reader
        self._writer = writer
        self._timeout_s = command_timeout_s
        self._replies = ReplyReader()
        self._pending = b""
        self._limit = limit

    async def execute(self, *commands: bytes, timeout_s: float | None = None) -> list[AgiReply]:
        """Send `commands` (each one LF-terminated line, see protocol.format_command) and return one reply
        per command, in order.

        All commands go out in one write: Asterisk reads them one by one from its socket buffer, so
        pipelining saves a round trip per command. ``HANGUP`` lines between replies set `hungup` and are
        skipped. Every reply must have arrived within `timeout_s` (default ``command_timeout_s``) of the
        write, one deadline for the batch: Asterisk answers a batch of SET VARIABLE in microseconds,
        and a command that waits for the caller (GET DATA) passes its own bound. Else TimeoutError; EOF
        or a line that is not a reply raises ProtocolError. After either, the session is unusable.
        """
        if self.failure is not None:
            raise ProtocolError(f"AGI session already failed ({self.failure}); no more commands")
        if not commands:
            return []
        for command in commands:
            # One reply is read per command: a command that is not exactly one line would desynchronise
            # the replies from the commands (and is how a command gets injected).
            if not command.endswith(b"\n") or command.count(b"\n") != 1:
                raise ValueError(f"an AGI command must be exactly one LF-terminated line: {command[:80]!r}")
        self._writer.write(commands[0] if len(commands) == 1 else b"".join(commands))
        bound = self._timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(bound):
                return await self._read_replies(len(commands))
        except TimeoutError as exc:
            self.failure = "timeout"
            raise TimeoutError(f"no reply from Asterisk within {bound} s") from exc

    async def command(self, *words: str, timeout_s: float | None = None) -> AgiReply:
        """Format one command from `words` (quoted as needed), send it and return its reply."""
        return (await self.execute(format_command(*words), timeout_s=timeout_s))[0]

    async def _read_replies(self, count: int) -> list[AgiReply]:
        # The replies to a pipelined batch arrive together: read what is there and split it into lines,
        # rather than one readuntil() (and one trip through the event loop) per line. Bytes after the
        # last reply (a HANGUP) wait in _pending for the next batch.
        replies: list[AgiReply] = []
        feed = self._replies.feed_line
        buffer = self._pending
        try:
            while True:
                start = 0
                while len(replies) < count:
                    end = buffer.find(b"\n", start)
                    if end < 0:
                        break
                    event = feed(buffer[start:end])
                    start = end + 1
                    if event is None:
                        continue  # inside a 520- usage block
                    if isinstance(event, Hangup):
                        self.hungup = True
                        continue
                    replies.append(event)
                buffer = buffer[start:]
                if len(replies) == count:
                    self._pending = buffer
                    return replies
                if len(buffer) > self._limit:
                    self.failure = "overrun"
                    raise ProtocolError("AGI reply line is longer than the stream limit (agi.max_env_bytes)",
                                        buffer[:120])
                chunk = await self._reader.read(65536)
                if not chunk:
                    self.failure = "eof"
                    raise ProtocolError("Asterisk closed the connection before replying", buffer)
                buffer += chunk
        except ConnectionError as exc:
            self.failure = "eof"
            raise ProtocolError(f"AGI connection lost while waiting for a reply: {exc}") from exc
        except ProtocolError:
            if self.failure is None:
                self.failure = "malformed"
            raise


Handler = Callable[[AgiSession], Awaitable[None]]


class AgiServer:
    """FastAGI server dispatching on ``agi_network_script`` to `handlers`.

    ``await start()`` binds ``settings.host:settings.port`` (port 0 picks a free port, see `port`);
    ``await close(grace_s)`` stops accepting, lets sessions in flight finish for up to `grace_s` seconds,
    then cancels the rest. Usable as ``async with AgiServer(...) as server:``.
    """

    def __init__(
        self,
        settings: AgiSettings,
        handlers: Mapping[str, Handler],
        *,
        logger: FilteringBoundLogger | None = None,
    ) -> None:
        self._settings = settings
        self._handlers = dict(handlers)
        self._log: FilteringBoundLogger = (
            logger if logger is not None else structlog.get_logger("a2bd.agi")
        )
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start accepting. Raises OSError when the address is taken."""
        if self._server is not None:
            raise RuntimeError("AgiServer.start() called twice")
        settings = self._settings
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._server = await asyncio.start_server(
            self._accept,
            settings.host,
            settings.port,
            # The stream limit bounds every readuntil(): the environment block and each reply line.
            limit=settings.max_env_bytes,
            # A call storm arrives as a burst of connects; let the kernel queue up to the cap of them.
            backlog=max(128, settings.max_connections),
        )

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop accepting, wait up to `grace_s` seconds for sessions in flight, then cancel the rest."""
        server = self._server
        if server is None:
            return
        self._closing = True
        # New calls now get "connection refused" at once, and Asterisk's dialplan denies them.
        server.close()
        pending: set[asyncio.Task[None]] = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace_s)
        if pending:
            self._log.warning("agi sessions cancelled at shutdown", count=len(pending), grace_s=grace_s)
            for task in pending:
                task.cancel()
            _, stuck = await asyncio.wait(pending, timeout=_CANCEL_WAIT_S)
            if stuck:
                self._log.error("agi sessions ignored cancellation", count=len(stuck))
        # Since Python 3.12 wait_closed() also waits for every connection to be gone: bound it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CANCEL_WAIT_S):
                await server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def sockets(self) -> Sequence[socket.socket]:
        """The listening sockets (empty before start())."""
        if self._server is None:
            return ()
        return tuple(self._server.sockets)

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0). Raises RuntimeError before start()."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("AgiServer is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def active(self) -> int:
        """Connections being served right now (reading their environment or in a handler)."""
        return len(self._tasks)

    # -- connections -------------------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        if self._closing:
            # Accepted by the kernel just before close() stopped the listener.
            self._log.warning("agi connection refused during shutdown", peer=_show(peer))
            writer.close()
            return
        if len(self._tasks) >= self._settings.max_connections:
            # Refuse before spending anything on it: Asterisk sees the close, AGISTATUS=FAILURE, A2B_STATUS
            # stays unset and the dialplan denies the call.
            self._reject("over_capacity", peer, active=len(self._tasks))
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Replies are a few bytes each; never let Nagle hold one back waiting for an ACK.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self._loop is not None
        task = self._loop.create_task(self._serve(reader, writer, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: tuple[str, int]
    ) -> None:
        AGI_ACTIVE.inc()
        try:
            await self._run(reader, writer, peer)
        finally:
            AGI_ACTIVE.dec()
            # Close at once, without waiting for Asterisk's trailing HANGUP: Asterisk keeps the channel
            # (and the caller) alive for as long as this socket stays open (transcript 10).
            writer.close()

    async def _run(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: tuple[str, int]
    ) -> None:
        settings = self._settings
        try:
            async with asyncio.timeout(settings.env_timeout_s):
                # Asterisk writes the block line by line and it arrives in 2-3 TCP chunks (transcripts 01-10);
                # the stream limit (max_env_bytes) bounds what a peer can make us buffer.
                block = await reader.readuntil(b"\n\n")
        except asyncio.IncompleteReadError as exc:
            self._reject("eof", peer, received_bytes=len(exc.partial))
            return
        except (asyncio.LimitOverrunError, ValueError):
            self._reject("overrun", peer, limit_bytes=settings.max_env_bytes)
            return
        except TimeoutError:
            self._reject("timeout", peer, env_timeout_s=settings.env_timeout_s)
            return
        except ConnectionError as exc:
            self._reject("eof", peer, error=str(exc))
            return
        try:
            env = parse_environment(block)
        except ProtocolError as exc:
            self._reject("malformed", peer, error=str(exc))
            return
        script = env.script
        handler = self._handlers.get(script)
        if handler is None:
            # Send nothing: A2B_STATUS stays unset and the dialplan denies. The name is the peer's text,
            # so it goes to the log (truncated) but never into a metric label.
            self._reject("unknown_script", peer, script=script[:100], uniqueid=env.uniqueid[:64])
            return
        AGI_SESSIONS.labels(script).inc()
        # This task's own context (a copy made by create_task in _accept): nothing leaks to other calls.
        structlog.contextvars.bind_contextvars(uniqueid=env.uniqueid, peer=_show(peer))
        session = AgiSession(env, peer, reader, writer, settings.command_timeout_s, settings.max_env_bytes)
        try:
            await handler(session)
        except Exception as exc:  # a handler bug ends its own call only; CancelledError passes through
            if session.failure is not None:
                AGI_REJECTED.labels(session.failure).inc()
                self._log.warning(
                    "agi session failed",
                    reason=session.failure,
                    peer=_show(peer),
                    script=script,
                    uniqueid=env.uniqueid,
                    error=str(exc),
                )
            else:
                AGI_REJECTED.labels("handler_error").inc()
                self._log.error(
                    "agi handler failed",
                    reason="handler_error",
                    peer=_show(peer),
                    script=script,
                    uniqueid=env.uniqueid,
                    exc_info=exc,
                )

    def _reject(self, reason: str, peer: tuple[str, int], **fields: object) -> None:
        AGI_REJECTED.labels(reason).inc()
        self._log.warning("agi connection rejected", reason=reason, peer=_show(peer), **fields)


def _peer(writer: asyncio.StreamWriter) -> tuple[str, int]:
    info = writer.get_extra_info("peername")
    if isinstance(info, tuple) and len(info) >= 2:  # IPv6 adds flowinfo and scope id
        return str(info[0]), int(info[1])
    return (str(info) if info else "?", 0)


def _show(peer: tuple[str, int]) -> str:
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
