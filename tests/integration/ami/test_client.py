"""The AMI client over real loopback sockets, against scripted AMI servers written here.

`FakeAmi` answers Login/Ping/Logoff like Asterisk 22 does (the replies are copied from the transcripts)
and lets a test script anything else; `replay()` plays a recorded capture's received stream back to the
client, waiting for the client's own action wherever the recorder sent one. Every panoramisk 1.4 fault
seen on the real Asterisk has a test: a consumer that raises, an Originate without Async, a request sent
while disconnected or cut off mid-reply, a wrong secret, a ping that nobody checks, UTF-8 split across
reads, CR/LF injection. No test asserts a duration; waits are on queues, events and futures.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from a2bd.ami import (
    AmiAuthError,
    AmiClient,
    AmiConnected,
    AmiDisconnected,
    AmiMessage,
    AmiParser,
    AmiStreamItem,
    AmiTimeout,
    AmiUnavailable,
    AmiValueError,
)
from a2bd.ami import client as client_module
from a2bd.errors import ConfigError
from a2bd.observability import REGISTRY
from tests.transcripts import FIXTURES, Capture, load_capture

BANNER = b"Asterisk Call Manager/11.0.0\r\n"
USER, SECRET = "a2bd", "s3cret-Do-Not-Log"
WAIT_S = 5.0  # upper bound for any single wait in these tests (pytest-timeout is 60 s)

Handler = Callable[["FakeConn", AmiMessage], Awaitable[None] | None]


def block(*pairs: tuple[str, str]) -> bytes:
    return "".join(f"{k}: {v}\r\n" for k, v in pairs).encode() + b"\r\n"


def ok(action: AmiMessage) -> bytes:
    return block(("Response", "Success"), ("ActionID", action["ActionID"]))


def event(name: str, *pairs: tuple[str, str]) -> bytes:
    return block(("Event", name), ("Privilege", "call,all"), *pairs)


class FakeConn:
    """One accepted connection: what the client sent (`raw`, `actions`) and ways to answer it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.raw = bytearray()
        self.actions: asyncio.Queue[AmiMessage] = asyncio.Queue()
        self.seen: list[AmiMessage] = []
        self.closed = asyncio.Event()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, action: AmiMessage, response: str = "Success", *pairs: tuple[str, str]) -> None:
        await self.send(block(("Response", response), ("ActionID", action["ActionID"]), *pairs))

    def abort(self) -> None:
        self.writer.transport.abort()

    async def next_action(self) -> AmiMessage:
        async with asyncio.timeout(WAIT_S):
            return await self.actions.get()


class FakeAmi:
    """A scripted AMI server on 127.0.0.1. `handlers[action]` overrides the default answers; `pong`
    False makes it silent to Ping (keeping the socket open); `secret` can change between connections."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.port = 0
        self.pong = True
        self.handlers: dict[str, Handler] = {}
        self.accepted: asyncio.Queue[FakeConn] = asyncio.Queue()
        self.conns: list[FakeConn] = []
        self.logins = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop_listening(self) -> None:
        """Close the port (connection refused) and drop every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for conn in self.conns:
            conn.abort()

    async def close(self) -> None:
        await self.stop_listening()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)

    async def next_conn(self) -> FakeConn:
        async with asyncio.timeout(WAIT_S):
            return await self.accepted.get()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = FakeConn(reader, writer)
        self.conns.append(conn)
        await self.accepted.put(conn)
        parser = AmiParser(expect_banner=False)
        try:
            await conn.send(BANNER)
            while data := await reader.read(65536):
                conn.raw += data
                for action in parser.feed(data):
                    conn.seen.append(action)
                    await conn.actions.put(action)
                    await self._answer(conn, action)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
            conn.closed.set()
            self._tasks.discard(task)

    async def _answer(self, conn: FakeConn, action: AmiMessage) -> None:
        name = action["Action"]
        handler = self.handlers.get(name)
        if handler is not None:
            result = handler(conn, action)
            if result is not None:
                await result
        elif name == "Login":
            self.logins += 1
            if action.get("Username") == USER and action.get("Secret") == self.secret:
                await conn.reply(action, "Success", ("Message", "Authentication accepted"))
            else:
                await conn.reply(action, "Error", ("Message", "Authentication failed"))
                conn.abort()  # Asterisk ends the session after a failed login
        elif name == "Ping":
            if self.pong:
                await conn.reply(action, "Success", ("Ping", "Pong"), ("Timestamp", "1795374856.123456"))
        elif name == "Logoff":
            await conn.reply(action, "Goodbye", ("Message", "Thanks for all the fish."))
            conn.abort()
        else:
            await conn.reply(action, "Success")


@pytest.fixture
async def ami() -> AsyncIterator[FakeAmi]:
    server = FakeAmi()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


