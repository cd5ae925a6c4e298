"""The simulated Asterisk (a2bd.sim.ami) against the recordings, over real loopback sockets.

The AMI client and the FastAGI server here are deliberately tiny and local to this file: the simulator exists
to test a2bd's own AMI client and AGI server, so it must not be checked with them. The FastAGI server plays
a2bd's side as recorded (it sends SET VARIABLE lines, reads one reply per command, half-closes and reads
until Asterisk closes). Every message is read by the test body; nothing asserts inside a callback.

The main checks compare what the simulator sends with the captures in tests/fixtures/asterisk/: the same
event names in the same order, and for every event the same header names in the same order. The captures
were placed with AMI Originate, and the simulator places its calls the same way (the Originate's ;1 leg,
its DialBegin/DialEnd without a Channel and its OriginateResponse included), so nothing is left out. Where
Asterisk's own order varies between captures (the Cdr and Hangup events of one burst), the call is placed
with the CallSpec.cdr_first of the capture it is compared with.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from a2bd.sim import ami as sim_ami
from a2bd.sim.ami import CallResult, CallSpec, CdrRecord, SimAsterisk, event_mask, manager_event_names
from tests.transcripts import FIXTURES, load_capture

Message = list[tuple[str, str]]
Answer = Callable[[dict[str, str]], Sequence[str]]

ACCOUNT = "1000000001"
SECRET = "s3cret"
STEP_S = 5.0  # bound of any single wait for a message


def recorded_answer(*extra: str, status: str = "OK", limit_ms: str | None = "600000") -> Answer:
    """What the recorder's FastAGI server sent: A2B_STATUS, A2B_LIMIT_MS, CHANNEL(accountcode)."""
    commands = [f"SET VARIABLE A2B_STATUS {status}"]
    if limit_ms is not None:
        commands.append(f"SET VARIABLE A2B_LIMIT_MS {limit_ms}")
    commands.append(f"SET VARIABLE CHANNEL(accountcode) {ACCOUNT}")
    commands.extend(extra)
    return lambda env: commands


# --- a minimal FastAGI server ---------------------------------------------------------------------------


class FastAgi:
    """Plays a2bd's side of FastAGI: reads the environment, sends `answer(env)` one command at a time,
    reading each reply, then half-closes and reads until the peer closes."""

    def __init__(self) -> None:
        self.answer: Answer = recorded_answer()
        self.delay_s = 0.0  # silence after the environment, before the first command
        self.envs: list[dict[str, str]] = []
        self.replies: list[bytes] = []
        self.tail: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            raw = await reader.readuntil(b"\n\n")
            env = dict(line.partition(": ")[::2] for line in raw.decode().splitlines() if line)
            self.envs.append(env)
            await asyncio.sleep(self.delay_s)
            for command in self.answer(env):
                writer.write(command.encode() + b"\n")
                self.replies.append(await reader.readline())
            writer.write_eof()
            self.tail.append(await reader.read())
        finally:
            writer.close()


# --- a raw AMI client -----------------------------------------------------------------------------------


def parse(block: bytes) -> Message:
    return [(k, v) for k, _, v in (line.partition(": ") for line in block.decode().split("\r\n")) if k]


def get(message: Message, key: str) -> str | None:
    return next((v for k, v in message if k == key), None)


def keys(message: Message) -> list[str]:
    return [k for k, _ in message]


class Ami:
    """A raw AMI connection: one message is everything up to a blank line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, banner: bytes) -> None:
        self.reader, self.writer, self.banner = reader, writer, banner
        self.ids = 0

    @classmethod
    async def connect(cls, port: int) -> Ami:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        banner = await asyncio.wait_for(reader.readline(), STEP_S)
        return cls(reader, writer, banner)

    def send(self, action: str, **headers: str) -> str:
        self.ids += 1
        action_id = headers.pop("ActionID", f"t{self.ids}")
        lines = [f"Action: {action}", f"ActionID: {action_id}", *(f"{k}: {v}" for k, v in headers.items())]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        return action_id

    async def read(self) -> Message:
        return parse(await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), STEP_S))

    async def login(self, events: str | None = None, secret: str = SECRET) -> Message:
        extra = {} if events is None else {"Events": events}
        self.send("Login", ActionID="login", Username="a2bd", Secret=secret, **extra)
        return await self.read()

    async def until(self, pred: Callable[[Message], bool]) -> list[Message]:
        """Every message up to and including the first one `pred` accepts."""
        seen = []
        while True:
            message = await self.read()
            seen.append(message)
            if pred(message):
                return seen

    async def drain(self) -> list[Message]:
        """Every message queued so far: a Ping is answered after all the events sent before it."""
        action_id = self.send("Ping")
        seen = await self.until(lambda m: get(m, "ActionID") == action_id and get(m, "Response") is not None)
        return seen[:-1]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# --- the recordings -------------------------------------------------------------------------------------


def recorded(name: str) -> list[Message]:
    """The messages Asterisk sent on a capture's connection, without the banner."""
    data = load_capture(FIXTURES / name)[0].received
    _, _, rest = data.partition(b"\r\n")
    return [parse(block) for block in rest.split(b"\r\n\r\n") if block]


