"""authorize: plan (everything decidable without live state) and finish (after the reservation)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from a2bd.contract import HANGUP_CAUSE, Status
from a2bd.domain.authorize import (
    AccountStatus,
    AccountView,
    Decision,
    Plan,
    ProviderState,
    Reservation,
    ReserveOutcome,
    RestrictMode,
    Route,
    finish,
    normalize_destination,
    plan,
    refuse,
)
from a2bd.domain.rating import SellRate, cost_micro, first_block_micro
from a2bd.domain.tariff import BuyRate, RateEntry, Tariff

NOW = datetime(2025, 3, 5, 12, 0, tzinfo=UTC)  # a Wednesday
NOW_S = int(NOW.timestamp())
MAX_CALL_S = 14_400

UK = SellRate(rate_per_min_micro=60_000, initial_block_s=30, increment_s=6)  # 0.06/min, 30/6
TARIFF = Tariff.build(
    "retail",
    [
        RateEntry("44", "UK", UK, provider="alpha", buy=BuyRate(20_000)),
        RateEntry("44", "UK", UK, provider="beta", buy=BuyRate(10_000)),
        RateEntry("44", "UK", UK, provider="gamma", buy=BuyRate(10_000)),
        RateEntry("33", "France", SellRate(rate_per_min_micro=30_000), provider="alpha", buy=BuyRate(5_000)),
        RateEntry("49", "Germany", SellRate(rate_per_min_micro=30_000)),  # no carrier at all
        RateEntry("39", "Italy", SellRate(rate_per_min_micro=30_000), provider="unknown"),
    ],
)
PROVIDERS = {
    "alpha": ProviderState("alpha", "PJSIP/{number}@alpha"),
    "beta": ProviderState("beta", "PJSIP/{number}@beta"),
    "gamma": ProviderState("gamma", "SIP/gamma/00{number}"),
}
ACCOUNT = AccountView(
    number="1001",
    status=AccountStatus.ACTIVE,
    tariff="retail",
    balance_micro=10_000_000,
    credit_limit_micro=0,
)


def account(**changes: object) -> AccountView:
    return dataclasses.replace(ACCOUNT, **changes)  # type: ignore[arg-type]


def planned(
    acct: AccountView = ACCOUNT,
    destination: str = "442071234567",
    tariff: Tariff | None = TARIFF,
    providers: Mapping[str, ProviderState] = PROVIDERS,
) -> Plan:
    result = plan(acct, destination, tariff, providers, NOW)
    assert isinstance(result, Plan), result
    return result


def refused(
    acct: AccountView = ACCOUNT,
    destination: str = "442071234567",
    tariff: Tariff | None = TARIFF,
    providers: Mapping[str, ProviderState] = PROVIDERS,
) -> Decision:
    result = plan(acct, destination, tariff, providers, NOW)
    assert isinstance(result, Decision), result
    assert not result.ok
    assert result.account == acct.number
    assert result.hangup_cause == HANGUP_CAUSE[result.status]
    return result


@pytest.mark.parametrize(
    ("raw", "number"),
    [
        ("442071234567", "442071234567"),
        ("+442071234567", "442071234567"),
        (" 4420 ", "4420"),
        ("", None),
        ("+", None),
        ("++44", None),
        ("44 20", None),
        ("44-20", None),
        ("*44#", None),
        ("s", None),  # Asterisk's start extension
        ("４４", None),  # full-width digits are not ASCII
        ("٤٤", None),
    ],
)
def test_normalize_destination(raw: str, number: str | None) -> None:
    assert normalize_destination(raw) == number


@pytest.mark.parametrize(
    ("changes", "destination", "tariff", "status", "reason"),
    [
        ({"status": AccountStatus.BLOCKED}, "4420", TARIFF, Status.BLOCKED, "account is blocked"),
        ({"status": AccountStatus.CLOSED}, "4420", TARIFF, Status.BLOCKED, "account is closed"),
        ({"expires_at_s": NOW_S}, "4420", TARIFF, Status.EXPIRED, "expired"),
        ({"expires_at_s": NOW_S - 86_400}, "4420", TARIFF, Status.EXPIRED, "expired"),
        ({}, "abc", TARIFF, Status.NORATE, "not a dialable number"),
        ({}, "", TARIFF, Status.NORATE, "not a dialable number"),
        ({}, "4420", None, Status.NORATE, "tariff 'retail' is not loaded"),
        ({}, "99123", TARIFF, Status.NORATE, "no rate for 99123 in tariff 'retail'"),
        ({}, "4", TARIFF, Status.NORATE, "no rate"),  # shorter than any prefix
        (
            {"restrict_mode": RestrictMode.DENY, "restrict_prefixes": ("449", "33")},
            "4490123",
            TARIFF,
            Status.BLOCKED,
            "deny list",
        ),
        (
            {"restrict_mode": RestrictMode.DENY, "restrict_prefixes": ("33",)},
            "+33123",  # normalized before the check: a '+' does not dodge the list
            TARIFF,
            Status.BLOCKED,
            "deny list",
        ),
        (
            {"restrict_mode": RestrictMode.ALLOW, "restrict_prefixes": ("33",)},
            "4420",
            TARIFF,
            Status.BLOCKED,
            "not on the account's allow list",
        ),
        (
            {"restrict_mode": RestrictMode.ALLOW, "restrict_prefixes": ()},  # allow nothing
            "4420",
            TARIFF,
            Status.BLOCKED,
            "allow list",
        ),
        ({}, "4912345", TARIFF, Status.NOROUTE, "no carrier available for prefix 49"),  # no provider
        ({}, "3912345", TARIFF, Status.NOROUTE, "no carrier"),  # provider not in the routing table
        # The order of the checks: status, expiry, destination, restrictions, tariff, rate, routes.
        ({"status": AccountStatus.BLOCKED, "expires_at_s": 1}, "abc", None, Status.BLOCKED, "blocked"),
        ({"expires_at_s": 1}, "abc", None, Status.EXPIRED, "expired"),
        (
            {"restrict_mode": RestrictMode.DENY, "restrict_prefixes": ("99",)},
            "99123",
            None,
            Status.BLOCKED,
            "deny list",
        ),
    ],
)
def test_plan_refuses(
    changes: dict[str, object], destination: str, tariff: Tariff | None, status: Status, reason: str
) -> None:
    decision = refused(account(**changes), destination, tariff)
    assert decision.status is status
    assert reason in decision.reason


@pytest.mark.parametrize(
    "changes",
    [
        {"expires_at_s": NOW_S + 1},
        {"expires_at_s": 0},  # never expires
        {"restrict_mode": RestrictMode.DENY, "restrict_prefixes": ("449", "33")},
        {"restrict_mode": RestrictMode.DENY, "restrict_prefixes": ()},
        {"restrict_mode": RestrictMode.ALLOW, "restrict_prefixes": ("33", "4420")},
        {"restrict_mode": RestrictMode.NONE, "restrict_prefixes": ("44",)},  # the list is off
    ],
)
def test_plan_accepts(changes: dict[str, object]) -> None:
    result = planned(account(**changes), "442071234567")
    assert result.destination == "442071234567"


def test_expiry_is_compared_in_absolute_time() -> None:
    # now_local is the account's wall clock; an aware datetime in any zone is the same instant.
    tokyo = NOW.astimezone(timezone(timedelta(hours=9)))
    acct = account(expires_at_s=NOW_S + 60)
    assert isinstance(plan(acct, "4420", TARIFF, PROVIDERS, tokyo), Plan)
    assert isinstance(plan(acct, "4420", TARIFF, PROVIDERS, tokyo + timedelta(minutes=1)), Decision)


def unavailable(name: str, **changes: object) -> ProviderState:
    return dataclasses.replace(PROVIDERS[name], **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"enabled": False},
        {"balance_micro": 5_000_000, "balance_limit_micro": 5_000_000},  # at the limit is over it
        {"balance_micro": 6_000_000, "balance_limit_micro": 5_000_000},
        {"minutes_today_s": 3_600, "daily_limit_s": 3_600},
        {"minutes_today_s": 4_000, "daily_limit_s": 3_600},
    ],
)
def test_noroute_when_every_carrier_is_unavailable(changes: dict[str, object]) -> None:
    providers = {name: unavailable(name, **changes) for name in PROVIDERS}
    decision = refused(providers=providers)
    assert decision.status is Status.NOROUTE
    assert decision.hangup_cause == 3


def test_noroute_when_no_carrier_is_known() -> None:
    assert refused(providers={}).status is Status.NOROUTE


@pytest.mark.parametrize(
    ("state", "available"),
    [
        (ProviderState("p", "x"), True),
        (ProviderState("p", "x", enabled=False), False),
        (ProviderState("p", "x", balance_micro=10**12), True),  # 0 = no balance limit
        (ProviderState("p", "x", balance_micro=4_999_999, balance_limit_micro=5_000_000), True),
        (ProviderState("p", "x", balance_micro=5_000_000, balance_limit_micro=5_000_000), False),
        (ProviderState("p", "x", minutes_today_s=10**9), True),  # 0 = no daily limit
        (ProviderState("p", "x", minutes_today_s=3_599, daily_limit_s=3_600), True),
        (ProviderState("p", "x", minutes_today_s=3_600, daily_limit_s=3_600), False),
    ],
)
def test_provider_available(state: ProviderState, available: bool) -> None:
    assert state.available is available


def test_routes_cheapest_buy_rate_first_then_by_name() -> None:
    result = planned()
    assert result.routes == (
        Route("beta", "PJSIP/442071234567@beta", BuyRate(10_000)),
        Route("gamma", "SIP/gamma/00442071234567", BuyRate(10_000)),  # same price as beta: by name
        Route("alpha", "PJSIP/442071234567@alpha", BuyRate(20_000)),
    )


def test_unavailable_carriers_are_skipped() -> None:
    providers = {**PROVIDERS, "beta": unavailable("beta", enabled=False)}
    assert [r.provider for r in planned(providers=providers).routes] == ["gamma", "alpha"]


def test_a_carrier_listed_twice_is_one_route_at_its_cheapest_rate() -> None:
    tariff = Tariff.build(
        "t",
        [
            RateEntry("44", "UK", UK, provider="alpha", buy=BuyRate(20_000)),
            RateEntry("44", "UK", UK, provider="beta", buy=BuyRate(15_000)),
            RateEntry("44", "UK", UK, provider="alpha", buy=BuyRate(12_000), week_start_min=1),
        ],
    )
    routes = planned(tariff=tariff).routes
    assert [(r.provider, r.buy_rate_per_min_micro) for r in routes] == [("alpha", 12_000), ("beta", 15_000)]


@pytest.mark.parametrize(
    ("template", "dial"),
    [
        ("PJSIP/{number}@carrier-a", "PJSIP/4420@carrier-a"),
        ("SIP/trunk/00{number}", "SIP/trunk/004420"),
        ("PJSIP/{number}@a&PJSIP/{number}@b", "PJSIP/4420@a&PJSIP/4420@b"),  # every occurrence
        ("DAHDI/g1/4420", "DAHDI/g1/4420"),  # a fixed string
        # Operator text never reaches str.format: no attribute access, no positional fields.
        ("PJSIP/{number.__class__.__mro__}@x", "PJSIP/{number.__class__.__mro__}@x"),
        ("PJSIP/{0}{number!r}@x", "PJSIP/{0}{number!r}@x"),
        ("PJSIP/{{number}}@x", "PJSIP/{4420}@x"),
    ],
)
def test_dial_string_template(template: str, dial: str) -> None:
    assert ProviderState("p", template).dial_string("4420") == dial


def test_dial_string_uses_the_normalized_number() -> None:
    result = planned(destination="+442071234567")
    assert result.routes[0].dial == "PJSIP/442071234567@beta"


def test_plan_holds_the_first_block() -> None:
    result = planned()
    assert result.match.prefix == "44"
    assert result.sell is UK
    assert result.hold_micro == first_block_micro(UK) == 30_000  # 30 s at 0.06/min
    assert result.account is ACCOUNT


@pytest.mark.parametrize(
    ("outcome", "credit", "live", "status", "cause", "reason"),
    [
        (ReserveOutcome.NOACCOUNT, 0, 0, Status.NOACCOUNT, 21, "vanished"),
        (ReserveOutcome.MAXCALLS, 10_000_000, 3, Status.MAXCALLS, 34, "3 live calls, limit 3"),
        (ReserveOutcome.NOFUNDS, 0, 1, Status.NOFUNDS, 21, "does not pay the first block (30000 µ)"),
        (ReserveOutcome.NOFUNDS, 10_000_000, 1, Status.NOFUNDS, 21, "first block"),  # the script decides
        (ReserveOutcome.OK, 29_999, 1, Status.NOFUNDS, 21, "credit 29999 µ"),  # a micro-unit short
        (ReserveOutcome.OK, -5, 1, Status.NOFUNDS, 21, "credit -5 µ"),
    ],
)
def test_finish_refuses(
    outcome: ReserveOutcome, credit: int, live: int, status: Status, cause: int, reason: str
) -> None:
    plan_ = planned(account(max_calls=3))
    decision = finish(plan_, Reservation(outcome, credit, live), MAX_CALL_S)
    assert decision.status is status
    assert not decision.ok
    assert decision.hangup_cause == cause == HANGUP_CAUSE[status]
    assert reason in decision.reason
    assert decision.limit_ms == 0
    assert decision.routes == ()
    assert decision.account == "1001"


@pytest.mark.parametrize(
    ("credit", "limit_ms"),
    [
        (30_000, 30_000),  # exactly the first block
        (30_999, 30_000),  # not yet the next 6 s (6 000 µ)
        (36_000, 36_000),
        (1_000_000, 996_000),  # 60 × 1 000 000 / 60 000 = 1 000 s billable; on the grid: 30 + 161 × 6
        (10**9, MAX_CALL_S * 1000),  # capped by billing.max_call_s
    ],
)
def test_finish_ok(credit: int, limit_ms: int) -> None:
    plan_ = planned()
    decision = finish(plan_, Reservation(ReserveOutcome.OK, credit, 1), MAX_CALL_S)
    assert decision.status is Status.OK
    assert decision.ok
    assert decision.hangup_cause == 16
    assert decision.limit_ms == limit_ms
    assert decision.routes == plan_.routes
    assert decision.plan is plan_
    assert decision.available_micro == credit
    assert decision.account == "1001"
    assert cost_micro(UK, limit_ms // 1000) <= credit


def test_finish_refuses_a2billings_initial_block_fault() -> None:
    # 1.00/min with a 60 s block; the credit pays 20 s at the per-minute rate. A2Billing would set a
    # 20 s timeout (credit / rate × 60) and bill the 60 s block: 1.00 spent out of 0.333334.
    rate = SellRate(rate_per_min_micro=1_000_000, initial_block_s=60, increment_s=60)
    tariff = Tariff.build("t", [RateEntry("44", "UK", rate, provider="alpha")])
    plan_ = planned(tariff=tariff)
    credit = 333_334
    a2billing_timeout_s = credit * 60 // rate.rate_per_min_micro
    assert a2billing_timeout_s == 20 and cost_micro(rate, a2billing_timeout_s) > credit

    decision = finish(plan_, Reservation(ReserveOutcome.OK, credit, 1), MAX_CALL_S)
    assert decision.status is Status.NOFUNDS
    assert decision.limit_ms == 0


@given(st.integers(min_value=-(10**6), max_value=10**10))
def test_an_ok_call_never_costs_more_than_the_credit(credit: int) -> None:
    decision = finish(planned(), Reservation(ReserveOutcome.OK, credit, 1), MAX_CALL_S)
    if decision.ok:
        assert decision.limit_ms % 1000 == 0
        assert 0 < decision.limit_ms <= MAX_CALL_S * 1000
        assert cost_micro(UK, decision.limit_ms // 1000) <= credit
    else:
        assert decision.status is Status.NOFUNDS
        assert credit < first_block_micro(UK)


@pytest.mark.parametrize("status", list(Status))
def test_every_status_has_its_contract_hangup_cause(status: Status) -> None:
    assert refuse(status, "why").hangup_cause == HANGUP_CAUSE[status]


@pytest.mark.parametrize(
    ("status", "cause"),
    [
        (Status.OK, 16),
        (Status.NOFUNDS, 21),
        (Status.MAXCALLS, 34),
        (Status.BLOCKED, 21),
        (Status.EXPIRED, 21),
        (Status.NOACCOUNT, 21),
        (Status.NORATE, 1),
        (Status.NOROUTE, 3),
        (Status.ERROR, 38),
    ],
)
def test_hangup_causes(status: Status, cause: int) -> None:
    assert Decision(status=status, reason="").hangup_cause == cause


def test_available_is_balance_plus_credit_limit() -> None:
    assert account(balance_micro=-2_000_000, credit_limit_micro=5_000_000).available_micro == 3_000_000