ClientFactory = Callable[..., AmiClient]


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    made: list[AmiClient] = []
    counter = iter(range(1, 1000))

    def factory(port: int, **kwargs: Any) -> AmiClient:
        options: dict[str, Any] = {
            "ping_interval_s": 0,  # off unless a test is about it
            "reconnect_min_s": 0.01,
            "reconnect_max_s": 0.05,
            "connect_timeout_s": 2.0,
            "request_timeout_s": 2.0,
            "action_id_prefix": "t",
        }
        options.update(kwargs)
        client = AmiClient(f"pbx{next(counter)}", "127.0.0.1", port, USER, options.pop("secret", SECRET), **options)
        made.append(client)
        return client

    try:
        yield factory
    finally:
        for client in made:
            await client.close()


async def next_item(client: AmiClient) -> AmiStreamItem | None:
    async with asyncio.timeout(WAIT_S):
        return await client.next_event()


async def next_marker(client: AmiClient) -> AmiConnected | AmiDisconnected:
    """Skip events up to the next connection marker."""
    while True:
        item = await next_item(client)
        assert item is not None, "the stream ended"
        if isinstance(item, AmiConnected | AmiDisconnected):
            return item


def marker(item: AmiStreamItem | None) -> object:
    """A connection marker as a comparable tuple (its `at` is a wall-clock time), anything else as is."""
    if isinstance(item, AmiConnected):
        return ("connected", item.server, item.first)
    if isinstance(item, AmiDisconnected):
        return ("disconnected", item.server, item.reason)
    return item


async def get(queue: asyncio.Queue[Any]) -> Any:
    async with asyncio.timeout(WAIT_S):
        return await queue.get()