def call_events(messages: Sequence[Message]) -> list[Message]:
    """The events of the call(s): everything but responses and the login events."""
    return [m for m in messages if get(m, "Event") not in (None, "FullyBooted", "SuccessfulAuth")]


def names(messages: Sequence[Message]) -> list[str | None]:
    return [get(m, "Event") for m in messages]


def assert_like_capture(got: Sequence[Message], capture: str, *, exact_from_talk: bool = False) -> None:
    """Same event names in the same order, and each event with the recorded header names and order.

    With `exact_from_talk`, only the end burst (after the callee's Wait starts) must be in the recorded
    order: the answer's events come in a slightly different order in every capture (compare 01, 02 and
    03), and the simulator emits them in 01's.
    """
    want = call_events(recorded(capture))
    if exact_from_talk:
        assert collections.Counter(names(got)) == collections.Counter(names(want))
        got, want = got[_talk_starts(got) :], want[_talk_starts(want) :]
    assert names(got) == names(want)
    for mine, theirs in zip(got, want, strict=True):
        assert keys(mine) == keys(theirs), get(theirs, "Event")


def _talk_starts(events: Sequence[Message]) -> int:
    return max(i for i, m in enumerate(events) if get(m, "Application") == "Wait") + 1


def billing_cdrs(result: CallResult) -> list[CdrRecord]:
    return [cdr for cdr in result.cdrs if cdr.uniqueid == result.uniqueid]


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture
async def agi() -> AsyncIterator[FastAgi]:
    server = FastAgi()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def sim(agi: FastAgi) -> AsyncIterator[SimAsterisk]:
    asterisk = SimAsterisk(username="a2bd", secret=SECRET, agi=("127.0.0.1", agi.port), auth_fail_delay_s=0.0, seed=7)
    await asterisk.start()
    try:
        yield asterisk
    finally:
        await asterisk.close()


@pytest.fixture
async def client(sim: SimAsterisk) -> AsyncIterator[Ami]:
    ami = await Ami.connect(sim.port)
    try:
        yield ami
    finally:
        await ami.close()


async def call_and_drain(sim: SimAsterisk, ami: Ami, spec: CallSpec) -> tuple[CallResult, list[Message]]:
    async with asyncio.timeout(10):
        result = await sim.call(spec)
        return result, call_events(await ami.drain())


# --- the Events: header ---------------------------------------------------------------------------------

CALL, CDR, SYSTEM, ALL = sim_ami.CALL, sim_ami.CDR, sim_ami.SYSTEM, sim_ami.ALL_EVENTS


@pytest.mark.parametrize(
    ("value", "mask"),
    [
        ("", ALL),
        ("on", ALL),
        ("Yes", ALL),
        ("off", 0),
        ("0", 0),
        ("2", CALL),
        ("call,cdr", CALL | CDR),
        ("cdr", CDR),
        ("call, cdr", CALL),  # manager.c trims nothing: " cdr" is no class
        ("Call", 0),  # and compares case-sensitively
        ("sys,cdr", SYSTEM | CDR),  # every item but the last may be a prefix
        ("call,all", ALL),
    ],
)
def test_events_header_selects_classes_like_manager_c(value: str, mask: int) -> None:
    assert event_mask(value) == mask


# --- sessions and actions -------------------------------------------------------------------------------


async def test_login_accepted_then_fully_booted_and_successful_auth(client: Ami) -> None:
    assert client.banner == b"Asterisk Call Manager/11.0.0\r\n"
    response = await client.login()
    assert response == [("Response", "Success"), ("ActionID", "login"), ("Message", "Authentication accepted")]
    booted, auth = await client.read(), await client.read()
    assert keys(booted) == keys(recorded("01-answered-callee-hangup.ami.txt")[1])
    assert get(booted, "Event") == "FullyBooted"
    assert keys(auth) == keys(recorded("01-answered-callee-hangup.ami.txt")[2])
    assert (get(auth, "Event"), get(auth, "AccountID")) == ("SuccessfulAuth", "a2bd")


