"""Hostile bytes against the sans-I/O FastAGI protocol, fuzzed with hypothesis.

Whatever the bytes and wherever TCP cuts them, the parser gives a value or a ProtocolError (ValueError only
for a caller breaking the API's contract), never another exception; every loop makes progress; and what it
holds stays under its documented bound: a ReplyStream never more than its `max_bytes`, an open usage block
never more than MAX_USAGE_BYTES. The same properties run for longer in fuzz/agi_fuzz.py (atheris).
"""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import example, given
from hypothesis import strategies as st

from a2bd.agi.protocol import (
    MAX_COMMAND_BYTES,
    MAX_USAGE_BYTES,
    AgiReply,
    Hangup,
    OverrunError,
    ReplyStream,
    format_command,
    parse_environment,
    parse_reply_line,
    split_command,
)
from a2bd.errors import ProtocolError
from a2bd.sim.agi import encode_environment, make_environment

Event = AgiReply | Hangup

# -- strategies -------------------------------------------------------------------------------------------

# Sizes of the reads TCP hands the server, cycled over the input.
CUTS = st.lists(st.integers(1, 64), min_size=1, max_size=16)

# Reply lines as res_agi.c writes them (transcripts 09 and 10).
REPLY_LINES = st.sampled_from([
    b"200 result=1", b"200 result=0", b"200 result=-1", b"200 result=1 (5551234)", b"200 result= (timeout)",
    b"200 result=1 (digit) digit=5 endpos=12", b"200 result=0 endpos=8000", b"200 result=1 (a) b (c)",
    b"510 Invalid or unknown command", b"511 Command Not Permitted on a dead channel or intercept routine",
    b"503 result=-2 Memory allocation failure", b"HANGUP",
])
USAGE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=60).map(
    str.encode).filter(lambda b: not b.startswith(b"520"))
USAGE_BLOCKS = st.lists(USAGE_TEXT, max_size=4).map(
    lambda lines: [b"520-Invalid command syntax.  Proper usage follows:", *lines, b"520 End of proper usage."])
REPLY_ITEMS = st.lists(st.one_of(REPLY_LINES.map(lambda line: [line]), USAGE_BLOCKS), max_size=12)

# What a mutation does at a position: insert bytes, delete some, or overwrite one.
MUTATIONS = st.lists(
    st.tuples(st.integers(0, 10_000), st.sampled_from(["insert", "delete", "replace"]),
              st.sampled_from([b"\n", b"\r", b"\n\n", b" ", b":", b": ", b"(", b")", b"=", b"-", b"520-",
                               b"HANGUP\n", b"\xff", b"\xe9", b"\x00", b"agi_", b"200 ", b"x" * 300])),
    min_size=1, max_size=6,
)


def mutate(data: bytes, mutations: list[tuple[int, str, bytes]]) -> bytes:
    for position, op, piece in mutations:
        at = position % (len(data) + 1)
        if op == "insert":
            data = data[:at] + piece + data[at:]
        elif op == "delete":
            data = data[:at] + data[at + len(piece):]
        else:
            data = data[:at] + piece[:1] + data[at + 1:]
    return data


def reply_bytes(items: list[list[bytes]], crlf: bool = False) -> bytes:
    end = b"\r\n" if crlf else b"\n"
    return b"".join(line + end for item in items for line in item)


# -- replies ----------------------------------------------------------------------------------------------


def read_stream(data: bytes, cuts: list[int], max_bytes: int) -> tuple[list[Event], str]:
    """Feed `data` to a ReplyStream the way AgiSession does (a read only when next_event() wants more, never
    more than `room`), in reads of the sizes in `cuts`, cycled. Returns the events and how it ended:
    ``more`` (every byte taken, waiting for the rest) or the error's class and text. Checks the bounds at
    every step."""
    stream = ReplyStream(max_bytes)
    events: list[Event] = []
    position = 0
    sizes = itertools.cycle(cuts)
    # Every turn yields an event (a parsed line: at least its LF consumed) or feeds at least one byte.
    for _ in range(2 * len(data) + 2):
        try:
            event = stream.next_event()
        except ProtocolError as exc:
            return events, f"{type(exc).__name__}: {exc}"
        assert stream.buffered_bytes <= max_bytes
        assert stream.replies.buffered_bytes <= MAX_USAGE_BYTES
        if event is not None:
            events.append(event)
            continue
        if position == len(data):
            return events, "more"
        assert stream.room > 0  # next_event() returns None only with room to read into
        size = min(next(sizes), stream.room, len(data) - position)
        stream.feed(data[position : position + size])
        position += size
        assert stream.buffered_bytes <= max_bytes
    raise AssertionError("the reply stream made no progress")


