"""The asyncio AMI client: one connection to one Asterisk, kept logged in, with actions and an event stream.

Built for billing, where a lost or doubled event is lost or doubled money, after panoramisk 1.4 failed on
a real Asterisk 22 (a raising callback or a non-Async Originate killed the connection, requests hung
forever when the connection dropped, a wrong secret retried silently, its ping never checked the reply):

* No callbacks. Every event goes, in the order Asterisk sent it, into ONE bounded queue read by one
  consumer (``async for item in client.events()``). A slow consumer makes the reader wait (backpressure,
  counted in `backpressure_waits`); an event is never dropped. A consumer that raises only stops itself.
* The stream also carries `AmiConnected` / `AmiDisconnected` markers in order with the events, so the
  consumer (the call tracker) knows when it may have missed events and must reconcile (CoreShowChannels).
* Every request ends: with its reply (matched by ActionID; ``Response: Error`` is a reply, not an
  exception), with AmiTimeout, or with AmiUnavailable the moment the connection drops or if there was none.
  Nothing is ever re-sent after a reconnect: an action such as Hangup must not run twice unseen.
* A Ping every `ping_interval_s` must be answered within `ping_timeout_s`, else the connection is treated
  as dead (a server or NAT that keeps the socket open but silent) and replaced.
* A refused login raises AmiAuthError from ``start()``; on a later reconnect it logs an error, sets the
  state to ``auth_failed`` and stops: retrying a wrong secret forever would hide the fault.
* The secret is never logged nor shown in ``repr``; it is sent only after the server's banner proved it
  is an AMI server.

Reading is one task per connection that feeds what ``read(65536)`` returns to the sans-I/O AmiParser and
dispatches synchronously (no task per event): replies resolve futures, events go to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias, TypeVar

import structlog
from structlog.typing import FilteringBoundLogger

from a2bd.ami.protocol import DEFAULT_MAX_MESSAGE_BYTES, AmiMessage, AmiParser, format_action
from a2bd.errors import AmiAuthError, AmiTimeout, AmiUnavailable, ProtocolError
from a2bd.observability import AMI_BACKPRESSURE_WAITS, AMI_CONNECTED, AMI_DISCONNECTS, AMI_RECONNECTS

__all__ = [
    "AmiClient",
    "AmiConnected",
    "AmiDisconnected",
    "AmiState",
    "AmiStreamItem",
    "Fields",
]

log: FilteringBoundLogger = structlog.get_logger("a2bd.ami")

AmiState: TypeAlias = Literal["connecting", "connected", "disconnected", "auth_failed", "closed"]
Fields: TypeAlias = Mapping[str, str] | Iterable[tuple[str, str]]

# How long close() waits for the Logoff reply ("Response: Goodbye") before closing anyway.
_LOGOFF_WAIT_S: Final = 1.0
_READ_SIZE: Final = 65536

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class AmiConnected:
    """In the event stream: logged in to `server`. `first` is False after a reconnect, when events may have
    been missed during the gap. `at` is the client's clock at login."""

    server: str
    first: bool
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class AmiDisconnected:
    """In the event stream: the connection to `server` is gone (`reason`: ``eof``, ``ping_timeout``,
    ``protocol_error``, ``error: ...``); no event arrives until the next AmiConnected."""

    server: str
    reason: str
    at: float = 0.0


AmiStreamItem: TypeAlias = AmiMessage | AmiConnected | AmiDisconnected


class _Connection:
    __slots__ = ("drop_reason", "parser", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, parser: AmiParser) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = parser
        self.drop_reason: str | None = None  # set by whoever closes it on purpose (the ping watchdog)


