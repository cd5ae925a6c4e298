"""A simulated Asterisk 22.10.1: the AMI server and a call engine, faithful to the recorded transcripts.

No Asterisk can be installed where a2bd is tested, so this is how the AMI client, the call tracker, the credit
guard and the reconciler meet "Asterisk" end to end, and how call storms are replayed. What it sends is
modelled on ``tests/fixtures/asterisk/`` (see that folder's README.md): the same event names, field names
and field order, ``Privilege: call,all``, ``Key: `` for empty values, CRLF framing, the same Uniqueid,
Linkedid and channel name formats, and the same event order inside each phase of a call.

The call model is the recorded one. Each call is placed the way the recorder placed it: an ``Originate`` of
``Local/<exten>@billing`` running ``Wait(60)``, so a call has

* ``Local/<exten>@billing-XXXXXXXX;1`` (B1): the originated half; its Uniqueid is the call's Linkedid;
* ``Local/<exten>@billing-XXXXXXXX;2`` (B2): **the billing leg**, which runs the ``[billing]`` dialplan of
  the recordings (NoOp, Set, Set, AGI at priority 4, Verbose, GotoIf, Dial at priority 7; denied:
  Verbose, Hangup(21)); ``agi_channel``/``agi_uniqueid`` name it;
* per Dial attempt, the dialled channel C1 and, for a ``Local/`` route, its ``;2`` half C2 running a fake
  callee dialplan (Answer, Wait, Hangup / Busy / Ringing, Wait).

Routes come from the AGI answer (``A2B_ROUTES``, ``A2B_ROUTE_1..n``, tried in order on CHANUNAVAIL and
CONGESTION as in ``asterisk_conf/extensions.conf``); without them the recorded ``Local/<exten>@callee`` is
dialled. A route of another technology (``PJSIP/<number>@<endpoint>``, ``SIP/<peer>/<number>``, ...)
makes one channel ``<TECH>/<peer>-XXXXXXXX`` and no callee Cdr (a dialled channel is only the
DestinationChannel of the caller's Cdr); its event text is the Local ;1 leg's, which is not recorded.

Event order. Inside each phase the simulator sends the events in the order of one capture: the setup, the
AGI, the Dial and the answer as in 01; ringing as in 05; the end burst as in 01 (the callee hangs up), 02
(Dial's L() limit), 03 (an AMI Hangup, and the caller hanging up), 04 (busy, congestion), 05 (no answer) or
06 (refused, AGI down, hung up during the AGI). Asterisk's own order varies from call to call (its threads
race); what varies in the captures and matters to a consumer, the billing leg's Cdr before or after its
Hangup, is CallSpec.cdr_first. All events of one phase leave in the same loop turn, as they arrive within
1 ms from Asterisk.

Not simulated: AMI Originate and other actions than Login, Logoff, Ping, CoreShowChannels and Hangup
(Hangup by ``/regex/`` neither); MD5 challenge logins; the ``HANGUP`` line Asterisk writes on the FastAGI
socket when the channel is hung up during the AGI (the session runs to its end, then the call ends as in
10); the 0.5 s that ``Answer()`` on a Local channel waits before the callee's next priority; media.

Events go through one ``asyncio.Protocol`` per AMI connection. Each event is encoded once and appended to
the output of every connection whose ``Events:`` mask covers its class; a connection flushes once per loop
turn (one ``write`` per burst, no task per event), and no event is even formatted when no connection wants
its class. Events emitted while no client is connected are lost, as with a real Asterisk.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, cast

from a2bd.agi.protocol import split_command
from a2bd.sim.agi import SimResult, make_environment, run_session

__all__ = [
    "ALL_EVENTS",
    "CallResult",
    "CallSpec",
    "CdrRecord",
    "ChannelInfo",
    "HangupAction",
    "Outcome",
    "SimAsterisk",
    "event_mask",
    "manager_event_names",
]

# --- AMI event classes (manager.h EVENT_FLAG_*) ---------------------------------------------------------

SYSTEM: Final = 1 << 0
CALL: Final = 1 << 1
CDR: Final = 1 << 10
DIALPLAN: Final = 1 << 11
AGI: Final = 1 << 13
SECURITY: Final = 1 << 18
ALL_EVENTS: Final = (1 << 20) - 1

# manager.c's perms[] table, in its order: authority_to_str() prints every label whose bits meet the class,
# which is why a call event says "call,all"; get_perm() parses an Events: header against the same labels.
_PERMS: Final[tuple[tuple[str, int], ...]] = (
    ("system", SYSTEM),
    ("call", CALL),
    ("log", 1 << 2),
    ("verbose", 1 << 3),
    ("command", 1 << 4),
    ("agent", 1 << 5),
    ("user", 1 << 6),
    ("config", 1 << 7),
    ("dtmf", 1 << 8),
    ("reporting", 1 << 9),
    ("cdr", CDR),
    ("dialplan", DIALPLAN),
    ("originate", 1 << 12),
    ("agi", AGI),
    ("cc", 1 << 15),
    ("aoc", 1 << 16),
    ("test", 1 << 17),
    ("security", SECURITY),
    ("message", 1 << 19),
    ("all", ALL_EVENTS),
    ("none", 0),
)
_PRIVILEGE: Final = {
    cls: ",".join(label for label, bits in _PERMS[:-1] if bits & cls) for cls in (SYSTEM, CALL, CDR, DIALPLAN, AGI)
}
_PRIVILEGE[SECURITY] = "security,all"

_BANNER: Final = b"Asterisk Call Manager/11.0.0\r\n"  # one line, no blank line after it (every capture)
_MAX_LINE: Final = 1024  # manager.c's inbuf: a longer line is dumped
_MAX_HEADERS: Final = 127  # AST_MAX_MANHEADERS - 1

_STATE_DESC: Final = {0: "Down", 4: "Ring", 5: "Ringing", 6: "Up", 7: "Busy"}
_DOWN, _RING, _RINGING, _UP, _BUSY = 0, 4, 5, 6, 7

# ast_cause2str() for the causes a call here can end with.
_CAUSE_TXT: Final = {
    0: "Unknown",
    1: "Unallocated (unassigned) number",
    3: "No route to destination",
    16: "Normal Clearing",
    17: "User busy",
    18: "No user responding",
    19: "User alerting, no answer",
    21: "Call Rejected",
    34: "Circuit/channel congestion",
    38: "Network out of order",
    41: "Temporary failure",
    42: "Switching equipment congestion",
}
_CID_PRES: Final = "CID-CallingPres: 0 (Presentation Allowed, Not Screened)\r\n"
_OUTGOING: Final = "(Outgoing Line)"
_DEFAULT_LIMIT_MS: Final = "600000"  # the recorded [billing] sets A2B_LIMIT_MS=600000 before the AGI
# Dial() clears these on the caller before dialling (all captures, right after Newexten Dial).
_DIAL_VARS: Final = (
    "DIALSTATUS",
    "DIALEDPEERNUMBER",
    "DIALEDPEERNAME",
    "ANSWEREDTIME",
    "ANSWEREDTIME_MS",
    "DIALEDTIME",
    "DIALEDTIME_MS",
    "RINGTIME",
    "RINGTIME_MS",
    "PROGRESSTIME",
    "PROGRESSTIME_MS",
)
# Dial status → the Disposition of the caller's Dial Cdr (cdr.conf congestion=yes, as recorded).
_DISPOSITION: Final = {
    "ANSWER": "ANSWERED",
    "BUSY": "BUSY",
    "NOANSWER": "NO ANSWER",
    "CANCEL": "NO ANSWER",
    "CONGESTION": "CONGESTION",
    "CHANUNAVAIL": "FAILED",
}

Outcome = Literal["answer", "busy", "noanswer", "congestion", "chanunavail"]
RouteFailure = Literal["CHANUNAVAIL", "CONGESTION"]


_CRITERION = re.compile(r"\s*(\w+)\(([^()]*)\)\s*")  # one "name(value)" of an eventfilter(...) key


def manager_event_names(conf: str, user: str) -> frozenset[str] | None:
    """The event names a manager.conf lets through to `user`'s sessions, from its advanced
    ``eventfilter(action(include),name(X)) =`` lines (Asterisk 21+; hash-matched on the event name, no regex
    per event). None when the user has no filter: every event of its read classes is sent.

    The simulator implements only that form: any other filter of the user (a legacy regex, an exclude, a
    header or a match expression) raises ValueError rather than be silently ignored.
    """
    names: set[str] = set()
    section = ""
    for number, raw in enumerate(conf.splitlines(), 1):
        line = raw.split(";", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        if section != user or not line.startswith("eventfilter"):
            continue
        key, _, expression = (part.strip() for part in line.partition("="))
        inner = key[len("eventfilter("):-1] if key.startswith("eventfilter(") and key.endswith(")") else ""
        parts = [_CRITERION.fullmatch(part) for part in inner.split(",")]
        criteria = {m[1]: m[2] for m in parts if m is not None}
        if (None in parts or expression or set(criteria) - {"action", "name"}
                or criteria.get("action", "include") != "include" or not criteria.get("name")):
            raise ValueError(f"manager.conf line {number}: the simulator reads only "
                             f"eventfilter(action(include),name(Event)) = filters, not {raw.strip()!r}")
        names.add(criteria["name"])
    return frozenset(names) if names else None


def event_mask(value: str) -> int:
    """The event classes an ``Events:`` login header selects, as manager.c's strings_to_mask() reads it.

    Empty or absent: all events. All digits: that number as a bit mask. ``on``/``yes``/``true``/... : all;
    ``off``/``no``/``false``/... : none. Otherwise a comma list of class names, matched like ast_instring():
    case-sensitive, every item but the last may be a prefix of a name (``c,cdr`` selects call, cdr,
    command, config and cc), the last must match exactly, and spaces are not trimmed.
    """
    if not value:
        return ALL_EVENTS
    if all("0" <= c <= "9" for c in value):
        return int(value)
    if value.lower() in ("yes", "true", "y", "t", "1", "on"):
        return ALL_EVENTS
    if value.lower() in ("no", "false", "n", "f", "0", "off"):
        return 0
    tokens = value.split(",")
    mask = 0
    for label, bits in _PERMS:
        hit = any(label[: len(tok)] == tok and len(label) >= len(tok) for tok in tokens[:-1])
        if hit or label == tokens[-1]:
            mask |= bits
    return mask


# --- public values --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallSpec:
    """One call to place. Times are seconds of real time.

    `accountcode`: the caller's own accountcode before the AGI (a SIP endpoint's ``accountcode``; the AGI
    sees it as ``agi_accountcode``). `outcome` is what the last route tried does; `route_failures` are the
    Dial statuses of the routes tried before it (``CHANUNAVAIL``: no channel could be made, as app_dial
    does when ast_request() fails; ``CONGESTION``: the carrier's channel rejects). `ring_s`: ringing before
    the answer (0: answered at once, as in every recorded answer). `talk_s`: answered time after which the
    callee hangs up. `caller_hangup_s`: answered time after which the caller hangs up instead. The Dial
    ``L()`` limit (``A2B_LIMIT_MS``) and AMI ``Hangup`` actions cut the call as well, whichever is first.
    `cdr_first`: whether the billing leg's Cdr precedes its Hangup event in the end burst (the captures
    show both orders); None: random per call. `originate_action_id`: the ActionID the call's
    OriginateResponse carries (the recorder's Originate had one).
    """

    extension: str
    callerid: str = "5551234"
    calleridname: str = "Test"
    accountcode: str = ""
    outcome: Outcome = "answer"
    ring_s: float = 0.0
    talk_s: float = 2.0
    dial_timeout_s: float = 30.0
    route_failures: tuple[RouteFailure, ...] = ()
    caller_hangup_s: float | None = None
    cdr_first: bool | None = None
    agi_args: tuple[str, ...] = ()
    originate_action_id: str | None = None


@dataclass(frozen=True, slots=True)
class CdrRecord:
    """One Cdr, in cdr_pgsql's column names. Times are wall-clock epoch seconds (the AMI text shows them
    as ``%Y-%m-%d %H:%M:%S`` UTC, like the recording box); `answer` is None when unanswered."""

    accountcode: str
    src: str
    dst: str
    dcontext: str
    clid: str
    channel: str
    dstchannel: str
    lastapp: str
    lastdata: str
    start: float
    answer: float | None
    end: float
    duration: int
    billsec: int
    disposition: str
    amaflags: str
    userfield: str
    uniqueid: str
    linkedid: str


@dataclass(slots=True)
class CallResult:
    """What one call did. `uniqueid`/`channel`: the billing leg (the AGI channel); `status`: A2B_STATUS
    as set over FastAGI ("" when never set); `variables`: every SET VARIABLE of the AGI session;
    `answered_at`/`ended_at`: wall clock (the sim's clock) when DialEnd ANSWER and the billing leg's Hangup
    were emitted; `billable_s`/`disposition`: from the billing leg's Dial Cdr (its last Cdr when it never
    dialled); `ended_by`: callee, limit, ami_hangup, caller, denied, busy, noanswer, congestion,
    chanunavail or shutdown; `cause`: the billing leg's Hangup cause; `dial_channel`: the channel the last
    Dial attempt reached; `cdrs`: every Cdr of the call in emission order."""

    uniqueid: str
    channel: str
    linkedid: str
    accountcode: str = ""
    status: str = ""
    agi_status: str = ""
    variables: dict[str, str] = field(default_factory=dict)
    answered_at: float | None = None
    ended_at: float = 0.0
    billable_s: int = 0
    disposition: str = ""
    ended_by: str = ""
    cause: int = 0
    dial_channel: str = ""
    cdrs: list[CdrRecord] = field(default_factory=list)
    authorize_s: float | None = None  # the FastAGI session, connect to close (None: none was opened)


@dataclass(frozen=True, slots=True)
class HangupAction:
    """An AMI ``Hangup`` action as received: `at` is the sim's wall clock, `found` whether the channel was
    live (``Channel Hungup``) or not (``No such channel``)."""

    channel: str
    cause: int
    at: float
    found: bool
    action_id: str


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    """A live channel, as CoreShowChannels would list it."""

    name: str
    uniqueid: str
    linkedid: str
    accountcode: str
    application: str
    application_data: str
    state: int


# --- channels and calls ---------------------------------------------------------------------------------


class _Channel:
    """A channel's snapshot fields. The AMI text of the snapshot is cached: most events repeat it."""

    __slots__ = (
        "_dest",
        "_snap",
        "account",
        "app",
        "appdata",
        "bridge",
        "cid_name",
        "cid_num",
        "conn_name",
        "conn_num",
        "context",
        "created",
        "exten",
        "linkedid",
        "name",
        "priority",
        "state",
        "uniqueid",
    )

    def __init__(
        self, name: str, uniqueid: str, linkedid: str, state: int, context: str, exten: str, created: float
    ) -> None:
        self.name = name
        self.uniqueid = uniqueid
        self.linkedid = linkedid
        self.state = state
        self.cid_num = self.cid_name = self.conn_num = self.conn_name = "<unknown>"
        self.account = ""
        self.context = context
        self.exten = exten
        self.priority = 1
        self.app = ""
        self.appdata = ""
        self.bridge = ""
        self.created = created
        self._snap: str | None = None
        self._dest: str | None = None

    def changed(self) -> None:
        self._snap = self._dest = None

    def snap(self) -> str:
        snap = self._snap
        if snap is None:
            snap = self._snap = self.block("")
        return snap

    def dest(self) -> str:
        dest = self._dest
        if dest is None:
            dest = self._dest = self.block("Dest")
        return dest

    def block(self, prefix: str) -> str:
        p = prefix
        return (
            f"{p}Channel: {self.name}\r\n{p}ChannelState: {self.state}\r\n"
            f"{p}ChannelStateDesc: {_STATE_DESC[self.state]}\r\n{p}CallerIDNum: {self.cid_num}\r\n"
            f"{p}CallerIDName: {self.cid_name}\r\n{p}ConnectedLineNum: {self.conn_num}\r\n"
            f"{p}ConnectedLineName: {self.conn_name}\r\n{p}Language: en\r\n{p}AccountCode: {self.account}\r\n"
            f"{p}Context: {self.context}\r\n{p}Exten: {self.exten}\r\n{p}Priority: {self.priority}\r\n"
            f"{p}Uniqueid: {self.uniqueid}\r\n{p}Linkedid: {self.linkedid}\r\n"
        )


