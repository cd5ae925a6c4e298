"""The call tracker fed the AMI event streams recorded from a real Asterisk 22 (tests/fixtures/asterisk/).

Each recorded call is reserved in the real Redis as a2bd's authorization would have done (same uniqueid,
same account), then the capture's received bytes go through the AMI parser into the tracker, in the order
and the chunks Asterisk sent them. What comes out is what charging gets: one EndedCall per billed leg.
"""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from a2bd.adapters.redis_store import RedisStore, calls_key
from a2bd.ami.protocol import AmiMessage, AmiParser
from a2bd.domain.authorize import Route
from a2bd.domain.calls import CallRecord, EndedCall, encode_record
from a2bd.domain.rating import SellRate
from a2bd.domain.tariff import BuyRate
from a2bd.services.tracker import CallTracker, RecentCalls
from a2bd.sim.proxy import proxied
from tests.transcripts import FIXTURES, load_capture

pytestmark = pytest.mark.integration

ACCOUNT = "1000000001"
NOW_MS = 1_795_374_800_000  # the captures' epoch (2026-11-22)
SELL = SellRate(rate_per_min_micro=600_000)  # 0.60 a minute, per second


def events(name: str) -> list[AmiMessage]:
    capture = load_capture(FIXTURES / name)[0]
    parser = AmiParser()
    out: list[AmiMessage] = []
    for t_s, chunk in capture.recv_chunks():
        # Stamped with the capture's receive time, as the client stamps what it reads.
        out.extend(AmiMessage(m.headers, NOW_MS / 1000 + (t_s or 0.0)) for m in parser.feed(chunk))
    return [m for m in out if m.is_event]


def agi_uniqueids(name: str) -> list[str]:
    ids = []
    for capture in load_capture(FIXTURES / name):
        for line in capture.received.decode().splitlines():
            if line.startswith("agi_uniqueid: "):
                ids.append(line.split(": ", 1)[1])
    return ids


async def reserve(store: RedisStore, uniqueid: str, recent: RecentCalls | None = None,
                  extension: str = "2000") -> CallRecord:
    await store.put_accounts([{
        "number": ACCOUNT, "status": "active", "tariff": "t", "balance_micro": 10_000_000,
        "credit_limit_micro": 0, "max_calls": 0, "expires_at": None, "restrict_mode": "none",
        "restrict_prefixes": [], "timezone": "UTC", "currency": "EUR",
    }])
    # The route's dial string as the recorded dialplan dialled it: DialBegin reports "<exten>@callee".
    rec = CallRecord(f"pbx1/{uniqueid}", ACCOUNT, extension, "test", extension[0], SELL,
                     (Route("other", "Local/9@elsewhere", BuyRate(1)),
                      Route("callee", f"Local/{extension}@callee", BuyRate(100_000))), NOW_MS)
    reply = await store.reserve(ACCOUNT, rec.call_id, 10_000, NOW_MS, NOW_MS + 3_600_000, "", encode_record(rec))
    assert reply is not None
    if recent is not None:
        recent.put(rec)
    return rec


async def track(store: RedisStore, stream: list[AmiMessage], recent: RecentCalls | None = None,
                wait_s: float = 2.0) -> list[EndedCall]:
    ended: list[EndedCall] = []
    tracker = CallTracker("pbx1", store, ended.append, recent=recent, cdr_wait_s=0.2)
    for message in stream:
        tracker.handle(message)
    async with asyncio.timeout(wait_s):
        while tracker.live:  # closed by the burst itself, or by the cdr_wait timer, or after a Redis fetch
            await asyncio.sleep(0.01)
    await tracker.close()
    return ended


@pytest.mark.parametrize(("capture", "extension", "seconds"), [
    ("01-answered-callee-hangup.ami.txt", "2000", 2),
    ("01-answered-callee-hangup.ami-events-call-cdr.txt", "2000", 2),
    ("02-duration-limit.ami.txt", "1001", 3),
    ("03-ami-hangup-midcall.ami.txt", "1001", 2),
    ("00b-accountcode-channel-func.ami.txt", "2000", 2),
])
async def test_an_answered_call_ends_once_with_the_cdrs_billable_seconds(store: RedisStore, capture: str,
                                                                        extension: str, seconds: int) -> None:
    agi = capture.split(".")[0] + ".agi.txt"
    (uniqueid,) = agi_uniqueids(agi)
    recent = RecentCalls()
    await reserve(store, uniqueid, recent, extension)
    ended = await track(store, events(capture), recent)
    assert len(ended) == 1
    call = ended[0]
    assert call.record.call_id == f"pbx1/{uniqueid}"
    assert (call.disposition, call.duration_s, call.cause) == ("ANSWERED", seconds, 16)
    assert call.record.answered_ms is not None and call.record.provider == "callee"
    assert call.record.channel.endswith(";2")  # the billed leg: what a Hangup action names


