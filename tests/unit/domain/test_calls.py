"""domain.calls: the record codec, rating an ended call, and the credit guard's exhaustion instant."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from a2bd.domain.authorize import Route
from a2bd.domain.calls import (
    CallRecord,
    EndedCall,
    buy_cost_micro,
    decode_ended,
    decode_record,
    encode_ended,
    encode_record,
    exhaustion_ms,
    rate_call,
    spent_micro,
)
from a2bd.domain.rating import SellRate, cost_micro
from a2bd.domain.tariff import BuyRate

T0 = 1_800_000_000_000
PER_MIN_010 = SellRate(rate_per_min_micro=100_000, increment_s=60)  # 0.10 a minute, billed per minute
ROUTES = (
    Route("alpha", "PJSIP/4930123@alpha", BuyRate(6_000, 30, 6)),
    Route("beta", "PJSIP/4930123@beta", BuyRate(7_000)),
)


def record(**changes: Any) -> CallRecord:
    base = CallRecord("pbx1/1795374825.15", "1000000001", "4930123", "Germany Berlin", "4930",
                      SellRate(rate_per_min_micro=120_000, connect_micro=50_000, initial_block_s=30, increment_s=6),
                      ROUTES, T0)
    return dataclasses.replace(base, **changes)


def test_record_round_trips_through_json_including_non_ascii() -> None:
    rec = record(description="Zürich mobile").answered(T0 + 4_000, "PJSIP/alice-00000001", "beta")
    assert decode_record(encode_record(rec)) == rec
    ended = EndedCall(rec, T0 + 65_000, 61, "ANSWERED", 16, cut_by_guard=True)
    assert decode_ended(encode_ended(ended)) == ended


@pytest.mark.parametrize("text", ["", "{", "[]", '{"id": "x"}', '{"id":"x","a":"1","d":"1","n":"","p":"1","r":[-1],'
                                  '"rt":[],"t":0}'])
def test_a_damaged_record_raises_a_value_or_key_error(text: str) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        decode_record(text)


def test_route_for_matches_the_dial_string_asterisk_reports() -> None:
    rec = record()
    assert rec.route_for("4930123@beta") is ROUTES[1]  # DialBegin's DialString: the part after PJSIP/
    assert rec.route_for("PJSIP/4930123@alpha") is ROUTES[0]
    assert rec.route_for("4930123@gamma") is None


@pytest.mark.parametrize(
    ("disposition", "seconds", "expected"),
    [
        ("ANSWERED", 0, 0),  # 0 s answered: within the (zero) grace, nothing billed, still one line
        ("ANSWERED", 1, 50_000 + 60_000),  # billed the 30 s initial block: 0.05 + 30 s at 1.20/min
        ("ANSWERED", 31, 50_000 + 72_000),  # 36 s
        ("ANSWERED", 61, 50_000 + 132_000),  # 66 s
        ("BUSY", 0, None),
        ("NO ANSWER", 0, None),
        ("FAILED", 0, None),
    ],
)
def test_rate_call_prices_answered_calls_only(disposition: str, seconds: int, expected: int | None) -> None:
    rec = record().answered(T0, "PJSIP/a-1", "alpha")
    rated = rate_call(EndedCall(rec, T0 + seconds * 1000, seconds, disposition))
    if expected is None:
        assert rated is None
        return
    assert rated is not None
    assert rated.amount_micro == -expected
    assert rated.provider == "alpha"
    assert rated.provider_amount_micro == buy_cost_micro(ROUTES[0].buy, seconds)
    assert rated.seconds == seconds


def test_buy_cost_uses_the_carriers_own_block_and_increment() -> None:
    # alpha bills 30 s then 6 s steps at 0.006/min: 31 s -> 36 s -> ceil(36 * 6000 / 60) = 3600
    assert buy_cost_micro(BuyRate(6_000, 30, 6), 31) == 3_600
    assert buy_cost_micro(BuyRate(6_000, 30, 6), 1) == 3_000  # an answered second pays the block


def test_a_call_answered_but_never_routed_is_billed_on_its_first_route() -> None:
    rec = record()  # events lost: no answer seen, no provider known
    rated = rate_call(EndedCall(rec, T0 + 100_000, 40, "ANSWERED"))
    assert rated is not None
    assert (rated.provider, rated.answered_ms) == ("alpha", T0 + 60_000)


def test_a_guard_cut_says_so_on_the_line() -> None:
    rated = rate_call(EndedCall(record().answered(T0, "c", "alpha"), T0 + 5_000, 5, "ANSWERED", cut_by_guard=True))
    assert rated is not None and "cut by the credit guard" in rated.description


# -- the guard ------------------------------------------------------------------------------------------------


def test_three_calls_share_one_credit_and_are_cut_together_when_it_runs_out() -> None:
    # The case: 1.00 of credit at 0.10/min (per-minute increments); three calls answered at
    # t=0, 60 s and 120 s. Alone, each call's L() limit would allow 10 minutes (600 s) of its own: together
    # they would cost up to 3.00. Shared, the credit pays 10 minutes in all.
    calls = [(T0, PER_MIN_010), (T0 + 60_000, PER_MIN_010), (T0 + 120_000, PER_MIN_010)]
    due = exhaustion_ms(1_000_000, calls, T0 + 120_000, 4 * 3600 * 1000)
    assert due is not None
    # Just before: within the credit; at the instant: over it, by at most one increment per call.
    assert spent_micro(calls, due - 1) <= 1_000_000 < spent_micro(calls, due)
    assert spent_micro(calls, due) - 1_000_000 <= 3 * 100_000
    # Each call individually would have run 600 s; together they stop after 4-5 minutes each.
    assert due - T0 < 600_000
    # What the L() timers alone would have allowed: 3 x 1.00.
    assert sum(cost_micro(PER_MIN_010, 600) for _ in calls) == 3_000_000


def test_no_calls_or_enough_credit_means_nothing_to_watch() -> None:
    assert exhaustion_ms(1_000_000, [], T0, 3_600_000) is None
    assert exhaustion_ms(10**12, [(T0, PER_MIN_010)], T0, 3_600_000) is None


def test_already_over_means_now() -> None:
    assert exhaustion_ms(0, [(T0 - 120_000, PER_MIN_010)], T0, 3_600_000) == T0


@settings(max_examples=200, deadline=None)
@given(
    available=st.integers(0, 5_000_000),
    answers=st.lists(st.integers(0, 300_000), min_size=1, max_size=6),
    rate=st.integers(1_000, 2_000_000),
    increment=st.sampled_from([1, 6, 30, 60]),
    block=st.sampled_from([0, 30, 60]),
)
def test_exhaustion_is_the_first_millisecond_over_the_credit(available: int, answers: list[int], rate: int,
                                                             increment: int, block: int) -> None:
    sell = SellRate(rate_per_min_micro=rate, increment_s=increment, initial_block_s=block)
    now = T0 + max(answers)
    calls = [(T0 + a, sell) for a in answers]
    due = exhaustion_ms(available, calls, now, 3_600_000)
    if due is None:
        assert spent_micro(calls, now + 3_600_000) <= available
    elif due == now:
        assert spent_micro(calls, now) > available
    else:
        assert spent_micro(calls, due - 1) <= available < spent_micro(calls, due)