@dataclass(slots=True)
class _Attempt:
    """One Dial attempt: the route's dial string and the channels it made (none for CHANUNAVAIL)."""

    route: str
    appdata: str
    dialstring: str
    device: str
    number: str
    c1: _Channel | None = None
    c2: _Channel | None = None  # the ;2 half of a Local route, which runs the callee's dialplan


class _Call:
    __slots__ = (
        "agi_status",
        "answer_at",
        "attempt",
        "b1",
        "b2",
        "bridge",
        "cdr_first",
        "channels",
        "dial_at",
        "first_attempt",
        "hangup_cause",
        "pending",
        "result",
        "spec",
        "vars",
        "wake",
    )

    def __init__(self, spec: CallSpec, b1: _Channel, b2: _Channel, cdr_first: bool) -> None:
        self.spec = spec
        self.b1 = b1
        self.b2 = b2
        self.cdr_first = cdr_first
        self.channels: list[_Channel] = [b1, b2]
        self.vars: dict[str, str] = {"A2B_LIMIT_MS": _DEFAULT_LIMIT_MS}
        self.agi_status = ""
        self.attempt: _Attempt | None = None
        self.first_attempt: _Attempt | None = None
        self.bridge = ""
        self.dial_at = 0.0
        self.answer_at: float | None = None
        self.hangup_cause = 16  # the billing leg's, set by an AMI Hangup with a Cause
        self.pending: str | None = None  # why the call must end now (ami_hangup, shutdown), set from outside
        self.wake: asyncio.Future[str] | None = None
        self.result = CallResult(uniqueid=b2.uniqueid, channel=b2.name, linkedid=b2.linkedid)


def _set_once(fut: asyncio.Future[str], reason: str) -> None:
    if not fut.done():
        fut.set_result(reason)


