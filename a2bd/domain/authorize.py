"""The authorization decision, in two pure steps around the one atomic Redis reservation.

    plan(...)   -> Refusal | Plan     status, expiry, restrictions, rate, routes, the hold to reserve
    finish(...) -> Decision           from what the reservation saw: credit left, concurrency

A refusal is a value, never an exception. Every Decision carries the A2B_STATUS and Q.850 cause the
dialplan needs; an OK carries the duration limit and the dial strings, cheapest carrier first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from a2bd.contract import HANGUP_CAUSE, Status
from a2bd.domain.rating import SellRate, first_block_micro, max_duration_s
from a2bd.domain.tariff import BuyRate, Match, Tariff


class AccountStatus(StrEnum):
    ACTIVE = "active"
    BLOCKED = "blocked"  # suspended by the operator (unpaid, fraud): calls refused, money kept
    CLOSED = "closed"


class RestrictMode(StrEnum):
    NONE = "none"
    DENY = "deny"  # the listed prefixes may not be called
    ALLOW = "allow"  # only the listed prefixes may be called


@dataclass(frozen=True, slots=True)
class AccountView:
    """What authorization knows of an account: the Redis hash, typed."""

    number: str
    status: AccountStatus
    tariff: str
    balance_micro: int
    credit_limit_micro: int
    max_calls: int = 0  # concurrent calls; 0 = unlimited
    expires_at_s: int = 0  # Unix seconds; 0 = never
    restrict_mode: RestrictMode = RestrictMode.NONE
    restrict_prefixes: tuple[str, ...] = ()
    timezone: str = "UTC"
    daily_limit_s: int = 0  # billed seconds per UTC day; 0 = no limit
    today_s: int = 0  # billed seconds so far today

    @property
    def available_micro(self) -> int:
        """Balance plus credit limit: what may still be spent (pre-paid is a credit limit of 0)."""
        return self.balance_micro + self.credit_limit_micro


@dataclass(frozen=True, slots=True)
class ProviderState:
    """A carrier as routing sees it: how to dial it and whether it may take more traffic now."""

    name: str
    dial_template: str  # e.g. "PJSIP/{number}@carrier-a"
    enabled: bool = True
    balance_micro: int = 0  # what we owe the carrier (grows with every call it carries)
    balance_limit_micro: int = 0  # 0 = no limit
    minutes_today_s: int = 0
    daily_limit_s: int = 0  # 0 = no limit

    @property
    def available(self) -> bool:
        if not self.enabled:
            return False
        if self.balance_limit_micro and self.balance_micro >= self.balance_limit_micro:
            return False
        return not (self.daily_limit_s and self.minutes_today_s >= self.daily_limit_s)

    def dial_string(self, number: str) -> str:
        # str.replace, not str.format: a template is operator text and must not reach attributes.
        return self.dial_template.replace("{number}", number)


@dataclass(frozen=True, slots=True)
class Route:
    provider: str
    dial: str
    buy: BuyRate  # what the carrier charges us: orders the routes, and grows its balance per call

    @property
    def buy_rate_per_min_micro(self) -> int:
        return self.buy.rate_per_min_micro


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything decided before the reservation: it only remains to know the credit and the slots."""

    account: AccountView
    destination: str
    match: Match
    routes: tuple[Route, ...]
    hold_micro: int  # the price of the first billed block: what the call will surely cost if answered

    @property
    def sell(self) -> SellRate:
        return self.match.sell


@dataclass(frozen=True, slots=True)
class Decision:
    status: Status
    reason: str  # one line for logs and `a2bd explain`
    account: str = ""
    limit_ms: int = 0
    routes: tuple[Route, ...] = ()
    plan: Plan | None = None
    available_micro: int | None = None

    @property
    def hangup_cause(self) -> int:
        return HANGUP_CAUSE[self.status]

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


def refuse(status: Status, reason: str, account: str = "") -> Decision:
    return Decision(status=status, reason=reason, account=account)


def normalize_destination(raw: str) -> str | None:
    """Digits only (a leading + is dropped); anything else cannot match a tariff and is refused."""
    number = raw.strip()
    if number.startswith("+"):
        number = number[1:]
    if not number or not number.isascii() or not number.isdigit():
        return None
    return number


