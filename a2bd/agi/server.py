"""The FastAGI server: owns the sockets, limits and timeouts around the sans-I/O protocol.

One task per connection: read the environment (bounded in bytes and time), pick the handler by
``agi_network_script``, let it run commands, close at once. Anything odd (EOF, an over-long or stalled
header, garbage, an unknown script, too many connections, a failing handler) ends that one connection
with a warning line and an ``a2bd_agi_rejected{reason}`` count, and never blocks the loop or other calls.

FastAGI has no authentication, so the first gate is the peer's address: only 127.0.0.1, ::1, the
configured Asterisk servers' FastAGI addresses and ``agi.allow`` may connect; any other connection is
closed before a byte of it is read (reason ``peer``). At ``agi.max_connections``, a connection that has
waited ``agi.shed_after_s`` for its environment is closed (``shed_slow``) to make room for the new one, so
slow or silent clients cannot hold every slot while Asterisk's calls are refused (``over_capacity``).

Each connection's task runs in its own copy of the contextvars: what a session binds with
``structlog.contextvars.bind_contextvars`` (its uniqueid and peer here, its account and server in the
handler) is on every log line of that call, and on no other call's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Self, TypeAlias, cast

import structlog
from structlog.typing import FilteringBoundLogger

from a2bd.agi.protocol import (
    AgiEnvironment,
    AgiReply,
    Hangup,
    OverrunError,
    ReplyStream,
    format_command,
    parse_environment,
)
from a2bd.config import AgiSettings
from a2bd.errors import ConfigError, ProtocolError
from a2bd.observability import AGI_ACTIVE, AGI_REJECTED, AGI_SESSIONS, LogThrottle

__all__ = ["AgiServer", "AgiSession", "Handler"]

# How long close() waits for cancelled sessions to unwind (they only run finally blocks by then).
_CANCEL_WAIT_S = 1.0
# Always allowed: an Asterisk on the same host. Only these two, not all of 127.0.0.0/8, so that a test can
# connect from 127.0.0.2 and be a stranger.
_LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
# How long start() waits for the addresses of an Asterisk server given by name.
_RESOLVE_TIMEOUT_S = 5.0
# Verdicts on peer addresses, remembered so that a session pays one dict probe; cleared when this big.
_PEER_CACHE = 4096

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class AgiSession:
    """One FastAGI connection whose environment has been read: what a handler talks to.

    `env` is the parsed environment, `peer` the (host, port) of the Asterisk that connected, `hungup`
    becomes True once Asterisk has written ``HANGUP`` (the caller hung up; dead-safe commands such as
    SET VARIABLE still work). `failure` names what broke the session (``eof``, ``timeout``, ``overrun``,
    ``malformed``) after execute() raised because of Asterisk, else None.
    """

    __slots__ = ("_reader", "_replies", "_timeout_s", "_writer", "env", "failure", "hungup", "peer")

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
        # Bytes held for replies never pass `limit`: an unfinished line that long is an overrun.
        self._replies = ReplyStream(limit)

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
        # The replies to a pipelined batch arrive together: one read takes what is there and the stream
        # splits it into lines, rather than one readuntil() (and one trip through the event loop) per
        # line. Bytes after the last reply (a HANGUP) stay in the stream for the next batch.
        replies: list[AgiReply] = []
        stream = self._replies
        next_event = stream.next_event
        try:
            while len(replies) < count:
                event = next_event()
                if event is None:
                    chunk = await self._reader.read(stream.room)  # room > 0 whenever next_event() is None
                    if not chunk:
                        self.failure = "eof"
                        raise ProtocolError("Asterisk closed the connection before replying")
                    stream.feed(chunk)
                elif isinstance(event, Hangup):
                    self.hungup = True
                else:
                    replies.append(event)
            return replies
        except ConnectionError as exc:
            self.failure = "eof"
            raise ProtocolError(f"AGI connection lost while waiting for a reply: {exc}") from exc
        except OverrunError:
            self.failure = "overrun"
            raise
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

    Connections are accepted from 127.0.0.1, ::1, ``settings.allow`` and `peers`: the addresses (or
    networks, or host names, resolved once by start()) the configured Asterisk servers connect from.
    """

    def __init__(
        self,
        settings: AgiSettings,
        handlers: Mapping[str, Handler],
        *,
        peers: Iterable[str] = (),
        logger: FilteringBoundLogger | None = None,
    ) -> None:
        self._settings = settings
        self._handlers = dict(handlers)
        self._peers = tuple(peers)
        self._log: FilteringBoundLogger = (
            logger if logger is not None else structlog.get_logger("a2bd.agi")
        )
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Connections still reading their environment, oldest first (dicts keep insertion order), with
        # when they were accepted and their writer: the candidates for shedding at capacity.
        self._waiting: dict[asyncio.Task[None], tuple[float, asyncio.StreamWriter, tuple[str, int]]] = {}
        # Tasks shed at capacity whose connection is aborted but which have not ended yet: not counted
        # against max_connections any more.
        self._leaving: set[asyncio.Task[None]] = set()
        self._allowed: tuple[Network, ...] = _LOOPBACK
        self._peer_networks: tuple[Network, ...] = ()  # the `peers`, resolved by start()
        self._peer_ok: dict[str, bool] = {}
        # Rejected connections (a stranger, over capacity, shed, malformed, overrun, too slow...) are what a
        # flood or a scan produces at the rate it connects: logged once per reason and address every 10 s; the
        # counter counts them all.
        self._throttle = LogThrottle()
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start accepting. Raises OSError when the address is taken, ConfigError when a peer
        given by name does not resolve."""
        if self._server is not None:
            raise RuntimeError("AgiServer.start() called twice")
        settings = self._settings
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._peer_networks = await self._resolve_peers()
        self._allowed = self._networks(self._settings)  # as they are now: a reconfigure() may have come
        self._peer_ok.clear()
        self._server = await asyncio.start_server(
            self._accept,
            settings.host,
            settings.port,
            # The stream limit bounds every readuntil(): the environment block and each reply line.
            limit=settings.max_env_bytes,
            # A call storm arrives as a burst of connects; let the kernel queue up to the cap of them.
            backlog=max(128, settings.max_connections),
        )

    def reconfigure(self, settings: AgiSettings) -> None:
        """Apply `settings.allow` and `settings.shed_after_s` to the running server (SIGHUP). The rest of
        `settings` is bound at start and ignored here. Sessions under way go on, whatever their address;
        the new allow list judges the next connection."""
        new = dataclasses.replace(self._settings, allow=settings.allow, shed_after_s=settings.shed_after_s)
        allowed = self._networks(new)  # raises on a bad entry before anything changes
        self._settings, self._allowed = new, allowed
        self._peer_ok.clear()

    @property
    def shed_after_s(self) -> float:
        return self._settings.shed_after_s

    def _networks(self, settings: AgiSettings) -> tuple[Network, ...]:
        networks = [*_LOOPBACK, *(ipaddress.ip_network(e) for e in settings.allow_entries), *self._peer_networks]
        return tuple(dict.fromkeys(networks))

    async def _resolve_peers(self) -> tuple[Network, ...]:
        networks: list[Network] = []
        assert self._loop is not None
        for entry in self._peers:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            # An [[asterisk]] host given by name, without agi_addresses: its addresses as of now.
            try:
                async with asyncio.timeout(_RESOLVE_TIMEOUT_S):
                    infos = await self._loop.getaddrinfo(entry, None, type=socket.SOCK_STREAM)
            except (OSError, TimeoutError) as exc:
                raise ConfigError(
                    f"FastAGI peer {entry!r} is not an address and does not resolve ({exc or 'timeout'}): "
                    "list the addresses its FastAGI connections come from in [[asterisk]] agi_addresses"
                ) from exc
            networks.extend(ipaddress.ip_network(info[4][0]) for info in infos)
            self._log.info("agi peer resolved", peer=entry, addresses=sorted({str(i[4][0]) for i in infos}))
        return tuple(networks)

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

    @property
    def allowed(self) -> tuple[Network, ...]:
        """The addresses and networks connections are accepted from (loopback alone before start())."""
        return self._allowed

    # -- connections -------------------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        if not self._is_allowed(peer[0]):
            # Closed before a byte is read: FastAGI has no authentication, the address is the only gate.
            writer.close()
            self._reject("peer", peer)
            return
        if self._closing:
            # Accepted by the kernel just before close() stopped the listener.
            self._log.warning("agi connection refused during shutdown", peer=_show(peer))
            writer.close()
            return
        assert self._loop is not None
        now = self._loop.time()
        if len(self._tasks) - len(self._leaving) >= self._settings.max_connections and not self._shed(now):
            # Refuse before spending anything on it: Asterisk sees the close, AGISTATUS=FAILURE, A2B_STATUS
            # stays unset and the dialplan denies the call.
            writer.close()
            self._reject("over_capacity", peer, active=len(self._tasks) - len(self._leaving))
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Replies are a few bytes each; never let Nagle hold one back waiting for an ACK.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self._loop.create_task(self._serve(reader, writer, peer))
        self._tasks.add(task)
        self._waiting[task] = (now, writer, peer)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._leaving.discard(task)
        self._waiting.pop(task, None)

    def _is_allowed(self, host: str) -> bool:
        verdict = self._peer_ok.get(host)
        if verdict is None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                verdict = False  # not an IP peer (a Unix socket): nothing configured can match it
            else:
                verdict = any(address in network for network in self._allowed)
            if len(self._peer_ok) >= _PEER_CACHE:
                self._peer_ok.clear()
            self._peer_ok[host] = verdict
        return verdict

    def _shed(self, now: float) -> bool:
        """At capacity: close the connection that has waited longest for its environment, if it has waited
        `shed_after_s` (Asterisk writes it as soon as it connects). True when a slot was freed."""
        oldest = next(iter(self._waiting.items()), None)
        if oldest is None:
            return False  # every slot is a call in progress: the cap is real load
        task, (since, writer, peer) = oldest
        if now - since < self._settings.shed_after_s:
            return False  # the slowest is still young: a burst of honest calls, keep them
        del self._waiting[task]
        self._leaving.add(task)
        writer.transport.abort()  # its readuntil() ends at once; _read_environment() sees it left
        self._reject("shed_slow", peer, waited_s=round(now - since, 3))
        return True

    def _reject(self, reason: str, peer: tuple[str, int], **fields: object) -> None:
        """Count a rejected connection; log it once per reason and address every 10 s (a flood of bad
        connections from one address is one line, then one with how many were `suppressed`)."""
        AGI_REJECTED.labels(reason).inc()
        suppressed = self._throttle.allow((reason, peer[0]))
        if suppressed is not None:
            self._log.warning("agi connection rejected", reason=reason, peer=_show(peer), suppressed=suppressed,
                              **fields)

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

    async def _read_environment(self, reader: asyncio.StreamReader, peer: tuple[str, int]) -> bytes | None:
        """The environment block, or None after the connection was rejected (counted and logged)."""
        settings = self._settings
        task = cast("asyncio.Task[None]", asyncio.current_task())
        fields: dict[str, object]
        try:
            # One deadline for the whole block, not one per read: a client that trickles a byte at a time
            # is cut at env_timeout_s all the same. Asterisk writes the block line by line and it arrives
            # in 2-3 TCP chunks (transcripts 01-10); the stream limit (max_env_bytes) bounds what a peer can
            # make us buffer.
            async with asyncio.timeout(settings.env_timeout_s):
                block = await reader.readuntil(b"\n\n")
        except asyncio.IncompleteReadError as exc:
            reason, fields = "eof", {"received_bytes": len(exc.partial)}
        except (asyncio.LimitOverrunError, ValueError):
            reason, fields = "overrun", {"limit_bytes": settings.max_env_bytes}
        except TimeoutError:
            reason, fields = "timeout", {"env_timeout_s": settings.env_timeout_s}
        except ConnectionError as exc:
            reason, fields = "eof", {"error": str(exc)}
        else:
            if task in self._leaving:
                return None  # shed at capacity just as its block came: counted as shed_slow already
            del self._waiting[task]
            return block
        self._waiting.pop(task, None)
        if task not in self._leaving:  # a shed connection ends here too: it was counted when it was shed
            self._reject(reason, peer, **fields)
        return None

    async def _run(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: tuple[str, int]
    ) -> None:
        settings = self._settings
        block = await self._read_environment(reader, peer)
        if block is None:
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



def _peer(writer: asyncio.StreamWriter) -> tuple[str, int]:
    info = writer.get_extra_info("peername")
    if isinstance(info, tuple) and len(info) >= 2:  # IPv6 adds flowinfo and scope id
        return str(info[0]), int(info[1])
    return (str(info) if info else "?", 0)


def _show(peer: tuple[str, int]) -> str:
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
