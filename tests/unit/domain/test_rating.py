"""rating: billable seconds, cost, and the longest call a credit pays for (its exact inverse)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from a2bd.domain.rating import SellRate, billable_s, cost_micro, cost_with_free_micro, first_block_micro, max_duration_s

PER_MINUTE = SellRate(rate_per_min_micro=1_000_000, initial_block_s=60, increment_s=60)  # 1.00/min, 60/60
# 0.0125/min, 30 s block then 6 s steps, 0.05 to connect, 0.01 to disconnect, first 5 s free
MIXED = SellRate(
    rate_per_min_micro=12_500,
    connect_micro=50_000,
    disconnect_micro=10_000,
    initial_block_s=30,
    increment_s=6,
    grace_s=5,
)
PER_SECOND = SellRate(rate_per_min_micro=10_000)  # 0.01/min, 1/1
MIN_COST = SellRate(rate_per_min_micro=60_000, initial_block_s=1, min_cost_micro=100_000)  # 0.06/min, ≥ 0.10
GRACE_OVER_BLOCK = SellRate(rate_per_min_micro=60_000, initial_block_s=6, increment_s=6, grace_s=10)
FLAT = SellRate(rate_per_min_micro=0, connect_micro=100_000)  # 0.10 a call, whatever its length
CAP = 14_400


@pytest.mark.parametrize(
    ("rate", "duration_s", "billable"),
    [
        (PER_MINUTE, 0, 0),
        (PER_MINUTE, 1, 60),
        (PER_MINUTE, 60, 60),
        (PER_MINUTE, 61, 120),
        (PER_MINUTE, 120, 120),
        (MIXED, 5, 0),  # within the grace
        (MIXED, 6, 30),  # the first billed second pays the whole block
        (MIXED, 30, 30),
        (MIXED, 31, 36),
        (MIXED, 36, 36),
        (MIXED, 37, 42),
        (PER_SECOND, 0, 0),
        (PER_SECOND, 1, 1),
        (PER_SECOND, 7, 7),
        (GRACE_OVER_BLOCK, 10, 0),
        (GRACE_OVER_BLOCK, 11, 12),  # past the grace, rounded up on the 6 s grid after the 6 s block
        (FLAT, 0, 0),
        (FLAT, 3600, 3600),
    ],
)
def test_billable_s(rate: SellRate, duration_s: int, billable: int) -> None:
    assert billable_s(rate, duration_s) == billable


@pytest.mark.parametrize(
    ("rate", "duration_s", "cost"),
    [
        (PER_MINUTE, 0, 0),
        (PER_MINUTE, 1, 1_000_000),
        (PER_MINUTE, 60, 1_000_000),
        (PER_MINUTE, 61, 2_000_000),
        (MIXED, 5, 0),  # free: no connect or disconnect charge either
        (MIXED, 6, 50_000 + 6_250 + 10_000),  # 30 s × 12 500 / 60 = 6 250
        (MIXED, 30, 66_250),
        (MIXED, 31, 50_000 + 7_500 + 10_000),  # 36 s
        (MIXED, 37, 50_000 + 8_750 + 10_000),  # 42 s
        (PER_SECOND, 6, 1_000),
        (PER_SECOND, 7, 1_167),  # 1 166.67 rounded up, once, for the whole call
        (PER_SECOND, 60, 10_000),
        (MIN_COST, 10, 100_000),  # 10 000 by time, lifted to the minimal cost
        (MIN_COST, 100, 100_000),
        (MIN_COST, 101, 101_000),
        (GRACE_OVER_BLOCK, 11, 12_000),
        (FLAT, 1, 100_000),
        (FLAT, 3600, 100_000),
    ],
)
def test_cost_micro(rate: SellRate, duration_s: int, cost: int) -> None:
    assert cost_micro(rate, duration_s) == cost


@pytest.mark.parametrize(
    ("rate", "credit", "cap", "longest"),
    [
        (PER_MINUTE, 1_000_000, CAP, 60),
        (PER_MINUTE, 999_999, CAP, 0),  # does not pay the first minute: NOFUNDS
        (PER_MINUTE, 2_500_000, CAP, 120),
        (PER_MINUTE, 10_000_000, 90, 90),  # capped
        (PER_MINUTE, 0, CAP, 0),
        (PER_MINUTE, -5, CAP, 0),
        (MIXED, 66_249, CAP, 5),  # the grace: no billed second
        (MIXED, 66_250, CAP, 30),
        (MIXED, 67_499, CAP, 30),
        (MIXED, 67_500, CAP, 36),
        (PER_SECOND, 1_166, CAP, 6),
        (PER_SECOND, 1_167, CAP, 7),
        (MIN_COST, 99_999, CAP, 0),
        (MIN_COST, 100_000, CAP, 100),
        (MIN_COST, 100_999, CAP, 100),
        (MIN_COST, 101_000, CAP, 101),
        (GRACE_OVER_BLOCK, 11_999, CAP, 10),
        (GRACE_OVER_BLOCK, 12_000, CAP, 12),
        (FLAT, 99_999, CAP, 0),
        (FLAT, 100_000, CAP, CAP),  # the price does not grow with time
    ],
)
def test_max_duration_s(rate: SellRate, credit: int, cap: int, longest: int) -> None:
    assert max_duration_s(rate, credit, cap) == longest


@pytest.mark.parametrize(
    ("rate", "first"),
    [(PER_MINUTE, 1_000_000), (MIXED, 66_250), (PER_SECOND, 167), (MIN_COST, 100_000), (FLAT, 100_000)],
)
def test_first_block_micro(rate: SellRate, first: int) -> None:
    assert first_block_micro(rate) == first


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate_per_min_micro": -1},
        {"rate_per_min_micro": 1, "connect_micro": -1},
        {"rate_per_min_micro": 1, "disconnect_micro": -1},
        {"rate_per_min_micro": 1, "min_cost_micro": -1},
        {"rate_per_min_micro": 1, "initial_block_s": -1},
        {"rate_per_min_micro": 1, "grace_s": -1},
        {"rate_per_min_micro": 1, "increment_s": 0},
    ],
)
def test_sell_rate_refuses_nonsense(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must"):
        SellRate(**kwargs)


def a2billing_timeout_s(rate: SellRate, credit_micro: int) -> int:
    """A2Billing's call timeout: credit / rate × 60, blind to the initial block and the increments."""
    budget = credit_micro - rate.connect_micro - rate.disconnect_micro
    return budget * 60 // rate.rate_per_min_micro