def _cdr_time(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _floor_s(later: float, earlier: float) -> int:
    # cdr.c: ast_tvdiff_ms(end, start) / 1000 with integer division (initiatedseconds = no).
    return max(int((later - earlier) * 1000), 0) // 1000


def _seconds_text(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


# --- the AMI connection ---------------------------------------------------------------------------------


class _AmiSession(asyncio.Protocol):
    """One AMI connection: parses actions line by line, batches its output once per loop turn."""

    def __init__(self, sim: SimAsterisk) -> None:
        self.sim = sim
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.headers: list[tuple[str, str]] = []
        self.authenticated = False
        self.refused = False  # a failed login: input is ignored until the session closes
        self.closing = False
        self.mask = ALL_EVENTS
        self.out: list[bytes] = []
        self.flush_pending = False
        self.session_id = f"0x{sim._rng.getrandbits(44) | (1 << 46):x}"
        self.peer = ("", 0)
        self.local = ("", 0)

    # -- transport side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not a subclass of asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername") or ("", 0)
        self.local = transport.get_extra_info("sockname") or ("", 0)
        self.sim._sessions.add(self)
        if self.sim._stalled:
            self.transport.pause_reading()
        self.send(_BANNER)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.sim._forget(self)

    def send(self, data: bytes) -> None:
        if self.closing:
            return
        self.out.append(data)
        if not self.flush_pending:
            self.flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_pending = False
        if self.sim._stalled or self.closing or self.transport is None or not self.out:
            return  # a stalled Asterisk holds its output; stall_ami(False) flushes it
        data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
        self.out.clear()
        self.transport.write(data)

    def close(self) -> None:
        """Flush what is queued, then close (Logoff, failed login)."""
        self.flush()
        self.closing = True
        if self.transport is not None:
            self.transport.close()
        self.sim._forget(self)

    # -- parsing

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        buffer = self.buffer + data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            self._line(line)
            if self.closing or self.refused:
                return
        rest = buffer[start:]
        if len(rest) > _MAX_LINE:
            rest = b""  # manager.c get_input(): "Dumping long line with no return"
        self.buffer = rest

    def _line(self, line: bytes) -> None:
        if not line:
            # do_message(): an empty line ends the message, even one without headers (then the action is
            # missing and Asterisk answers so).
            headers, self.headers = self.headers, []
            self.sim._action(self, headers)
            return
        if len(line) > _MAX_LINE or len(self.headers) >= _MAX_HEADERS:
            return
        text = line.decode("utf-8", "replace")
        key, sep, value = text.partition(":")
        if sep:
            self.headers.append((key.strip().lower(), value.lstrip(" ")))


def _header(headers: Sequence[tuple[str, str]], key: str) -> str:
    """astman_get_header(): the first header of that name, case-insensitively; "" when absent."""
    for name, value in headers:
        if name == key:
            return value
    return ""


def _response(kind: str, action_id: str, message: str | None, *, listing: bool = False) -> bytes:
    """astman_send_response_full(): Response, ActionID (when given), EventList: start, Message."""
    parts = [f"Response: {kind}\r\n"]
    if action_id:
        parts.append(f"ActionID: {action_id}\r\n")
    if listing:
        parts.append("EventList: start\r\n")
    if message is not None:
        parts.append(f"Message: {message}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("utf-8")


# --- the simulator --------------------------------------------------------------------------------------

CdrSink = Callable[[CdrRecord], Awaitable[None]]


class SimAsterisk:
    """An Asterisk for tests and storms: an AMI server on `host`:`port` (0: any free port, see `port`)
    with one manager user, and `call()` to place calls whose authorization is asked of the FastAGI server
    at `agi` (None: nobody listens, every call fails like transcript 07).

    `clock` gives the wall clock (Cdr times, Uniqueids, answered_at/ended_at, Hangup action times);
    sleeping is real time on the running loop. `cdr_sink`, if given, is awaited with every Cdr once its
    call has ended. A failed login is answered after `auth_fail_delay_s` (manager.c sleeps 1 s).
    `agi_timeout_s` bounds a FastAGI session (Asterisk itself would wait for ever). `seed` makes the
    random parts (the Cdr/Hangup order when CallSpec.cdr_first is None, ids) repeatable.
    """

    def __init__(
        self,
        *,
        username: str,
        secret: str,
        host: str = "127.0.0.1",
        port: int = 0,
        agi: tuple[str, int] | None = None,
        clock: Callable[[], float] = time.time,
        cdr_sink: CdrSink | None = None,
        auth_fail_delay_s: float = 1.0,
        agi_timeout_s: float = 5.0,
        seed: int | None = None,
        event_names: frozenset[str] | None = None,
    ) -> None:
        self.username = username
        # The user's manager.conf `eventfilter(name(...))` include filters (see `manager_event_names`):
        # only events of these names are sent to its sessions. None: no filter, every event of its classes.
        self._names = event_names
        self._secret = secret
        self.host = host
        self._port = port
        self.agi = agi
        #: A second a2bd, tried when `agi` refuses the connection (hagi:// and an SRV record listing both).
        self.agi_backup: tuple[str, int] | None = None
        self._clock = clock
        self._cdr_sink = cdr_sink
        self.auth_fail_delay_s = auth_fail_delay_s
        self.agi_timeout_s = agi_timeout_s
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._sessions: set[_AmiSession] = set()
        self._listeners: list[_AmiSession] = []  # logged in, with a non-empty event mask
        self._mask = 0  # union of the listeners' masks: what is worth formatting at all
        self._stalled = False
        self._logins = asyncio.Event()
        self._channels: dict[str, _Channel] = {}
        self._owner: dict[str, _Call] = {}
        self._calls: set[_Call] = set()
        self._uniqueids = itertools.count(1)
        self._local_ids = itertools.count(1)
        self._tech_ids: dict[str, itertools.count[int]] = {}
        self._started_at = clock()
        #: Every AMI Hangup action received, in order (for measuring how late a guard cut a call).
        self.hangup_actions: list[HangupAction] = []
        #: When each successful AMI login happened (clock time): how soon a client came back after a cut.
        self.login_times: list[float] = []

    # -- lifecycle

    async def start(self) -> None:
        """Listen for AMI connections."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _AmiSession(self), self.host, self._port)
        self._started_at = self._clock()

    @property
    def port(self) -> int:
        """The AMI port actually bound."""
        if self._server is None or not self._server.sockets:
            return self._port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        """Stop listening, end the calls still up (their events go nowhere) and close every connection."""
        if self._server is not None:
            self._server.close()
        for call in list(self._calls):
            self._request_end(call, "shutdown")
        for session in list(self._sessions):
            session.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await asyncio.sleep(0)

    async def __aenter__(self) -> SimAsterisk:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- fault injection and inspection

    async def drop_ami(self) -> None:
        """Close every AMI connection at once (Asterisk restarted or the network cut). Calls go on; their
        events are lost until a client logs in again. The port keeps listening."""
        for session in list(self._sessions):
            session.closing = True
            if session.transport is not None:
                session.transport.abort()
            self._forget(session)
        await asyncio.sleep(0)

    async def cut_ami(self) -> None:
        """Cut the network to AMI: every connection dropped and new ones refused until `restore_ami`.
        Calls go on; their events reach no one meanwhile."""
        self._port = self.port  # to listen on the same port again
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.drop_ami()

    async def restore_ami(self) -> None:
        """Listen on AMI's port again after `cut_ami`."""
        if self._server is None:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: _AmiSession(self), self.host, self._port)

    def stall_ami(self, stalled: bool) -> None:
        """Stop (True) or resume (False) reading and writing on every AMI connection, without closing:
        actions get no answer and events pile up, as with a hung Asterisk. Resuming sends what piled up."""
        self._stalled = stalled
        for session in list(self._sessions):
            if session.transport is None or session.closing:
                continue
            if stalled:
                session.transport.pause_reading()
            else:
                session.transport.resume_reading()
                session.flush()

    def replay(self, data: bytes) -> int:
        """Send `data` verbatim to every logged-in AMI connection, whatever its event mask (for replaying
        a recorded received stream, e.g. a capture's events). Returns how many connections got it."""
        targets = [s for s in self._sessions if s.authenticated and not s.closing]
        for session in targets:
            session.send(data)
        return len(targets)

    @property
    def logged_in(self) -> int:
        """How many AMI connections are logged in now."""
        return sum(1 for s in self._sessions if s.authenticated and not s.closing)

    async def wait_logged_in(self, count: int = 1) -> None:
        """Return once at least `count` AMI connections are logged in (bound it with asyncio.timeout)."""
        while self.logged_in < count:
            self._logins.clear()
            await self._logins.wait()

    def live_channels(self) -> list[ChannelInfo]:
        """Every live channel, in creation order."""
        return [
            ChannelInfo(ch.name, ch.uniqueid, ch.linkedid, ch.account, ch.app, ch.appdata, ch.state)
            for ch in self._channels.values()
        ]

    def hangup(self, channel: str, cause: int = 16) -> bool:
        """Hang a live channel up as the AMI Hangup action does, without AMI (False: no such channel)."""
        call = self._owner.get(channel)
        if call is None:
            return False
        self._request_end(call, "ami_hangup", cause)
        return True

    # -- AMI sessions

    def _forget(self, session: _AmiSession) -> None:
        self._sessions.discard(session)
        if session in self._listeners:
            self._listeners.remove(session)
            self._recompute_mask()

    def _recompute_mask(self) -> None:
        mask = 0
        for session in self._listeners:
            mask |= session.mask
        self._mask = mask

    def _action(self, session: _AmiSession, headers: list[tuple[str, str]]) -> None:
        action = _header(headers, "action").lower()
        action_id = _header(headers, "actionid")
        if not action:
            session.send(_response("Error", action_id, "Missing action in request"))
            return
        if not session.authenticated and action not in ("login", "logoff", "challenge"):
            session.send(_response("Error", action_id, "Permission denied"))
            return
        handler = _ACTIONS.get(action)
        if handler is None:
            name = _header(headers, "action")
            text = f"Invalid/unknown command: {name}. Use Action: ListCommands to show available commands."
            session.send(_response("Error", action_id, text))
            return
        handler(self, session, headers, action_id)

    def _login(self, session: _AmiSession, headers: list[tuple[str, str]], action_id: str) -> None:
        if session.authenticated:
            session.send(_response("Success", action_id, "Already authenticated"))
            return
        user = _header(headers, "username")
        if user.lower() != self.username.lower() or _header(headers, "secret") != self._secret:
            # manager.c action_login(): sleep(1), then "Authentication failed" and the session ends; nothing
            # more is read meanwhile.
            session.refused = True

            def refuse() -> None:
                session.send(_response("Error", action_id, "Authentication failed"))
                session.close()

            asyncio.get_running_loop().call_later(self.auth_fail_delay_s, refuse)
            return
        session.authenticated = True
        session.mask = event_mask(_header(headers, "events"))
        session.send(_response("Success", action_id, "Authentication accepted"))
        if session.mask:
            self._listeners.append(session)
            self._recompute_mask()
        if session.mask & SYSTEM:
            uptime = int(self._clock() - self._started_at)
            session.send(
                f"Event: FullyBooted\r\nPrivilege: system,all\r\nUptime: {uptime}\r\nLastReload: {uptime}\r\n"
                "Status: Fully Booted\r\n\r\n".encode()
            )
        if self._mask & SECURITY:
            # A security event published to every session that takes the class, this one included.
            now = self._clock()
            tv = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}+0000"
            self._broadcast(
                SECURITY,
                f"Event: SuccessfulAuth\r\nPrivilege: security,all\r\nEventTV: {tv}\r\nSeverity: Informational\r\n"
                f"Service: AMI\r\nEventVersion: 1\r\nAccountID: {user}\r\nSessionID: {session.session_id}\r\n"
                f"LocalAddress: IPV4/TCP/{session.local[0]}/{session.local[1]}\r\n"
                f"RemoteAddress: IPV4/TCP/{session.peer[0]}/{session.peer[1]}\r\nUsingPassword: 0\r\n"
                f"SessionTV: {tv}\r\n\r\n".encode(),
            )
        self.login_times.append(self._clock())
        self._logins.set()

    def _logoff(self, session: _AmiSession, headers: list[tuple[str, str]], action_id: str) -> None:
        session.send(_response("Goodbye", action_id, "Thanks for all the fish."))
        session.close()

    def _ping(self, session: _AmiSession, headers: list[tuple[str, str]], action_id: str) -> None:
        now = self._clock()
        head = f"ActionID: {action_id}\r\n" if action_id else ""
        session.send(f"Response: Success\r\n{head}Ping: Pong\r\nTimestamp: {now:.6f}\r\n\r\n".encode())

    def _core_show_channels(self, session: _AmiSession, headers: list[tuple[str, str]], action_id: str) -> None:
        # The listing goes to the asking session only, whatever its event mask; each item carries the
        # ActionID and no Privilege (transcript 08).
        session.send(_response("Success", action_id, "Channels will follow", listing=True))
        head = f"ActionID: {action_id}\r\n" if action_id else ""
        now = self._clock()
        parts = []
        for ch in self._channels.values():
            age = max(int(now - ch.created), 0)
            duration = f"{age // 3600:02d}:{age % 3600 // 60:02d}:{age % 60:02d}"
            parts.append(
                f"Event: CoreShowChannel\r\n{head}{ch.snap()}Application: {ch.app}\r\n"
                f"ApplicationData: {ch.appdata}\r\nDuration: {duration}\r\nBridgeId: {ch.bridge}\r\n\r\n"
            )
        parts.append(
            f"Event: CoreShowChannelsComplete\r\n{head}EventList: Complete\r\nListItems: {len(self._channels)}\r\n\r\n"
        )
        session.send("".join(parts).encode("utf-8"))

    def _hangup_action(self, session: _AmiSession, headers: list[tuple[str, str]], action_id: str) -> None:
        name = _header(headers, "channel")
        if not name:
            session.send(_response("Error", action_id, "No channel specified"))
            return
        text = _header(headers, "cause")
        cause = int(text) if text.isdigit() and int(text) <= 127 else 0  # manager.c: a bad Cause is ignored
        call = self._owner.get(name)
        self.hangup_actions.append(HangupAction(name, cause, self._clock(), call is not None, action_id))
        if call is None:
            session.send(_response("Error", action_id, "No such channel"))
            return
        # The response is queued before any event of the hangup (transcript 03): the call's task runs the
        # end burst on a later loop turn.
        session.send(_response("Success", action_id, "Channel Hungup"))
        self._request_end(call, "ami_hangup", cause or 16)

    # -- event output

    def _broadcast(self, cls: int, data: bytes) -> None:
        for session in self._listeners:
            if session.mask & cls:
                session.send(data)

    def _wants(self, cls: int, name: str) -> bool:
        """Whether an event is worth formatting: some session takes its class and the filter its name."""
        return bool(self._mask & cls) and (self._names is None or name in self._names)

    def _emit(self, cls: int, name: str, body: str) -> None:
        """Send an event its caller checked with _wants() (formatting it is the cost worth saving)."""
        self._broadcast(cls, f"Event: {name}\r\nPrivilege: {_PRIVILEGE[cls]}\r\n{body}\r\n".encode())

    def _chan(self, name: str, ch: _Channel, tail: str = "") -> None:
        if self._wants(CALL, name):
            self._emit(CALL, name, ch.snap() + tail)

    def _newexten(self, ch: _Channel, priority: int, app: str, data: str) -> None:
        ch.priority, ch.app, ch.appdata = priority, app, data
        ch.changed()
        if self._wants(DIALPLAN, "Newexten"):
            self._emit(
                DIALPLAN, "Newexten", f"{ch.snap()}Extension: {ch.exten}\r\nApplication: {app}\r\nAppData: {data}\r\n"
            )

    def _varset(self, ch: _Channel, variable: str, value: str) -> None:
        if self._wants(DIALPLAN, "VarSet"):
            self._emit(DIALPLAN, "VarSet", f"{ch.snap()}Variable: {variable}\r\nValue: {value}\r\n")

    def _dial(self, name: str, caller: _Channel | None, dest: _Channel, tail: str) -> None:
        # The Originate's own DialBegin/DialState/DialEnd have no caller block at all (README pitfalls).
        if self._wants(CALL, name):
            self._emit(CALL, name, (caller.snap() if caller else "") + dest.dest() + tail)

    def _bridge_text(self, call: _Call, members: int) -> str:
        return (
            f"BridgeUniqueid: {call.bridge}\r\nBridgeType: basic\r\nBridgeTechnology: simple_bridge\r\n"
            f"BridgeCreator: <unknown>\r\nBridgeName: <unknown>\r\nBridgeNumChannels: {members}\r\n"
            "BridgeVideoSourceMode: none\r\n"
        )

    def _bridge(self, name: str, call: _Call, members: int, ch: _Channel | None = None) -> None:
        if self._wants(CALL, name):
            self._emit(CALL, name, self._bridge_text(call, members) + (ch.snap() if ch else ""))

    def _device(self, device: str, state: str) -> None:
        if self._wants(CALL, "DeviceStateChange"):
            self._emit(CALL, "DeviceStateChange", f"Device: {device}\r\nState: {state}\r\n")

    def _local_bridge(self, one: _Channel, two: _Channel, context: str, exten: str) -> None:
        if self._wants(CALL, "LocalBridge"):
            body = one.block("LocalOne") + two.block("LocalTwo")
            self._emit(CALL, "LocalBridge", f"{body}Context: {context}\r\nExten: {exten}\r\nLocalOptimization: Yes\r\n")

    def _hangup_request(self, name: str, ch: _Channel, cause: int) -> None:
        self._chan(name, ch, f"Cause: {cause}\r\n")

    def _hangup(self, call: _Call, ch: _Channel, cause: int) -> None:
        """The channel's Hangup event; the channel is gone from then on (Hangup action: No such channel)."""
        self._chan("Hangup", ch, f"Cause: {cause}\r\nCause-txt: {_CAUSE_TXT.get(cause, 'Unknown')}\r\n")
        self._channels.pop(ch.name, None)
        self._owner.pop(ch.name, None)
        if ch is call.b2:
            call.result.ended_at = self._clock()
            call.result.cause = cause

    def _set_account(self, ch: _Channel, account: str) -> None:
        old = ch.account
        ch.account = account
        ch.changed()
        if account != old:  # NewAccountCode comes from comparing snapshots: no change, no event
            self._chan("NewAccountCode", ch, f"OldAccountCode: {old}\r\n")

    def _originate_response(self, call: _Call, success: bool) -> None:
        if not self._wants(CALL, "OriginateResponse"):
            return
        spec = call.spec
        action_id = spec.originate_action_id or f"sim-originate-{call.b1.uniqueid}"
        if success:
            channel, uniqueid, response, reason = call.b1.name, call.b1.uniqueid, "Success", 4
        else:  # on failure: the dial string without suffix, Uniqueid <unknown>, Reason 0 (04-07, 10)
            channel, uniqueid, response, reason = f"Local/{spec.extension}@billing", "<unknown>", "Failure", 0
        self._emit(
            CALL,
            "OriginateResponse",
            f"ActionID: {action_id}\r\nResponse: {response}\r\nChannel: {channel}\r\nApplication: Wait\r\n"
            f"Data: 60\r\nReason: {reason}\r\nUniqueid: {uniqueid}\r\nCallerIDNum: {spec.callerid}\r\n"
            f"CallerIDName: {spec.calleridname}\r\n",
        )

    def _cdr(
        self,
        call: _Call,
        ch: _Channel,
        *,
        lastapp: str,
        lastdata: str,
        start: float,
        answer: float | None,
        disposition: str,
        dstchannel: str = "",
    ) -> None:
        end = self._clock()
        spec = call.spec
        clid = f'"{spec.calleridname}" <{spec.callerid}>' if spec.calleridname else spec.callerid
        rec = CdrRecord(
            accountcode=ch.account,
            src=spec.callerid,
            dst=spec.extension,
            dcontext=ch.context,
            clid=clid,
            channel=ch.name,
            dstchannel=dstchannel,
            lastapp=lastapp,
            lastdata=lastdata,
            start=start,
            answer=answer,
            end=end,
            duration=_floor_s(end, start),
            billsec=0 if answer is None else _floor_s(end, answer),
            disposition=disposition,
            amaflags="DOCUMENTATION",
            userfield="",
            uniqueid=ch.uniqueid,
            linkedid=ch.linkedid,
        )
        call.result.cdrs.append(rec)
        if ch is call.b2 and (lastapp == "Dial" or not call.result.disposition):
            call.result.billable_s = rec.billsec
            call.result.disposition = rec.disposition
        if self._wants(CDR, "Cdr"):
            self._emit(
                CDR,
                "Cdr",
                f"AccountCode: {rec.accountcode}\r\nSource: {rec.src}\r\nDestination: {rec.dst}\r\n"
                f"DestinationContext: {rec.dcontext}\r\nCallerID: {rec.clid}\r\nChannel: {rec.channel}\r\n"
                f"DestinationChannel: {rec.dstchannel}\r\nLastApplication: {rec.lastapp}\r\n"
                f"LastData: {rec.lastdata}\r\nStartTime: {_cdr_time(rec.start)}\r\n"
                f"AnswerTime: {_cdr_time(rec.answer)}\r\nEndTime: {_cdr_time(rec.end)}\r\n"
                f"Duration: {rec.duration}\r\nBillableSeconds: {rec.billsec}\r\nDisposition: {rec.disposition}\r\n"
                f"AMAFlags: {rec.amaflags}\r\nUniqueID: {rec.uniqueid}\r\nUserField: {rec.userfield}\r\n"
                f"LinkedID: {rec.linkedid}\r\n",
            )

    # -- channel factory

    def _new_channel(
        self, call: _Call | None, name: str, linkedid: str, state: int, context: str, exten: str
    ) -> _Channel:
        now = self._clock()
        uniqueid = f"{int(now)}.{next(self._uniqueids)}"
        ch = _Channel(name, uniqueid, linkedid or uniqueid, state, context, exten, now)
        self._channels[name] = ch
        if call is not None:
            self._owner[name] = call
            call.channels.append(ch)
        return ch

    def _attempt(self, call: _Call, route: str, limit_ms: str) -> _Attempt:
        tech, _, data = route.partition("/")
        appdata = f"{route},{_seconds_text(call.spec.dial_timeout_s)},L({limit_ms})"
        if tech.lower() == "local":
            return _Attempt(route, appdata, data, route, data.partition("@")[0])
        peer, number = data, call.spec.extension
        if "@" in data:  # PJSIP/<number>@<endpoint>
            number, _, peer = data.partition("@")
        elif "/" in data:  # SIP/<peer>/<number>, IAX2/<peer>/<number>
            peer, _, number = data.partition("/")
        return _Attempt(route, appdata, data, f"{tech}/{peer}", number)

    # -- calls

    def _request_end(self, call: _Call, reason: str, cause: int = 16) -> None:
        if call.pending is None:
            call.pending = reason
            call.hangup_cause = cause
        if call.wake is not None:
            _set_once(call.wake, reason)

    async def _wait(self, call: _Call, delay_s: float, reason: str) -> str:
        """Sleep `delay_s`, or less when the call is hung up meanwhile; return why it woke."""
        if call.pending is not None:
            return call.pending
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        call.wake = fut
        handle = loop.call_later(max(delay_s, 0.0), _set_once, fut, reason)
        try:
            return await fut
        finally:
            handle.cancel()
            call.wake = None

    async def call(self, spec: CallSpec) -> CallResult:
        """Place one call and return once all of its channels are gone (see the module docstring)."""
        cdr_first = spec.cdr_first if spec.cdr_first is not None else self._rng.random() < 0.5
        n = next(self._local_ids)
        base = f"Local/{spec.extension}@billing-{n:08x}"
        b1 = self._new_channel(None, base + ";1", "", _DOWN, "billing", spec.extension)
        b2 = self._new_channel(None, base + ";2", b1.uniqueid, _RING, "billing", spec.extension)
        call = _Call(spec, b1, b2, cdr_first)
        self._owner[b1.name] = self._owner[b2.name] = call
        self._calls.add(call)
        try:
            await self._run(call)
            call.result.accountcode = b2.account
        finally:
            self._calls.discard(call)
            for ch in call.channels:  # cancelled mid-call: leave no ghost channel behind
                self._channels.pop(ch.name, None)
                self._owner.pop(ch.name, None)
        if self._cdr_sink is not None:
            for rec in call.result.cdrs:
                await self._cdr_sink(rec)
        return call.result

    async def _run(self, call: _Call) -> None:
        spec, b1, b2 = call.spec, call.b1, call.b2
        # Setup, in transcript 01's order: both Local halves, the Originate's own events, the dialplan.
        b2.account = spec.accountcode
        self._chan("Newchannel", b1)
        self._chan("Newchannel", b2)
        self._newexten(b1, 1, "AppDial2", _OUTGOING)
        b1.cid_num, b1.cid_name = spec.callerid, spec.calleridname
        b1.changed()
        self._chan("NewCallerid", b1, _CID_PRES)
        b1.conn_num, b1.conn_name = spec.callerid, spec.calleridname
        b1.changed()
        self._chan("NewConnectedLine", b1)
        b2.cid_num, b2.cid_name = spec.callerid, spec.calleridname
        b2.conn_num, b2.conn_name = spec.callerid, spec.calleridname
        b2.changed()
        self._chan("NewCallerid", b2, _CID_PRES)
        self._chan("NewConnectedLine", b2)
        self._local_bridge(b1, b2, "billing", spec.extension)
        self._dial("DialBegin", None, b1, f"DialString: {spec.extension}@billing\r\n")
        timeout = _seconds_text(spec.dial_timeout_s)
        self._newexten(b2, 1, "NoOp", f'billing: call to {spec.extension} from "{spec.calleridname}" <{spec.callerid}>')
        self._newexten(b2, 2, "Set", f"A2B_LIMIT_MS={_DEFAULT_LIMIT_MS}")
        self._varset(b2, "A2B_LIMIT_MS", _DEFAULT_LIMIT_MS)
        self._newexten(b2, 3, "Set", f"A2B_DIAL_TIMEOUT={timeout}")
        self._varset(b2, "A2B_DIAL_TIMEOUT", timeout)

        await self._authorize(call)
        status = call.vars.get("A2B_STATUS", "")
        call.result.status = status
        call.result.agi_status = call.agi_status
        if call.pending is not None:
            # Hung up while the AGI ran (transcript 10): the channel lived until the server closed; the
            # dialplan ends there, with the AGI as the Cdr's last application.
            self._end_unanswered(call, reason=call.pending, lastapp="AGI", lastdata=b2.appdata, cause=call.hangup_cause)
            return
        limit = call.vars.get("A2B_LIMIT_MS", _DEFAULT_LIMIT_MS)
        self._newexten(
            b2,
            5,
            "Verbose",
            f"1,AGISTATUS={call.agi_status} A2B_STATUS={status} A2B_LIMIT_MS={limit} accountcode={b2.account}",
        )
        self._newexten(b2, 6, "GotoIf", f"{int(status != 'OK')}?denied")
        if status != "OK":
            self._newexten(
                b2, 10, "Verbose", f"1,authorization refused: A2B_STATUS={status} AGISTATUS={call.agi_status}"
            )
            code = call.vars.get("A2B_HANGUPCAUSE", "")
            cause = int(code) if code.isdigit() else 21
            self._newexten(b2, 11, "Hangup", str(cause))
            self._end_unanswered(call, reason="denied", lastapp="Hangup", lastdata=str(cause), cause=cause)
            return
        await self._dial_routes(call, limit)

    async def _authorize(self, call: _Call) -> None:
        """Run the FastAGI session, then emit what Asterisk emits per command (AGIExecStart, the effect,
        AGIExecEnd) as the recordings show them. They come right after the session instead of during it
        (a2bd.sim.agi reports only at the end); AMI and FastAGI are separate sockets, so a consumer can
        never rely on their relative order anyway."""
        b2, spec = call.b2, call.spec
        host, port = self.agi if self.agi is not None else ("127.0.0.1", 4573)
        script = f"agi://{host}:{port}/authorize" + "".join("," + arg for arg in spec.agi_args)
        self._newexten(b2, 4, "AGI", script)
        result: SimResult | None = None
        if self.agi is not None:
            began = time.perf_counter()
            # A2BD_URL = hagi://... with an SRV record listing two a2bd (asterisk_conf/README.md): res_agi
            # tries the next target when one refuses the connection. All refused: AGISTATUS=FAILURE at once,
            # no AGIExec events (transcript 07).
            for host, port in (self.agi, *((self.agi_backup,) if self.agi_backup is not None else ())):
                environment = make_environment(
                    uniqueid=b2.uniqueid, channel=b2.name, extension=spec.extension, callerid=spec.callerid,
                    calleridname=spec.calleridname, accountcode=b2.account, host=host, port=port,
                    args=spec.agi_args,
                )
                try:
                    result = await run_session(host, port, environment, timeout_s=self.agi_timeout_s)
                    break
                except OSError:
                    continue
            call.result.authorize_s = time.perf_counter() - began
        if result is not None:
            call.result.variables = dict(result.variables)
            for line in result.commands:
                self._agi_command(call, line)
        if call.pending is not None:
            call.agi_status = "HANGUP"
        elif result is not None and result.server_closed:
            call.agi_status = "SUCCESS"
        else:
            call.agi_status = "FAILURE"
        self._varset(b2, "AGISTATUS", call.agi_status)

    def _agi_command(self, call: _Call, line: str) -> None:
        b2 = call.b2
        argv = split_command(line)
        words = [w.upper() for w in argv[:3]]
        command_id = self._rng.randrange(1 << 31)
        if self._wants(AGI, "AGIExecStart"):
            self._emit(AGI, "AGIExecStart", f"{b2.snap()}CommandId: {command_id}\r\nCommand: {line}\r\n")
        # ResultCode/Result as in transcript 09, for the commands a2bd.sim.agi answers.
        code, text = 200, "Success"
        if words[:2] == ["SET", "VARIABLE"] and len(argv) == 4:
            name, value = argv[2], argv[3]
            if name in ("CHANNEL(accountcode)", "CDR(accountcode)"):  # both work (00a, 00b)
                self._set_account(b2, value)
            else:
                call.vars[name] = value
                self._varset(b2, name, value)
        elif words[:2] == ["SET", "VARIABLE"] or (words[:2] == ["GET", "VARIABLE"] and len(argv) != 3):
            code, text = 520, "Usage"
        elif words[:1] == ["ANSWER"] or words[:2] == ["GET", "DATA"]:
            if call.pending is not None:  # hung up during the AGI: not dead-safe (transcript 10)
                code, text = 511, "Command Not Permitted on a dead channel or intercept routine"
        elif words[:1] not in (["VERBOSE"], ["NOOP"]) and words[:2] != ["GET", "VARIABLE"]:
            if words[:3] != ["GET", "FULL", "VARIABLE"]:
                code, text = 510, "Invalid or unknown command"
        if self._wants(AGI, "AGIExecEnd"):
            self._emit(
                AGI,
                "AGIExecEnd",
                f"{b2.snap()}CommandId: {command_id}\r\nCommand: {line}\r\nResultCode: {code}\r\nResult: {text}\r\n",
            )

    # -- the dial phase

    async def _dial_routes(self, call: _Call, limit: str) -> None:
        """Try the routes in order, as asterisk_conf's [a2b-connect] does: the next route only after
        CHANUNAVAIL or CONGESTION (spec.route_failures), the spec's outcome on the route after them."""
        spec, b2 = call.spec, call.b2
        count = call.vars.get("A2B_ROUTES", "")
        routes = [call.vars.get(f"A2B_ROUTE_{i}", "") for i in range(1, int(count) + 1)] if count.isdigit() else []
        routes = [r for r in routes if r] or [f"Local/{spec.extension}@callee"]
        for index, route in enumerate(routes):
            failing = index < len(spec.route_failures)
            status: str = spec.route_failures[index] if failing else spec.outcome.upper()
            attempt = self._attempt(call, route, limit)
            call.attempt = attempt
            if call.first_attempt is None:
                call.first_attempt = attempt
                call.dial_at = self._clock()
            self._begin_dial(call, attempt, status)
            if status in ("CHANUNAVAIL", "CONGESTION"):
                if attempt.c1 is not None:
                    self._reject(call, attempt, status)
                if failing and index < len(routes) - 1:
                    self._varset(b2, "DIALSTATUS", status)
                    continue
                self._end_failed(call, status)
                return
            if status == "BUSY":
                self._reject(call, attempt, status)
                self._end_failed(call, status)
                return
            await self._progress(call, attempt, status, limit)
            return

    def _begin_dial(self, call: _Call, attempt: _Attempt, status: str) -> None:
        """Newexten Dial, the cleared Dial variables, the dialled channel(s) and DialBegin (transcript 01).
        A CHANUNAVAIL attempt makes no channel and no Dial event, as app_dial when ast_request() fails."""
        spec, b2 = call.spec, call.b2
        self._newexten(b2, 7, "Dial", attempt.appdata)
        for variable in _DIAL_VARS:
            self._varset(b2, variable, "")
        if status == "CHANUNAVAIL":
            return
        local = attempt.route.lower().startswith("local/")
        if local:
            n = next(self._local_ids)
            name = f"{attempt.route}-{n:08x}"
            context = attempt.dialstring.partition("@")[2] or "default"
        else:
            tech = attempt.device.partition("/")[0]
            counter = self._tech_ids.setdefault(tech, itertools.count(1))
            name = f"{attempt.device}-{next(counter):08x}"
            context = "default"
        c1 = self._new_channel(call, name + (";1" if local else ""), b2.linkedid, _DOWN, context, attempt.number)
        c2 = self._new_channel(call, name + ";2", b2.linkedid, _RING, context, attempt.number) if local else None
        attempt.c1, attempt.c2 = c1, c2
        call.result.dial_channel = c1.name
        self._chan("Newchannel", c1)
        if c2 is not None:
            self._chan("Newchannel", c2)
        self._varset(c1, "DIALEDPEERNUMBER", attempt.dialstring)
        c1.cid_num, c1.cid_name = attempt.number, spec.calleridname
        c1.conn_num, c1.conn_name = spec.callerid, spec.calleridname
        c1.account = b2.account  # inherited from the caller; the event comes after NewCallerid (captures)
        self._newexten(c1, 1, "AppDial", _OUTGOING)
        self._chan("NewCallerid", c1, _CID_PRES)
        if c1.account:
            self._chan("NewAccountCode", c1, "OldAccountCode: \r\n")
        self._chan("NewConnectedLine", c1)
        if c2 is not None:
            self._varset(c2, "DIALEDPEERNUMBER", attempt.dialstring)
            c2.cid_num, c2.cid_name = spec.callerid, spec.calleridname
            c2.conn_num, c2.conn_name = attempt.number, spec.calleridname
            c2.account = b2.account
            c2.changed()
            self._chan("NewCallerid", c2, _CID_PRES)
            if c2.account:
                self._chan("NewAccountCode", c2, "OldAccountCode: \r\n")
            self._chan("NewConnectedLine", c2)
            self._local_bridge(c1, c2, context, attempt.number)
        self._dial("DialBegin", b2, c1, f"DialString: {attempt.dialstring}\r\n")

    def _reject(self, call: _Call, attempt: _Attempt, status: str) -> None:
        """The callee side of BUSY or CONGESTION, in transcript 04's order: Busy()/Congestion() on the
        callee's ;2, DialEnd, then both callee halves hang up (the ;2 with its own Cdr)."""
        b2, c1, c2 = call.b2, attempt.c1, attempt.c2
        assert c1 is not None
        app, cause = ("Busy", 17) if status == "BUSY" else ("Congestion", 34)
        if c2 is not None:
            self._newexten(c2, 1, app, "5" if app == "Busy" else "")
            c2.state = _BUSY
            c2.changed()
            self._chan("Newstate", c2)
        self._dial("DialEnd", b2, c1, f"DialStatus: {status}\r\n")
        if c2 is not None:
            self._hangup_request("HangupRequest", c2, 0)
            self._hangup_request("SoftHangupRequest", c2, 16)
            self._cdr(
                call,
                c2,
                lastapp=app,
                lastdata=c2.appdata,
                start=c2.created,
                answer=None,
                disposition=_DISPOSITION[status],
            )
            self._hangup(call, c2, cause)
            self._device(attempt.device, "INUSE")
            self._hangup(call, c1, 0)
        else:
            self._hangup(call, c1, cause)

    async def _progress(self, call: _Call, attempt: _Attempt, status: str, limit: str) -> None:
        """Ringing (if any), the answer and the talk, or no answer: status is ANSWER or NOANSWER."""
        spec, b1, b2 = call.spec, call.b1, call.b2
        c1, c2 = attempt.c1, attempt.c2
        assert c1 is not None
        rings = status == "NOANSWER" or spec.ring_s > 0
        if rings:
            # Transcript 05: the callee rings, the Originate's ;1 mirrors it, DialState RINGING twice.
            if c2 is not None:
                self._newexten(c2, 1, "Ringing", "")
            c1.state = _RINGING
            c1.changed()
            self._chan("Newstate", c1)
            if c2 is not None:
                self._newexten(c2, 2, "Wait", "60")
            b1.state = _RINGING
            b1.changed()
            self._chan("Newstate", b1)
            ring_ms = int((self._clock() - call.dial_at) * 1000)
            self._varset(b2, "RINGTIME", str(ring_ms // 1000))
            self._varset(b2, "RINGTIME_MS", str(ring_ms))
            self._dial("DialState", b2, c1, "DialStatus: RINGING\r\n")
            self._device(attempt.device, "INUSE")
            self._device(f"Local/{spec.extension}@billing", "INUSE")
            self._dial("DialState", None, b1, "DialStatus: RINGING\r\n")
        if status == "NOANSWER" or spec.ring_s >= spec.dial_timeout_s:
            why = await self._wait(call, spec.dial_timeout_s, "noanswer")
            self._end_unreached(call, attempt, "NOANSWER" if why == "noanswer" else "CANCEL", why)
            return
        if spec.ring_s > 0:
            why = await self._wait(call, spec.ring_s, "answer")
            if why != "answer":
                self._end_unreached(call, attempt, "CANCEL", why)
                return
        self._answer(call, attempt, rang=rings)
        answered = call.answer_at or self._clock()
        # The first of: the callee hangs up, Dial's L() limit, the caller hangs up, an AMI Hangup.
        ends = [(spec.talk_s, "callee"), (int(limit) / 1000 if limit.isdigit() and int(limit) else 1e9, "limit")]
        if spec.caller_hangup_s is not None:
            ends.append((spec.caller_hangup_s, "caller"))
        delay, reason = min(ends, key=lambda end: end[0])
        why = await self._wait(call, delay - (self._clock() - answered), reason)
        if why == "callee":
            self._end_callee_hangup(call, attempt)
        elif why == "limit":
            self._end_limit(call, attempt)
        else:
            self._end_billing_side(call, attempt, why)

    def _answer(self, call: _Call, attempt: _Attempt, *, rang: bool) -> None:
        """The answer, in transcript 01's order; DialEnd ANSWER, Newstate Up and BridgeEnter of the billing
        leg come together, and answered_at is taken at the DialEnd."""
        spec, b1, b2 = call.spec, call.b1, call.b2
        c1, c2 = attempt.c1, attempt.c2
        assert c1 is not None
        priority = 3 if rang else 1
        if c2 is not None:
            self._newexten(c2, priority, "Answer", "")
            c2.state = _UP
            c2.changed()
            self._chan("Newstate", c2)
        c1.state = _UP
        c1.changed()
        self._chan("Newstate", c1)
        self._varset(b2, "DIALSTATUS", "ANSWER")
        self._varset(b2, "DIALEDPEERNAME", c1.name)
        self._varset(b2, "DIALEDPEERNUMBER", attempt.dialstring)
        c1.exten = ""  # after the answer the dialled ;1 runs AppDial with an empty exten (DestExten: )
        c1.changed()
        call.answer_at = self._clock()
        call.result.answered_at = call.answer_at
        self._dial("DialEnd", b2, c1, "DialStatus: ANSWER\r\n")
        b2.state = _UP
        b2.changed()
        self._chan("Newstate", b2)
        call.bridge = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        self._bridge("BridgeCreate", call, 0)
        self._originate_response(call, True)
        self._newexten(c1, 1, "AppDial", _OUTGOING)
        c1.bridge = call.bridge
        self._bridge("BridgeEnter", call, 1, c1)
        self._device(attempt.device, "INUSE")
        self._device(attempt.device, "INUSE")
        b1.state = _UP
        b1.app, b1.appdata = "Wait", "60"  # the originated ;1 now runs the Originate's application
        b1.changed()
        self._chan("Newstate", b1)
        billing_device = f"Local/{spec.extension}@billing"
        self._device(billing_device, "INUSE")
        self._dial("DialEnd", None, b1, "DialStatus: ANSWER\r\n")
        b2.bridge = call.bridge
        self._bridge("BridgeEnter", call, 2, b2)
        self._varset(c1, "BRIDGEPEER", b2.name)
        self._varset(b2, "BRIDGEPEER", c1.name)
        self._device(billing_device, "INUSE")
        if c2 is not None:
            # The callee's Wait starts 0.5 s after Answer() on a real Local channel; not simulated.
            self._newexten(c2, priority + 1, "Wait", _seconds_text(spec.talk_s))

    # -- end bursts (every capture: all Hangup and Cdr events of a call within 1 ms)

    def _billing_cdrs(self, call: _Call, status: str, hangup_cdr_from: float | None = None) -> None:
        """The billing leg's Cdr(s): the Dial Cdr, and when the dialplan went on after Dial (busy, no
        answer: transcripts 04, 05) a second one, Hangup / NO ANSWER, started when Dial returned."""
        b2, first = call.b2, call.first_attempt
        assert first is not None
        dest = first.c1 or (call.attempt.c1 if call.attempt else None)
        self._cdr(
            call,
            b2,
            lastapp="Dial",
            lastdata=first.appdata,  # after a failover the Cdr keeps the first Dial's data (README)
            start=b2.created,
            answer=call.answer_at,
            disposition=_DISPOSITION[status],
            dstchannel=dest.name if dest else "",
        )
        if hangup_cdr_from is not None:
            self._cdr(
                call, b2, lastapp="Hangup", lastdata="", start=hangup_cdr_from, answer=None, disposition="NO ANSWER"
            )

    def _end_answered_common(self, call: _Call, attempt: _Attempt) -> None:
        """ANSWEREDTIME..DIALSTATUS: the Dial variables the billing leg gets once the bridge is over."""
        b2 = call.b2
        now = self._clock()
        answered_ms = int((now - (call.answer_at or now)) * 1000)
        dialed_ms = int((now - call.dial_at) * 1000)
        self._varset(b2, "ANSWEREDTIME", str(answered_ms // 1000))
        self._varset(b2, "ANSWEREDTIME_MS", str(answered_ms))
        self._varset(b2, "DIALEDTIME", str(dialed_ms // 1000))
        self._varset(b2, "DIALEDTIME_MS", str(dialed_ms))
        self._varset(b2, "DIALSTATUS", "ANSWER")

    def _answered_cdr(self, call: _Call, ch: _Channel, lastapp: str, lastdata: str) -> None:
        self._cdr(
            call,
            ch,
            lastapp=lastapp,
            lastdata=lastdata,
            start=ch.created,
            answer=call.answer_at,
            disposition="ANSWERED",
        )

    def _end_callee_hangup(self, call: _Call, attempt: _Attempt) -> None:
        """The callee hangs up: transcript 01's order."""
        b1, b2, c1, c2 = call.b1, call.b2, attempt.c1, attempt.c2
        assert c1 is not None
        billing_device = f"Local/{call.spec.extension}@billing"
        call.result.ended_by = "callee"
        if c2 is not None:
            self._newexten(c2, c2.priority + 1, "Hangup", "")
            self._hangup_request("SoftHangupRequest", c2, 16)
        self._hangup_request("HangupRequest", c1, 16)
        if c2 is not None:
            self._hangup(call, c2, 16)
            self._answered_cdr(call, c2, "Hangup", "")
            self._device(attempt.device, "NOT_INUSE")
        self._varset(c1, "BRIDGEPEER", "")
        self._varset(b2, "BRIDGEPEER", "")
        c1.bridge = ""
        self._bridge("BridgeLeave", call, 1, c1)
        self._hangup(call, c1, 16)
        self._device(attempt.device, "NOT_INUSE")
        b2.bridge = ""
        self._bridge("BridgeLeave", call, 0, b2)
        if call.cdr_first:
            self._billing_cdrs(call, "ANSWER")
        self._bridge("BridgeDestroy", call, 0)
        self._end_answered_common(call, attempt)
        self._hangup_request("SoftHangupRequest", b2, 16)
        self._varset(b1, "CHANLOCALSTATUS", "ANSWER")
        self._hangup_request("HangupRequest", b1, 16)
        self._hangup(call, b2, 16)
        if not call.cdr_first:
            self._billing_cdrs(call, "ANSWER")
        self._hangup(call, b1, 16)
        self._device(billing_device, "NOT_INUSE")
        self._device(billing_device, "NOT_INUSE")
        self._answered_cdr(call, b1, "Wait", "60")

    def _end_limit(self, call: _Call, attempt: _Attempt) -> None:
        """Dial's L() limit cuts the call: transcript 02's order. Nothing marks it as a limit cut."""
        b1, b2, c1, c2 = call.b1, call.b2, attempt.c1, attempt.c2
        assert c1 is not None
        billing_device = f"Local/{call.spec.extension}@billing"
        call.result.ended_by = "limit"
        self._varset(c1, "BRIDGEPEER", "")
        self._varset(b2, "BRIDGEPEER", "")
        c1.bridge = ""
        self._bridge("BridgeLeave", call, 1, c1)
        if c2 is not None:
            self._hangup_request("HangupRequest", c2, 16)
        self._hangup(call, c1, 16)
        self._device(attempt.device, "NOT_INUSE")
        b2.bridge = ""
        self._bridge("BridgeLeave", call, 0, b2)
        if call.cdr_first:
            self._billing_cdrs(call, "ANSWER")
        self._end_answered_common(call, attempt)
        self._hangup_request("SoftHangupRequest", b2, 16)
        self._varset(b1, "CHANLOCALSTATUS", "ANSWER")
        self._hangup_request("HangupRequest", b1, 16)
        self._hangup(call, b2, 16)
        self._bridge("BridgeDestroy", call, 0)
        self._hangup(call, b1, 16)
        if c2 is not None:
            self._hangup_request("SoftHangupRequest", c2, 16)
            self._hangup(call, c2, 16)
        if not call.cdr_first:
            self._billing_cdrs(call, "ANSWER")
        self._answered_cdr(call, b1, "Wait", "60")
        if c2 is not None:
            self._answered_cdr(call, c2, c2.app, c2.appdata)
        self._device(billing_device, "NOT_INUSE")
        self._device(billing_device, "NOT_INUSE")
        self._device(attempt.device, "NOT_INUSE")

    def _end_billing_side(self, call: _Call, attempt: _Attempt, why: str) -> None:
        """The billing side ends an answered call (an AMI Hangup, the caller): transcript 03's order."""
        b1, b2, c1, c2 = call.b1, call.b2, attempt.c1, attempt.c2
        assert c1 is not None
        billing_device = f"Local/{call.spec.extension}@billing"
        call.result.ended_by = why
        cause = call.hangup_cause if why == "ami_hangup" else 16
        self._varset(b2, "BRIDGEPEER", "")
        self._varset(c1, "BRIDGEPEER", "")
        b2.bridge = ""
        self._bridge("BridgeLeave", call, 1, b2)
        now = self._clock()
        answered_ms = int((now - (call.answer_at or now)) * 1000)
        dialed_ms = int((now - call.dial_at) * 1000)
        self._varset(b2, "ANSWEREDTIME", str(answered_ms // 1000))
        c1.bridge = ""
        self._bridge("BridgeLeave", call, 0, c1)
        self._varset(b2, "ANSWEREDTIME_MS", str(answered_ms))
        self._bridge("BridgeDestroy", call, 0)
        self._varset(b2, "DIALEDTIME", str(dialed_ms // 1000))
        if c2 is not None:
            self._hangup_request("HangupRequest", c2, 16)
        self._varset(b2, "DIALEDTIME_MS", str(dialed_ms))
        self._varset(b2, "DIALSTATUS", "ANSWER")
        self._hangup_request("SoftHangupRequest", b2, 16)
        self._hangup(call, c1, 16)
        self._varset(b1, "CHANLOCALSTATUS", "ANSWER")
        self._hangup_request("HangupRequest", b1, 16)
        self._device(attempt.device, "NOT_INUSE")
        self._answered_cdr(call, b1, "Wait", "60")
        if c2 is not None:
            self._answered_cdr(call, c2, c2.app, c2.appdata)
            self._hangup_request("SoftHangupRequest", c2, 16)
            self._hangup(call, c2, 16)
        self._hangup(call, b1, 16)
        if call.cdr_first:
            self._billing_cdrs(call, "ANSWER")
        self._hangup(call, b2, cause)
        self._device(attempt.device, "NOT_INUSE")
        self._device(billing_device, "NOT_INUSE")
        if not call.cdr_first:
            self._billing_cdrs(call, "ANSWER")
        self._device(billing_device, "NOT_INUSE")

    def _end_unreached(self, call: _Call, attempt: _Attempt, status: str, why: str) -> None:
        """Dial ends without an answer after ringing: NOANSWER (transcript 05's order), or CANCEL when the
        billing side was hung up meanwhile (then Dial returns -1: no more dialplan, one Cdr)."""
        b1, b2, c1, c2 = call.b1, call.b2, attempt.c1, attempt.c2
        assert c1 is not None
        billing_device = f"Local/{call.spec.extension}@billing"
        continues = status == "NOANSWER"
        call.result.ended_by = why
        cause = call.hangup_cause if why == "ami_hangup" else 16
        self._dial("DialEnd", b2, c1, f"DialStatus: {status}\r\n")
        if c2 is not None:
            self._hangup_request("HangupRequest", c2, 0)
        call_dial_end = self._clock()
        if call.cdr_first:
            self._billing_cdrs(call, status, call_dial_end if continues else None)
        self._hangup(call, c1, 0)
        self._varset(b2, "DIALSTATUS", status)
        if continues:
            self._newexten(b2, 8, "Verbose", f"1,DIALSTATUS={status} ANSWEREDTIME= DIALEDTIME=")
            self._newexten(b2, 9, "Hangup", "")
        self._hangup_request("SoftHangupRequest", b2, 16)
        self._varset(b1, "CHANLOCALSTATUS", status)
        self._hangup_request("HangupRequest", b1, 16)
        self._hangup(call, b2, cause)
        if not call.cdr_first:
            self._billing_cdrs(call, status, call_dial_end if continues else None)
        if c2 is not None:
            self._hangup_request("SoftHangupRequest", c2, 16)
        self._dial("DialEnd", None, b1, "DialStatus: NOANSWER\r\n")
        if c2 is not None:
            self._hangup(call, c2, 0)
            self._cdr(
                call, c2, lastapp=c2.app, lastdata=c2.appdata, start=c2.created, answer=None, disposition="FAILED"
            )
        self._device(attempt.device, "NOT_INUSE")
        self._device(billing_device, "NOT_INUSE")
        self._hangup(call, b1, 16)
        self._originate_response(call, False)
        self._cdr(
            call, b1, lastapp="AppDial2", lastdata=_OUTGOING, start=b1.created, answer=None, disposition="NO ANSWER"
        )
        self._device(attempt.device, "NOT_INUSE")
        self._device(billing_device, "NOT_INUSE")

    def _end_failed(self, call: _Call, status: str) -> None:
        """The last Dial returned BUSY, CONGESTION or CHANUNAVAIL (the callee side already hung up): the
        dialplan goes on (Verbose, Hangup()), the billing leg gets two Cdrs; transcript 04's order."""
        b1, b2 = call.b1, call.b2
        attempt = call.attempt
        billing_device = f"Local/{call.spec.extension}@billing"
        call.result.ended_by = status.lower()
        dial_end = self._clock()
        self._varset(b2, "DIALSTATUS", status)
        self._newexten(b2, 8, "Verbose", f"1,DIALSTATUS={status} ANSWEREDTIME= DIALEDTIME=")
        self._newexten(b2, 9, "Hangup", "")
        if call.cdr_first:
            self._billing_cdrs(call, status, dial_end)
        self._hangup_request("SoftHangupRequest", b2, 16)
        self._varset(b1, "CHANLOCALSTATUS", status)
        self._hangup_request("HangupRequest", b1, 16)
        self._hangup(call, b2, 16)
        if not call.cdr_first:
            self._billing_cdrs(call, status, dial_end)
        if attempt is not None and attempt.c1 is not None:
            self._device(attempt.device, "NOT_INUSE")
            self._device(attempt.device, "NOT_INUSE")
        self._device(billing_device, "NOT_INUSE")
        self._dial("DialEnd", None, b1, "DialStatus: NOANSWER\r\n")
        self._originate_response(call, False)
        self._hangup(call, b1, 16)
        self._cdr(
            call, b1, lastapp="AppDial2", lastdata=_OUTGOING, start=b1.created, answer=None, disposition="NO ANSWER"
        )
        self._device(billing_device, "NOT_INUSE")

    def _end_unanswered(self, call: _Call, *, reason: str, lastapp: str, lastdata: str, cause: int) -> None:
        """The billing leg ends before any Dial: refused (Hangup(21), transcript 06's order; 07 when the
        AGI was down) or hung up during the AGI (transcript 10). One Cdr, NO ANSWER."""
        b1, b2 = call.b1, call.b2
        billing_device = f"Local/{call.spec.extension}@billing"
        call.result.ended_by = reason
        if call.cdr_first:
            self._cdr(
                call, b2, lastapp=lastapp, lastdata=lastdata, start=b2.created, answer=None, disposition="NO ANSWER"
            )
        self._hangup_request("SoftHangupRequest", b2, 16)
        self._hangup_request("HangupRequest", b1, cause)
        self._hangup(call, b2, cause)
        if not call.cdr_first:
            self._cdr(
                call, b2, lastapp=lastapp, lastdata=lastdata, start=b2.created, answer=None, disposition="NO ANSWER"
            )
        self._dial("DialEnd", None, b1, "DialStatus: NOANSWER\r\n")
        self._device(billing_device, "NOT_INUSE")
        self._hangup(call, b1, cause)
        self._cdr(
            call, b1, lastapp="AppDial2", lastdata=_OUTGOING, start=b1.created, answer=None, disposition="NO ANSWER"
        )
        self._originate_response(call, False)
        self._device(billing_device, "NOT_INUSE")


_Handler = Callable[[SimAsterisk, _AmiSession, list[tuple[str, str]], str], None]
_ACTIONS: Final[dict[str, _Handler]] = {
    "login": SimAsterisk._login,
    "logoff": SimAsterisk._logoff,
    "ping": SimAsterisk._ping,
    "coreshowchannels": SimAsterisk._core_show_channels,
    "hangup": SimAsterisk._hangup_action,
}