@pytest.mark.parametrize("capture", ["04-busy.ami.txt", "05-no-answer.ami.txt"])
async def test_busy_and_unanswered_end_once_unanswered_despite_their_two_cdrs(store: RedisStore,
                                                                             capture: str) -> None:
    (uniqueid,) = agi_uniqueids(capture.replace(".ami.", ".agi."))
    recent = RecentCalls()
    await reserve(store, uniqueid, recent)
    ended = await track(store, events(capture), recent)
    assert [e.disposition for e in ended] == [{"04-busy.ami.txt": "BUSY", "05-no-answer.ami.txt": "NO ANSWER"}[capture]]
    assert ended[0].duration_s == 0


async def test_a_denied_call_bills_nothing_and_frees_a_reservation_if_one_was_taken(store: RedisStore) -> None:
    (uniqueid,) = agi_uniqueids("06-auth-denied-nofunds.agi.txt")
    await reserve(store, uniqueid)  # as if the answer had been OK but the call never dialled
    ended = await track(store, events("06-auth-denied-nofunds.ami.txt"))
    assert ended == []
    async with asyncio.timeout(2):
        while await store.client.hlen(calls_key(ACCOUNT)):
            await asyncio.sleep(0.01)


async def test_two_concurrent_calls_of_one_account_each_end_once(store: RedisStore) -> None:
    ids = agi_uniqueids("08-two-calls-same-account.agi.txt")
    recent = RecentCalls()
    for uniqueid in ids:
        await reserve(store, uniqueid, recent, "1001")
    ended = await track(store, events("08-two-calls-same-account.ami.txt"), recent)
    assert sorted(e.record.call_id for e in ended) == sorted(f"pbx1/{u}" for u in ids)
    assert all((e.disposition, e.duration_s) == ("ANSWERED", 2) for e in ended)


async def test_replayed_events_never_end_a_call_twice(store: RedisStore) -> None:
    (uniqueid,) = agi_uniqueids("01-answered-callee-hangup.agi.txt")
    recent = RecentCalls()
    await reserve(store, uniqueid, recent)
    stream = events("01-answered-callee-hangup.ami-events-call-cdr.txt")
    ended = await track(store, stream + stream, recent)
    assert len(ended) == 1


async def test_a_call_whose_start_was_missed_is_billed_from_its_record_in_redis(store: RedisStore) -> None:
    # The tracker connected after DialBegin (a reconnect): no hand-over in memory, only the end burst.
    (uniqueid,) = agi_uniqueids("01-answered-callee-hangup.agi.txt")
    await reserve(store, uniqueid)
    stream = events("01-answered-callee-hangup.ami-events-call-cdr.txt")
    end_burst = [m for m in stream if m.event in {"Hangup", "Cdr"}]
    ended = await track(store, end_burst)
    assert len(ended) == 1
    assert (ended[0].disposition, ended[0].duration_s) == ("ANSWERED", 2)


async def test_events_of_channels_a2bd_never_reserved_are_ignored(store: RedisStore) -> None:
    ended = await track(store, events("07-agi-server-down.ami.txt"))  # no accountcode anywhere
    assert ended == []
    # A leg with an accountcode but no reservation (another billing system's call): looked up, ignored.
    ended = await track(store, events("01-answered-callee-hangup.ami-events-call-cdr.txt"))
    assert ended == []


async def test_a_missing_cdr_closes_the_call_from_its_events_after_the_wait(store: RedisStore) -> None:
    (uniqueid,) = agi_uniqueids("02-duration-limit.agi.txt")
    recent = RecentCalls()
    await reserve(store, uniqueid, recent)
    stream = [m for m in events("02-duration-limit.ami.txt") if m.event != "Cdr"]  # cdr_manager off
    ended = await track(store, stream, recent)
    assert len(ended) == 1
    # Billed from DialEnd ANSWER to Hangup as the events' receive times show (3.003 s in the capture),
    # floored as Asterisk floors BillableSeconds.
    assert (ended[0].disposition, ended[0].duration_s) == ("ANSWERED", 3)


