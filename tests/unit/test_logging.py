"""Log lines: secrets never reach them, and every line of a call names that call and no other.

No servers: the redaction processor is a pure function; two concurrent authorize sessions, and the call
tracker, talk to fakes that make them interleave.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from a2bd.agi.protocol import AgiReply, parse_environment
from a2bd.ami.protocol import AmiMessage
from a2bd.config import AsteriskServer, Settings
from a2bd.errors import ProtocolError, StoreUnavailable
from a2bd.observability import REDACTED, LogThrottle, configure_logging, redact_secrets
from a2bd.services.authorization import Authorizer
from a2bd.services.tracker import CallTracker
from a2bd.sim.agi import encode_environment, make_environment

PIN = "90817263"
AMI_SECRET = "ami-s3cret-value"
PG_PASSWORD = "pg-pa55word"
REDIS_PASSWORD = "redis-pa55word"
SECRETS = (PIN, AMI_SECRET, PG_PASSWORD, REDIS_PASSWORD)


def redacted(**fields: Any) -> dict[str, Any]:
    return dict(redact_secrets(None, "info", dict(fields)))


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("pin", PIN, REDACTED),
    ("PIN", PIN, REDACTED),
    ("caller_pin", PIN, REDACTED),
    ("secret", AMI_SECRET, REDACTED),
    ("ami_secret", AMI_SECRET, REDACTED),
    ("password", PG_PASSWORD, REDACTED),
    ("db_password", PG_PASSWORD, REDACTED),
    ("url", f"postgresql://a2bd:{PG_PASSWORD}@db.example:5432/a2bd",
     f"postgresql://a2bd:{REDACTED}@db.example:5432/a2bd"),
    ("url", f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0", f"redis://:{REDACTED}@127.0.0.1:6379/0"),
    ("url", "postgresql://a2bd:p@ss@db/a2bd", f"postgresql://a2bd:{REDACTED}@db/a2bd"),  # an unescaped @
    ("error", f"cannot connect to postgresql://u:{PG_PASSWORD}@h/db: refused",
     f"cannot connect to postgresql://u:{REDACTED}@h/db: refused"),
    ("dsn", f"host=db user=a2bd password={PG_PASSWORD} dbname=a2bd",
     f"host=db user=a2bd password={REDACTED} dbname=a2bd"),
    ("raw", f"Action: Login\r\nUsername: a2bd\r\nSecret: {AMI_SECRET}\r\n",
     f"Action: Login\r\nUsername: a2bd\r\nSecret: {REDACTED}\r\n"),
    ("raw", f"Action: Login\r\nSecret: {AMI_SECRET}\r\n".encode(), f"Action: Login\r\nSecret: {REDACTED}\r\n"),
    ("nested", {"password": PG_PASSWORD, "urls": [f"redis://:{REDIS_PASSWORD}@r"]},
     {"password": REDACTED, "urls": [f"redis://:{REDACTED}@r"]}),
    # Not secrets: left exactly as they are.
    ("pin_attempts", 3, 3),
    ("ping_timeout_s", 5.0, 5.0),
    ("url", "postgresql://a2bd@db/a2bd", "postgresql://a2bd@db/a2bd"),
    ("url", "http://127.0.0.1:9573/metrics", "http://127.0.0.1:9573/metrics"),
    ("reason", "account 1000000001 is unknown", "account 1000000001 is unknown"),
    ("pin", None, None),  # "no PIN given" is not a secret
])
def test_redact_secrets(field: str, value: object, expected: object) -> None:
    assert redacted(**{field: value})[field] == expected


def test_an_exception_whose_text_holds_a_url_is_scrubbed() -> None:
    out = redacted(error=OSError(f"postgresql://a2bd:{PG_PASSWORD}@db/a2bd unreachable"))
    assert PG_PASSWORD not in str(out["error"]) and REDACTED in str(out["error"])
    plain = OSError("connection refused")
    assert redacted(error=plain)["error"] is plain


def test_captured_lines_have_their_secrets_redacted() -> None:
    log = structlog.get_logger("test")
    with capture_logs(processors=[structlog.contextvars.merge_contextvars, redact_secrets]) as logs:
        log.info("login", pin=PIN, secret=AMI_SECRET)
        log.warning(f"cannot reach postgresql://a2bd:{PG_PASSWORD}@db/a2bd", url=f"redis://:{REDIS_PASSWORD}@r/0")
    assert logs == [
        {"event": "login", "pin": REDACTED, "secret": REDACTED, "log_level": "info"},
        {"event": f"cannot reach postgresql://a2bd:{REDACTED}@db/a2bd", "url": f"redis://:{REDACTED}@r/0",
         "log_level": "warning"},
    ]


@pytest.fixture
def json_logging() -> Iterator[None]:
    """The daemon's JSON configuration for one test, then whatever was configured before."""
    saved = structlog.get_config()
    configure_logging("debug", json=True)
    try:
        yield
    finally:
        structlog.configure(**saved)