def check_reply(event: Event) -> None:
    """Every accessor of a parsed reply answers without raising."""
    if isinstance(event, AgiReply):
        assert 0 <= event.code <= 999
        assert event.endpos is None or isinstance(event.endpos, int)
        assert isinstance(event.ok, bool)
        for name, value in event.extras:
            assert event.get(name) is not None and isinstance(value, str)


@given(st.binary(max_size=2048), CUTS, st.integers(1, 512))
@example(b"200 result=1 endpos=\xc2\xb2\n", [1], 64)  # "²" is str.isdigit() but not int(): once a crash
@example(b"200 result=1 endpos=--5\n", [3], 64)
@example(b"520-x\n" + b"y" * 70_000 + b"\n", [64], 100_000)
def test_any_bytes_in_any_reads_give_the_same_replies_or_a_protocol_error(
    data: bytes, cuts: list[int], max_bytes: int
) -> None:
    events, end = read_stream(data, cuts, max_bytes)
    assert (events, end) == read_stream(data, [len(data) or 1], max_bytes)  # TCP's cuts change nothing
    for event in events:
        check_reply(event)


@given(REPLY_ITEMS, st.booleans(), CUTS)
def test_real_replies_in_any_reads(items: list[list[bytes]], crlf: bool, cuts: list[int]) -> None:
    events, end = read_stream(reply_bytes(items, crlf), cuts, 16384)
    assert end == "more"
    assert len(events) == len(items)
    for item, event in zip(items, events, strict=True):
        if item == [b"HANGUP"]:
            assert isinstance(event, Hangup)
        else:
            assert isinstance(event, AgiReply)
            assert event.raw == b"\n".join(item)
            assert len(event.usage) == max(0, len(item) - 2)
            check_reply(event)


@given(REPLY_ITEMS, MUTATIONS, CUTS, st.integers(16, 4096))
def test_near_valid_replies_in_any_reads(
    items: list[list[bytes]], mutations: list[tuple[int, str, bytes]], cuts: list[int], max_bytes: int
) -> None:
    data = mutate(reply_bytes(items), mutations)
    events, end = read_stream(data, cuts, max_bytes)
    assert (events, end) == read_stream(data, [len(data) or 1], max_bytes)
    for event in events:
        check_reply(event)


@given(st.binary(max_size=600))
@example(b"200 result=1 (" + b")x" * 2000)  # one pass over the ")", however many
def test_parse_reply_line_gives_a_reply_or_a_protocol_error(line: bytes) -> None:
    try:
        reply = parse_reply_line(line)
    except ProtocolError as exc:
        assert exc.raw == line or exc.raw == b""
        return
    assert reply.raw == line
    check_reply(reply)


def test_an_unfinished_line_is_an_overrun_at_max_bytes() -> None:
    events, end = read_stream(b"200 result=1\n200 result=1 (" + b"x" * 200, [7], 64)
    assert len(events) == 1
    assert end.startswith("OverrunError: AGI reply line longer than 64 bytes")
    # A line fits when it takes at most max_bytes, its LF included.
    events, end = read_stream(b"200 result=1 (" + b"x" * 48 + b")\n", [7], 64)
    assert end == "more" and len(events) == 1
    events, end = read_stream(b"200 result=1 (" + b"x" * 49 + b")\n", [7], 64)
    assert end.startswith("OverrunError") and events == []


def test_a_usage_block_never_holds_more_than_its_bound() -> None:
    line = b"u" * 1000
    data = b"520-Invalid command syntax.  Proper usage follows:\n" + (line + b"\n") * 80
    events, end = read_stream(data, [4096], 16384)
    assert events == []
    assert end.startswith(f"OverrunError: AGI usage block longer than {MAX_USAGE_BYTES} bytes")