async def test_login_refused_then_closed(client: Ami) -> None:
    response = await client.login(secret="wrong")
    assert response == [("Response", "Error"), ("ActionID", "login"), ("Message", "Authentication failed")]
    assert await asyncio.wait_for(client.reader.read(), STEP_S) == b""


async def test_actions_answer_like_manager_c(client: Ami) -> None:
    client.send("Ping", ActionID="early")
    assert await client.read() == [("Response", "Error"), ("ActionID", "early"), ("Message", "Permission denied")]
    await client.login(events="off")
    client.send("Ping", ActionID="p")
    pong = await client.read()
    assert keys(pong) == ["Response", "ActionID", "Ping", "Timestamp"]
    assert (get(pong, "Response"), get(pong, "Ping")) == ("Success", "Pong")
    assert float(get(pong, "Timestamp") or "x") > 0
    client.send("FooBar", ActionID="u")
    assert get(await client.read(), "Message") == (
        "Invalid/unknown command: FooBar. Use Action: ListCommands to show available commands."
    )
    client.send("Hangup", ActionID="h")
    assert get(await client.read(), "Message") == "No channel specified"
    client.send("Hangup", ActionID="h2", Channel="Local/1@billing-00000001;2")
    assert await client.read() == [("Response", "Error"), ("ActionID", "h2"), ("Message", "No such channel")]
    client.writer.write(b"\r\n")
    assert get(await client.read(), "Message") == "Missing action in request"
    client.send("Logoff", ActionID="bye")
    assert await client.read() == [
        ("Response", "Goodbye"),
        ("ActionID", "bye"),
        ("Message", "Thanks for all the fish."),
    ]
    assert await asyncio.wait_for(client.reader.read(), STEP_S) == b""


async def test_events_off_sends_no_event(sim: SimAsterisk, client: Ami) -> None:
    await client.login(events="off")
    result, events = await call_and_drain(sim, client, CallSpec(extension="2000", talk_s=0.1, cdr_first=True))
    assert result.disposition == "ANSWERED"
    assert events == []


# --- calls, compared with the captures ------------------------------------------------------------------


async def test_answered_call_is_transcript_01_on_two_connections(sim: SimAsterisk, agi: FastAgi) -> None:
    every, filtered = await Ami.connect(sim.port), await Ami.connect(sim.port)
    try:
        await every.login()
        await filtered.login(events="call,cdr")
        async with asyncio.timeout(10):
            result = await sim.call(CallSpec(extension="2000", talk_s=0.3, cdr_first=True))
            all_events = call_events(await every.drain())
            call_cdr_events = call_events(await filtered.drain())
    finally:
        await every.close()
        await filtered.close()

    assert_like_capture(all_events, "01-answered-callee-hangup.ami.txt")
    assert_like_capture(call_cdr_events, "01-answered-callee-hangup.ami-events-call-cdr.txt")
    assert len(call_cdr_events) == 51

    # The billing leg is the AGI channel; the Linkedid is the originated ;1 leg's Uniqueid.
    env = agi.envs[0]
    assert (env["agi_channel"], env["agi_uniqueid"]) == (result.channel, result.uniqueid)
    assert env["agi_accountcode"] == "" and env["agi_extension"] == "2000"
    assert result.channel.startswith("Local/2000@billing-") and result.channel.endswith(";2")
    first = call_cdr_events[0]
    assert get(first, "Channel") == result.channel[:-1] + "1"
    assert get(first, "Uniqueid") == get(first, "Linkedid") == result.linkedid != result.uniqueid
    assert {get(m, "Linkedid") for m in call_cdr_events if get(m, "Linkedid")} == {result.linkedid}

    # AccountCode: empty before the SET, then on every event of the billing leg and on the callee legs.
    billing = [m for m in call_cdr_events if get(m, "Channel") == result.channel]
    set_at = names(billing).index("NewAccountCode")
    assert {get(m, "AccountCode") for m in billing[:set_at]} == {""}
    assert {get(m, "AccountCode") for m in billing[set_at:]} == {ACCOUNT}
    assert get(billing[set_at], "OldAccountCode") == ""
    dial_end = next(m for m in call_cdr_events if get(m, "Event") == "DialEnd" and get(m, "Channel"))
    assert (get(dial_end, "DialStatus"), get(dial_end, "DestAccountCode")) == ("ANSWER", ACCOUNT)

    # One Dial Cdr for the billing leg: ANSWERED, BillableSeconds = floor(end - answer).
    assert result.status == "OK" and result.ended_by == "callee" and result.cause == 16
    assert result.answered_at is not None
    (cdr,) = billing_cdrs(result)
    assert (cdr.lastapp, cdr.lastdata, cdr.disposition) == ("Dial", "Local/2000@callee,30,L(600000)", "ANSWERED")
    assert cdr.billsec == result.billable_s == int(result.ended_at - result.answered_at)
    assert (cdr.accountcode, cdr.linkedid, cdr.dstchannel) == (ACCOUNT, result.linkedid, result.dial_channel)
    cdr_event = next(m for m in call_cdr_events if get(m, "Event") == "Cdr" and get(m, "UniqueID") == result.uniqueid)
    assert get(cdr_event, "LastApplication") == "Dial" and get(cdr_event, "BillableSeconds") == str(cdr.billsec)
    assert get(cdr_event, "AnswerTime") and get(cdr_event, "CallerID") == '"Test" <5551234>'
    assert sim.live_channels() == []


