"""A real AgiServer on 127.0.0.1, port 0, driven by the simulated Asterisk and by the recorded sessions.

Handlers only push what they saw to a queue; every assertion is in the test body.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import pytest
from structlog.testing import capture_logs

from a2bd.agi.protocol import AgiEnvironment, AgiReply, ReplyReader, format_command, set_variable
from a2bd.agi.server import AgiServer, AgiSession, Handler
from a2bd.config import AgiSettings
from a2bd.errors import ConfigError, ProtocolError
from a2bd.observability import REGISTRY
from a2bd.sim.agi import encode_environment, make_environment, run_session
from tests.transcripts import Capture, agi_files, load_capture

pytestmark = pytest.mark.e2e

SETTINGS = AgiSettings(
    host="127.0.0.1",
    port=0,
    env_timeout_s=0.2,
    command_timeout_s=0.3,
    max_env_bytes=2048,
    max_connections=8,
)
_ids = itertools.count(1)

ANSWER = (
    set_variable("A2B_STATUS", "OK"),
    set_variable("A2B_LIMIT_MS", "600000"),
    set_variable("CHANNEL(accountcode)", "1000000001"),
)


@dataclass
class Seen:
    """What a handler saw, pushed to the test's queue."""

    env: AgiEnvironment
    peer: tuple[str, int]
    replies: list[AgiReply]
    hungup: bool


Queue = asyncio.Queue[Any]


def answering(queue: Queue, commands: tuple[bytes, ...] = ANSWER) -> Handler:
    async def handler(session: AgiSession) -> None:
        replies = await session.execute(*commands)
        await queue.put(Seen(session.env, session.peer, replies, session.hungup))

    return handler


def blocking(queue: Queue, release: asyncio.Event) -> Handler:
    """Reports "entered", waits for `release`, then answers; reports "cancelled" if cancelled."""

    async def handler(session: AgiSession) -> None:
        await queue.put("entered")
        try:
            await release.wait()
        except asyncio.CancelledError:
            queue.put_nowait("cancelled")
            raise
        await session.execute(*ANSWER)
        await queue.put("answered")

    return handler


@contextlib.asynccontextmanager
async def serving(
    handlers: Mapping[str, Handler], *, peers: Iterable[str] = (), **overrides: Any
) -> AsyncIterator[AgiServer]:
    server = AgiServer(replace(SETTINGS, **overrides), handlers, peers=peers)
    await server.start()
    try:
        yield server
    finally:
        await server.close(grace_s=1.0)


def environment(script: str = "authorize", **kw: Any) -> dict[str, str]:
    n = next(_ids)
    return make_environment(uniqueid=f"1795374860.{n}", channel=f"Local/2000@billing-{n:08x};2",
                            extension="2000", script=script, **kw)


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("a2bd_agi_rejected_total", {"reason": reason}) or 0.0


def sessions(script: str) -> float:
    return REGISTRY.get_sample_value("a2bd_agi_sessions_total", {"script": script}) or 0.0


def active() -> float:
    return REGISTRY.get_sample_value("a2bd_agi_active_sessions") or 0.0