def test_the_configured_json_renderer_never_prints_a_secret(json_logging: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    log = structlog.get_logger("test")
    log.info("caller keyed a PIN", pin=PIN, account="1000000001")
    log.info("AMI login", secret=AMI_SECRET, raw=f"Action: Login\r\nSecret: {AMI_SECRET}\r\n".encode())
    try:
        raise ConnectionError(f"postgresql://a2bd:{PG_PASSWORD}@db/a2bd and redis://:{REDIS_PASSWORD}@r refused")
    except ConnectionError:
        log.exception("store unreachable")  # the traceback's text is scrubbed too
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines()]
    assert [line["event"] for line in lines] == ["caller keyed a PIN", "AMI login", "store unreachable"]
    for secret in SECRETS:
        assert secret not in err
    assert lines[0]["pin"] == REDACTED and lines[0]["account"] == "1000000001"
    assert "ConnectionError" in lines[2]["exception"] and f"postgresql://a2bd:{REDACTED}@db" in lines[2]["exception"]


# -- one call's identity on its own lines, two calls at once -------------------------------------------------


class FakeSession:
    """What Authorizer.handle needs of an AgiSession: the environment, the peer, commands and their replies."""

    def __init__(self, peer: str, uniqueid: str, accountcode: str = "", keyed: str = "") -> None:
        env = make_environment(uniqueid=uniqueid, channel=f"PJSIP/100-{uniqueid}", extension="4930123456",
                               accountcode=accountcode, callerid="anonymous")
        self.env = parse_environment(encode_environment(env))
        self.peer = (peer, 40000)
        self.hungup = False
        self.keyed = keyed
        self.answer: list[bytes] = []

    async def command(self, *words: str, timeout_s: float | None = None) -> AgiReply:
        assert words[:2] == ("GET", "DATA")
        return AgiReply(200, result=self.keyed)

    async def execute(self, *commands: bytes, timeout_s: float | None = None) -> list[AgiReply]:
        self.answer.extend(commands)
        return [AgiReply(200, result="1") for _ in commands]


class FakeStore:
    """Knows one PIN and no account; both sessions meet inside it, so each resumes after the other ran."""

    def __init__(self) -> None:
        self.log = structlog.get_logger("fake-store")
        self.meet = asyncio.Barrier(2)

    async def number_for_callerid(self, callerid: str) -> str | None:
        return None

    async def number_for_pin(self, pin: str) -> str | None:
        return {PIN: "1000000002"}.get(pin)

    async def account(self, number: str) -> None:
        self.log.info("reading the account")
        await self.meet.wait()
        self.log.info("read the account")

    async def account_version(self, number: str) -> str | None:
        return None

    async def is_synced(self) -> bool:
        return True  # loaded, and the account is simply not there