async def test_manager_conf_name_filters_send_only_those_events(agi: FastAgi) -> None:
    # Asterisk applies the user's eventfilter(name(...)) lines to each event: what passes is the capture's
    # stream with every other event left out, headers untouched.
    kept = manager_event_names("[a2bd]\neventfilter(action(include),name(DialEnd)) =\n"
                               "eventfilter(action(include),name(Cdr)) =\n", "a2bd")
    assert kept == {"DialEnd", "Cdr"}
    sim = SimAsterisk(username="a2bd", secret=SECRET, agi=("127.0.0.1", agi.port), seed=7, event_names=kept)
    await sim.start()
    ami = await Ami.connect(sim.port)
    try:
        await ami.login(events="call,cdr")
        async with asyncio.timeout(10):
            await sim.call(CallSpec(extension="2000", talk_s=0.3, cdr_first=True))
            got = call_events(await ami.drain())
    finally:
        await ami.close()
        await sim.close()
    want = [m for m in call_events(recorded("01-answered-callee-hangup.ami-events-call-cdr.txt"))
            if get(m, "Event") in kept]
    assert names(got) == names(want) == ["DialEnd", "DialEnd", "Cdr", "Cdr", "Cdr"]
    assert [[k for k, _ in m] for m in got] == [[k for k, _ in m] for m in want]


@pytest.mark.parametrize(
    "line",
    [
        "eventfilter = Event: Newchannel",  # a legacy regex
        "eventfilter = !Channel: DAHDI.*",
        "eventfilter(action(exclude),name(Newchannel)) =",
        "eventfilter(name(Newchannel),header(Channel)) =",
        "eventfilter(name(Newchannel)) = PJSIP/",
        "eventfilter() =",
    ],
)
def test_manager_conf_filters_the_simulator_cannot_apply_are_refused(line: str) -> None:
    with pytest.raises(ValueError, match="line 3"):
        manager_event_names(f"[a2bd]\nread = call\n{line}\n", "a2bd")


def test_manager_conf_without_filters_or_for_another_user_sends_everything() -> None:
    conf = "[general]\neventfilter(name(Cdr)) =\n[other]\neventfilter = !junk\n[a2bd]\nread = call,cdr\n"
    assert manager_event_names(conf, "a2bd") is None


async def test_busy_is_transcript_04(sim: SimAsterisk, client: Ami) -> None:
    await client.login()
    result, events = await call_and_drain(sim, client, CallSpec(extension="4000", outcome="busy", cdr_first=False))
    assert_like_capture(events, "04-busy.ami.txt")
    assert result.ended_by == "busy" and result.cause == 16
    dial, after = billing_cdrs(result)
    assert (dial.lastapp, dial.disposition, dial.billsec) == ("Dial", "BUSY", 0)
    assert (after.lastapp, after.disposition, after.billsec) == ("Hangup", "NO ANSWER", 0)
    causes = {get(m, "Channel"): get(m, "Cause-txt") for m in events if get(m, "Event") == "Hangup"}
    assert causes[result.dial_channel] == "Unknown"  # the callee ;1: cause 0
    assert causes[result.dial_channel[:-1] + "2"] == "User busy"
    assert causes[result.channel] == "Normal Clearing"