def metric(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- login ------------------------------------------------------------------------------------------------


async def test_login_sends_the_events_filter(ami: FakeAmi, make_client: ClientFactory) -> None:
    client = make_client(ami.port)
    await client.start()
    assert client.state == "connected"
    conn = await ami.next_conn()
    login = await conn.next_action()
    assert bytes(conn.raw) == (
        b"Action: Login\r\nActionID: t-1\r\nUsername: a2bd\r\nSecret: s3cret-Do-Not-Log\r\nEvents: call,cdr\r\n\r\n"
    )
    assert login["Events"] == "call,cdr"
    assert marker(await next_item(client)) == ("connected", client.name, True)
    assert metric("a2bd_ami_connected", server=client.name) == 1
    await client.close()
    assert client.state == "closed"
    assert metric("a2bd_ami_connected", server=client.name) == 0


async def test_events_none_sends_no_events_header(ami: FakeAmi, make_client: ClientFactory) -> None:
    client = make_client(ami.port, events=None)
    await client.start()
    login = await (await ami.next_conn()).next_action()
    assert "Events" not in login


async def test_the_secret_waits_for_the_banner(make_client: ClientFactory) -> None:
    # A server that is not AMI (wrong port) never receives the secret.
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await received.put(await reader.read(65536))  # b"" once the client gives up
        writer.close()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    try:
        client = make_client(server.sockets[0].getsockname()[1])
        with pytest.raises(AmiUnavailable, match="not an AMI server"):
            await client.start()
        async with asyncio.timeout(WAIT_S):
            assert await received.get() == b""
        assert client.state == "disconnected"
    finally:
        server.close()
        await server.wait_closed()


async def test_bad_secret_raises_and_does_not_retry(ami: FakeAmi, make_client: ClientFactory) -> None:
    client = make_client(ami.port, secret="wrong-secret-xyz")
    with capture_logs() as logs, pytest.raises(AmiAuthError) as info:
        await client.start()
    text = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert "'a2bd'" in text and client.name in text and "Authentication failed" in text
    assert "wrong-secret-xyz" not in text and "wrong-secret-xyz" not in repr(logs)
    assert client.state == "auth_failed"
    # Nothing is left running that could retry: one connection, one login, no background task.
    conn = await ami.next_conn()
    async with asyncio.timeout(WAIT_S):
        await conn.closed.wait()
    assert client._supervisor is None
    assert (ami.logins, len(ami.conns)) == (1, 1)


async def test_bad_secret_in_the_background_gives_up_loudly(ami: FakeAmi, make_client: ClientFactory) -> None:
    states: asyncio.Queue[str] = asyncio.Queue()
    client = make_client(ami.port, secret="nope", on_state=lambda _, state: states.put_nowait(state))
    with capture_logs() as logs:
        await client.start(wait=False)
        assert await next_item(client) is None  # the stream ends: the client gave up
    assert client.state == "auth_failed"
    assert [states.get_nowait() for _ in range(states.qsize())] == ["connecting", "auth_failed"]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["ami login refused; not retrying"]
    assert (ami.logins, len(ami.conns)) == (1, 1)
    assert client._supervisor is not None and client._supervisor.done()


async def test_secret_refused_on_reconnect_stops_reconnecting(ami: FakeAmi, make_client: ClientFactory) -> None:
    client = make_client(ami.port)
    await client.start()
    assert isinstance(await next_item(client), AmiConnected)
    ami.secret = "rotated"  # someone changed manager.conf
    with capture_logs() as logs:
        (await ami.next_conn()).abort()
        assert marker(await next_item(client)) == ("disconnected", client.name, "eof")
        assert await next_item(client) is None
    assert client.state == "auth_failed"
    assert any(e["event"] == "ami login refused; not retrying" and e["log_level"] == "error" for e in logs)
    assert ami.logins == 2
    with pytest.raises(AmiUnavailable):
        await client.action("Ping")


async def test_first_connect_refused(make_client: ClientFactory) -> None:
    server = FakeAmi()
    await server.start()
    port = server.port
    await server.close()  # nothing listens there any more
    client = make_client(port)
    with pytest.raises(AmiUnavailable, match=f"127.0.0.1:{port}"):
        await client.start()
    assert client.state == "disconnected"
    assert client._supervisor is None


async def test_start_without_wait_connects_when_the_server_comes_up(make_client: ClientFactory) -> None:
    server = FakeAmi()
    await server.start()
    port = server.port
    await server.close()
    states: asyncio.Queue[str] = asyncio.Queue()
    client = make_client(port, on_state=lambda _, state: states.put_nowait(state))
    try:
        await client.start(wait=False)
        assert [await get(states), await get(states)] == ["connecting", "disconnected"]  # refused, retrying
        server.port = port
        await server.start()  # same port, now listening
        assert marker(await next_item(client)) == ("connected", client.name, True)
        assert client.state == "connected"
        assert (await client.action("Ping"))["Ping"] == "Pong"
    finally:
        await client.close()
        await server.close()


# -- actions ----------------------------------------------------------------------------------------------


async def test_action_matched_by_action_id_while_events_interleave(ami: FakeAmi, make_client: ClientFactory) -> None:
    async def originate(conn: FakeConn, action: AmiMessage) -> None:
        # As in the captures: events before and after the reply, and a reply to someone else's ActionID.
        await conn.send(event("Newchannel", ("Channel", "Local/2000@billing-00000004;1")))
        await conn.send(block(("Response", "Success"), ("ActionID", "someone-else"), ("Message", "x")))
        await conn.send(event("Newchannel", ("Channel", "Local/2000@billing-00000004;2")))
        await conn.reply(action, "Success", ("Message", "Originate successfully queued"))
        await conn.send(
            event(
                "OriginateResponse",
                ("ActionID", action["ActionID"]),
                ("Response", "Success"),
                ("Channel", "Local/2000@billing-00000004;1"),
                ("Reason", "4"),
            )
        )

    ami.handlers["Originate"] = originate
    client = make_client(ami.port)
    await client.start()
    reply = await client.action("Originate", {"Channel": "Local/2000@billing", "Async": "true"})
    assert (reply.response, reply["Message"], reply.action_id) == ("Success", "Originate successfully queued", "t-2")
    assert isinstance(await next_item(client), AmiConnected)
    items = [await next_item(client) for _ in range(3)]
    assert [(m.event, m.get("Channel")) for m in items if isinstance(m, AmiMessage)] == [
        ("Newchannel", "Local/2000@billing-00000004;1"),
        ("Newchannel", "Local/2000@billing-00000004;2"),
        ("OriginateResponse", "Local/2000@billing-00000004;1"),  # an event, though it has Response:
    ]
    assert client.late_replies == 1  # the foreign reply was dropped, not queued


async def test_error_response_is_returned_not_raised(ami: FakeAmi, make_client: ClientFactory) -> None:
    ami.handlers["Hangup"] = lambda conn, action: conn.reply(action, "Error", ("Message", "No such channel"))
    client = make_client(ami.port)
    await client.start()
    reply = await client.action("Hangup", {"Channel": "Local/1001@billing-00000008;2", "Cause": "16"})
    assert (reply.response, reply["Message"]) == ("Error", "No such channel")


async def test_originate_without_async_waits_for_its_late_reply(ami: FakeAmi, make_client: ClientFactory) -> None:
    # Without Async, Asterisk answers only when the call is answered or fails; events flow meanwhile and the
    # connection must survive (it killed panoramisk's).
    release = asyncio.Event()

    async def originate(conn: FakeConn, action: AmiMessage) -> None:
        for i in range(20):
            await conn.send(event("Newstate", ("Uniqueid", f"1795374856.{i}")))
        await release.wait()
        await conn.reply(action, "Success", ("Message", "Originate successfully queued"))

    async def release_after_events() -> None:
        for _ in range(21):  # the marker and the 20 events
            await next_item(client)
        release.set()

    ami.handlers["Originate"] = originate
    client = make_client(ami.port, request_timeout_s=0.05)
    await client.start()
    releaser = asyncio.create_task(release_after_events())
    reply = await client.action("Originate", {"Channel": "Local/1001@billing"}, timeout_s=WAIT_S)
    await releaser
    assert reply.response == "Success"
    assert (await client.action("Ping", timeout_s=WAIT_S))["Ping"] == "Pong"


async def test_request_timeout_discards_the_late_reply(ami: FakeAmi, make_client: ClientFactory) -> None:
    held: asyncio.Queue[tuple[FakeConn, AmiMessage]] = asyncio.Queue()
    ami.handlers["Command"] = lambda conn, action: held.put_nowait((conn, action))
    client = make_client(ami.port)
    await client.start()
    with pytest.raises(AmiTimeout, match="Command") as info:
        await client.action("Command", {"Command": "core show uptime"}, timeout_s=0.05)
    assert isinstance(info.value, TimeoutError)
    conn, action = await get(held)
    await conn.reply(action, "Success", ("Output", "System uptime: 45 seconds"))  # too late
    # The connection is still good, and the late reply went nowhere.
    assert (await client.action("Ping"))["Ping"] == "Pong"
    assert client.late_replies == 1
    assert client.state == "connected"
    assert isinstance(await next_item(client), AmiConnected)
    assert client.queued() == 0


async def test_request_while_disconnected_fails_at_once(ami: FakeAmi, make_client: ClientFactory) -> None:
    client = make_client(ami.port, reconnect_min_s=30.0, reconnect_max_s=30.0)
    with pytest.raises(AmiUnavailable, match="not connected"):
        await client.action("Ping")  # not started
    await client.start()
    assert isinstance(await next_item(client), AmiConnected)
    (await ami.next_conn()).abort()
    assert isinstance(await next_item(client), AmiDisconnected)
    assert client.state == "disconnected"
    with pytest.raises(AmiUnavailable, match="not connected"):
        await client.action("Ping")
    with pytest.raises(AmiUnavailable):
        await client.list_action("CoreShowChannels")


async def test_connection_cut_mid_reply_fails_every_pending_request(ami: FakeAmi, make_client: ClientFactory) -> None:
    async def list_started(conn: FakeConn, action: AmiMessage) -> None:
        await conn.reply(action, "Success", ("EventList", "start"), ("Message", "Channels will follow"))
        await conn.send(event("CoreShowChannel", ("ActionID", action["ActionID"]), ("Channel", "x")))

    async def half_reply(conn: FakeConn, action: AmiMessage) -> None:
        await conn.send(b"Response: Success\r\nActionID: " + action["ActionID"].encode() + b"\r\nMess")
        conn.abort()

    ami.handlers["CoreShowChannels"] = list_started
    ami.handlers["Status"] = half_reply
    client = make_client(ami.port, reconnect_min_s=30.0, reconnect_max_s=30.0)
    await client.start()
    results = await asyncio.gather(
        client.list_action("CoreShowChannels"), client.action("Status"), return_exceptions=True
    )
    assert [type(r) for r in results] == [AmiUnavailable, AmiUnavailable]
    assert "lost before the reply" in str(results[1])
    assert client._pending == {}
    assert client.state == "disconnected"


async def test_reconnect_logs_in_again_and_replays_nothing(ami: FakeAmi, make_client: ClientFactory) -> None:
    cut: asyncio.Queue[FakeConn] = asyncio.Queue()
    ami.handlers["Hangup"] = lambda conn, action: cut.put_nowait(conn)  # never answered: the link dies first
    reconnects = metric("a2bd_ami_reconnects_total", server="pbx1")
    client = make_client(ami.port)
    await client.start()
    assert marker(await next_marker(client)) == ("connected", "pbx1", True)
    hangup = asyncio.create_task(client.action("Hangup", {"Channel": "Local/1001@billing-00000008;2"}))
    (await get(cut)).abort()
    with pytest.raises(AmiUnavailable):
        await hangup
    assert marker(await next_marker(client)) == ("disconnected", "pbx1", "eof")
    assert marker(await next_marker(client)) == ("connected", "pbx1", False)
    second = ami.conns[1]
    assert (await client.action("Ping"))["Ping"] == "Pong"
    assert [a["Action"] for a in second.seen] == ["Login", "Ping"]  # the Hangup was not re-sent
    assert ami.logins == 2
    assert client.reconnects == 1
    assert metric("a2bd_ami_reconnects_total", server="pbx1") == reconnects + 1


async def test_reconnect_waits_through_refusals(ami: FakeAmi, make_client: ClientFactory) -> None:
    states: asyncio.Queue[str] = asyncio.Queue()
    client = make_client(
        ami.port, reconnect_min_s=0.01, reconnect_max_s=0.04, on_state=lambda _, state: states.put_nowait(state)
    )
    await client.start()
    assert isinstance(await next_item(client), AmiConnected)
    with capture_logs() as logs:
        await ami.stop_listening()
        assert isinstance(await next_item(client), AmiDisconnected)
        failures = 0
        while failures < 3:  # three refused attempts, each followed by a backoff
            failures += await get(states) == "disconnected"
        await ami.start()  # same port again
        assert marker(await next_item(client)) == ("connected", client.name, False)
    delays = [e["retry_in_s"] for e in logs if e["event"] == "ami connect failed"]
    assert len(delays) >= 2 and all(0.01 <= d <= 0.04 for d in delays)
    assert ami.logins == 2


def test_backoff_grows_to_its_ceiling_with_jitter() -> None:
    client = AmiClient("pbx", "127.0.0.1", 1, USER, SECRET, reconnect_min_s=0.2, reconnect_max_s=10.0)
    for attempt in range(12):
        ceiling = min(10.0, 0.2 * 2**attempt)
        delays = {client._backoff_s(attempt) for _ in range(50)}
        assert all(max(0.2, ceiling / 2) <= d <= ceiling for d in delays)
    assert len({client._backoff_s(8) for _ in range(20)}) > 1  # jittered, so daemons do not reconnect in step


# -- list actions ---------------------------------------------------------------------------------------------


async def test_list_action_error_ends_at_once(ami: FakeAmi, make_client: ClientFactory) -> None:
    ami.handlers["QueueStatus"] = lambda conn, action: conn.reply(action, "Error", ("Message", "Permission denied"))
    client = make_client(ami.port)
    await client.start()
    response, items = await client.list_action("QueueStatus")
    assert (response.response, items) == ("Error", [])


async def test_list_item_count_mismatch_is_logged(ami: FakeAmi, make_client: ClientFactory) -> None:
    async def channels(conn: FakeConn, action: AmiMessage) -> None:
        aid = ("ActionID", action["ActionID"])
        await conn.reply(action, "Success", ("EventList", "start"), ("Message", "Channels will follow"))
        await conn.send(event("Newchannel", ("Channel", "not part of the list")))
        await conn.send(block(("Event", "CoreShowChannel"), aid, ("Channel", "Local/1001@billing-00000010;2")))
        await conn.send(
            block(("Event", "CoreShowChannelsComplete"), aid, ("EventList", "Complete"), ("ListItems", "2"))
        )

    ami.handlers["CoreShowChannels"] = channels
    client = make_client(ami.port)
    await client.start()
    with capture_logs() as logs:
        response, items = await client.list_action("CoreShowChannels")
    assert response["Message"] == "Channels will follow"
    assert [m["Channel"] for m in items] == ["Local/1001@billing-00000010;2"]
    (warning,) = [e for e in logs if e["event"] == "ami list item count disagrees"]
    assert (warning["list_items"], warning["received"]) == ("2", 1)
    assert isinstance(await next_item(client), AmiConnected)
    unrelated = await next_item(client)
    assert isinstance(unrelated, AmiMessage) and unrelated["Channel"] == "not part of the list"


async def test_list_action_timeout_swallows_the_late_list(ami: FakeAmi, make_client: ClientFactory) -> None:
    held: asyncio.Queue[tuple[FakeConn, AmiMessage]] = asyncio.Queue()
    ami.handlers["CoreShowChannels"] = lambda conn, action: held.put_nowait((conn, action))
    ami.handlers["Go"] = lambda conn, action: conn.send(event("After") + ok(action))
    client = make_client(ami.port)
    await client.start()
    with pytest.raises(AmiTimeout):
        await client.list_action("CoreShowChannels", timeout_s=0.05)
    conn, action = await get(held)
    aid = ("ActionID", action["ActionID"])
    await conn.reply(action, "Success", ("EventList", "start"), ("Message", "Channels will follow"))
    await conn.send(block(("Event", "CoreShowChannel"), aid, ("Channel", "Local/1001@billing-00000010;2")))
    await conn.send(block(("Event", "CoreShowChannelsComplete"), aid, ("EventList", "Complete"), ("ListItems", "1")))
    await client.action("Go")  # its reply comes after the late list
    assert isinstance(await next_item(client), AmiConnected)
    after = await next_item(client)  # the late CoreShowChannel did not leak into the event stream
    assert isinstance(after, AmiMessage) and after.event == "After"
    assert client._pending == {}
    assert client.late_replies == 1


# -- ping watchdog --------------------------------------------------------------------------------------------


async def test_ping_watchdog_replaces_a_silent_server(ami: FakeAmi, make_client: ClientFactory) -> None:
    ami.pong = False  # the socket stays open, the server just never answers
    before = metric("a2bd_ami_disconnects_total", server="pbx1", reason="ping_timeout")
    client = make_client(ami.port, ping_interval_s=0.02, ping_timeout_s=0.05)
    await client.start()
    assert isinstance(await next_item(client), AmiConnected)
    with capture_logs() as logs:
        dropped = await next_item(client)
    assert marker(dropped) == ("disconnected", "pbx1", "ping_timeout")
    assert any(e["event"] == "ami server did not answer Ping; dropping the connection" for e in logs)
    ami.pong = True
    assert marker(await next_item(client)) == ("connected", "pbx1", False)
    assert [a["Action"] for a in ami.conns[0].seen] == ["Login", "Ping"]
    assert metric("a2bd_ami_disconnects_total", server="pbx1", reason="ping_timeout") == before + 1


async def test_ping_answered_keeps_the_connection(ami: FakeAmi, make_client: ClientFactory) -> None:
    client = make_client(ami.port, ping_interval_s=0.01, ping_timeout_s=0.5)
    await client.start()
    conn = await ami.next_conn()
    await conn.next_action()  # Login
    for _ in range(3):
        assert (await conn.next_action())["Action"] == "Ping"
    assert len(ami.conns) == 1 and client.state == "connected"


# -- the event stream -----------------------------------------------------------------------------------------


async def test_backpressure_delivers_every_event_in_order(ami: FakeAmi, make_client: ClientFactory) -> None:
    count = 300
    flood = b"".join(event("Newexten", ("Priority", str(i))) for i in range(count))
    ami.handlers["Flood"] = lambda conn, action: conn.send(ok(action) + flood)
    # A ping that cannot be read while the reader waits on the full queue must not kill the connection.
    client = make_client(ami.port, queue_size=4, ping_interval_s=0.01, ping_timeout_s=0.03)
    waits = metric("a2bd_ami_backpressure_waits_total", server=client.name)
    await client.start()
    await client.action("Flood")
    conn = ami.conns[0]
    while (await conn.next_action())["Action"] != "Ping":
        pass
    # The Pong is behind the 300 events in the stream, and the reader is stuck at the fifth of them.
    await asyncio.sleep(0.1)  # longer than ping_timeout_s
    assert client.backpressure_waits == 1
    assert client.queued() == 4
    received: list[AmiStreamItem] = []
    while len(received) < count + 1:
        item = await next_item(client)
        assert item is not None
        received.append(item)
        await asyncio.sleep(0)  # a slow consumer
    assert isinstance(received[0], AmiConnected)
    assert [m["Priority"] for m in received[1:] if isinstance(m, AmiMessage)] == [str(i) for i in range(count)]
    assert client.backpressure_waits > 0 and client.backpressure_s > 0
    assert len(ami.conns) == 1 and client.state == "connected"
    assert metric("a2bd_ami_backpressure_waits_total", server=client.name) == waits + client.backpressure_waits


async def test_a_consumer_that_raises_does_not_touch_the_connection(ami: FakeAmi, make_client: ClientFactory) -> None:
    ami.handlers["Go"] = lambda conn, action: conn.send(event("A") + event("B") + ok(action))
    client = make_client(ami.port)
    await client.start()
    await client.action("Go")

    async def bad_consumer() -> None:
        async for item in client.events():
            if isinstance(item, AmiMessage):
                raise RuntimeError(f"bug in the tracker on {item.event}")

    with pytest.raises(RuntimeError, match="on A"):
        await bad_consumer()
    item = await next_item(client)
    assert isinstance(item, AmiMessage) and item.event == "B"
    assert client.state == "connected"
    assert (await client.action("Ping"))["Ping"] == "Pong"


async def test_on_state_hook_that_raises_is_contained(ami: FakeAmi, make_client: ClientFactory) -> None:
    def hook(server: str, state: str) -> None:
        raise ValueError("broken hook")

    client = make_client(ami.port, on_state=hook)
    with capture_logs() as logs:
        await client.start()
        assert (await client.action("Ping"))["Ping"] == "Pong"
    assert client.state == "connected"
    assert any(e["event"] == "ami on_state hook failed" for e in logs)


async def test_utf8_split_across_tcp_writes(ami: FakeAmi, make_client: ClientFactory) -> None:
    data = event("Newchannel", ("CallerIDName", "Jürgen Müller"), ("AccountCode", ""))
    cut = data.index("ü".encode()) + 1

    async def split(conn: FakeConn, action: AmiMessage) -> None:
        await conn.reply(action)
        await conn.send(data[:cut])
        await asyncio.sleep(0.01)  # separate TCP segments, so separate reads
        await conn.send(data[cut:])

    ami.handlers["Go"] = split
    client = make_client(ami.port)
    await client.start()
    await client.action("Go")
    assert isinstance(await next_item(client), AmiConnected)
    item = await next_item(client)
    assert isinstance(item, AmiMessage)
    assert (item["CallerIDName"], item["AccountCode"]) == ("Jürgen Müller", "")


async def test_received_at_comes_from_the_clock(ami: FakeAmi, make_client: ClientFactory) -> None:
    ami.handlers["Go"] = lambda conn, action: conn.send(event("A") + ok(action))
    client = make_client(ami.port, clock=lambda: 1795374856.5)
    await client.start()
    await client.action("Go")
    assert await next_item(client) == AmiConnected(client.name, True, 1795374856.5)
    item = await next_item(client)
    assert isinstance(item, AmiMessage) and item.received_at == 1795374856.5


async def test_crlf_in_a_value_is_refused_and_nothing_is_sent(ami: FakeAmi, make_client: ClientFactory) -> None:
    client = make_client(ami.port)
    await client.start()
    with pytest.raises(AmiValueError, match="CallerID"):
        await client.action(
            "Originate", {"Channel": "Local/1001@billing", "CallerID": '"x"\r\n\r\nAction: Originate\r\nChannel: y'}
        )
    with pytest.raises(AmiValueError):
        await client.list_action("CoreShowChannels", [("Bad\nKey", "1")])
    assert (await client.action("Ping"))["Ping"] == "Pong"
    conn = ami.conns[0]
    assert [a["Action"] for a in conn.seen] == ["Login", "Ping"]
    assert b"Originate" not in conn.raw


async def test_oversized_message_drops_the_connection(ami: FakeAmi, make_client: ClientFactory) -> None:
    ami.handlers["Go"] = lambda conn, action: conn.send(b"Event: Huge\r\nData: " + b"x" * 5000)
    before = metric("a2bd_ami_disconnects_total", server="pbx1", reason="protocol_error")
    client = make_client(ami.port, max_message_bytes=1024)
    await client.start()
    assert isinstance(await next_item(client), AmiConnected)
    with capture_logs() as logs:
        with pytest.raises(AmiUnavailable):
            await client.action("Go")
        assert marker(await next_item(client)) == ("disconnected", "pbx1", "protocol_error")
    assert client.protocol_errors == 1
    assert any(e["event"] == "ami protocol error; dropping the connection" and e["log_level"] == "warning"
               for e in logs)
    assert metric("a2bd_ami_disconnects_total", server="pbx1", reason="protocol_error") == before + 1
    assert marker(await next_item(client)) == ("connected", "pbx1", False)


# -- close and secrets -----------------------------------------------------------------------------------------


async def test_close_logs_off_fails_pending_and_ends_the_stream(ami: FakeAmi, make_client: ClientFactory) -> None:
    ami.handlers["Wait"] = lambda conn, action: None  # never answered
    ami.handlers["Go"] = lambda conn, action: conn.send(event("A") + event("B") + ok(action))
    client = make_client(ami.port)
    await client.start()
    await client.action("Go")
    waiting = asyncio.create_task(client.action("Wait", timeout_s=WAIT_S))
    conn = await ami.next_conn()
    while (await conn.next_action())["Action"] != "Wait":
        pass
    await client.close()
    with pytest.raises(AmiUnavailable):
        await waiting
    assert [a["Action"] for a in conn.seen] == ["Login", "Go", "Wait", "Logoff"]
    items = [item async for item in client.events()]  # what was queued is still delivered, then the end
    assert [i.event if isinstance(i, AmiMessage) else type(i).__name__ for i in items] == ["AmiConnected", "A", "B"]
    assert await client.next_event() is None
    assert client.state == "closed"
    await client.close()  # idempotent
    with pytest.raises(AmiUnavailable):
        await client.action("Ping")
    with pytest.raises(RuntimeError):
        await client.start()


async def test_close_wakes_a_waiting_consumer(ami: FakeAmi, make_client: ClientFactory) -> None:
    client = make_client(ami.port)
    await client.start()
    assert isinstance(await next_item(client), AmiConnected)
    consumer = asyncio.create_task(client.next_event())
    await asyncio.sleep(0)
    await client.close()
    async with asyncio.timeout(WAIT_S):
        assert await consumer is None


async def test_close_does_not_wait_long_for_a_silent_logoff(ami: FakeAmi, make_client: ClientFactory,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ami.handlers["Logoff"] = lambda conn, action: None
    # Only the request timeout can end the wait: the cap on a Logoff's wait is raised past this test's bound.
    monkeypatch.setattr(client_module, "_LOGOFF_WAIT_S", 3600.0)
    client = make_client(ami.port, request_timeout_s=0.05)
    await client.start()
    conn = await ami.next_conn()
    assert (await conn.next_action())["Action"] == "Login"
    async with asyncio.timeout(WAIT_S):  # a hang guard, not a speed check
        await client.close()
    assert client.state == "closed"
    assert (await conn.next_action())["Action"] == "Logoff"  # it was sent, and went unanswered


async def test_the_secret_is_never_logged(ami: FakeAmi, make_client: ClientFactory) -> None:
    ami.pong = False
    client = make_client(ami.port, ping_interval_s=0.01, ping_timeout_s=0.02)
    assert SECRET not in repr(client)
    with capture_logs() as logs:
        await client.start()
        assert isinstance(await next_item(client), AmiConnected)
        ami.secret = "other"
        assert isinstance(await next_item(client), AmiDisconnected)  # ping timeout, warnings logged
        assert await next_item(client) is None  # refused on reconnect, error logged
        await client.close()
    assert logs, "expected log lines to check"
    assert SECRET not in repr(logs)
    assert SECRET not in repr(client)


# -- recorded captures, replayed ------------------------------------------------------------------------------


async def replay(capture: Capture, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 seen: list[AmiMessage]) -> None:
    """Play `capture`'s received stream; at each recorded send, take the client's next action, check it is
    the recorded one (apart from its ActionID), and map the recorded ActionID to the client's."""
    parser = AmiParser(expect_banner=False)
    actions: list[AmiMessage] = []
    ids: dict[bytes, bytes] = {}
    try:
        for segment in capture.segments:
            if segment.kind == "recv":
                data = segment.data
                for old, new in ids.items():
                    data = data.replace(b"ActionID: " + old + b"\r\n", b"ActionID: " + new + b"\r\n")
                writer.write(data)
                await writer.drain()
            elif segment.kind == "sent":
                for recorded in AmiParser(expect_banner=False).feed(segment.data):
                    while not actions:
                        data = await reader.read(65536)
                        assert data, "the client closed early"
                        actions += parser.feed(data)
                    action = actions.pop(0)
                    seen.append(action)
                    assert action.headers[0] == recorded.headers[0]
                    assert action.headers[2:] == recorded.headers[2:]  # same fields, ours in the same order
                    ids[recorded["ActionID"].encode()] = action["ActionID"].encode()
    finally:
        writer.close()  # Asterisk closes after the Goodbye


@pytest.mark.parametrize(
    ("name", "events"),
    [
        ("08-two-calls-same-account.ami.txt", None),
        ("03-ami-hangup-midcall.ami.txt", None),
        ("01-answered-callee-hangup.ami-events-call-cdr.txt", "call,cdr"),
    ],
)
async def test_replay_a_recorded_session(name: str, events: str | None, make_client: ClientFactory) -> None:
    (capture,) = load_capture(FIXTURES / name)
    seen: list[AmiMessage] = []
    done: asyncio.Queue[BaseException | None] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await replay(capture, reader, writer, seen)
        except Exception as exc:  # reported to the test body, which asserts
            await done.put(exc)
        else:
            await done.put(None)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        client = make_client(server.sockets[0].getsockname()[1], secret="a2bdsecret", events=events)
        await client.start()
        recorded = AmiParser(expect_banner=False).feed(capture.sent)
        # All the recorder's actions at once, in order (pipelined); Logoff comes from close().
        calls = [
            client.list_action(m["Action"], m.headers[2:]) if m["Action"] == "CoreShowChannels"
            else client.action(m["Action"], m.headers[2:])
            for m in recorded[1:-1]
        ]
        results = await asyncio.gather(*calls)
        await client.close()
        async with asyncio.timeout(WAIT_S):
            assert await done.get() is None
    finally:
        server.close()
        await server.wait_closed()

    assert [a["Action"] for a in seen] == [m["Action"] for m in recorded]
    original = AmiParser().feed(capture.received)
    replies = {m.action_id: m for m in original if m.is_response}
    for sent, result in zip(recorded[1:-1], results, strict=True):
        reply = result[0] if isinstance(result, tuple) else result
        original_reply = replies[sent["ActionID"]]
        assert (reply.response, reply.headers[2:]) == (original_reply.response, original_reply.headers[2:])
        assert reply.action_id != sent["ActionID"]
    if "08" in name:
        _, channels = results[2]
        assert len(channels) == 8
        dial = [c["Channel"] for c in channels if c["AccountCode"] == "1000000001" and c["Application"] == "Dial"]
        assert dial == ["Local/1001@billing-00000011;2", "Local/1001@billing-00000010;2"]
    if "03" in name:
        assert (results[1]["Message"], results[2].response, results[2]["Message"]) == (
            "Channel Hungup", "Error", "No such channel"
        )

    # Every recorded event reaches the stream once, in order; only the list's own events went to the list.
    stream = [item async for item in client.events()]
    assert isinstance(stream[0], AmiConnected) and stream[0].first
    got = [m for m in stream if isinstance(m, AmiMessage)]
    listed = {m.action_id for m in recorded if m["Action"] == "CoreShowChannels"}
    expected = [m for m in original if m.is_event and m.action_id not in listed]
    assert len(got) == len(expected) == {"08": 211 - 9, "03": 102, "01": 51}[name[:2]]

    def without_action_id(m: AmiMessage) -> tuple[tuple[str, str], ...]:
        return tuple(h for h in m.headers if h[0] != "ActionID")

    assert [without_action_id(m) for m in got] == [without_action_id(m) for m in expected]
    new_accounts = [m for m in got if m.event == "NewAccountCode"]
    assert new_accounts and all(m.headers[-1] == ("OldAccountCode", "") for m in new_accounts)
