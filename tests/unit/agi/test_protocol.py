"""The sans-I/O FastAGI protocol, fed the bytes Asterisk 22 sent (tests/fixtures/asterisk/*.agi.txt)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from a2bd.agi.protocol import (
    HANGUP,
    MAX_COMMAND_BYTES,
    MAX_USAGE_BYTES,
    AgiReply,
    Hangup,
    ReplyReader,
    format_command,
    get_variable,
    parse_environment,
    parse_reply_line,
    quote_word,
    set_variable,
    split_command,
)
from a2bd.errors import ProtocolError
from a2bd.sim.agi import encode_environment, make_environment, split_chunks
from tests.transcripts import Capture, agi_files, load_capture

CAPTURES = [c for path in agi_files() for c in load_capture(path)]
CAPTURE_IDS = [f"{c.scenario}#{c.index}" for c in CAPTURES]


def env_block(capture: Capture) -> bytes:
    return capture.received[: capture.received.index(b"\n\n") + 2]


def read_events(data: bytes) -> list[AgiReply | Hangup]:
    reader = ReplyReader()
    events: list[AgiReply | Hangup] = []
    for line in data.split(b"\n")[:-1]:
        event = reader.feed_line(line)
        if event is not None:
            events.append(event)
    assert not reader.in_block
    return events


def test_every_agi_fixture_is_loaded() -> None:
    assert len(agi_files()) == 11
    assert len(CAPTURES) == 12  # 08 holds two sessions


# -- environment ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capture", CAPTURES, ids=CAPTURE_IDS)
def test_recorded_environment(capture: Capture) -> None:
    env = parse_environment(env_block(capture))
    channel = re.search(r"agi_channel (\S+)\)", capture.header[-3]).group(1)  # the "=====" line
    assert env.script == "authorize"
    assert env.request == "agi://127.0.0.1:4573/authorize"
    assert env.channel == channel
    assert re.fullmatch(r"1795374\d{3}\.\d+", env.uniqueid)
    assert (env.callerid, env.calleridname) == ("5551234", "Test")
    assert env.context == "billing"
    assert env.extension == channel.split("/")[1].split("@")[0]
    assert env.accountcode == ""  # "agi_accountcode: " with its trailing space
    assert env.version == "22.10.1"
    assert env.arguments == ()
    assert env.get("agi_priority") == "4"
    assert env.get("agi_no_such_key", "?") == "?"


@pytest.mark.parametrize("capture", CAPTURES, ids=CAPTURE_IDS)
def test_simulator_environment_is_byte_identical(capture: Capture) -> None:
    env = parse_environment(env_block(capture))
    sim = make_environment(uniqueid=env.uniqueid, channel=env.channel, extension=env.extension)
    sim["agi_threadid"] = env.get("agi_threadid")
    assert list(sim) == list(env.variables)
    assert encode_environment(sim) == env_block(capture)


def test_arguments_follow_threadid_in_order() -> None:
    sim = make_environment(uniqueid="1.2", channel="Local/1@x-1;2", extension="1", args=("442071234567", ""))
    assert list(sim)[-3:] == ["agi_threadid", "agi_arg_1", "agi_arg_2"]
    assert parse_environment(encode_environment(sim)).arguments == ("442071234567", "")


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        pytest.param(
            b"agi_network_script: authorize\r\nagi_uniqueid: 1.2\r\n\r\n",
            {"agi_network_script": "authorize", "agi_uniqueid": "1.2"},
            id="crlf-from-a-proxy",
        ),
        pytest.param(
            b"agi_network_script: authorize\nagi_uniqueid: 1.2\nagi_accountcode:\n\n",
            {"agi_network_script": "authorize", "agi_uniqueid": "1.2", "agi_accountcode": ""},
            id="key-colon-without-space",
        ),
        pytest.param(
            b"agi_network_script: authorize\nagi_uniqueid: 1.2\nagi_calleridname: A: B \n\n",
            {"agi_network_script": "authorize", "agi_uniqueid": "1.2", "agi_calleridname": "A: B "},
            id="value-kept-raw",
        ),
        pytest.param(
            "agi_network_script: authorize\nagi_uniqueid: 1.2\nagi_calleridname: Zoë\n\n".encode(),
            {"agi_network_script": "authorize", "agi_uniqueid": "1.2", "agi_calleridname": "Zoë"},
            id="utf8",
        ),
    ],
)
def test_environment_variants_accepted(block: bytes, expected: dict[str, str]) -> None:
    assert dict(parse_environment(block).variables) == expected


def test_a_latin1_caller_name_does_not_lose_the_call() -> None:
    # SIP trunks send Latin-1 display names; Asterisk passes the bytes through unchanged.
    env = parse_environment(b"agi_network_script: authorize\nagi_calleridname: Andr\xe9\nagi_uniqueid: 1\n\n")
    assert env.calleridname == "Andr\ufffd"
    assert env.uniqueid == "1"


GOOD = b"agi_network_script: authorize\nagi_uniqueid: 1.2\n"


@pytest.mark.parametrize(
    ("block", "raw"),
    [
        pytest.param(GOOD + b"agi_caller\xe9d: 1\n\n", b"agi_caller\xe9d: 1", id="key-not-ascii"),
        pytest.param(GOOD + b"agi_callerid 5551234\n\n", b"agi_callerid 5551234", id="no-colon-space"),
        pytest.param(GOOD + b"agi_request:agi://x/y\n\n", b"agi_request:agi://x/y", id="colon-without-space"),
        pytest.param(GOOD + b"Host: example.org\n\n", b"Host: example.org", id="not-agi-key"),
        pytest.param(GOOD + b"agi_uniqueid: 3.4\n\n", b"agi_uniqueid: 3.4", id="duplicate"),
        pytest.param(b"agi_uniqueid: 1.2\n\n", None, id="no-script"),
        pytest.param(b"agi_network_script: authorize\n\n", None, id="no-uniqueid"),
        pytest.param(GOOD, None, id="no-empty-line"),
        pytest.param(GOOD + b"\nagi_extra: 1\n\n", b"", id="empty-line-inside"),
        pytest.param(b"\n", None, id="empty"),
        pytest.param(b"GET / HTTP/1.0\n\n", b"GET / HTTP/1.0", id="http"),
    ],
)
def test_malformed_environment(block: bytes, raw: bytes | None) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_environment(block)
    if raw is not None:
        assert caught.value.raw == raw


# -- replies ----------------------------------------------------------------------------------------------


def ok(result: str, data: str | None = None) -> tuple[int, str | None, str | None]:
    return 200, result, data


# (code, result, data) of every reply, in order, for the sessions that are not just three SET VARIABLEs.
EXPECTED_REPLIES: dict[str, list[tuple[int, str | None, str | None] | Hangup]] = {
    "09-agi-misc-commands": [
        ok("1"), ok("1"), ok("1"),                         # SET VARIABLE x3
        ok("1", "5551234"),                                 # GET VARIABLE CALLERID(num)
        ok("1", "1000000001"),                              # GET FULL VARIABLE ${CHANNEL(accountcode)}
        ok("1"),                                            # VERBOSE "hello" 1
        (510, None, None),                                  # FOO BAR
        ok("1"),                                            # SET VARIABLE A2B_NOTE "say \"hi\" ..."
        ok("1", 'say "hi" to Bob\'s phone, then wait'),     # GET VARIABLE A2B_NOTE: raw, not escaped
        ok("1", 'say "hi" to Bob\'s phone, then wait'),     # GET FULL VARIABLE ${A2B_NOTE}
        ok("0"),                                            # GET VARIABLE A2B_NO_SUCH_VAR
        (520, None, None),                                  # GET VARIABLE (no argument): usage block
        HANGUP,                                             # after the half-close
    ],
    "10-caller-hangup-during-agi": [
        HANGUP,                                             # caller hung up before any command
        ok("1"), ok("1"), ok("1"),                          # SET VARIABLE works on a dead channel
        (511, None, None),                                  # ANSWER does not
        ok("1", "5551234"),                                 # GET VARIABLE CALLERID(num) does
        HANGUP,                                             # after the half-close
    ],
}


def shape(event: AgiReply | Hangup) -> tuple[int, str | None, str | None] | Hangup:
    return event if isinstance(event, Hangup) else (event.code, event.result, event.data)


@pytest.mark.parametrize("capture", CAPTURES, ids=CAPTURE_IDS)
def test_recorded_replies(capture: Capture) -> None:
    events = read_events(capture.received[len(env_block(capture)) :])
    replies = [e for e in events if isinstance(e, AgiReply)]
    assert len(replies) == len(capture.sent_lines())  # exactly one reply per command
    default = [ok("1")] * len(capture.sent_lines()) + [HANGUP]
    assert [shape(e) for e in events] == EXPECTED_REPLIES.get(capture.scenario, default)


def test_recorded_usage_block() -> None:
    (capture,) = load_capture(agi_files()[-2])
    assert capture.scenario == "09-agi-misc-commands"
    events = read_events(capture.received[len(env_block(capture)) :])
    usage = [e for e in events if isinstance(e, AgiReply) and e.code == 520]
    assert len(usage) == 1
    reply = usage[0]
    assert reply.text == "Invalid command syntax.  Proper usage follows:"
    assert reply.usage[0].startswith("Returns <literal>0</literal> if <replaceable>variablename")
    # The usage text quotes a reply; inside the block it is text, not a reply.
    assert reply.usage[1] == "Example return code: 200 result=1 (testvariable)"
    assert reply.raw.endswith(b"\n520 End of proper usage.")
    assert not reply.ok


Extras = tuple[tuple[str, str], ...]


@pytest.mark.parametrize(
    ("line", "code", "result", "data", "extras"),
    [
        (b"200 result=1", 200, "1", None, ()),
        (b"200 result=0", 200, "0", None, ()),
        (b"200 result=-1", 200, "-1", None, ()),
        (b"200 result=1 (5551234)", 200, "1", "5551234", ()),
        (b"200 result=1 ()", 200, "1", "", ()),
        (b"200 result= (timeout)", 200, "", "timeout", ()),  # GET DATA timed out, no digit
        (b"200 result=12 (timeout)", 200, "12", "timeout", ()),
        (b"200 result=0 endpos=8000", 200, "0", None, (("endpos", "8000"),)),
        (b"200 result=1 (digit) digit=5 endpos=12", 200, "1", "digit", (("digit", "5"), ("endpos", "12"))),
        # A variable's value may hold parentheses: the data runs to the last ")".
        (b"200 result=1 (a) b (c)", 200, "1", "a) b (c", ()),
        (b"200 result=1 (x) endpos=3)", 200, "1", "x) endpos=3", ()),
        (b"510 Invalid or unknown command", 510, None, None, ()),
        (b"511 Command Not Permitted on a dead channel or intercept routine", 511, None, None, ()),
        (b"520 Invalid command syntax.  Proper usage not available.", 520, None, None, ()),
        (b"503 result=-2 Memory allocation failure", 503, "-2", None, ()),
    ],
)
def test_reply_lines(line: bytes, code: int, result: str | None, data: str | None, extras: Extras) -> None:
    expected = AgiReply(code, result, data, extras, text=line[4:].decode(), raw=line)
    assert parse_reply_line(line) == expected
    assert ReplyReader().feed_line(line) == expected
    assert ReplyReader().feed_line(line + b"\r") == expected


def test_reply_accessors() -> None:
    reply = parse_reply_line(b"200 result=1 (digit) digit=5 endpos=1200")
    assert reply.ok
    assert (reply.get("digit"), reply.get("endpos"), reply.get("nope")) == ("5", "1200", None)
    assert reply.endpos == 1200
    assert parse_reply_line(b"200 result=1").endpos is None
    assert not parse_reply_line(b"510 Invalid or unknown command").ok


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"garbage",
        b"20 result=1",
        b"2000 result=1",
        b"200result=1",
        b"abc result=1",
        b"200",  # a 200 always carries result=
        b"200 ok",
        b"200 result=1 (unterminated",
        b"200 result=1 (\xff)",
        b"\xff\xfe",
        b"hangup",
        b"HANGUP ",
    ],
)
def test_malformed_reply_lines(line: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        ReplyReader().feed_line(line)
    assert caught.value.raw == line


def test_hangup_between_replies_and_blocks() -> None:
    reader = ReplyReader()
    assert reader.feed_line(b"HANGUP") is HANGUP
    assert reader.feed_line(b"520-Invalid command syntax.  Proper usage follows:") is None
    assert reader.in_block
    assert reader.feed_line(b"HANGUP") is None  # inside a block a line is usage text (see ReplyReader)
    assert reader.feed_line(b"") is None
    reply = reader.feed_line(b"520 End of proper usage.")
    assert isinstance(reply, AgiReply)
    assert reply.usage == ("HANGUP", "")
    assert not reader.in_block
    assert reader.feed_line(b"200 result=1") == parse_reply_line(b"200 result=1")


def test_parse_reply_line_refuses_a_block_opener() -> None:
    with pytest.raises(ProtocolError):
        parse_reply_line(b"520-Invalid command syntax.  Proper usage follows:")


def test_usage_block_is_bounded() -> None:
    reader = ReplyReader()
    reader.feed_line(b"520-Invalid command syntax.  Proper usage follows:")
    line = b"x" * 1000
    with pytest.raises(ProtocolError, match="usage block longer"):
        for _ in range(MAX_USAGE_BYTES // len(line) + 2):
            reader.feed_line(line)


def test_usage_line_not_utf8() -> None:
    reader = ReplyReader()
    reader.feed_line(b"520-Invalid command syntax.  Proper usage follows:")
    reader.feed_line(b"\xff")
    with pytest.raises(ProtocolError):
        reader.feed_line(b"520 End of proper usage.")


# -- commands ---------------------------------------------------------------------------------------------


def test_set_variable_matches_the_recorded_bytes() -> None:
    recorded = {line for c in CAPTURES for line in c.sent_lines() if line.startswith(b"SET VARIABLE ")}
    assert b'SET VARIABLE A2B_NOTE "say \\"hi\\" to Bob\'s phone, then wait"\n' in recorded
    for line in recorded:
        _, _, name, value = split_command(line[:-1].decode())
        assert set_variable(name, value) == line


def test_recorded_commands_split_as_asterisk_did() -> None:
    (capture,) = load_capture(agi_files()[-2])
    words = [split_command(line[:-1].decode()) for line in capture.sent_lines()]
    assert words[5] == ["VERBOSE", "hello", "1"]
    assert words[7] == ["SET", "VARIABLE", "A2B_NOTE", 'say "hi" to Bob\'s phone, then wait']
    assert words[-1] == ["GET", "VARIABLE"]


@pytest.mark.parametrize(
    ("words", "line"),
    [
        (("ANSWER",), b"ANSWER\n"),
        (("SET", "VARIABLE", "A2B_STATUS", "OK"), b"SET VARIABLE A2B_STATUS OK\n"),
        (("SET", "VARIABLE", "CHANNEL(accountcode)", "1000000001"),
         b"SET VARIABLE CHANNEL(accountcode) 1000000001\n"),
        (("SET", "VARIABLE", "X", ""), b'SET VARIABLE X ""\n'),
        (("SET", "VARIABLE", "X", "a\tb"), b'SET VARIABLE X "a\tb"\n'),
        (("SET", "VARIABLE", "X", "C:\\dir"), b'SET VARIABLE X "C:\\\\dir"\n'),
        (("SET", "VARIABLE", "A2B_ROUTE_1", "PJSIP/442071234567@carrier-a"),
         b"SET VARIABLE A2B_ROUTE_1 PJSIP/442071234567@carrier-a\n"),
        (("SET", "VARIABLE", "X", "Zoë"), "SET VARIABLE X Zoë\n".encode()),
        (("GET", "DATA", "a2b/enter-pin", "6000", "10"), b"GET DATA a2b/enter-pin 6000 10\n"),
    ],
)
def test_format_command(words: tuple[str, ...], line: bytes) -> None:
    assert format_command(*words) == line
    assert split_command(line[:-1].decode()) == list(words)


def test_get_variable() -> None:
    assert get_variable("CALLERID(num)") == b"GET VARIABLE CALLERID(num)\n"


@pytest.mark.parametrize("bad", ["OK\nSET VARIABLE A2B_STATUS OK", "OK\r", "O\0K", "\n"])
def test_command_injection_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        set_variable("A2B_STATUS", bad)
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        format_command("SET", "VARIABLE", bad, "x")


def test_command_limits() -> None:
    with pytest.raises(ValueError, match="at least one word"):
        format_command()
    with pytest.raises(ValueError, match="at most 127 words"):
        format_command(*["NOOP"] * 128)
    with pytest.raises(ValueError, match="Asterisk reads at most"):
        set_variable("X", "y" * MAX_COMMAND_BYTES)
    assert len(set_variable("X", "y" * (MAX_COMMAND_BYTES - len("SET VARIABLE X \n")))) == MAX_COMMAND_BYTES
    with pytest.raises(ValueError, match="name"):
        set_variable("", "x")
    with pytest.raises(ValueError, match="name"):
        get_variable("")


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("", []),
        ("   ", []),
        ("  a   b  ", ["a", "b"]),
        ("a\tb", ["a", "b"]),
        ('""', [""]),
        ('a "" b', ["a", "", "b"]),
        ('a"b c"d', ["ab cd"]),  # a quote opens mid-word and does not split it
        ('"a\\"b"', ['a"b']),
        ("a\\ b", ["a b"]),  # an escaped blank outside quotes is literal too
        ("a\\\\b", ["a\\b"]),
        ("a\\", ["a"]),  # a trailing backslash escapes nothing
        ('"unterminated x', ["unterminated x"]),
    ],
)
def test_split_command_like_parse_args(line: str, words: list[str]) -> None:
    assert split_command(line) == words


# Text Asterisk can carry in a command word: anything but CR, LF, NUL, and UTF-8-encodable.
WORD = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\0"), max_size=200)


@given(WORD)
def test_quote_round_trip(value: str) -> None:
    line = set_variable("A2B_NOTE", value)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert split_command(line[:-1].decode()) == ["SET", "VARIABLE", "A2B_NOTE", value]


@given(st.lists(WORD, min_size=1, max_size=8))
def test_words_round_trip(words: list[str]) -> None:
    assert split_command(format_command(*words)[:-1].decode()) == words
    assert split_command(" ".join(quote_word(w) for w in words)) == words


@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=200))
def test_get_variable_data_is_raw(value: str) -> None:
    # Asterisk writes "200 result=1 (%s)" without escaping: the data is exactly the stored value.
    reply = parse_reply_line(b"200 result=1 (" + value.encode() + b")")
    assert (reply.result, reply.data) == ("1", value)


def test_split_chunks_cuts_after_lines() -> None:
    block = encode_environment(make_environment(uniqueid="1.1", channel="Local/1@b-1;2", extension="1"))
    for n in (1, 2, 3, 50):
        pieces = split_chunks(block, n)
        assert b"".join(pieces) == block
        assert len(pieces) == min(n, block.count(b"\n"))
        assert all(p.endswith(b"\n") for p in pieces)


@given(WORD.filter(bool), st.one_of(WORD, st.text(max_size=2100)))
def test_set_variable_is_format_command(name: str, value: str) -> None:
    # set_variable takes a shorter path (it runs for every line of every answer): same bytes, same refusals.
    try:
        expected: bytes | type[ValueError] = format_command("SET", "VARIABLE", name, value)
    except ValueError:
        expected = ValueError
    if expected is ValueError:
        with pytest.raises(ValueError):
            set_variable(name, value)
    else:
        assert set_variable(name, value) == expected