async def test_no_answer_is_transcript_05(sim: SimAsterisk, client: Ami) -> None:
    await client.login()
    spec = CallSpec(extension="3000", outcome="noanswer", dial_timeout_s=0.3, cdr_first=True)
    result, events = await call_and_drain(sim, client, spec)
    assert_like_capture(events, "05-no-answer.ami.txt")
    assert result.ended_by == "noanswer" and result.answered_at is None
    dial, after = billing_cdrs(result)
    assert (dial.lastapp, dial.lastdata, dial.disposition) == ("Dial", "Local/3000@callee,0.3,L(600000)", "NO ANSWER")
    assert (after.lastapp, after.disposition) == ("Hangup", "NO ANSWER")
    assert [get(m, "DialStatus") for m in events if get(m, "Event") == "DialState"] == ["RINGING", "RINGING"]
    callee_cdr = next(c for c in result.cdrs if c.channel == result.dial_channel[:-1] + "2")
    assert callee_cdr.disposition == "FAILED"


async def test_denied_call_is_transcript_06(sim: SimAsterisk, agi: FastAgi, client: Ami) -> None:
    agi.answer = recorded_answer(status="NOFUNDS", limit_ms=None)
    await client.login()
    result, events = await call_and_drain(sim, client, CallSpec(extension="2000", cdr_first=True))
    assert_like_capture(events, "06-auth-denied-nofunds.ami.txt")
    assert (result.status, result.ended_by, result.cause, result.accountcode) == ("NOFUNDS", "denied", 21, ACCOUNT)
    (cdr,) = billing_cdrs(result)
    assert (cdr.lastapp, cdr.lastdata, cdr.disposition, cdr.accountcode) == ("Hangup", "21", "NO ANSWER", ACCOUNT)
    hangups = [m for m in events if get(m, "Event") == "Hangup"]
    assert [(get(m, "Cause"), get(m, "Cause-txt")) for m in hangups] == [("21", "Call Rejected")] * 2
    assert not any(get(m, "Event") == "DialBegin" and get(m, "Channel") for m in events)


async def test_agi_down_is_refused_like_transcript_07(agi: FastAgi) -> None:
    await agi.close()  # nothing listens on the AGI port any more: connection refused
    async with SimAsterisk(username="a2bd", secret=SECRET, agi=("127.0.0.1", agi.port)) as asterisk:
        ami = await Ami.connect(asterisk.port)
        try:
            await ami.login()
            result, events = await call_and_drain(asterisk, ami, CallSpec(extension="2000", cdr_first=False))
        finally:
            await ami.close()
    # Asterisk's own order differs between 06 and 07 for the same burst: compare the events as a multiset.
    want = call_events(recorded("07-agi-server-down.ami.txt"))
    assert collections.Counter(names(events)) == collections.Counter(names(want))
    assert (result.status, result.agi_status, result.ended_by, result.cause) == ("", "FAILURE", "denied", 21)
    (cdr,) = billing_cdrs(result)
    assert (cdr.lastapp, cdr.disposition, cdr.accountcode) == ("Hangup", "NO ANSWER", "")
    assert ("AGISTATUS", "FAILURE") in [(get(m, "Variable"), get(m, "Value")) for m in events]
    assert not any(get(m, "AccountCode") for m in events if get(m, "Event") in ("Hangup", "Cdr"))


async def test_duration_limit_cuts_like_transcript_02(sim: SimAsterisk, agi: FastAgi, client: Ami) -> None:
    agi.answer = recorded_answer(limit_ms="300")
    await client.login()
    result, events = await call_and_drain(sim, client, CallSpec(extension="1001", talk_s=30, cdr_first=False))
    assert_like_capture(events, "02-duration-limit.ami.txt", exact_from_talk=True)
    assert result.ended_by == "limit" and result.cause == 16  # nothing marks a limit cut
    assert result.answered_at is not None and result.ended_at - result.answered_at < 30
    (cdr,) = billing_cdrs(result)
    assert (cdr.disposition, cdr.lastdata, cdr.billsec) == ("ANSWERED", "Local/1001@callee,30,L(300)", 0)