async def eventually(predicate: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    """Poll `predicate` every 5 ms for at most `timeout_s` seconds."""
    for _ in range(int(timeout_s / 0.005)):
        if predicate():
            return True
        await asyncio.sleep(0.005)
    return predicate()


@contextlib.asynccontextmanager
async def raw_client(
    server: AgiServer, local: str | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A plain connection; from `local` (e.g. 127.0.0.2, another address of Linux's loopback) if given."""
    host = "::1" if local is not None and ":" in local else "127.0.0.1"
    reader, writer = await asyncio.open_connection(host, server.port,
                                                   local_addr=(local, 0) if local is not None else None)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_to_eof(reader: asyncio.StreamReader, timeout_s: float = 2.0) -> bytes:
    """Everything the server sends until it closes (a reset counts as a close)."""
    async with asyncio.timeout(timeout_s):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


def warnings_for(logs: list[dict[str, Any]], reason: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("reason") == reason and e["log_level"] == "warning"]


# -- normal sessions --------------------------------------------------------------------------------------


async def test_normal_session_with_the_simulator() -> None:
    queue: Queue = asyncio.Queue()
    before = sessions("authorize")
    async with serving({"authorize": answering(queue)}) as server:
        env = environment(args=("442071234567",))
        result = await run_session("127.0.0.1", server.port, env, chunks=3)
        seen = await asyncio.wait_for(queue.get(), 1)
        assert await eventually(lambda: server.active == 0)
    assert result.server_closed
    assert result.variables == {"A2B_STATUS": "OK", "A2B_LIMIT_MS": "600000",
                                "CHANNEL(accountcode)": "1000000001"}
    assert result.commands == [c[:-1].decode() for c in ANSWER]  # what the handler sent, byte for byte
    assert dict(seen.env.variables) == env
    assert seen.env.arguments == ("442071234567",)
    assert seen.peer[0] == "127.0.0.1"
    assert [(r.code, r.result) for r in seen.replies] == [(200, "1")] * 3
    assert not seen.hungup
    assert sessions("authorize") == before + 1


async def test_many_concurrent_sessions() -> None:
    queue: Queue = asyncio.Queue()
    active_before = active()
    async with serving({"authorize": answering(queue)}, max_connections=100) as server:
        calls = [run_session("127.0.0.1", server.port, environment()) for _ in range(50)]
        results = await asyncio.gather(*calls)
        assert await eventually(lambda: server.active == 0)
    assert all(r.server_closed and r.variables["A2B_STATUS"] == "OK" for r in results)
    assert queue.qsize() == 50
    assert active() == active_before


async def test_command_helper_and_other_replies() -> None:
    queue: Queue = asyncio.Queue()

    async def handler(session: AgiSession) -> None:
        replies = [
            await session.command("GET", "VARIABLE", "A2B_LIMIT_MS"),
            await session.command("GET", "VARIABLE", "A2B_NO_SUCH_VAR"),
            await session.command("GET", "FULL", "VARIABLE", "${CALLERID(num)}-${EXTEN}"),
            await session.command("GET", "DATA", "a2b/enter-pin", "6000", "4"),
            await session.command("FOO", "BAR"),
            await session.command("GET", "VARIABLE"),
            await session.command("SET", "VARIABLE", "A2B_NOTE", 'say "hi" to Bob\'s phone, then wait'),
            await session.command("GET", "VARIABLE", "A2B_NOTE"),
        ]
        await queue.put(replies)

    async with serving({"authorize": handler}) as server:
        result = await run_session("127.0.0.1", server.port, environment(), digits="424299",
                                   channel_vars={"A2B_LIMIT_MS": "600000"})
        replies = await asyncio.wait_for(queue.get(), 1)
    assert [(r.code, r.result, r.data) for r in replies] == [
        (200, "1", "600000"),
        (200, "0", None),
        (200, "1", "5551234-2000"),
        (200, "4242", None),
        (510, None, None),
        (520, None, None),
        (200, "1", None),
        (200, "1", 'say "hi" to Bob\'s phone, then wait'),
    ]
    assert replies[5].usage[-1] == "Example return code: 200 result=1 (testvariable)"
    assert result.commands[6] == 'SET VARIABLE A2B_NOTE "say \\"hi\\" to Bob\'s phone, then wait"'


REPLAYED = [c for c in (load_capture(p)[0] for p in agi_files()) if c.scenario in
            ("01-answered-callee-hangup", "09-agi-misc-commands", "10-caller-hangup-during-agi")]


@pytest.mark.parametrize("capture", REPLAYED, ids=[c.scenario for c in REPLAYED])
async def test_replay_recorded_session(capture: Capture) -> None:
    """Asterisk's side of a recorded session, byte for byte and in its recorded order, against a handler
    that sends the recorded commands."""
    queue: Queue = asyncio.Queue()
    commands = tuple(capture.sent_lines())
    env_end = capture.received.index(b"\n\n") + 2
    expected_replies = []
    reply_reader = ReplyReader()
    for line in capture.received[env_end:].split(b"\n")[:-1]:
        event = reply_reader.feed_line(line)
        if isinstance(event, AgiReply):
            expected_replies.append(event)

    async with serving({"authorize": answering(queue, commands)}) as server:
        received = bytearray()
        closed_by_server = False
        async with raw_client(server) as (reader, writer):
            for segment in capture.segments:
                if segment.kind == "recv":
                    if closed_by_server:
                        with contextlib.suppress(OSError):
                            writer.write(segment.data)  # Asterisk's last HANGUP, after the server's close
                        continue
                    writer.write(segment.data)
                    await writer.drain()
                    if not received:
                        await asyncio.sleep(0.002)  # let each recorded environment chunk arrive on its own
                elif segment.kind == "sent":
                    async with asyncio.timeout(1):
                        received += await reader.readexactly(len(segment.data))
                elif "half-closed" in segment.data.decode():
                    assert await read_to_eof(reader) == b""  # nothing more than the commands
                    closed_by_server = True
        seen = await asyncio.wait_for(queue.get(), 1)
    assert bytes(received) == capture.sent
    assert seen.replies == expected_replies
    assert seen.hungup == (capture.scenario == "10-caller-hangup-during-agi")
    assert closed_by_server


async def test_dead_channel_hangup_before_replies() -> None:
    queue: Queue = asyncio.Queue()
    commands = (*ANSWER, format_command("ANSWER"), format_command("GET", "VARIABLE", "CALLERID(num)"))
    async with serving({"authorize": answering(queue, commands)}) as server:
        result = await run_session("127.0.0.1", server.port, environment(), dead=True)
        seen = await asyncio.wait_for(queue.get(), 1)
    assert seen.hungup
    assert [(r.code, r.result, r.data) for r in seen.replies] == [
        (200, "1", None), (200, "1", None), (200, "1", None),  # SET VARIABLE still works (transcript 10)
        (511, None, None),  # ANSWER does not
        (200, "1", "5551234"),
    ]
    assert result.server_closed
    assert result.variables["A2B_STATUS"] == "OK"


# -- rejected connections ---------------------------------------------------------------------------------


async def test_client_closing_mid_header_does_not_block_others() -> None:
    queue: Queue = asyncio.Queue()
    before = rejected("eof")
    header = encode_environment(environment())
    with capture_logs() as logs:
        async with serving({"authorize": answering(queue)}, env_timeout_s=2.0) as server:
            async with raw_client(server) as (_, writer):
                writer.write(header[: len(header) // 2])
                await writer.drain()
                assert await eventually(lambda: server.active == 1)
                # The half-open client holds its connection; another call is served meanwhile.
                result = await run_session("127.0.0.1", server.port, environment())
                assert result.server_closed and result.variables["A2B_STATUS"] == "OK"
            assert await eventually(lambda: rejected("eof") == before + 1)
    (warning,) = warnings_for(logs, "eof")
    assert warning["event"] == "agi connection rejected"
    assert warning["received_bytes"] == len(header) // 2


async def test_connect_and_close_counts_eof() -> None:
    before = rejected("eof")
    async with serving({}) as server:
        async with raw_client(server):
            pass
        assert await eventually(lambda: rejected("eof") == before + 1)


async def test_overlong_header_is_cut() -> None:
    before, timeouts = rejected("overrun"), rejected("timeout")
    with capture_logs() as logs:
        # With a 30 s env_timeout_s, a close within read_to_eof's 2 s bound can only be the overrun.
        async with serving({}, env_timeout_s=30.0) as server, raw_client(server) as (reader, writer):
            writer.write(b"agi_x: " + b"y" * 100 + b"\n")
            writer.write(b"agi_x: " + b"y" * (SETTINGS.max_env_bytes + 100) + b"\n")
            assert await read_to_eof(reader) == b""
    assert rejected("overrun") == before + 1
    assert rejected("timeout") == timeouts
    (warning,) = warnings_for(logs, "overrun")
    assert warning["limit_bytes"] == SETTINGS.max_env_bytes


async def test_stalled_client_is_closed_within_env_timeout() -> None:
    before = rejected("timeout")
    with capture_logs() as logs:
        async with serving({}) as server, raw_client(server) as (reader, writer):
            writer.write(b"agi_network: yes\n")
            assert await read_to_eof(reader) == b""
    assert rejected("timeout") == before + 1
    assert len(warnings_for(logs, "timeout")) == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"hello world\n\n",
        b"GET / HTTP/1.0\nHost: a2bd\n\n",
        b"agi_network_script: authorize\n\n",  # no agi_uniqueid
        b"agi_network_script: authorize\nagi_\xffid: 1\nagi_uniqueid: 1\n\n",
    ],
    ids=["text", "http", "no-uniqueid", "key-not-ascii"],
)
async def test_garbage_is_malformed(garbage: bytes) -> None:
    queue: Queue = asyncio.Queue()
    before = rejected("malformed")
    with capture_logs() as logs:
        async with serving({"authorize": answering(queue)}) as server, raw_client(server) as (reader, writer):
            writer.write(garbage)
            assert await read_to_eof(reader) == b""
    assert rejected("malformed") == before + 1
    (warning,) = warnings_for(logs, "malformed")
    assert "AGI environment" in warning["error"]
    assert queue.empty()


async def test_unknown_script_gets_nothing() -> None:
    queue: Queue = asyncio.Queue()
    before = rejected("unknown_script")
    with capture_logs() as logs:
        async with serving({"authorize": answering(queue)}) as server, raw_client(server) as (reader, writer):
            writer.write(encode_environment(environment(script="balance")))
            assert await read_to_eof(reader) == b""  # A2B_STATUS stays unset: the dialplan denies
    assert rejected("unknown_script") == before + 1
    assert sessions("balance") == 0
    (warning,) = warnings_for(logs, "unknown_script")
    assert warning["script"] == "balance"
    assert queue.empty()


async def test_connection_cap() -> None:
    queue: Queue = asyncio.Queue()
    release = asyncio.Event()
    before = rejected("over_capacity")
    with capture_logs() as logs:
        # With a 30 s env_timeout_s, a close within read_to_eof's 2 s bound can only be the cap.
        async with serving({"authorize": blocking(queue, release)}, max_connections=2, env_timeout_s=30.0) as server:
            calls = [asyncio.create_task(run_session("127.0.0.1", server.port, environment())),
                     asyncio.create_task(run_session("127.0.0.1", server.port, environment()))]
            assert [await asyncio.wait_for(queue.get(), 1) for _ in range(2)] == ["entered", "entered"]
            async with raw_client(server) as (reader, _):
                assert await read_to_eof(reader) == b""
            release.set()
            results = await asyncio.gather(*calls)
            # Capacity is back once the two calls are done.
            after = await run_session("127.0.0.1", server.port, environment())
    assert rejected("over_capacity") == before + 1
    assert [r.variables["A2B_STATUS"] for r in (*results, after)] == ["OK", "OK", "OK"]
    (warning,) = warnings_for(logs, "over_capacity")
    assert warning["active"] == 2


async def test_handler_error_is_contained() -> None:
    queue: Queue = asyncio.Queue()

    async def broken(session: AgiSession) -> None:
        await session.execute(set_variable("A2B_STATUS", "ERROR"))
        raise KeyError("bug in a handler")

    before = rejected("handler_error")
    with capture_logs() as logs:
        async with serving({"broken": broken, "authorize": answering(queue)}) as server:
            failed = await run_session("127.0.0.1", server.port, environment(script="broken"))
            ok = await run_session("127.0.0.1", server.port, environment())
    assert failed.server_closed and failed.variables == {"A2B_STATUS": "ERROR"}
    assert ok.variables["A2B_STATUS"] == "OK"
    assert rejected("handler_error") == before + 1
    (error,) = [e for e in logs if e.get("reason") == "handler_error"]
    assert error["log_level"] == "error"
    assert error["script"] == "broken"
    assert isinstance(error["exc_info"], KeyError)


async def test_silent_asterisk_times_out_the_command() -> None:
    queue: Queue = asyncio.Queue()

    async def handler(session: AgiSession) -> None:
        try:
            await session.execute(*ANSWER)
        except TimeoutError as exc:
            await queue.put(exc)
            try:
                await session.execute(*ANSWER)  # the session is unusable now
            except ProtocolError as again:
                await queue.put(again)
            raise

    before = rejected("timeout")
    with capture_logs() as logs:
        async with serving({"authorize": handler}) as server, raw_client(server) as (reader, writer):
            writer.write(encode_environment(environment()))
            sent = await read_to_eof(reader)  # never answers; the server gives up and closes
    assert sent == b"".join(ANSWER)
    assert isinstance(queue.get_nowait(), TimeoutError)
    assert "already failed (timeout)" in str(queue.get_nowait())
    assert rejected("timeout") == before + 1
    (warning,) = warnings_for(logs, "timeout")
    assert warning["event"] == "agi session failed"


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"200 result=1\n", "eof"),
        (b"200 result=1\nthis is not a reply\n", "malformed"),
        (b"200 result=1\n200 result=1 (" + b"x" * 3000, "overrun"),  # a line past max_env_bytes (2048)
    ],
    ids=["eof", "malformed", "overrun"],
)
async def test_broken_asterisk_mid_session(answer: bytes, reason: str) -> None:
    queue: Queue = asyncio.Queue()

    async def handler(session: AgiSession) -> None:
        try:
            await session.execute(*ANSWER)
        except ProtocolError as exc:
            await queue.put((session.failure, exc))
            raise

    before = rejected(reason)
    async with serving({"authorize": handler}) as server, raw_client(server) as (reader, writer):
        writer.write(encode_environment(environment()))
        async with asyncio.timeout(1):
            await reader.readexactly(len(b"".join(ANSWER)))
        writer.write(answer)
        writer.write_eof()
        assert await read_to_eof(reader) == b""
    failure, exc = queue.get_nowait()
    assert failure == reason
    assert isinstance(exc, ProtocolError)
    assert rejected(reason) == before + 1