def plan(
    account: AccountView,
    raw_destination: str,
    tariff: Tariff | None,
    providers: Mapping[str, ProviderState],
    now_local: datetime,
) -> Decision | Plan:
    """Every check that needs no live state. `now_local` is the wall clock in the account's zone."""
    number = account.number
    if account.status is not AccountStatus.ACTIVE:
        return refuse(Status.BLOCKED, f"account is {account.status.value}", number)
    if account.expires_at_s and now_local.timestamp() >= account.expires_at_s:
        return refuse(Status.EXPIRED, "account expired", number)
    destination = normalize_destination(raw_destination)
    if destination is None:
        return refuse(Status.NORATE, f"destination {raw_destination!r} is not a dialable number", number)
    if account.restrict_mode is RestrictMode.DENY and destination.startswith(account.restrict_prefixes):
        return refuse(Status.BLOCKED, f"destination {destination} is on the account's deny list", number)
    if account.restrict_mode is RestrictMode.ALLOW and not destination.startswith(account.restrict_prefixes):
        return refuse(Status.BLOCKED, f"destination {destination} is not on the account's allow list", number)
    if tariff is None:
        return refuse(Status.NORATE, f"tariff {account.tariff!r} is not loaded", number)
    match = tariff.lookup(destination, now_local)
    if match is None:
        return refuse(Status.NORATE, f"no rate for {destination} in tariff {tariff.name!r}", number)
    routes = order_routes(match, destination, providers)
    if not routes:
        return refuse(Status.NOROUTE, f"no carrier available for prefix {match.prefix}", number)
    return Plan(account, destination, match, routes, first_block_micro(match.sell))


def order_routes(match: Match, destination: str, providers: Mapping[str, ProviderState]) -> tuple[Route, ...]:
    """Carriers of the match that may take traffic, cheapest buy rate first (name breaks ties)."""
    best: dict[str, BuyRate] = {}
    for entry in match.entries:
        if entry.provider is None:
            continue
        state = providers.get(entry.provider)
        if state is None or not state.available:
            continue
        known = best.get(entry.provider)
        if known is None or entry.buy.rate_per_min_micro < known.rate_per_min_micro:
            best[entry.provider] = entry.buy
    ordered = sorted(best.items(), key=lambda item: (item[1].rate_per_min_micro, item[0]))
    return tuple(Route(name, providers[name].dial_string(destination), buy)
                 for name, buy in ordered)


class ReserveOutcome(StrEnum):
    OK = "OK"
    MAXCALLS = "MAXCALLS"
    NOFUNDS = "NOFUNDS"
    DAILYLIMIT = "DAILYLIMIT"
    NOACCOUNT = "NOACCOUNT"


@dataclass(frozen=True, slots=True)
class Reservation:
    """What the atomic reservation saw. `credit_micro` is what this call may spend: balance plus
    credit limit, less the holds of the account's other live calls."""

    outcome: ReserveOutcome
    credit_micro: int
    live_calls: int
    daily_left_s: int | None = None  # seconds left today under the account's daily limit; None: no limit


def finish(plan_: Plan, reservation: Reservation, max_call_s: int) -> Decision:
    """Turn a plan and its reservation into the answer."""
    number = plan_.account.number
    if reservation.outcome is ReserveOutcome.NOACCOUNT:
        return refuse(Status.NOACCOUNT, "account vanished from Redis during authorization", number)
    if reservation.outcome is ReserveOutcome.MAXCALLS:
        return refuse(
            Status.MAXCALLS, f"{reservation.live_calls} live calls, limit {plan_.account.max_calls}", number
        )
    if reservation.outcome is ReserveOutcome.DAILYLIMIT:
        return refuse(Status.DAILYLIMIT, f"daily limit of {plan_.account.daily_limit_s} s reached", number)
    cap_s = max_call_s if reservation.daily_left_s is None else min(max_call_s, reservation.daily_left_s)
    longest_s = max_duration_s(plan_.sell, reservation.credit_micro, cap_s)
    if reservation.outcome is ReserveOutcome.NOFUNDS or longest_s <= plan_.sell.grace_s:
        return Decision(
            status=Status.NOFUNDS,
            reason=f"credit {reservation.credit_micro} µ does not pay the first block ({plan_.hold_micro} µ)",
            account=number,
            plan=plan_,
            available_micro=reservation.credit_micro,
        )
    return Decision(
        status=Status.OK,
        reason=f"rate {plan_.match.prefix} ({plan_.match.destination}), {longest_s} s for "
        f"{reservation.credit_micro} µ",
        account=number,
        limit_ms=longest_s * 1000,
        routes=plan_.routes,
        plan=plan_,
        available_micro=reservation.credit_micro,
    )