class _Request:
    """A plain action waiting for its ``Response``."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[AmiMessage]) -> None:
        self.future = future


class _ListRequest:
    """A list action (CoreShowChannels...): the response, then events with our ActionID until the one with
    ``EventList: Complete``."""

    __slots__ = ("abandoned", "future", "items", "name", "response")

    def __init__(self, future: asyncio.Future[tuple[AmiMessage, list[AmiMessage]]], name: str) -> None:
        self.future = future
        self.name = name
        self.response: AmiMessage | None = None
        self.items: list[AmiMessage] = []
        # Timed out (or its caller was cancelled): its late events are swallowed up to the closing one,
        # so that a late CoreShowChannels does not spill 8 CoreShowChannel events into the event stream.
        self.abandoned = False


class AmiClient:
    """A kept-up, logged-in AMI connection to one Asterisk server named `name` (used in logs and metrics).

    ``await start()`` connects and logs in (sending ``Events: <events>``; None sends no Events header, so
    the user's manager.conf read classes apply). Then ``events()`` / ``next_event()`` give the stream,
    ``action()`` / ``list_action()`` send requests, ``close()`` logs off. `on_state(name, state)` is called
    on every state change (an exception in it is logged and ignored). Times are seconds. `clock` stamps
    each message's `received_at` and the markers' `at`.
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        username: str,
        secret: str,
        *,
        events: str | None = "call,cdr",
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 5.0,
        ping_interval_s: float = 10.0,
        ping_timeout_s: float = 5.0,
        reconnect_min_s: float = 0.2,
        reconnect_max_s: float = 10.0,
        queue_size: int = 10_000,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        clock: Callable[[], float] = time.time,
        on_state: Callable[[str, str], None] | None = None,
        action_id_prefix: str | None = None,
        only_events: frozenset[str] | None = None,
    ) -> None:
        self.name = name
        self.only_events = only_events  # the events decoded and delivered (None: every one); see AmiParser
        self.host = host
        self.port = port
        self.username = username
        self._secret = secret
        self.events_filter = events
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = max(reconnect_max_s, reconnect_min_s)
        self.max_message_bytes = max_message_bytes
        self._clock = clock
        self._on_state = on_state
        # Unique per client: OriginateResponse events reach every AMI session with their ActionID, so a
        # plain counter could match another client's request.
        self._prefix = action_id_prefix if action_id_prefix is not None else f"a2bd-{secrets.token_hex(3)}"
        self._ids = itertools.count(1)
        self._log = log.bind(server=name)

        self._state: AmiState = "disconnected"
        self._queue: asyncio.Queue[AmiStreamItem | None] = asyncio.Queue(maxsize=queue_size)
        self._pending: dict[str, _Request | _ListRequest] = {}
        self._conn: _Connection | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._stream_ended = False  # no more items will be queued (closed, or gave up)
        self._ever_connected = False
        self._reader_blocked = False

        # Counters for tests and the curious; the Prometheus metrics carry the same facts.
        self.backpressure_waits = 0  # times the reader waited on a full queue
        self.backpressure_s = 0.0  # total time it waited (event loop clock)
        self.reconnects = 0  # logins after a lost connection
        self.protocol_errors = 0  # connections dropped for bytes that are not AMI (oversized message...)
        self.late_replies = 0  # replies with no waiting request (timed out before), discarded
        AMI_CONNECTED.labels(name).set(0)

    def __repr__(self) -> str:
        # Never the secret (arq printed its password in __repr__).
        return (
            f"AmiClient(name={self.name!r}, host={self.host!r}, port={self.port}, "
            f"username={self.username!r}, state={self._state!r})"
        )

    @property
    def state(self) -> AmiState:
        """``connecting``, ``connected``, ``disconnected`` (waiting to reconnect, or not started),
        ``auth_failed`` (gave up: the login was refused) or ``closed``."""
        return self._state

    @property
    def connected(self) -> bool:
        return self._state == "connected"

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self, *, wait: bool = True) -> None:
        """Connect and log in, then keep the connection up in the background.

        With `wait` (the default) the first attempt happens here: it returns once logged in, raises
        AmiAuthError if the login is refused, or AmiUnavailable if the server cannot be reached (nothing is
        left running; call start() again to retry). Without `wait` it returns at once and connects in the
        background with the usual backoff, which suits a daemon that must come up while Asterisk is down;
        a refused login then only logs an error and sets ``auth_failed``.
        """
        if self._supervisor is not None or self._state == "closed":
            raise RuntimeError(f"AmiClient {self.name}: start() called twice or after close()")
        conn: _Connection | None = None
        leftovers: list[AmiMessage] = []
        if wait:
            try:
                conn, leftovers = await self._open()
            except AmiAuthError:
                self._set_state("auth_failed")
                raise
            except (OSError, TimeoutError, ProtocolError) as exc:
                self._set_state("disconnected")
                raise AmiUnavailable(
                    f"cannot reach the AMI server {self.name} at {self.host}:{self.port}: {_describe(exc)}"
                ) from exc
        self._supervisor = asyncio.create_task(self._run(conn, leftovers), name=f"ami-{self.name}")

    async def close(self) -> None:
        """Log off (waiting at most about a second for the Goodbye), close the connection, stop the
        background tasks and fail pending requests with AmiUnavailable. Events already queued can still be
        read; then the stream ends. Idempotent."""
        if self._state == "closed":
            return
        self._closing = True
        if self._conn is not None and self._state == "connected":
            with contextlib.suppress(AmiUnavailable, TimeoutError, OSError):
                await self.action("Logoff", timeout_s=min(_LOGOFF_WAIT_S, self.request_timeout_s))
        tasks = [t for t in (self._supervisor, *self._tasks) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            # asyncio.wait does not re-raise the tasks' CancelledError, so close() itself stays cancellable.
            await asyncio.wait(tasks)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.writer.transport.abort()
        self._fail_pending(AmiUnavailable(f"AMI client {self.name} closed"))
        self._set_state("closed")
        self._end_stream()

    async def __aenter__(self) -> AmiClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the event stream ----------------------------------------------------------------------------------

    async def next_event(self) -> AmiStreamItem | None:
        """The next event or connection marker, in order; None once the client is closed (or gave up after
        a refused login) and everything queued has been read."""
        queue = self._queue
        if queue.empty():
            if self._stream_ended:
                return None
            return await queue.get()  # None: woken by the end of the stream
        return queue.get_nowait()

    async def events(self) -> AsyncIterator[AmiStreamItem]:
        """``async for item in client.events()``: next_event() until the stream ends. One consumer only."""
        while (item := await self.next_event()) is not None:
            yield item

    def queued(self) -> int:
        """Items waiting in the event queue (read, not yet taken by the consumer)."""
        return self._queue.qsize()

    # -- requests ------------------------------------------------------------------------------------------

    async def action(self, name: str, fields: Fields = (), *, timeout_s: float | None = None) -> AmiMessage:
        """Send action `name` with `fields` and return its response, matched by a fresh ActionID.

        ``Response: Error`` is returned, not raised: Hangup of a channel that is already gone answers
        ``Message: No such channel``, a normal outcome for the credit guard. Raises AmiValueError (CR/LF in
        a field; nothing sent), AmiUnavailable (not connected, or the connection dropped before the reply;
        the action may have run), AmiTimeout after `timeout_s` (default `request_timeout_s`; a late reply
        is discarded). The connection stays up after a timeout: an Originate without ``Async`` simply needs
        a `timeout_s` longer than its own ``Timeout``.
        """
        action_id, data = self._encode(name, fields)
        conn = self._connection_for(name)
        future: asyncio.Future[AmiMessage] = asyncio.get_running_loop().create_future()
        self._pending[action_id] = _Request(future)
        return await self._exchange(conn, action_id, data, future, name, timeout_s)

    async def list_action(
        self, name: str, fields: Fields = (), *, timeout_s: float | None = None
    ) -> tuple[AmiMessage, list[AmiMessage]]:
        """Send a list action (``CoreShowChannels``...) and return its response and the list's events.

        Asterisk answers ``Response: Success`` with ``EventList: start``, then one event per item carrying
        our ActionID, then a closing event with ``EventList: Complete`` and ``ListItems`` (capture 08:
        8 CoreShowChannel events, then CoreShowChannelsComplete ``ListItems: 8``). The items exclude the
        closing event; a ListItems that disagrees with their count is logged as a warning. An ``Error``
        response, or a Success without ``EventList: start``, ends the list at once with no items. The
        timeout covers the whole list. Same errors as action().
        """
        action_id, data = self._encode(name, fields)
        conn = self._connection_for(name)
        future: asyncio.Future[tuple[AmiMessage, list[AmiMessage]]] = asyncio.get_running_loop().create_future()
        self._pending[action_id] = _ListRequest(future, name)
        return await self._exchange(conn, action_id, data, future, name, timeout_s)

    def _encode(self, name: str, fields: Fields) -> tuple[str, bytes]:
        action_id = f"{self._prefix}-{next(self._ids)}"
        return action_id, format_action(name, action_id, fields)  # raises before anything is sent

    def _connection_for(self, name: str) -> _Connection:
        conn = self._conn
        if conn is None or self._state != "connected" or conn.writer.is_closing():
            raise AmiUnavailable(f"AMI {name} not sent: not connected to {self.name} (state {self._state})")
        return conn

    async def _exchange(
        self,
        conn: _Connection,
        action_id: str,
        data: bytes,
        future: asyncio.Future[_T],
        name: str,
        timeout_s: float | None,
    ) -> _T:
        bound = self.request_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(bound):
                conn.writer.write(data)
                await conn.writer.drain()
                return await future
        except TimeoutError as exc:
            raise AmiTimeout(f"no reply to AMI {name} from {self.name} within {bound} s") from exc
        except OSError as exc:  # drain() on a connection that just broke
            raise AmiUnavailable(f"AMI {name}: connection to {self.name} lost: {_describe(exc)}") from exc
        finally:
            # A reply that comes after this is counted in late_replies and dropped.
            # (A list still pending is unfinished: whatever finishes one removes it first.)
            request = self._pending.get(action_id)
            if isinstance(request, _ListRequest):
                request.abandoned = True  # stays until its closing event, or the connection, goes
                request.items.clear()
            else:
                self._pending.pop(action_id, None)

    def _fail_pending(self, error: AmiUnavailable) -> None:
        pending, self._pending = self._pending, {}
        for request in pending.values():
            if not request.future.done():
                request.future.set_exception(error)

    # -- connection ------------------------------------------------------------------------------------------

    async def _open(self) -> tuple[_Connection, list[AmiMessage]]:
        """Connect, read the banner, log in. Returns the connection (now current and ``connected``) and the
        messages that came with the login reply (FullyBooted...), to be dispatched after the marker."""
        self._set_state("connecting")
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    conn, leftovers = await self._login(reader, writer)
                except BaseException:
                    writer.transport.abort()
                    raise
        except TimeoutError as exc:
            raise TimeoutError(f"no AMI banner and login reply within {self.connect_timeout_s} s") from exc
        self._conn = conn
        self._set_state("connected")
        return conn, leftovers

    async def _login(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[_Connection, list[AmiMessage]]:
        parser = AmiParser(max_message_bytes=self.max_message_bytes, events=self.only_events)
        messages: list[AmiMessage] = []
        # The banner first (one line, no blank line after it): the secret goes only to an AMI server.
        while parser.banner is None:
            data = await reader.read(_READ_SIZE)
            if not data:
                raise ConnectionError("the server closed the connection before the AMI banner")
            messages += parser.feed(data, self._clock())
        fields = {"Username": self.username, "Secret": self._secret}
        if self.events_filter is not None:
            fields["Events"] = self.events_filter
        login_id = f"{self._prefix}-{next(self._ids)}"
        writer.write(format_action("Login", login_id, fields))
        # With all events, FullyBooted can come in the same read as the reply (every capture): keep what
        # follows the reply for the stream.
        while True:
            for i, message in enumerate(messages):
                if message.action_id == login_id and message.is_response:
                    self._check_login(message)
                    return _Connection(reader, writer, parser), messages[:i] + messages[i + 1 :]
            data = await reader.read(_READ_SIZE)
            if not data:
                raise ConnectionError("the server closed the connection before answering the login")
            messages += parser.feed(data, self._clock())

    def _check_login(self, reply: AmiMessage) -> None:
        if reply.response == "Success":  # "Message: Authentication accepted"
            return
        message = reply.get("Message", "")
        if reply.response == "Error":  # "Message: Authentication failed"
            raise AmiAuthError(
                f"AMI server {self.name} ({self.host}:{self.port}) refused the login of user "
                f"{self.username!r}: {message or 'no reason given'}. Check the user and its secret in "
                "Asterisk's manager.conf and in the a2bd settings; a2bd does not retry a refused login."
            )
        raise ProtocolError(f"unexpected reply to the AMI login: Response {reply.response!r} {message!r}")

    def _backoff_s(self, attempt: int) -> float:
        ceiling = min(self.reconnect_max_s, self.reconnect_min_s * 2 ** min(attempt, 32))
        # Jitter in [ceiling/2, ceiling], so that several daemons do not reconnect in step after a restart.
        return random.uniform(max(self.reconnect_min_s, ceiling / 2), ceiling)

    async def _run(self, conn: _Connection | None, leftovers: list[AmiMessage]) -> None:
        """Supervisor: serve the connection, and after it drops reconnect with backoff until closed."""
        attempt = 0
        while True:
            if conn is None:
                if self._closing:
                    return
                try:
                    conn, leftovers = await self._open()
                except AmiAuthError as exc:
                    self._log.error("ami login refused; not retrying", user=self.username, error=str(exc))
                    self._set_state("auth_failed")
                    self._end_stream()
                    return
                except (OSError, TimeoutError, ProtocolError) as exc:
                    self._set_state("disconnected")
                    delay = self._backoff_s(attempt)
                    attempt += 1
                    self._log.warning(
                        "ami connect failed",
                        address=f"{self.host}:{self.port}",
                        error=_describe(exc),
                        retry_in_s=round(delay, 3),
                    )
                    await asyncio.sleep(delay)
                    continue
            reason = await self._serve(conn, leftovers)
            conn, leftovers = None, []
            if self._closing:
                return
            AMI_DISCONNECTS.labels(self.name, reason.partition(":")[0]).inc()
            self._log.warning("ami connection lost", reason=reason)
            await self._emit(AmiDisconnected(self.name, reason, self._clock()))
            attempt = 1
            await asyncio.sleep(self._backoff_s(0))

    async def _serve(self, conn: _Connection, leftovers: list[AmiMessage]) -> str:
        """Run one logged-in connection until it ends; return why it ended."""
        first = not self._ever_connected
        self._ever_connected = True
        if not first:
            self.reconnects += 1
            AMI_RECONNECTS.labels(self.name).inc()
        self._log.info("ami connected", address=f"{self.host}:{self.port}", first=first, events=self.events_filter)
        watchdog: asyncio.Task[None] | None = None
        try:
            await self._emit(AmiConnected(self.name, first, self._clock()))
            for message in leftovers:
                await self._dispatch(message)
            if self.ping_interval_s > 0:
                watchdog = asyncio.create_task(self._watchdog(conn), name=f"ami-{self.name}-ping")
                self._tasks.add(watchdog)
                watchdog.add_done_callback(self._tasks.discard)
            return await self._read(conn)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            # Pending requests fail now, in the same step as the state change: no request waits on a
            # connection that is gone, and none is re-sent on the next one.
            conn.writer.transport.abort()
            if self._conn is conn:
                self._conn = None
            if not self._closing:
                self._set_state("disconnected")
            self._fail_pending(AmiUnavailable(f"AMI connection to {self.name} lost before the reply"))

    async def _read(self, conn: _Connection) -> str:
        read = conn.reader.read
        feed = conn.parser.feed
        clock = self._clock
        dispatch = self._dispatch_now
        try:
            while True:
                data = await read(_READ_SIZE)
                if not data:
                    return conn.drop_reason or "eof"
                try:
                    messages = feed(data, clock())
                except ProtocolError as exc:
                    self.protocol_errors += 1
                    self._log.warning("ami protocol error; dropping the connection", error=str(exc))
                    return "protocol_error"
                for message in messages:
                    # The fast path stays synchronous; only a full queue makes the reader wait.
                    if not dispatch(message):
                        await self._emit(message)
        except OSError as exc:  # ConnectionResetError and friends
            return conn.drop_reason or f"error: {_describe(exc)}"

    async def _dispatch(self, message: AmiMessage) -> None:
        if not self._dispatch_now(message):
            await self._emit(message)

    def _dispatch_now(self, message: AmiMessage) -> bool:
        """Route one message without waiting; False when it is an event for a full queue (emit it)."""
        index = message._index
        if "Event" in index:  # first: OriginateResponse has a Response header too (every Originate capture)
            pending = self._pending
            if pending:
                action_id = index.get("ActionID")
                if action_id is not None:
                    request = pending.get(action_id)
                    # List items carry our ActionID (CoreShowChannel, capture 08). OriginateResponse carries
                    # one too, but its Originate was answered before, so it is a plain event.
                    if isinstance(request, _ListRequest):
                        self._list_event(action_id, request, message)
                        return True
            queue = self._queue
            if queue.full():
                return False
            queue.put_nowait(message)
            return True
        if "Response" in index:
            self._on_response(message)
        else:
            self._log.warning("ami message is neither event nor response; ignored", headers=message.headers[:4])
        return True

    def _on_response(self, message: AmiMessage) -> None:
        action_id = message.action_id
        request = self._pending.get(action_id) if action_id is not None else None
        if request is None or action_id is None:
            self.late_replies += 1
            self._log.debug("ami reply with no waiting request discarded", action_id=action_id)
            return
        if isinstance(request, _Request):
            del self._pending[action_id]
            if not request.future.done():
                request.future.set_result(message)
            return
        if message.response == "Success" and (message.get("EventList") or "").lower() == "start":
            request.response = message  # the items follow
            return
        del self._pending[action_id]
        if request.abandoned:
            self.late_replies += 1
        elif not request.future.done():
            request.future.set_result((message, []))

    def _list_event(self, action_id: str, request: _ListRequest, message: AmiMessage) -> None:
        if (message.get("EventList") or "").lower() != "complete":
            if not request.abandoned:
                request.items.append(message)
            return
        del self._pending[action_id]
        if request.abandoned:
            self.late_replies += 1
            self._log.debug("ami late list discarded", action=request.name, action_id=action_id)
            return
        count = message.get("ListItems")
        if count is not None and count != str(len(request.items)):
            self._log.warning(
                "ami list item count disagrees", action=request.name, list_items=count, received=len(request.items)
            )
        if not request.future.done():
            request.future.set_result((request.response or message, request.items))

    async def _emit(self, item: AmiStreamItem) -> None:
        """Queue `item`, waiting while the queue is full: backpressure, never a dropped event."""
        queue = self._queue
        if not queue.full():
            queue.put_nowait(item)
            return
        self.backpressure_waits += 1
        AMI_BACKPRESSURE_WAITS.labels(self.name).inc()
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._reader_blocked = True
        try:
            await queue.put(item)
        finally:
            self._reader_blocked = False
            self.backpressure_s += loop.time() - started

    def _end_stream(self) -> None:
        if self._stream_ended:
            return
        self._stream_ended = True
        with contextlib.suppress(asyncio.QueueFull):
            # Wakes a consumer blocked on an empty queue. A full queue means the consumer is not waiting:
            # it drains the queue, then finds it empty with the stream ended (see next_event).
            self._queue.put_nowait(None)

    async def _watchdog(self, conn: _Connection) -> None:
        """Ping every ping_interval_s; no reply within ping_timeout_s means the connection is dead.

        While the reader itself waits on a full event queue it cannot read the Pong: that is our
        slowness, not the server's, so the deadline restarts instead of dropping a live connection.
        """
        while True:
            await asyncio.sleep(self.ping_interval_s)
            if self._conn is not conn:
                return
            action_id, data = self._encode("Ping", ())
            future: asyncio.Future[AmiMessage] = asyncio.get_running_loop().create_future()
            # If this task is cancelled as the connection drops, _fail_pending still sets the future's
            # exception: mark it retrieved so asyncio does not report it.
            future.add_done_callback(_retrieve)
            self._pending[action_id] = _Request(future)
            try:
                conn.writer.write(data)
                waits = self.backpressure_waits
                while True:
                    done, _ = await asyncio.wait({future}, timeout=self.ping_timeout_s)
                    if done:
                        future.result()  # raises AmiUnavailable if the connection dropped meanwhile
                        break
                    if self._reader_blocked or self.backpressure_waits != waits:
                        waits = self.backpressure_waits
                        continue
                    self._log.warning(
                        "ami server did not answer Ping; dropping the connection", timeout_s=self.ping_timeout_s
                    )
                    conn.drop_reason = "ping_timeout"
                    conn.writer.transport.abort()
                    return
            except AmiUnavailable:
                return
            finally:
                self._pending.pop(action_id, None)

    def _set_state(self, state: AmiState) -> None:
        if state == self._state:
            return
        self._state = state
        AMI_CONNECTED.labels(self.name).set(1 if state == "connected" else 0)
        if self._on_state is not None:
            try:
                self._on_state(self.name, state)
            except Exception:  # a hook must not break the connection
                self._log.exception("ami on_state hook failed", state=state)


def _retrieve(future: asyncio.Future[AmiMessage]) -> None:
    if not future.cancelled():
        future.exception()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