async def test_ami_hangup_mid_call_is_transcript_03(sim: SimAsterisk, client: Ami) -> None:
    await client.login()
    async with asyncio.timeout(10):
        task = asyncio.create_task(sim.call(CallSpec(extension="1001", talk_s=30, cdr_first=False)))
        # The callee's Wait is the last event of the answer: the call is up and quiet.
        seen = await client.until(lambda m: get(m, "Event") == "Newexten" and get(m, "Application") == "Wait")
        billing = next(get(m, "Channel") or "" for m in seen if get(m, "Event") == "DialEnd" and get(m, "Channel"))
        client.send("Hangup", ActionID="03-hangup", Channel=billing, Cause="16")
        response = await client.read()
        result = await task
        seen += await client.drain()
        client.send("Hangup", ActionID="again", Channel=billing, Cause="16")
        again = await client.read()

    # The response comes before any event of the hangup.
    assert response == [("Response", "Success"), ("ActionID", "03-hangup"), ("Message", "Channel Hungup")]
    assert again == [("Response", "Error"), ("ActionID", "again"), ("Message", "No such channel")]
    assert_like_capture(call_events(seen), "03-ami-hangup-midcall.ami.txt", exact_from_talk=True)
    assert (result.ended_by, result.cause, result.disposition) == ("ami_hangup", 16, "ANSWERED")
    assert [(a.channel, a.cause, a.found) for a in sim.hangup_actions] == [(billing, 16, True), (billing, 16, False)]
    assert result.answered_at is not None and sim.hangup_actions[0].at <= result.ended_at


async def test_hangup_while_ringing_cancels_the_dial(sim: SimAsterisk, client: Ami) -> None:
    await client.login(events="call,cdr")
    async with asyncio.timeout(10):
        task = asyncio.create_task(sim.call(CallSpec(extension="1001", ring_s=20, cdr_first=True)))
        # The Originate's DialState (no Channel header) is the last event of the ringing.
        seen = await client.until(lambda m: get(m, "Event") == "DialState" and get(m, "Channel") is None)
        billing = next(get(m, "Channel") or "" for m in seen if get(m, "Event") == "DialState")
        client.send("Hangup", Channel=billing, Cause="16")
        response = await client.read()  # nothing else happens on the call while it rings
        result = await task
        seen += await client.drain()
    assert get(response, "Message") == "Channel Hungup"
    dial_ends = [get(m, "DialStatus") for m in seen if get(m, "Event") == "DialEnd"]
    assert dial_ends == ["CANCEL", "NOANSWER"]  # the billing leg's Dial, then the Originate's
    assert (result.ended_by, result.answered_at) == ("ami_hangup", None)
    (cdr,) = billing_cdrs(result)  # Dial returned -1: the dialplan does not go on, one Cdr
    assert (cdr.lastapp, cdr.disposition) == ("Dial", "NO ANSWER")


async def test_hangup_during_the_agi_is_like_transcript_10(sim: SimAsterisk, agi: FastAgi, client: Ami) -> None:
    agi.answer = recorded_answer("ANSWER", "GET VARIABLE CALLERID(num)")
    agi.delay_s = 0.3
    await client.login()
    async with asyncio.timeout(10):
        task = asyncio.create_task(sim.call(CallSpec(extension="2000", cdr_first=False)))
        seen = await client.until(lambda m: get(m, "Event") == "Newexten" and get(m, "Application") == "AGI")
        client.send("Hangup", ActionID="10-hangup", Channel=get(seen[-1], "Channel") or "", Cause="16")
        seen += await client.until(lambda m: get(m, "Response") is not None)
        result = await task
        seen += await client.drain()

    want = call_events(recorded("10-caller-hangup-during-agi.ami.txt"))
    assert collections.Counter(names(call_events(seen))) == collections.Counter(names(want))
    ends = [(get(m, "Command"), get(m, "ResultCode")) for m in seen if get(m, "Event") == "AGIExecEnd"]
    assert ends[3:] == [("ANSWER", "511"), ("GET VARIABLE CALLERID(num)", "200")]
    assert ("AGISTATUS", "HANGUP") in [(get(m, "Variable"), get(m, "Value")) for m in seen]
    assert (result.ended_by, result.agi_status, result.status) == ("ami_hangup", "HANGUP", "OK")
    (cdr,) = billing_cdrs(result)  # the account is stamped even on the dead channel
    assert (cdr.lastapp, cdr.disposition, cdr.accountcode) == ("AGI", "NO ANSWER", ACCOUNT)