def test_initial_block_fault_of_a2billing_is_fixed() -> None:
    rate = SellRate(rate_per_min_micro=1_000_000, initial_block_s=60, increment_s=60)  # 1.00/min, 60/60
    credit = 333_334  # pays 20 s at the per-minute rate, not the 60 s block

    a2billing = a2billing_timeout_s(rate, credit)
    assert a2billing == 20
    assert cost_micro(rate, a2billing) == 1_000_000  # A2Billing lets a call cost 3 × what the credit holds
    assert cost_micro(rate, a2billing) > credit

    ours = max_duration_s(rate, credit, CAP)
    assert ours <= rate.grace_s  # NOFUNDS: no call at all
    assert cost_micro(rate, ours) == 0


def test_increment_fault_of_a2billing_is_fixed() -> None:
    rate = SellRate(rate_per_min_micro=1_000_000, initial_block_s=60, increment_s=60)
    credit = 1_500_000  # 90 s at the per-minute rate; the second minute is billed whole

    assert cost_micro(rate, a2billing_timeout_s(rate, credit)) == 2_000_000 > credit
    ours = max_duration_s(rate, credit, CAP)
    assert ours == 60
    assert cost_micro(rate, ours) == 1_000_000 <= credit


sell_rates = st.builds(
    SellRate,
    rate_per_min_micro=st.integers(min_value=0, max_value=5_000_000),
    connect_micro=st.integers(min_value=0, max_value=200_000),
    disconnect_micro=st.integers(min_value=0, max_value=100_000),
    initial_block_s=st.integers(min_value=0, max_value=120),
    increment_s=st.integers(min_value=1, max_value=120),
    grace_s=st.integers(min_value=0, max_value=30),
    min_cost_micro=st.integers(min_value=0, max_value=500_000),
)
credits = st.integers(min_value=-1_000_000, max_value=100_000_000)
caps = st.integers(min_value=0, max_value=100_000)


@given(sell_rates, credits, caps)
def test_max_duration_is_the_exact_inverse_of_cost(rate: SellRate, credit: int, cap: int) -> None:
    longest = max_duration_s(rate, credit, cap)
    assert 0 <= longest <= cap
    if longest > rate.grace_s:
        assert cost_micro(rate, longest) <= credit  # the call it allows is paid for
        if longest < cap:
            # ... and not one second more: the next billed second (a whole increment) does not fit.
            assert cost_micro(rate, longest + 1) > credit
            assert cost_micro(rate, longest + rate.increment_s) > credit
            # It ends on the billing grid: no paid-for second is cut off.
            assert longest >= rate.initial_block_s
            assert billable_s(rate, longest) == longest
    elif longest < cap:
        assert longest == rate.grace_s
        assert cost_micro(rate, rate.grace_s + 1) > credit  # NOFUNDS: the first block does not fit