async def test_two_concurrent_sessions_each_log_their_own_call(json_logging: None,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(asterisk=(
        AsteriskServer(name="pbx1", host="10.0.0.1", secret=AMI_SECRET),
        AsteriskServer(name="pbx2", host="10.0.0.2", secret=AMI_SECRET),
    )).validate()
    authorizer = Authorizer(FakeStore(), None, None, settings)  # type: ignore[arg-type]  # no tariff is reached
    by_account = FakeSession("10.0.0.1", "1700000000.11", accountcode="1000000001")
    by_pin = FakeSession("10.0.0.2", "1700000000.22", keyed=PIN)
    # Each session in its own task, as AgiServer runs them (a task runs in a copy of the context).
    await asyncio.gather(authorizer.handle(by_account), authorizer.handle(by_pin))  # type: ignore[arg-type]

    err = capsys.readouterr().err
    assert PIN not in err and AMI_SECRET not in err
    lines = [json.loads(line) for line in err.splitlines()]
    expected = {"1700000000.11": ("pbx1", "1000000001"), "1700000000.22": ("pbx2", "1000000002")}
    seen: dict[str, list[str]] = {uniqueid: [] for uniqueid in expected}
    for line in lines:
        assert (line["server"], line["account"]) == expected[line["uniqueid"]], line
        seen[line["uniqueid"]].append(line["event"])
    for events in seen.values():
        assert events == ["reading the account", "read the account", "authorize"]
    assert all(b"A2B_STATUS NOACCOUNT" in session.answer[-1] for session in (by_account, by_pin))


async def test_a_malformed_reply_to_get_data_does_not_carry_the_pin_into_the_error() -> None:
    class Mangled(FakeSession):
        async def command(self, *words: str, timeout_s: float | None = None) -> AgiReply:
            raise ProtocolError("AGI reply data has no closing parenthesis", f"200 result={PIN} (timeout".encode())

    settings = Settings(asterisk=(AsteriskServer(name="pbx1", host="10.0.0.1", secret=AMI_SECRET),)).validate()
    authorizer = Authorizer(FakeStore(), None, None, settings)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError) as info:
        await asyncio.create_task(authorizer.handle(Mangled("10.0.0.1", "1700000000.33")))  # type: ignore[arg-type]
    assert PIN not in str(info.value) and info.value.__cause__ is None and info.value.__suppress_context__


# -- the call tracker: one task follows every call, so each line names its call explicitly or by context ----


class SlowRecords:
    """A Redis that fails each call's first record lookup, then answers only when `gate` opens."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.asked: set[str] = set()

    async def call_record(self, account: str, call_id: str) -> str | None:
        if call_id not in self.asked:
            self.asked.add(call_id)
            raise StoreUnavailable("Redis unavailable: cut by the test")
        await self.gate.wait()
        return None


def dial_begin(uniqueid: str, account: str) -> AmiMessage:
    return AmiMessage.from_pairs({
        "Event": "DialBegin", "Channel": f"PJSIP/100-{uniqueid}", "Uniqueid": uniqueid, "AccountCode": account,
        "ChannelStateDesc": "Ring", "DestUniqueid": f"{uniqueid}9", "DialString": "carrier-a/4930123456",
    })


async def test_the_tracker_names_the_call_on_each_line_it_logs_about_one(json_logging: None,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    store = SlowRecords()
    tracker = CallTracker("logtest", store, lambda ended: None)  # type: ignore[arg-type]
    tracker.handle(dial_begin("1700000000.41", "1000000001"))
    tracker.handle(dial_begin("1700000000.42", "1000000002"))
    async with asyncio.timeout(2):
        while len(store.asked) < 2:
            await asyncio.sleep(0.01)
    assert tracker.abandon("1700000000.41")  # logged from the event task, not a call's own
    store.gate.set()
    await tracker.close()

    assert structlog.contextvars.get_contextvars() == {}
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    about = [(line["event"].split(";")[0], line["uniqueid"], line["account"], line["server"], line["call"])
             for line in lines]
    assert sorted(about) == [
        ("Redis unavailable while looking up a call", "1700000000.41", "1000000001", "logtest",
         "logtest/1700000000.41"),
        ("Redis unavailable while looking up a call", "1700000000.42", "1000000002", "logtest",
         "logtest/1700000000.42"),
        ("call ended unseen (AMI events lost)", "1700000000.41", "1000000001", "logtest", "logtest/1700000000.41"),
    ]


def test_log_throttle_says_one_line_per_key_then_how_many_were_held_back() -> None:
    now = [100.0]
    throttle = LogThrottle(every_s=10.0, keys=2, clock=lambda: now[0])
    assert throttle.allow(("peer", "10.0.0.9")) == 0
    assert [throttle.allow(("peer", "10.0.0.9")) for _ in range(3)] == [None, None, None]
    now[0] = 105.0
    assert throttle.allow(("eof", "10.0.0.9")) == 0  # another reason: its own line
    assert throttle.allow(("eof", "10.0.0.9")) is None
    now[0] = 110.0
    assert throttle.allow(("peer", "10.0.0.9")) == 3  # the next line says how many were held back
    # Two keys at most: a third forgets the one logged longest ago (eof, at 105), which then counts afresh
    # although its 10 s are not over.
    assert throttle.allow("scanner-1") == 0
    now[0] = 111.0
    assert throttle.allow(("eof", "10.0.0.9")) == 0
