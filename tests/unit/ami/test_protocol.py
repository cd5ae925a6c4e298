"""The sans-I/O AMI protocol, fed the bytes Asterisk 22 sent (tests/fixtures/asterisk/*.ami*.txt).

Each panoramisk 1.4 fault that lives in the protocol layer has a test here: the empty value on a
message's last header (NewAccountCode's ``OldAccountCode: ``), UTF-8 split across TCP reads, and CR/LF in
a value injecting a second action.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from a2bd.ami.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RAW_LINE_KEY,
    AmiMessage,
    AmiParser,
    format_action,
    parse_message,
)
from a2bd.errors import AmiValueError, InputError, ProtocolError
from a2bd.services.tracker import TRACKED_EVENTS, CallTracker
from tests.transcripts import Capture, ami_files, load_capture

CAPTURES = [c for path in ami_files() for c in load_capture(path)]
BY_NAME = {c.path.name: c for c in CAPTURES}
BANNER = "Asterisk Call Manager/11.0.0"

# (messages, events, responses) after the banner, counted from the fixtures. 103 events for one answered
# call with all events and 51 with "Events: call,cdr" are the README's figures for scenario 01.
EXPECTED = {
    "00a-accountcode-cdr-func.ami.txt": (106, 103, 3),
    "00b-accountcode-channel-func.ami.txt": (106, 103, 3),
    "01-answered-callee-hangup.ami-events-call-cdr.txt": (53, 51, 2),
    "01-answered-callee-hangup.ami.txt": (106, 103, 3),
    "02-duration-limit.ami.txt": (105, 102, 3),
    "03-ami-hangup-midcall.ami.txt": (107, 102, 5),
    "04-busy.ami.txt": (83, 80, 3),
    "05-no-answer.ami.txt": (90, 87, 3),
    "06-auth-denied-nofunds.ami.txt": (41, 38, 3),
    "07-agi-server-down.ami.txt": (35, 32, 3),
    "08-two-calls-same-account.ami.txt": (218, 211, 7),
    "09-agi-misc-commands.ami.txt": (125, 122, 3),
    "10-caller-hangup-during-agi.ami.txt": (45, 41, 4),
}


def parse_all(data: bytes) -> tuple[AmiParser, list[AmiMessage]]:
    parser = AmiParser()
    return parser, parser.feed(data)


def parse_chunks(chunks: list[bytes]) -> tuple[AmiParser, list[AmiMessage]]:
    parser = AmiParser()
    messages: list[AmiMessage] = []
    for chunk in chunks:
        messages += parser.feed(chunk)
    return parser, messages


def test_every_ami_fixture_is_loaded() -> None:
    assert sorted(BY_NAME) == sorted(EXPECTED)
    assert len(CAPTURES) == 13  # one connection per file


# -- the recorded streams ---------------------------------------------------------------------------------


@pytest.mark.parametrize("capture", CAPTURES, ids=[c.path.name for c in CAPTURES])
def test_recorded_stream_counts(capture: Capture) -> None:
    parser, messages = parse_all(capture.received)
    events = [m for m in messages if m.is_event]
    responses = [m for m in messages if m.is_response]
    assert (len(messages), len(events), len(responses)) == EXPECTED[capture.path.name]
    assert parser.banner == BANNER
    assert parser.buffered == 0  # every capture ends on a message boundary (the Goodbye)
    # The first reply is the Login's, the last the Logoff's (then Asterisk closed).
    assert (responses[0].response, responses[0].action_id, responses[0]["Message"]) == (
        "Success",
        "login",
        "Authentication accepted",
    )
    assert (responses[-1].response, responses[-1]["Message"]) == ("Goodbye", "Thanks for all the fish.")
    # No line of a real capture falls outside "Key: value".
    assert all(key != RAW_LINE_KEY for m in messages for key, _ in m.headers)


@pytest.mark.parametrize("capture", CAPTURES, ids=[c.path.name for c in CAPTURES])
def test_byte_by_byte_and_recorded_reads_give_the_same_messages(capture: Capture) -> None:
    _, whole = parse_all(capture.received)
    data = capture.received
    _, one_by_one = parse_chunks([data[i : i + 1] for i in range(len(data))])
    _, as_read = parse_chunks([chunk for _, chunk in capture.recv_chunks()])  # Asterisk's own TCP reads
    assert one_by_one == whole
    assert as_read == whole
    assert [m.headers for m in one_by_one] == [m.headers for m in whole]


@given(
    index=st.integers(0, len(CAPTURES) - 1),
    cuts=st.lists(st.integers(0, 100_000), max_size=60),
)
def test_random_chunks_give_the_same_messages(index: int, cuts: list[int]) -> None:
    data = CAPTURES[index].received
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert parse_chunks(chunks)[1] == parse_all(data)[1]


def test_events_filter_connection_has_no_dialplan_events() -> None:
    _, messages = parse_all(BY_NAME["01-answered-callee-hangup.ami-events-call-cdr.txt"].received)
    names = {m.event for m in messages if m.is_event}
    assert not names & {"VarSet", "Newexten", "AGIExecStart", "AGIExecEnd", "FullyBooted", "SuccessfulAuth"}
    assert {"Newchannel", "NewAccountCode", "DialBegin", "DialEnd", "Hangup", "Cdr", "OriginateResponse"} <= names


def test_new_account_code_keeps_the_empty_last_header() -> None:
    # "OldAccountCode: \r\n\r\n": the value is empty and the header is the message's last (panoramisk lost it).
    capture = BY_NAME["01-answered-callee-hangup.ami-events-call-cdr.txt"]
    assert b"OldAccountCode: \r\n\r\n" in capture.received
    _, messages = parse_all(capture.received)
    changes = [m for m in messages if m.event == "NewAccountCode"]
    assert len(changes) == 3
    for message in changes:
        assert message.headers[-1] == ("OldAccountCode", "")
        assert message.get("OldAccountCode") == ""
        assert "OldAccountCode" in message
        assert message["AccountCode"] == "1000000001"


@pytest.mark.parametrize("capture", CAPTURES, ids=[c.path.name for c in CAPTURES])
def test_every_empty_value_is_kept(capture: Capture) -> None:
    _, messages = parse_all(capture.received)
    recorded = capture.received.count(b": \r\n")
    assert recorded > 0
    assert sum(1 for m in messages for _, value in m.headers if value == "") == recorded


def test_originate_response_is_an_event_despite_its_response_header() -> None:
    _, messages = parse_all(BY_NAME["08-two-calls-same-account.ami.txt"].received)
    originated = [m for m in messages if m.event == "OriginateResponse"]
    assert [m.action_id for m in originated] == ["08-originate-1", "08-originate-2"]
    for message in originated:
        assert message.is_event
        assert not message.is_response
        assert message.response == "Success"
        assert message["Reason"] == "4"


def test_failed_originate_response() -> None:
    _, messages = parse_all(BY_NAME["04-busy.ami.txt"].received)
    (failed,) = [m for m in messages if m.event == "OriginateResponse"]
    assert (failed.is_event, failed.response, failed["Reason"], failed["Uniqueid"]) == (
        True,
        "Failure",
        "0",
        "<unknown>",
    )


def test_hangup_of_a_gone_channel_is_an_error_response() -> None:
    _, messages = parse_all(BY_NAME["03-ami-hangup-midcall.ami.txt"].received)
    replies = {m.action_id: m for m in messages if m.is_response}
    assert (replies["03-hangup"].response, replies["03-hangup"]["Message"]) == ("Success", "Channel Hungup")
    again = replies["03-hangup-again"]
    assert (again.response, again["Message"]) == ("Error", "No such channel")
    assert again.event is None


def test_core_show_channels_list() -> None:
    _, messages = parse_all(BY_NAME["08-two-calls-same-account.ami.txt"].received)
    listed = [m for m in messages if m.action_id == "08-channels"]
    assert [m.response for m in listed[:1]] == ["Success"]
    assert listed[0]["EventList"] == "start"  # lower case, as Asterisk sends it
    items = [m for m in listed if m.event == "CoreShowChannel"]
    assert len(items) == 8
    assert all("Privilege" not in m for m in items)
    assert (listed[-1].event, listed[-1]["EventList"], listed[-1]["ListItems"]) == (
        "CoreShowChannelsComplete",
        "Complete",
        "8",
    )
    billing = [m["Channel"] for m in items if m["AccountCode"] == "1000000001" and m["Application"] == "Dial"]
    assert sorted(billing) == ["Local/1001@billing-00000010;2", "Local/1001@billing-00000011;2"]


def test_dial_begin_of_the_originate_has_no_channel_header() -> None:
    _, messages = parse_all(BY_NAME["01-answered-callee-hangup.ami.txt"].received)
    dials = [m for m in messages if m.event == "DialBegin"]
    assert any("Channel" not in m and "DestChannel" in m for m in dials)
    assert any(m.get("Channel") is None for m in dials)


# -- banner -------------------------------------------------------------------------------------------------


def test_banner_alone_then_message() -> None:
    parser = AmiParser()
    assert parser.feed(b"Asterisk Call Man") == []
    assert parser.banner is None
    assert parser.feed(b"ager/11.0.0\r\n") == []
    assert parser.banner == BANNER
    (message,) = parser.feed(b"Response: Success\r\nActionID: a\r\nMessage: Authentication accepted\r\n\r\n")
    assert message.action_id == "a"


def test_banner_and_messages_in_one_read() -> None:
    parser = AmiParser()
    messages = parser.feed(b"Asterisk Call Manager/11.0.0\r\nEvent: A\r\n\r\nEvent: B\r\nX: \r\n\r\nEvent: C")
    assert [m.event for m in messages] == ["A", "B"]
    assert parser.banner == BANNER
    assert [m.event for m in parser.feed(b"\r\n\r\n")] == ["C"]


def test_not_an_ami_server() -> None:
    with pytest.raises(ProtocolError, match="not an AMI server") as info:
        AmiParser().feed(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert info.value.raw == b"HTTP/1.1 400 Bad Request"


def test_without_banner() -> None:
    parser = AmiParser(expect_banner=False)
    assert [m["Action"] for m in parser.feed(b"Action: Ping\r\nActionID: 1\r\n\r\n")] == ["Ping"]
    assert parser.banner is None


# -- odd input ------------------------------------------------------------------------------------------------


def test_utf8_split_inside_a_character() -> None:
    block = "Event: Newchannel\r\nCallerIDName: Jürgen Müller 東京\r\n\r\n".encode()
    split_at = block.index("ü".encode()) + 1  # between the two bytes of ü
    parser = AmiParser(expect_banner=False)
    assert parser.feed(block[:split_at]) == []
    (message,) = parser.feed(block[split_at:])
    assert message["CallerIDName"] == "Jürgen Müller 東京"
    # Every split point, including inside the 3-byte characters.
    for cut in range(1, len(block)):
        parser = AmiParser(expect_banner=False)
        assert parser.feed(block[:cut]) + parser.feed(block[cut:]) == [message]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    (message,) = AmiParser(expect_banner=False).feed(b"Event: Newchannel\r\nCallerIDName: J\xfcrgen\r\n\r\n")
    assert message["CallerIDName"] == "J\ufffdrgen"


def test_lines_without_colon_space() -> None:
    # Legacy "Response: Follows" Command output: raw lines, then --END COMMAND--.
    block = b"Response: Follows\r\nPrivilege: Command\r\nEmpty:\r\nChannel   Location\r\nA:b\r\n--END COMMAND--"
    message = parse_message(block)
    assert message is not None
    assert message.headers == (
        ("Response", "Follows"),
        ("Privilege", "Command"),
        ("Empty", ""),
        (RAW_LINE_KEY, "Channel   Location"),
        (RAW_LINE_KEY, "A:b"),
        (RAW_LINE_KEY, "--END COMMAND--"),
    )
    assert message.get_all(RAW_LINE_KEY) == ["Channel   Location", "A:b", "--END COMMAND--"]
    assert message.is_response


def test_stray_blank_lines_make_no_messages() -> None:
    parser = AmiParser(expect_banner=False)
    messages = parser.feed(b"\r\n\r\nEvent: A\r\n\r\n\r\n\r\n\r\nEvent: B\r\n\r\n")
    assert [m.event for m in messages] == ["A", "B"]
    assert parse_message(b"") is None


def test_value_with_colon_space_and_leading_space() -> None:
    message = parse_message(b"Event: UserEvent\r\nData: a: b\r\nPad:  x")
    assert message is not None
    assert (message["Data"], message["Pad"]) == ("a: b", " x")


def test_message_access() -> None:
    message = AmiMessage.from_pairs([("Event", "VarSet"), ("Variable", "A"), ("Variable", "B"), ("Value", "")])
    assert message.event == "VarSet"
    assert message.response is None
    assert message.action_id is None
    assert message.get("Variable") == "A"  # the first occurrence
    assert message.get_all("Variable") == ["A", "B"]
    assert message.get("variable") is None  # exact case
    assert message.get("Missing", "-") == "-"
    assert message["Value"] == ""
    with pytest.raises(KeyError):
        message["Missing"]
    assert message.as_dict() == {"Event": "VarSet", "Variable": "A", "Value": ""}
    assert AmiMessage.from_pairs({"Event": "VarSet"}) == AmiMessage((("Event", "VarSet"),), received_at=5.0)
    assert hash(AmiMessage.from_pairs({"Event": "A"})) == hash(AmiMessage((("Event", "A"),)))
    neither = AmiMessage.from_pairs({"Foo": "bar"})
    assert not neither.is_event and not neither.is_response


def test_received_at_stamps_the_messages_of_a_read() -> None:
    parser = AmiParser(expect_banner=False)
    (first,) = parser.feed(b"Event: A\r\n\r\nEvent: B\r\n", received_at=10.0)
    (second,) = parser.feed(b"\r\n", received_at=11.5)
    assert (first.received_at, second.received_at) == (10.0, 11.5)


# -- size limit -----------------------------------------------------------------------------------------------


def test_oversized_message_raises() -> None:
    parser = AmiParser(max_message_bytes=1000)
    parser.feed(b"Asterisk Call Manager/11.0.0\r\n")
    assert parser.feed(b"Event: Big\r\nData: " + b"x" * 900) == []
    with pytest.raises(ProtocolError, match="longer than 1000 bytes") as info:
        parser.feed(b"x" * 200)
    assert info.value.raw.startswith(b"Event: Big")


def test_oversized_tail_after_good_messages_raises_on_the_next_feed() -> None:
    parser = AmiParser(max_message_bytes=100, expect_banner=False)
    messages = parser.feed(b"Event: A\r\n\r\nEvent: B\r\n\r\nEvent: Big\r\nData: " + b"x" * 200)
    assert [m.event for m in messages] == ["A", "B"]  # not lost to the bad tail
    with pytest.raises(ProtocolError):
        parser.feed(b"x")


def test_oversized_fed_byte_by_byte() -> None:
    parser = AmiParser(max_message_bytes=64, expect_banner=False)
    with pytest.raises(ProtocolError):
        for _ in range(100):
            parser.feed(b"y")


def test_banner_line_is_bounded_too() -> None:
    with pytest.raises(ProtocolError):
        AmiParser(max_message_bytes=64).feed(b"A" * 65)


def test_default_limit_is_one_mebibyte() -> None:
    assert DEFAULT_MAX_MESSAGE_BYTES == 1 << 20
    parser = AmiParser(expect_banner=False)
    big = b"Event: Big\r\nData: " + b"x" * 500_000 + b"\r\n\r\n"
    (message,) = parser.feed(big)  # half a MiB is still a message
    assert len(message["Data"]) == 500_000


# -- actions --------------------------------------------------------------------------------------------------


def test_format_action_bytes() -> None:
    data = format_action("Hangup", "a2bd-1", {"Channel": "Local/1001@billing-00000008;2", "Cause": "16"})
    assert data == b"Action: Hangup\r\nActionID: a2bd-1\r\nChannel: Local/1001@billing-00000008;2\r\nCause: 16\r\n\r\n"
    assert format_action("Ping", "p") == b"Action: Ping\r\nActionID: p\r\n\r\n"


@pytest.mark.parametrize("capture", CAPTURES, ids=[c.path.name for c in CAPTURES])
def test_format_action_reproduces_every_recorded_action(capture: Capture) -> None:
    # The recorder's Login / Originate / Hangup / CoreShowChannels / Logoff, byte for byte.
    sent = AmiParser(expect_banner=False).feed(capture.sent)
    assert sent[0]["Action"] == "Login" and sent[-1]["Action"] == "Logoff"
    rebuilt = b"".join(format_action(m["Action"], m["ActionID"], m.headers[2:]) for m in sent)
    assert rebuilt == capture.sent


def test_format_action_round_trip_with_unicode_and_empty_values() -> None:
    fields = [("CallerID", '"Jürgen 東京" <5551234>'), ("Variable", "A=1"), ("Variable", "B="), ("Account", "")]
    data = format_action("Originate", "x-1", fields)
    assert "Jürgen 東京".encode() in data
    (message,) = AmiParser(expect_banner=False).feed(data)
    assert message.headers == (("Action", "Originate"), ("ActionID", "x-1"), *fields)


KEYS = st.text(st.characters(codec="ascii", exclude_characters=":\r\n"), min_size=1, max_size=20).filter(
    lambda key: key[0] != " "  # "Key" starting with a space would not survive partition(": ") of "x:  y"
)


@given(
    action=st.text(st.characters(exclude_characters="\r\n", exclude_categories=("Cs",)), min_size=1, max_size=20),
    fields=st.lists(
        st.tuples(KEYS, st.text(st.characters(exclude_characters="\r\n", exclude_categories=("Cs",)))),
        max_size=8,
    ),
)
def test_format_action_round_trip_property(action: str, fields: list[tuple[str, str]]) -> None:
    data = format_action(action, "id-1", fields)
    (message,) = AmiParser(expect_banner=False).feed(data)
    assert message.headers == (("Action", action), ("ActionID", "id-1"), *fields)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"CallerID": "x\r\nAction: Originate"}, "CallerID"),
        ({"CallerID": '"x"\r\n\r\nAction: Originate\r\nChannel: Local/900@premium'}, "CallerID"),
        ({"CallerID": "lf only\nAction: Originate"}, "CallerID"),
        ({"CallerID": "cr only\rAction: Originate"}, "CallerID"),
        ([("Channel", "ok"), ("Variable", "A=1\r\n")], "Variable"),
        ({"Bad\r\nKey": "v"}, "Bad"),
        ({"Ba:d": "v"}, "Ba:d"),
        ({"": "v"}, "''"),
    ],
)
def test_cr_lf_injection_is_refused(fields: dict[str, str] | list[tuple[str, str]], named: str) -> None:
    with pytest.raises(AmiValueError, match="nothing was sent") as info:
        format_action("Originate", "a-1", fields)
    assert named in str(info.value)
    assert isinstance(info.value, InputError)


@pytest.mark.parametrize(("action", "action_id"), [("Ping\r\nAction: Originate", "1"), ("Ping", "1\r\n"), ("", "1")])
def test_action_name_and_id_are_checked(action: str, action_id: str) -> None:
    with pytest.raises(AmiValueError):
        format_action(action, action_id)


def test_lone_surrogate_is_refused() -> None:
    with pytest.raises(AmiValueError, match="not valid Unicode"):
        format_action("Originate", "1", {"CallerID": "\udcff"})


@given(value=st.text())
def test_any_value_is_one_action_or_refused(value: str) -> None:
    # Whatever a caller ID holds, the bytes parse back to exactly one action with that value, or nothing is
    # produced: no second action can ride along.
    try:
        data = format_action("Originate", "a-1", {"Channel": "Local/1@billing", "CallerID": value})
    except AmiValueError:
        assert "\r" in value or "\n" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value)
        return
    messages = AmiParser(expect_banner=False).feed(data)
    assert len(messages) == 1
    assert messages[0]["CallerID"] == value


# -- decoding only the events wanted ----------------------------------------------------------------------

WANTED = TRACKED_EVENTS


@pytest.mark.parametrize("capture", CAPTURES, ids=[c.path.name for c in CAPTURES])
def test_an_event_filter_drops_exactly_the_other_events(capture: Capture) -> None:
    _, everything = parse_all(capture.received)
    parser = AmiParser(events=WANTED)
    kept = []
    for _, chunk in capture.recv_chunks():
        kept += parser.feed(chunk)
    expected = [m for m in everything if not m.is_event or m.event in WANTED or m.action_id is not None]
    assert kept == expected
    assert parser.skipped == len(everything) - len(expected)


def test_the_filter_keeps_an_unwanted_event_that_answers_an_action() -> None:
    parser = AmiParser(expect_banner=False, events=WANTED)
    stream = (b"Event: CoreShowChannel\r\nActionID: a2bd-1\r\nChannel: PJSIP/x\r\n\r\n"
              b"Event: Newexten\r\nChannel: PJSIP/x\r\n\r\nEvent: Hangup\r\nUniqueid: 1.2\r\n\r\n")
    assert [m.event for m in parser.feed(stream)] == ["CoreShowChannel", "Hangup"]
    assert parser.skipped == 1


def test_the_tracker_handles_exactly_the_events_the_client_decodes() -> None:
    tracker = CallTracker("pbx", None, lambda call: None)  # type: ignore[arg-type]  # no store needed to look
    assert set(tracker._handlers) == TRACKED_EVENTS