async def test_replies_split_anywhere_across_reads() -> None:
    """Replies, a HANGUP and a 520 block dribbled one byte per TCP write still pair with the commands."""
    queue: Queue = asyncio.Queue()
    commands = (*ANSWER, format_command("GET", "VARIABLE"), format_command("GET", "VARIABLE", "X"))
    answer = (b"200 result=1\nHANGUP\n200 result=1\n200 result=1\n520-Invalid command syntax.  Proper usage"
              b" follows:\nUsage: GET VARIABLE <variablename>\n520 End of proper usage.\n200 result=1 (a b)\n")
    async with serving({"authorize": answering(queue, commands)}) as server, raw_client(server) as (reader, writer):
        writer.write(encode_environment(environment()))
        async with asyncio.timeout(1):
            await reader.readexactly(len(b"".join(commands)))
        for i in range(len(answer)):
            writer.write(answer[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)
        async with asyncio.timeout(2):
            seen = await queue.get()
    assert [r.code for r in seen.replies] == [200, 200, 200, 520, 200]
    assert seen.replies[4].data == "a b"
    assert seen.hungup is True


async def test_execute_refuses_a_command_that_is_not_one_line() -> None:
    queue: Queue = asyncio.Queue()

    async def handler(session: AgiSession) -> None:
        for bad in (b"NOOP", b"NOOP\nNOOP\n", b"SET VARIABLE A B\nANSWER"):
            try:
                await session.execute(bad)
            except ValueError as exc:
                await queue.put(exc)
        await queue.put(await session.execute())

    async with serving({"authorize": handler}) as server:
        result = await run_session("127.0.0.1", server.port, environment())
    assert [type(queue.get_nowait()) for _ in range(3)] == [ValueError] * 3
    assert queue.get_nowait() == []
    assert result.commands == []  # nothing reached Asterisk


# -- who may connect --------------------------------------------------------------------------------------


async def session_from(server: AgiServer, local: str, env: Mapping[str, str]) -> bytes:
    """A FastAGI session played from address `local`: the environment, then "200 result=1" for every
    command line, until the server closes. Returns the commands received (b"" when refused)."""
    received = b""
    async with raw_client(server, local) as (reader, writer):
        writer.write(encode_environment(env))
        async with asyncio.timeout(2):
            while True:
                try:
                    chunk = await reader.read(4096)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += chunk
                writer.write(b"200 result=1\n" * chunk.count(b"\n"))
    return received


async def test_a_stranger_is_closed_unread_and_counted() -> None:
    queue: Queue = asyncio.Queue()
    before, eofs, malformed = rejected("peer"), rejected("eof"), rejected("malformed")
    served = sessions("authorize")
    with capture_logs() as logs:
        async with serving({"authorize": answering(queue)}) as server:
            # The allowed addresses are loopback's 127.0.0.1 and ::1 alone: 127.0.0.2 is a stranger.
            assert [str(n) for n in server.allowed] == ["127.0.0.1/32", "::1/128"]
            strangers = [await session_from(server, "127.0.0.2", environment()) for _ in range(3)]
            assert await eventually(lambda: rejected("peer") == before + 3)
            honest = await session_from(server, "127.0.0.1", environment())
            assert await eventually(lambda: server.active == 0)
    assert strangers == [b"", b"", b""]  # no command, whatever the stranger wrote
    assert honest == b"".join(ANSWER)
    assert queue.qsize() == 1 and queue.get_nowait().peer[0] == "127.0.0.1"
    assert sessions("authorize") == served + 1
    # Closed before a byte was read: no environment was waited for, none was parsed.
    assert (rejected("eof"), rejected("malformed")) == (eofs, malformed)
    (warning,) = warnings_for(logs, "peer")  # three refusals, one line: logged once per address a while
    assert warning["event"] == "agi connection rejected"
    assert warning["peer"].startswith("127.0.0.2:")
    assert warning["suppressed"] == 0


@pytest.mark.parametrize(
    ("allow", "peers"),
    [("127.0.0.2", ()), ("127.0.0.0/30", ()), ("", ("127.0.0.2",)), ("", ("127.0.0.0/30",))],
    ids=["allow-address", "allow-network", "asterisk-address", "asterisk-network"],
)
async def test_configured_addresses_are_answered(allow: str, peers: tuple[str, ...]) -> None:
    queue: Queue = asyncio.Queue()
    before = rejected("peer")
    async with serving({"authorize": answering(queue)}, allow=allow, peers=peers) as server:
        allowed = await session_from(server, "127.0.0.2", environment())
        stranger = await session_from(server, "127.0.0.4", environment())
    assert allowed == b"".join(ANSWER)
    assert queue.get_nowait().peer[0] == "127.0.0.2"
    assert stranger == b"" and queue.empty()
    assert rejected("peer") == before + 1


async def test_a_reload_changes_who_may_connect_and_keeps_the_asterisk_peers() -> None:
    queue: Queue = asyncio.Queue()
    async with serving({"authorize": answering(queue)}, peers=("127.0.0.3",)) as server:
        assert await session_from(server, "127.0.0.2", environment()) == b""
        server.reconfigure(replace(SETTINGS, allow="127.0.0.2", port=1, shed_after_s=0.3))  # port: not rebound
        assert server.shed_after_s == 0.3 and server.port != 1
        assert await session_from(server, "127.0.0.2", environment()) == b"".join(ANSWER)
        with pytest.raises(ValueError):  # a list that does not parse changes nothing
            server.reconfigure(replace(SETTINGS, allow="127.0.0.300"))
        assert server.shed_after_s == 0.3
        assert await session_from(server, "127.0.0.2", environment()) == b"".join(ANSWER)
        server.reconfigure(SETTINGS)
        assert await session_from(server, "127.0.0.2", environment()) == b""
        assert await session_from(server, "127.0.0.3", environment()) == b"".join(ANSWER)
    assert [queue.get_nowait().peer[0] for _ in range(queue.qsize())] == ["127.0.0.2", "127.0.0.2", "127.0.0.3"]


async def test_ipv6_loopback_is_allowed() -> None:
    queue: Queue = asyncio.Queue()
    async with serving({"authorize": answering(queue)}, host="::1") as server:
        assert await session_from(server, "::1", environment()) == b"".join(ANSWER)
    assert queue.get_nowait().peer[0] == "::1"


async def test_an_asterisk_given_by_name_is_resolved_at_start() -> None:
    with capture_logs() as logs:
        async with serving({}, peers=("localhost",)):
            pass
    (resolved,) = [e for e in logs if e["event"] == "agi peer resolved"]
    assert resolved["peer"] == "localhost" and "127.0.0.1" in resolved["addresses"]
    server = AgiServer(SETTINGS, {}, peers=("no-such-host.invalid",))
    with pytest.raises(ConfigError, match=r"'no-such-host.invalid' is not an address .* agi_addresses"):
        await server.start()
    assert server.sockets == ()  # nothing was bound


# -- slow clients and floods ------------------------------------------------------------------------------


async def trickle(port: int, data: bytes, interval_s: float, max_bytes: int) -> int | None:
    """Write `data` one byte every `interval_s` seconds, at most `max_bytes` of it, until the server closes.
    Returns how many bytes were written when the server closed, or None if it never did."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    closed = asyncio.ensure_future(reader.read())  # b"" (or a reset) once the server closes
    sent = 0
    try:
        for byte in data[:max_bytes]:
            if closed.done():
                break
            writer.write(bytes([byte]))
            sent += 1
            await asyncio.wait({closed}, timeout=interval_s)
        return sent if closed.done() else None
    finally:
        closed.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await closed
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_a_trickling_client_is_cut_by_the_whole_header_deadline() -> None:
    """A byte every 50 ms: no single read waits long, yet the block must be complete within env_timeout_s."""
    queue: Queue = asyncio.Queue()
    before = rejected("timeout")
    header = encode_environment(environment())
    async with serving({"authorize": answering(queue)}, env_timeout_s=0.3) as server:
        sent = await trickle(server.port, header, 0.05, 60)
    assert sent is not None and sent < 60, "the server kept a trickling client past 60 bytes"
    assert rejected("timeout") == before + 1
    assert queue.empty()


async def test_trickled_replies_are_cut_by_the_batch_deadline() -> None:
    queue: Queue = asyncio.Queue()

    async def handler(session: AgiSession) -> None:
        try:
            await session.execute(*ANSWER)
        except TimeoutError as exc:
            await queue.put((session.failure, exc))
            raise

    before = rejected("timeout")
    replies = b"200 result=1\n" * len(ANSWER)
    async with serving({"authorize": handler}, command_timeout_s=0.3) as server, raw_client(server) as (r, w):
        w.write(encode_environment(environment()))
        async with asyncio.timeout(1):
            await r.readexactly(len(b"".join(ANSWER)))
        sent = 0
        for byte in replies:  # a byte every 50 ms: 39 bytes, far past the 0.3 s the batch may take
            if not queue.empty():
                break
            w.write(bytes([byte]))
            sent += 1
            await asyncio.sleep(0.05)
        assert await read_to_eof(r) == b""
    failure, exc = queue.get_nowait()
    assert failure == "timeout" and isinstance(exc, TimeoutError)
    assert sent < len(replies)
    assert rejected("timeout") == before + 1


async def test_honest_calls_are_answered_through_slow_clients_and_a_flood() -> None:
    """A flood of silent connections past the cap, then slow clients (a byte a second) that stay attached,
    then honest calls all at once: every honest call is answered, and the counters say what was shed."""
    cap, flood_n, slow_n, honest_n = 16, 30, 4, 10
    queue: Queue = asyncio.Queue()
    header = encode_environment(environment())
    shed0, over0, served = rejected("shed_slow"), rejected("over_capacity"), sessions("authorize")
    with capture_logs() as logs:
        async with (
            serving({"authorize": answering(queue)}, max_connections=cap, env_timeout_s=30.0,
                    shed_after_s=0.1) as server,
            contextlib.AsyncExitStack() as attached,
        ):
            # 1. The flood: each connection past the cap is refused, or sheds an older silent one.
            for _ in range(flood_n):
                await attached.enter_async_context(raw_client(server))
            assert await eventually(
                lambda: rejected("shed_slow") + rejected("over_capacity") == shed0 + over0 + flood_n - cap)
            assert await eventually(lambda: server.active == cap)
            await asyncio.sleep(0.25)  # the flood's connections are now past shed_after_s
            # 2. Slow clients: each takes the slot of the oldest silent connection, and keeps it.
            shed1, over1 = rejected("shed_slow"), rejected("over_capacity")
            slow = [asyncio.create_task(trickle(server.port, header, 1.0, 30)) for _ in range(slow_n)]
            try:
                assert await eventually(lambda: rejected("shed_slow") == shed1 + slow_n)
                assert rejected("over_capacity") == over1
                await asyncio.sleep(0.25)  # the slow clients are past shed_after_s too
                # 3. Honest calls, all at once, at capacity: they shed the oldest (the flood), never refused.
                shed2 = rejected("shed_slow")
                results = await asyncio.gather(
                    *(run_session("127.0.0.1", server.port, environment()) for _ in range(honest_n)))
                assert not any(task.done() for task in slow)  # still trickling: the flood went first
            finally:
                for task in slow:
                    task.cancel()
                await asyncio.gather(*slow, return_exceptions=True)
    assert [r.variables.get("A2B_STATUS") for r in results] == ["OK"] * honest_n
    assert all(r.server_closed for r in results)
    assert queue.qsize() == honest_n and sessions("authorize") == served + honest_n
    assert rejected("over_capacity") == over1  # no honest call was refused
    assert shed2 < rejected("shed_slow") <= shed2 + honest_n
    # Dozens of refusals from one address, one warning line per reason (see LogThrottle in a2bd/observability.py).
    assert len(warnings_for(logs, "shed_slow")) == 1
    assert len(warnings_for(logs, "over_capacity")) <= 1


# -- shutdown ---------------------------------------------------------------------------------------------


async def test_close_lets_a_session_in_flight_finish() -> None:
    queue: Queue = asyncio.Queue()
    release = asyncio.Event()
    server = AgiServer(SETTINGS, {"authorize": blocking(queue, release)})
    await server.start()
    port = server.port
    call = asyncio.create_task(run_session("127.0.0.1", port, environment()))
    assert await asyncio.wait_for(queue.get(), 1) == "entered"
    closing = asyncio.create_task(server.close(grace_s=2.0))
    await asyncio.sleep(0.05)
    assert not closing.done()
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        await asyncio.open_connection("127.0.0.1", port)
    release.set()
    async with asyncio.timeout(2):
        await closing
    result = await call
    assert queue.get_nowait() == "answered"
    assert result.server_closed and result.variables["A2B_STATUS"] == "OK"
    assert server.sockets == ()


async def test_close_cancels_sessions_past_the_grace() -> None:
    queue: Queue = asyncio.Queue()
    server = AgiServer(SETTINGS, {"authorize": blocking(queue, asyncio.Event())})
    await server.start()
    call = asyncio.create_task(run_session("127.0.0.1", server.port, environment()))
    assert await asyncio.wait_for(queue.get(), 1) == "entered"
    with capture_logs() as logs:
        await asyncio.wait_for(server.close(grace_s=0.1), 2)
    result = await asyncio.wait_for(call, 1)
    assert queue.get_nowait() == "cancelled"
    assert result.server_closed and result.variables == {}
    assert [e["count"] for e in logs if e["event"] == "agi sessions cancelled at shutdown"] == [1]
    assert server.active == 0


async def test_server_lifecycle_errors() -> None:
    server = AgiServer(SETTINGS, {})
    assert server.sockets == ()
    with pytest.raises(RuntimeError):
        _ = server.port
    async with server:
        assert server.port > 0
        with pytest.raises(RuntimeError):
            await server.start()
    await server.close()  # closing twice is harmless