@given(
    st.builds(
        SellRate,
        rate_per_min_micro=st.integers(min_value=0, max_value=600_000),
        connect_micro=st.integers(min_value=0, max_value=50_000),
        disconnect_micro=st.integers(min_value=0, max_value=50_000),
        initial_block_s=st.integers(min_value=0, max_value=60),
        increment_s=st.integers(min_value=1, max_value=60),
        grace_s=st.integers(min_value=0, max_value=20),
        min_cost_micro=st.integers(min_value=0, max_value=100_000),
    ),
    st.integers(min_value=-10_000, max_value=3_000_000),
    st.integers(min_value=0, max_value=400),
)
def test_max_duration_matches_a_brute_force_search(rate: SellRate, credit: int, cap: int) -> None:
    fits = [d for d in range(cap + 1) if d <= rate.grace_s or cost_micro(rate, d) <= credit]
    assert max_duration_s(rate, credit, cap) == max(fits)


@given(sell_rates, st.integers(min_value=0, max_value=100_000), st.integers(min_value=0, max_value=100_000))
def test_cost_is_monotone_in_duration(rate: SellRate, a: int, b: int) -> None:
    shorter, longer = sorted((a, b))
    assert billable_s(rate, shorter) <= billable_s(rate, longer)
    assert cost_micro(rate, shorter) <= cost_micro(rate, longer)


@given(sell_rates, st.integers(min_value=0, max_value=100_000))
def test_billable_covers_the_call(rate: SellRate, duration_s: int) -> None:
    billable = billable_s(rate, duration_s)
    if duration_s <= rate.grace_s:
        assert billable == 0
        assert cost_micro(rate, duration_s) == 0
    else:
        assert billable >= max(duration_s, rate.initial_block_s)
        assert billable - max(duration_s, rate.initial_block_s) < rate.increment_s
        # One rounding, upward, of the whole call: at most one micro-unit over the exact price.
        exact_times_60 = billable * rate.rate_per_min_micro
        time_charge = cost_micro(rate, duration_s) - rate.connect_micro - rate.disconnect_micro
        if cost_micro(rate, duration_s) > rate.min_cost_micro:
            assert 0 <= time_charge * 60 - exact_times_60 < 60


@given(sell_rates, credits, credits, caps)
def test_more_credit_never_shortens_the_call(rate: SellRate, a: int, b: int, cap: int) -> None:
    less, more = sorted((a, b))
    assert max_duration_s(rate, less, cap) <= max_duration_s(rate, more, cap)


@given(sell_rates, caps)
def test_a2billing_overspends_where_we_do_not(rate: SellRate, cap: int) -> None:
    # Whenever A2Billing's timeout would allow a call costing more than the credit, ours does not.
    assume(rate.rate_per_min_micro > 0)
    credit = first_block_micro(rate) - 1  # just short of the first block
    assume(credit > 0)
    ours = max_duration_s(rate, credit, cap)
    assert cost_micro(rate, ours) <= credit
    theirs = a2billing_timeout_s(rate, credit)
    if theirs > rate.grace_s:
        assert cost_micro(rate, theirs) > credit


# -- free-minute packages ---------------------------------------------------------------------------

PACKAGED = SellRate(rate_per_min_micro=60_000, connect_micro=10_000, initial_block_s=30, increment_s=6)


@pytest.mark.parametrize(("duration", "free", "price", "covered"), [
    (100, 0, 10_000 + 102_000, 0),               # no package: 30 s + 12 x 6 s billed, plus the connection
    (100, 500, 0, 102),                          # covered whole (billable 102 s): no connection charge either
    (100, 60, 10_000 + 42_000, 60),              # 42 s left to pay, at 1,000 micro/s, plus the connection
    (10, 500, 0, 30),                            # the initial block is what is covered
    (0, 500, 0, 0),                              # nothing billable, nothing used
])
def test_cost_with_free_seconds(duration: int, free: int, price: int, covered: int) -> None:
    assert cost_with_free_micro(PACKAGED, duration, free) == (price, covered)


@given(sell_rates, st.integers(0, 20_000), st.integers(0, 20_000), st.integers(0, 20_000))
def test_free_seconds_never_raise_a_price_and_more_never_cost_more(rate: SellRate, duration: int, free: int,
                                                                  more: int) -> None:
    price, covered = cost_with_free_micro(rate, duration, free)
    assert covered <= min(free, billable_s(rate, duration))
    assert price <= cost_micro(rate, duration)
    assert cost_with_free_micro(rate, duration, free + more)[0] <= price
