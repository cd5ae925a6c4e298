"""A call from reservation to ledger line, as values: its record, how it ended, its price, and the credit
guard's arithmetic (when the live calls of one account use up its credit together).

Pure: no clock, no I/O. Times are Unix milliseconds (`_ms`), durations whole seconds (`_s`, as Asterisk's
BillableSeconds), money integer micro-units.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from a2bd.domain.authorize import Route
from a2bd.domain.rating import SellRate, cost_micro
from a2bd.domain.tariff import BuyRate


@dataclass(frozen=True, slots=True)
class CallRecord:
    """What any daemon needs to rate or guard a live call: written beside its reservation at authorization,
    completed by the tracker when the callee answers."""

    call_id: str  # "<asterisk>/<uniqueid of the AGI channel>"
    account: str
    destination: str  # the number dialled, digits
    description: str  # the rate's destination name, e.g. "Germany mobile"
    prefix: str
    sell: SellRate
    routes: tuple[Route, ...]
    reserved_ms: int
    answered_ms: int | None = None
    channel: str = ""  # the billed leg's channel name once seen on AMI (what a Hangup action names)
    provider: str | None = None  # the route that answered

    def answered(self, at_ms: int, channel: str, provider: str | None) -> CallRecord:
        return replace(self, answered_ms=at_ms, channel=channel, provider=provider)

    def route_for(self, dial_string: str) -> Route | None:
        """The route whose dial string Asterisk reports in DialBegin (`DialString` is the part after the
        technology: `PJSIP/4930@carrier-a` is dialled as DialString `4930@carrier-a`)."""
        for route in self.routes:
            if route.dial == dial_string or route.dial.partition("/")[2] == dial_string:
                return route
        return None


def _record_dict(rec: CallRecord) -> dict[str, Any]:
    s = rec.sell
    return {
        "id": rec.call_id, "a": rec.account, "d": rec.destination, "n": rec.description, "p": rec.prefix,
        "r": [s.rate_per_min_micro, s.connect_micro, s.disconnect_micro, s.initial_block_s, s.increment_s,
              s.grace_s, s.min_cost_micro],
        "rt": [[r.provider, r.dial, r.buy.rate_per_min_micro, r.buy.initial_block_s, r.buy.increment_s]
               for r in rec.routes],
        "t": rec.reserved_ms, "ans": rec.answered_ms, "ch": rec.channel, "via": rec.provider,
    }


def encode_record(rec: CallRecord) -> str:
    return json.dumps(_record_dict(rec), separators=(",", ":"), ensure_ascii=False)


def decode_record(text: str) -> CallRecord:
    """Raises ValueError (json.JSONDecodeError is one) or KeyError/TypeError on a damaged record."""
    return _record_from(json.loads(text))


def _record_from(d: dict[str, Any]) -> CallRecord:
    return CallRecord(
        call_id=d["id"], account=d["a"], destination=d["d"], description=d["n"], prefix=d["p"],
        sell=SellRate(*d["r"]),
        routes=tuple(Route(r[0], r[1], BuyRate(r[2], r[3], r[4])) for r in d["rt"]),
        reserved_ms=d["t"], answered_ms=d.get("ans"), channel=d.get("ch", ""),
        provider=d.get("via"),
    )


@dataclass(frozen=True, slots=True)
class EndedCall:
    """How a call ended, from the Cdr and Hangup of its billed leg."""

    record: CallRecord
    ended_ms: int
    duration_s: int  # answered seconds, as Asterisk's BillableSeconds: floor(end - answer); 0 if unanswered
    disposition: str  # ANSWERED, BUSY, NO ANSWER, FAILED, CONGESTION
    cause: int = 16
    cut_by_guard: bool = False


def encode_ended(call: EndedCall) -> str:
    return json.dumps(
        {"rec": _record_dict(call.record), "e": call.ended_ms, "s": call.duration_s, "disp": call.disposition,
         "c": call.cause, "g": call.cut_by_guard},
        separators=(",", ":"),
        ensure_ascii=False,
    )


def decode_ended(text: str) -> EndedCall:
    d = json.loads(text)
    return EndedCall(_record_from(d["rec"]), d["e"], d["s"], d["disp"], d["c"], d["g"])


@dataclass(frozen=True, slots=True)
class RatedCall:
    """An answered call priced: what the ledger line says."""

    call_id: str
    account: str
    amount_micro: int  # <= 0: debited from the account
    seconds: int
    provider: str | None
    provider_amount_micro: int  # >= 0: added to what we owe the carrier
    destination: str
    description: str
    answered_ms: int
    ended_ms: int
    sell: SellRate | None = None  # the rate it was priced at: a free-minute package re-prices it when written


def buy_cost_micro(buy: BuyRate, duration_s: int) -> int:
    """What the carrier charges for `duration_s` answered seconds (its own block and increment; no grace,
    connection charge or minimum: carriers' cards rarely have them and our rate card does not carry them)."""
    return cost_micro(SellRate(buy.rate_per_min_micro, initial_block_s=buy.initial_block_s,
                               increment_s=buy.increment_s), duration_s)


CUT_NOTE = " (cut by the credit guard)"


def destination_name(description: str) -> str:
    """The destination a call line's description names (what invoices group calls by)."""
    return description.removesuffix(CUT_NOTE)


def rate_call(call: EndedCall) -> RatedCall | None:
    """The ledger line of an ended call, or None when it bills nothing (not answered)."""
    rec = call.record
    if call.disposition != "ANSWERED":
        return None
    route = next((r for r in rec.routes if r.provider == rec.provider), None)
    if route is None and rec.routes and rec.provider is None:
        route = rec.routes[0]  # answered but the route was not seen (events lost): the first was dialled first
    # The description is the destination's name, what an invoice summarises calls by (number and seconds
    # have their own columns).
    note = rec.description or rec.prefix
    if call.cut_by_guard:
        note += CUT_NOTE
    answered_ms = rec.answered_ms if rec.answered_ms is not None else call.ended_ms - call.duration_s * 1000
    return RatedCall(
        call_id=rec.call_id,
        account=rec.account,
        amount_micro=-cost_micro(rec.sell, call.duration_s),
        seconds=call.duration_s,
        provider=route.provider if route else None,
        provider_amount_micro=buy_cost_micro(route.buy, call.duration_s) if route else 0,
        destination=rec.destination,
        description=note,
        answered_ms=answered_ms,
        ended_ms=call.ended_ms,
        sell=rec.sell,
    )


# -- the credit guard ------------------------------------------------------------------------------------


def spent_micro(calls: Sequence[tuple[int, SellRate]], at_ms: int) -> int:
    """What the answered calls (answer time, rate) cost together if they all end at `at_ms`: each is billed
    on its whole seconds, floor(at - answer), as Asterisk will bill it."""
    total = 0
    for answered_ms, sell in calls:
        if at_ms > answered_ms:
            total += cost_micro(sell, (at_ms - answered_ms) // 1000)
    return total


def exhaustion_ms(available_micro: int, calls: Sequence[tuple[int, SellRate]], now_ms: int,
                  horizon_ms: int) -> int | None:
    """The first instant, at or after `now_ms`, at which the answered calls together cost more than
    `available_micro` (balance + credit limit, before any of them is debited). None: not within
    `horizon_ms` (the longest call allowed), so nothing needs watching.

    The total cost only grows with time, so a binary search over milliseconds finds it in
    O(calls × log horizon). Hanging all the calls up at that instant leaves the account below zero by at
    most one billing step per call: the step that crossed.
    """
    if not calls:
        return None
    if spent_micro(calls, now_ms) > available_micro:
        return now_ms
    hi = now_ms + horizon_ms
    if spent_micro(calls, hi) <= available_micro:
        return None
    lo = now_ms  # invariant: spent(lo) <= available < spent(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if spent_micro(calls, mid) > available_micro:
            hi = mid
        else:
            lo = mid
    return hi