async def test_redis_away_when_the_call_starts_delays_its_billing_but_loses_nothing(
    store: RedisStore, redis_url: str,
) -> None:
    # Another daemon authorized the call (nothing handed over in memory): the tracker must read its record
    # from Redis, which is unreachable for a while. It keeps trying, and bills the call once Redis is back.
    (uniqueid,) = agi_uniqueids("01-answered-callee-hangup.agi.txt")
    await reserve(store, uniqueid)
    async with proxied(redis_url) as (proxy, via_proxy):
        cut_off = RedisStore.from_url(via_proxy, timeout_s=0.3)
        try:
            await proxy.refuse()
            ended: list[EndedCall] = []
            tracker = CallTracker("pbx1", cut_off, ended.append, cdr_wait_s=0.2)
            for message in events("01-answered-callee-hangup.ami-events-call-cdr.txt"):
                tracker.handle(message)
            await asyncio.sleep(4.0)  # the whole call went by, and Redis stays away longer than a few retries
            assert ended == [] and tracker.is_tracking(f"pbx1/{uniqueid}")
            await proxy.restore()
            async with asyncio.timeout(10):
                while not ended:
                    await asyncio.sleep(0.05)
            assert [(e.record.call_id, e.disposition, e.duration_s) for e in ended] == [
                (f"pbx1/{uniqueid}", "ANSWERED", 2)]
            await tracker.close()
        finally:
            await cut_off.close()


async def test_a_calling_card_leg_is_billed_from_the_dial_answer_not_from_its_own_answer(store: RedisStore) -> None:
    # A calling-card leg runs Answer() before the PIN prompt and the Dial: its Cdr's BillableSeconds count
    # the prompt and the ringing. DialBegin shows the leg already Up; it is billed from DialEnd ANSWER to its
    # Hangup instead (2 s in this recording), not from the Cdr (made 30 s here, as after a long PIN entry).
    (uniqueid,) = agi_uniqueids("01-answered-callee-hangup.agi.txt")
    recent = RecentCalls()
    await reserve(store, uniqueid, recent)
    stream = []
    for m in events("01-answered-callee-hangup.ami-events-call-cdr.txt"):
        if m.event == "DialBegin" and m.get("Uniqueid") == uniqueid:
            m = AmiMessage(tuple((k, "Up" if k == "ChannelStateDesc" else v) for k, v in m.headers), m.received_at)
        elif m.event == "Cdr" and m.get("UniqueID") == uniqueid:
            m = AmiMessage(tuple((k, "30" if k == "BillableSeconds" else v) for k, v in m.headers), m.received_at)
        stream.append(m)
    ended = await track(store, stream, recent)
    assert [(e.disposition, e.duration_s) for e in ended] == [("ANSWERED", 2)]


@pytest.mark.parametrize("billable", ["-1", "4000000000", "abc", "٣", ""])
async def test_a_garbled_billable_seconds_bills_the_call_from_its_events(store: RedisStore, billable: str) -> None:
    # Transcript 01's call, its Cdr garbled: negative, past any call's length (PostgreSQL's integer would
    # refuse it and, before, its whole ledger batch), not digits. The events say 2 s (DialEnd to Hangup).
    (uniqueid,) = agi_uniqueids("01-answered-callee-hangup.agi.txt")
    recent = RecentCalls()
    await reserve(store, uniqueid, recent)
    stream = [AmiMessage(tuple((k, billable if k == "BillableSeconds" else v) for k, v in m.headers), m.received_at)
              if m.event == "Cdr" and m.get("UniqueID") == uniqueid else m
              for m in events("01-answered-callee-hangup.ami-events-call-cdr.txt")]
    with capture_logs() as logs:
        ended = await track(store, stream, recent)
    assert [(e.disposition, e.duration_s) for e in ended] == [("ANSWERED", 2)]
    assert [e["value"] for e in logs if e["event"].startswith("Cdr with a malformed BillableSeconds")] == [billable]