def test_feeding_more_than_the_room_is_refused() -> None:
    stream = ReplyStream(8)
    stream.feed(b"200 ")
    try:
        stream.feed(b"result=1\n")
    except ValueError as exc:
        assert "room for 4" in str(exc)
    else:
        raise AssertionError("feed() took more than its room")
    assert stream.buffered_bytes == 4
    assert issubclass(OverrunError, ProtocolError)


# -- environment ------------------------------------------------------------------------------------------

AGI_KEY = st.from_regex(r"agi_[a-z0-9_]{1,20}", fullmatch=True)
VALUE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=80)


def check_environment(block: bytes) -> None:
    """parse_environment() gives an environment that keeps its promises, or a ProtocolError."""
    try:
        env = parse_environment(block)
    except ProtocolError:
        return
    assert block.endswith(b"\n\n") or block.endswith(b"\n\r\n")
    assert all(key.startswith("agi_") and key.isascii() for key in env.variables)
    assert env.script == env.variables["agi_network_script"]
    assert env.uniqueid == env.variables["agi_uniqueid"]
    assert all(isinstance(arg, str) for arg in env.arguments)


@given(st.binary(max_size=2048))
@example(b"agi_network_script: a\nagi_uniqueid: 1\n\n")
def test_any_bytes_give_an_environment_or_a_protocol_error(block: bytes) -> None:
    check_environment(block)


@given(st.dictionaries(AGI_KEY, VALUE, max_size=30), VALUE, VALUE)
def test_every_environment_asterisk_can_write_round_trips(extra: dict[str, str], script: str, uid: str) -> None:
    env = {**extra, "agi_network_script": script, "agi_uniqueid": uid}
    assert dict(parse_environment(encode_environment(env)).variables) == env


@given(MUTATIONS)
def test_near_valid_environments(mutations: list[tuple[int, str, bytes]]) -> None:
    env = make_environment(uniqueid="1795374860.7", channel="Local/2000@billing-00000007;2", extension="2000",
                           args=("442071234567",))
    check_environment(mutate(encode_environment(env), mutations))


async def _read_block(data: bytes, cuts: list[int], limit: int) -> bytes | str:
    """The server's read of the environment (readuntil on a stream limited to agi.max_env_bytes), fed the
    bytes in reads of the sizes in `cuts`; the outcome named as the server's reject reason."""
    reader = asyncio.StreamReader(limit=limit)
    task = asyncio.ensure_future(reader.readuntil(b"\n\n"))
    position = 0
    sizes = itertools.cycle(cuts)
    while position < len(data) and not task.done():
        size = next(sizes)
        reader.feed_data(data[position : position + size])
        position += size
        await asyncio.sleep(0)  # the reading task wakes after each read, as on a socket
    reader.feed_eof()
    try:
        return await task
    except asyncio.IncompleteReadError:
        return "eof"
    except (asyncio.LimitOverrunError, ValueError):
        return "overrun"


@given(st.one_of(st.binary(max_size=700), MUTATIONS.map(lambda m: mutate(encode_environment(make_environment(
    uniqueid="1.1", channel="Local/1@b-1;2", extension="1")), m))), CUTS, st.integers(256, 1024))
def test_the_environment_read_in_any_reads(data: bytes, cuts: list[int], limit: int) -> None:
    outcome = asyncio.run(_read_block(data, cuts, limit))
    assert outcome == asyncio.run(_read_block(data, [len(data) or 1], limit))
    if isinstance(outcome, bytes):
        assert outcome.endswith(b"\n\n") and len(outcome) <= limit + 2
        check_environment(outcome)


# -- commands ---------------------------------------------------------------------------------------------


@given(st.lists(st.text(max_size=300), max_size=130))
def test_format_command_gives_one_line_or_a_value_error(words: list[str]) -> None:
    try:
        line = format_command(*words)
    except ValueError:  # UnicodeEncodeError (a lone surrogate) is one too
        return
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and len(line) <= MAX_COMMAND_BYTES
    assert b"\r" not in line and b"\0" not in line
    assert split_command(line[:-1].decode()) == words