async def test_core_show_channels_lists_the_live_channels_like_transcript_08(sim: SimAsterisk, client: Ami) -> None:
    await client.login(events="off")
    recorded_items = [m for m in recorded("08-two-calls-same-account.ami.txt") if get(m, "Event") == "CoreShowChannel"]
    async with asyncio.timeout(10):
        tasks = [asyncio.create_task(sim.call(CallSpec(extension="1001", talk_s=30))) for _ in range(2)]
        while sum(1 for ch in sim.live_channels() if ch.state == 6) < 8:  # both calls answered: 8 channels Up
            await asyncio.sleep(0.01)
        client.send("CoreShowChannels", ActionID="08-channels")
        listing = await client.until(lambda m: get(m, "Event") == "CoreShowChannelsComplete")
        live = sim.live_channels()

        head, *items, done = listing
        assert head == [
            ("Response", "Success"),
            ("ActionID", "08-channels"),
            ("EventList", "start"),
            ("Message", "Channels will follow"),
        ]
        assert done == [
            ("Event", "CoreShowChannelsComplete"),
            ("ActionID", "08-channels"),
            ("EventList", "Complete"),
            ("ListItems", "8"),
        ]
        assert all(keys(item) == keys(recorded_items[0]) for item in items)
        assert sorted(get(item, "Channel") or "" for item in items) == sorted(ch.name for ch in live)
        # The billing legs: AccountCode and Application Dial (the callee legs carry the account too).
        billing = [
            get(m, "Channel") or ""
            for m in items
            if get(m, "AccountCode") == ACCOUNT and get(m, "Application") == "Dial"
        ]
        assert len(billing) == 2
        assert sum(1 for m in items if get(m, "AccountCode") == ACCOUNT) == 6
        assert {get(m, "Application") for m in items} == {"Dial", "Wait", "AppDial"}
        for name in billing:
            client.send("Hangup", Channel=name, Cause="16")
            assert get(await client.read(), "Message") == "Channel Hungup"
        results = await asyncio.gather(*tasks)

    assert sorted(r.channel for r in results) == sorted(billing)
    assert all(r.ended_by == "ami_hangup" and r.disposition == "ANSWERED" for r in results)
    assert sim.live_channels() == []


async def test_failover_tries_the_next_route(sim: SimAsterisk, agi: FastAgi, client: Ami) -> None:
    agi.answer = recorded_answer(
        "SET VARIABLE A2B_ROUTES 3",
        "SET VARIABLE A2B_ROUTE_1 PJSIP/4930123@carrier-a",
        "SET VARIABLE A2B_ROUTE_2 SIP/carrier-b/4930123",
        "SET VARIABLE A2B_ROUTE_3 PJSIP/4930123@carrier-c",
    )
    await client.login(events="call,cdr")
    spec = CallSpec(extension="4930123", talk_s=0.1, route_failures=("CHANUNAVAIL", "CONGESTION"), cdr_first=True)
    result, events = await call_and_drain(sim, client, spec)

    dials = [
        (get(m, "Event"), get(m, "DialString"), get(m, "DialStatus"))
        for m in events
        if get(m, "Event") in ("DialBegin", "DialEnd") and get(m, "Channel")
    ]
    # CHANUNAVAIL: app_dial could not make a channel, so no Dial event at all.
    assert dials == [
        ("DialBegin", "carrier-b/4930123", None),
        ("DialEnd", None, "CONGESTION"),
        ("DialBegin", "4930123@carrier-c", None),
        ("DialEnd", None, "ANSWER"),
    ]
    assert result.dial_channel.startswith("PJSIP/carrier-c-")
    (cdr,) = billing_cdrs(result)  # a failed route leaves no Cdr of its own
    assert (cdr.disposition, cdr.lastdata) == ("ANSWERED", "PJSIP/4930123@carrier-a,30,L(600000)")
    assert len(result.cdrs) == 2  # the billing leg's and the originated ;1's: a dialled PJSIP leg has none


async def test_caller_hangup_ends_an_answered_call(sim: SimAsterisk, client: Ami) -> None:
    await client.login(events="call,cdr")
    result, _ = await call_and_drain(sim, client, CallSpec(extension="1001", talk_s=30, caller_hangup_s=0.2))
    assert (result.ended_by, result.disposition) == ("caller", "ANSWERED")


