"""The AMI parser against hostile bytes: arbitrary bytes and mutated recordings of a real Asterisk 22, in
arbitrary chunkings (as TCP may cut them). Whatever arrives, the parser only returns messages or raises
ProtocolError; it never holds more than its limit between reads; once it has refused a stream it refuses
every later read; the limit and the chunking only ever cut the stream short, never change a message; and a
stream whose messages fit the limit gives the same messages however it is cut.

The reference for a stream is the parser fed the whole of it at once with no effective limit. Each test is
bounded in examples and sizes (and by the suite's per-test timeout, which is what catches a hang).
fuzz/ami_fuzz.py drives the same properties under atheris, outside the test suite.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from a2bd.ami.protocol import DEFAULT_MAX_MESSAGE_BYTES, AmiMessage, AmiParser, parse_message
from a2bd.errors import ProtocolError
from tests.transcripts import ami_files, load_capture

STREAMS = [c.received for path in ami_files() for c in load_capture(path)]
TERMINATOR = b"\r\n\r\n"
BANNER = b"Asterisk Call Manager/11.0.0\r\n"
# Pieces that make the parser's decisions: line and message ends (whole and split), the separator, the
# banner, event names the filter keeps or drops, an ActionID, invalid and split UTF-8.
PIECES = [b"\r\n", TERMINATOR, b"\r", b"\n", b"\r\n\r", b": ", b":", b"Event: ", b"Event: Hangup\r\n",
          b"Event: Newexten\r\n", b"ActionID: 7\r\n", b"ActionID:\r\n", b"Response: Success\r\n",
          BANNER, b"Asterisk Call Manager/", b"\xff", b"\xe2\x82", b"\xac", b"x" * 40]
LIMITS = [8, 64, 300, 1000, DEFAULT_MAX_MESSAGE_BYTES]  # recorded messages are up to 923 bytes
EVENTS = frozenset({"Hangup", "Cdr", "DialEnd"})
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True, slots=True)
class Run:
    messages: list[AmiMessage]
    refused: bool  # a feed raised ProtocolError


def run(chunks: list[bytes], *, limit: int, banner: bool, events: frozenset[str] | None = None) -> Run:
    """Feed `chunks` in order, checking after each read what must hold whatever the bytes."""
    parser = AmiParser(max_message_bytes=limit, expect_banner=banner, events=events)
    messages: list[AmiMessage] = []
    for chunk in chunks:
        try:
            messages += parser.feed(chunk)
        except ProtocolError:  # anything else fails the test
            for again in (b"", b"\r\n\r\n", chunk):  # refused for good: no resynchronising on later bytes
                try:
                    parser.feed(again)
                except ProtocolError:
                    continue
                raise AssertionError(f"a refused parser accepted {again!r} afterwards") from None
            return Run(messages, True)
        assert parser.buffered <= limit, f"{parser.buffered} bytes held over a limit of {limit}"
    return Run(messages, False)


def reference(data: bytes, *, banner: bool) -> Run:
    return run([data], limit=len(data) + 8, banner=banner)


def fits(data: bytes, limit: int, *, banner: bool) -> bool:
    """Whether no read can ever hold more than `limit` bytes, however the stream is cut: each message (and
    the banner line) fits with the start of its terminator."""
    if banner:
        line, eol, data = data.partition(b"\r\n")
        if len(line) + 1 > limit or not eol:
            return len(line) + 1 <= limit  # held until its end; none: all there is
    return all(len(segment) + 3 <= limit for segment in data.split(TERMINATOR))


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    if len(data) <= 300 and draw(st.booleans()):
        return [data[i : i + 1] for i in range(len(data))]
    points = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=40))))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


hostile_bytes = st.one_of(
    st.binary(max_size=2000),
    st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=12)), max_size=120).map(b"".join),
)


@st.composite
def mutated_recording(draw: st.DrawFn) -> bytes:
    """A recorded stream (a real Asterisk 22 connection) with a few bytes flipped, inserted, deleted,
    repeated or cut off."""
    data = bytearray(draw(st.sampled_from(STREAMS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "repeat", "truncate"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.one_of(st.sampled_from(PIECES), st.binary(min_size=1, max_size=64)))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 3000))]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


def check(data: bytes, chunks: list[bytes], limit: int, banner: bool) -> None:
    assert b"".join(chunks) == data
    whole = reference(data, banner=banner)
    got = run(chunks, limit=limit, banner=banner)
    if whole.refused:  # not an AMI server: refused before any message, whatever the cut
        assert got.messages == []
        return
    # The limit and the chunking cut the stream short at most; they never change or invent a message.
    assert got.messages == whole.messages[: len(got.messages)]
    if not got.refused:
        assert got.messages == whole.messages
    if fits(data, limit, banner=banner):
        assert not got.refused and got.messages == whole.messages


@FUZZ
@given(data=st.data(), stream=hostile_bytes, limit=st.sampled_from(LIMITS), banner=st.booleans())
def test_arbitrary_bytes_in_arbitrary_chunks(data: st.DataObject, stream: bytes, limit: int, banner: bool) -> None:
    check(stream, data.draw(chunked(stream)), limit, banner)


@FUZZ
@given(data=st.data(), stream=mutated_recording(), limit=st.sampled_from(LIMITS))
def test_mutated_recordings_in_arbitrary_chunks(data: st.DataObject, stream: bytes, limit: int) -> None:
    check(stream, data.draw(chunked(stream)), limit, banner=True)


@FUZZ
@given(data=st.data(), index=st.integers(0, len(STREAMS) - 1),
       limit=st.sampled_from([1000, DEFAULT_MAX_MESSAGE_BYTES]))
def test_a_recording_gives_the_same_messages_however_it_is_cut(data: st.DataObject, index: int, limit: int) -> None:
    stream = STREAMS[index]
    got = run(data.draw(chunked(stream)), limit=limit, banner=True)
    assert not got.refused
    assert got.messages == reference(stream, banner=True).messages
    assert len(got.messages) > 30  # a real connection's worth: the comparison is not between two empty lists


@FUZZ
@given(data=st.data(), stream=st.one_of(mutated_recording(), hostile_bytes.map(lambda b: BANNER + b)))
def test_the_event_filter_drops_only_unwanted_events(data: st.DataObject, stream: bytes) -> None:
    check_filter(stream, data.draw(chunked(stream)), banner=True)


def check_filter(stream: bytes, chunks: list[bytes], *, banner: bool) -> None:
    """The event filter drops only events it was not asked for that answer no action, whatever the cuts."""
    everything = reference(stream, banner=banner)
    filtered = run(chunks, limit=len(stream) + 8, banner=banner, events=EVENTS)
    assert filtered.refused == everything.refused
    kept = iter(filtered.messages)
    following = next(kept, None)
    for message in everything.messages:
        if message == following:
            following = next(kept, None)
            continue
        # dropped: an event it was not asked for, answering no action of ours
        assert message.event is not None and message.event not in EVENTS and not message.action_id
    assert following is None, "the filter returned a message the stream does not hold"


@FUZZ
@given(block=st.one_of(st.binary(max_size=500),
                       st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join)))
def test_parse_message_takes_any_block(block: bytes) -> None:
    message = parse_message(block)
    if message is None:
        assert not block.replace(b"\r\n", b"")  # only empty lines
        return
    assert message.headers and all(isinstance(k, str) and isinstance(v, str) for k, v in message.headers)
    assert message.as_dict() == {k: message.get(k) for k, _ in message.headers}


def test_fits_is_exact_at_its_edge() -> None:
    # a 10-byte message plus the "\r\n\r" of its terminator is 13 bytes held before the last "\n"
    stream = b"Event: Abc" + TERMINATOR
    assert fits(stream, 13, banner=False) and not fits(stream, 12, banner=False)
    assert run([stream[:-1], stream[-1:]], limit=13, banner=False) == Run(parse_message_list(stream), False)
    assert run([stream[:-1], stream[-1:]], limit=12, banner=False).refused


def parse_message_list(stream: bytes) -> list[AmiMessage]:
    return [m for block in stream.split(TERMINATOR)[:-1] if (m := parse_message(block)) is not None]