async def test_accountcode_of_the_endpoint_reaches_the_agi(sim: SimAsterisk, agi: FastAgi, client: Ami) -> None:
    agi.answer = recorded_answer()  # sets the same account: no NewAccountCode for the billing leg
    await client.login(events="call")
    result, events = await call_and_drain(sim, client, CallSpec(extension="2000", accountcode=ACCOUNT, talk_s=0.1))
    assert agi.envs[0]["agi_accountcode"] == ACCOUNT
    assert not [m for m in events if get(m, "Event") == "NewAccountCode" and get(m, "Channel") == result.channel]
    assert not [m for m in events if get(m, "Event") == "Cdr"]  # Events: call


# --- fault injection, replay, sink, many calls ----------------------------------------------------------


async def test_drop_ami_closes_connections_and_calls_go_on(sim: SimAsterisk, client: Ami) -> None:
    await client.login()
    async with asyncio.timeout(10):
        task = asyncio.create_task(sim.call(CallSpec(extension="2000", talk_s=0.3)))
        await client.until(lambda m: get(m, "Event") == "BridgeEnter")
        await sim.drop_ami()
        with contextlib.suppress(ConnectionError):
            while await client.reader.read(65536):
                pass
        assert sim.logged_in == 0
        result = await task
        late = await Ami.connect(sim.port)
        try:
            await late.login(events="call,cdr")
            assert await late.drain() == []  # the end of the call went out while nobody listened
        finally:
            await late.close()
    assert result.disposition == "ANSWERED"


async def test_cut_ami_refuses_connections_until_restored_on_the_same_port(sim: SimAsterisk, client: Ami) -> None:
    await client.login()
    port = sim.port
    async with asyncio.timeout(10):
        task = asyncio.create_task(sim.call(CallSpec(extension="2000", talk_s=0.3)))
        await client.until(lambda m: get(m, "Event") == "BridgeEnter")
        await sim.cut_ami()
        with contextlib.suppress(ConnectionError):
            while await client.reader.read(65536):
                pass
        with pytest.raises(OSError):
            await Ami.connect(port)  # refused while cut
        result = await task  # the call went on without AMI
        await sim.restore_ami()
        late = await Ami.connect(port)
        try:
            await late.login(events="call,cdr")
            assert sim.logged_in == 1
        finally:
            await late.close()
    assert result.disposition == "ANSWERED"


async def test_stalled_ami_answers_nothing_until_resumed(sim: SimAsterisk, client: Ami) -> None:
    await client.login(events="off")
    sim.stall_ami(True)
    client.send("Ping", ActionID="stalled")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 0.3)
    sim.stall_ami(False)
    assert get(await client.read(), "ActionID") == "stalled"


async def test_replay_sends_a_recorded_stream_verbatim(sim: SimAsterisk, client: Ami) -> None:
    await client.login(events="off")
    data = load_capture(FIXTURES / "01-answered-callee-hangup.ami-events-call-cdr.txt")[0].received
    events = data[data.index(b"Event: ") :]
    assert sim.replay(events) == 1
    got = await asyncio.wait_for(client.reader.readexactly(len(events)), STEP_S)
    assert got == events


async def test_every_cdr_goes_to_the_sink(agi: FastAgi) -> None:
    sunk: list[CdrRecord] = []

    async def sink(record: CdrRecord) -> None:
        sunk.append(record)

    async with SimAsterisk(username="a2bd", secret=SECRET, agi=("127.0.0.1", agi.port), cdr_sink=sink) as asterisk:
        async with asyncio.timeout(10):
            result = await asterisk.call(CallSpec(extension="2000", talk_s=0.1))
    assert sunk == result.cdrs and len(sunk) == 3
    assert {record.linkedid for record in sunk} == {result.linkedid}


async def test_many_concurrent_calls_leave_nothing_behind(sim: SimAsterisk, agi: FastAgi, client: Ami) -> None:
    await client.login(events="call,cdr")
    async with asyncio.timeout(30):
        specs = [CallSpec(extension=f"2{i:03d}", talk_s=0.2) for i in range(50)]
        results = await asyncio.gather(*(sim.call(spec) for spec in specs))
        events = call_events(await client.drain())
    assert len({r.uniqueid for r in results}) == 50
    assert all(r.disposition == "ANSWERED" for r in results)
    dial_cdrs = [m for m in events if get(m, "Event") == "Cdr" and get(m, "LastApplication") == "Dial"]
    assert sorted(get(m, "UniqueID") or "" for m in dial_cdrs) == sorted(r.uniqueid for r in results)
    assert len([m for m in events if get(m, "Event") == "Hangup"]) == 200
    assert sim.live_channels() == []
