"""Invoice maths: the one tax rounding, taxes in a gross payment, the invoice day in local time, totals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from a2bd.domain.invoice import (
    CENT_MICRO,
    PeriodLine,
    TaxBase,
    TaxRow,
    close_after,
    format_rate,
    invoice_taxes,
    period_totals,
    tax_in_gross,
    tax_on_net,
)


@pytest.mark.parametrize(("net", "rate", "tax"), [
    (65_277_887, 200_000, 13_060_000),   # 13.0555774 -> 13.06
    (10_000_000, 200_000, 2_000_000),    # exact
    (25_000, 200_000, 10_000),           # 0.005 -> 0.01: halves away from zero
    (24_999, 200_000, 0),                # 0.0049998 -> 0.00
    (-25_000, 200_000, -10_000),         # a credit mirrors a charge
    (-24_999, 200_000, 0),
    (1_000_000, 55_000, 60_000),         # 5.5 % of 1.00 = 0.055 -> 0.06
    (123_456_789, 0, 0),                 # exempt
    (1, 1_000_000, 0),                   # 100 % of a micro-unit is still below half a cent
])
def test_tax_on_net_is_rounded_once_to_the_cent_half_away_from_zero(net: int, rate: int, tax: int) -> None:
    assert tax_on_net(net, rate) == tax


@given(st.integers(-10**14, 10**14), st.integers(0, 1_000_000))
def test_tax_on_net_equals_decimal_half_up_rounding(net: int, rate: int) -> None:
    exact = Decimal(net) * Decimal(rate) / Decimal(1_000_000) / Decimal(CENT_MICRO)
    cents = exact.copy_abs().quantize(Decimal(1), rounding=ROUND_HALF_UP)
    assert tax_on_net(net, rate) == int(cents if net >= 0 else -cents) * CENT_MICRO


@pytest.mark.parametrize(("gross", "rate", "tax"), [
    (12_000_000, 200_000, 2_000_000),    # 12.00 incl. 20 % -> 2.00 tax, 10.00 net
    (10_000_000, 200_000, 1_670_000),    # 1.6666.. -> 1.67
    (10_550_000, 55_000, 550_000),       # 10.55 incl. 5.5 % -> 0.55
    (5_000_000, 0, 0),
])
def test_tax_in_a_gross_payment(gross: int, rate: int, tax: int) -> None:
    assert tax_in_gross(gross, rate) == tax


@given(st.integers(0, 10**13), st.integers(0, 1_000_000))
def test_tax_in_gross_is_the_tax_of_its_net_within_a_cent(gross: int, rate: int) -> None:
    tax = tax_in_gross(gross, rate)
    assert tax % CENT_MICRO == 0
    assert abs(tax_on_net(gross - tax, rate) - tax) <= CENT_MICRO


@pytest.mark.parametrize(("rate", "text"), [(200_000, "20%"), (55_000, "5.5%"), (0, "0%"), (196_000, "19.6%"),
                                            (1_000_000, "100%"), (123_456, "12.3456%")])
def test_format_rate_is_exact(rate: int, text: str) -> None:
    assert format_rate(rate) == text


def test_invoice_taxes_group_by_class_and_rate_and_round_per_group_not_per_line() -> None:
    # Three lines of 0.004 each at 100 %: per line each tax would round to 0.00; per group 0.012 -> 0.01.
    bases = [TaxBase("standard", 1_000_000, 4_000)] * 3 + [TaxBase("exempt", 0, 2_500_000)]
    assert invoice_taxes(bases) == [TaxRow("exempt", 0, 2_500_000, 0), TaxRow("standard", 1_000_000, 12_000, 10_000)]


def test_invoice_taxes_drop_groups_that_net_to_zero() -> None:
    assert invoice_taxes([TaxBase("standard", 200_000, 5_000_000), TaxBase("standard", 200_000, -5_000_000)]) == []


def test_period_totals_count_payments_and_taxable_charges() -> None:
    lines = [
        PeriodLine("payment", 357_000_000, None, None),
        PeriodLine("did", -5_000_000, "standard", 200_000),
        PeriodLine("charge", -2_500_000, "exempt", 0),
        PeriodLine("correction", 1_000_000, "standard", 200_000),  # a refund lowers the taxable net
        PeriodLine("tax", -400_000, None, None),
    ]
    totals = period_totals(lines, taxed_here=True)
    assert totals.lines_micro == 357_000_000 - 5_000_000 - 2_500_000 + 1_000_000 - 400_000
    assert totals.payments_micro == 357_000_000
    assert totals.net_micro == 6_500_000
    assert totals.taxes == (TaxRow("exempt", 0, 2_500_000, 0), TaxRow("standard", 200_000, 4_000_000, 800_000))
    assert totals.tax_micro == 800_000
    assert period_totals(lines, taxed_here=False).taxes == ()


# -- the invoice day -------------------------------------------------------------------------------

AUCKLAND, LOS_ANGELES = ZoneInfo("Pacific/Auckland"), ZoneInfo("America/Los_Angeles")


@pytest.mark.parametrize(("after", "day", "tz", "expected"), [
    # Auckland is UTC+13 in summer: its 1 December starts at 11:00 UTC on 30 November.
    (datetime(2026, 11, 15, tzinfo=UTC), 1, "Pacific/Auckland", datetime(2026, 11, 30, 11, 0, tzinfo=UTC)),
    (datetime(2026, 11, 15, tzinfo=UTC), 1, "America/Los_Angeles", datetime(2026, 12, 1, 8, 0, tzinfo=UTC)),
    # exactly at a close: the next one
    (datetime(2026, 12, 1, 8, 0, tzinfo=UTC), 1, "America/Los_Angeles", datetime(2027, 1, 1, 8, 0, tzinfo=UTC)),
    (datetime(2026, 12, 1, 7, 59, tzinfo=UTC), 1, "America/Los_Angeles", datetime(2026, 12, 1, 8, 0, tzinfo=UTC)),
    (datetime(2026, 12, 20, tzinfo=UTC), 15, "UTC", datetime(2027, 1, 15, tzinfo=UTC)),
    # Los Angeles springs forward on 8 March 2026 (at 02:00): midnight of the 8th is still PST, the 9th PDT.
    (datetime(2026, 3, 1, tzinfo=UTC), 8, "America/Los_Angeles", datetime(2026, 3, 8, 8, 0, tzinfo=UTC)),
    (datetime(2026, 3, 1, tzinfo=UTC), 9, "America/Los_Angeles", datetime(2026, 3, 9, 7, 0, tzinfo=UTC)),
    # Auckland falls back on 5 April 2026 (03:00 -> 02:00) and springs forward on 27 September 2026.
    (datetime(2026, 4, 1, tzinfo=UTC), 5, "Pacific/Auckland", datetime(2026, 4, 4, 11, 0, tzinfo=UTC)),
    (datetime(2026, 4, 1, tzinfo=UTC), 6, "Pacific/Auckland", datetime(2026, 4, 5, 12, 0, tzinfo=UTC)),
    (datetime(2026, 9, 20, tzinfo=UTC), 28, "Pacific/Auckland", datetime(2026, 9, 27, 11, 0, tzinfo=UTC)),
])
def test_close_after_is_the_next_local_midnight_of_the_invoice_day(after: datetime, day: int, tz: str,
                                                                   expected: datetime) -> None:
    assert close_after(after, day, tz) == expected


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2060, 1, 1), timezones=st.just(UTC)),
       st.integers(1, 28), st.sampled_from(["Pacific/Auckland", "America/Los_Angeles", "America/Santiago",
                                             "Europe/London", "Asia/Kolkata", "UTC"]))
def test_closes_follow_each_other_month_by_month_without_skipping_or_doubling(start: datetime, day: int,
                                                                               tz: str) -> None:
    zone = ZoneInfo(tz)
    first = close_after(start, day, tz)
    second = close_after(first, day, tz)
    assert start < first < second
    for close in (first, second):
        local = close.astimezone(zone)
        assert local.day == day  # the invoice day, in the account's zone
        assert (close - timedelta(microseconds=1)).astimezone(zone).date() < local.date()  # its first instant
    months = (second.astimezone(zone).year * 12 + second.astimezone(zone).month) - \
        (first.astimezone(zone).year * 12 + first.astimezone(zone).month)
    assert months == 1  # a DST change neither skips a month nor closes one twice
    assert (first - start) <= timedelta(days=32)


def test_invoice_day_outside_1_to_28_is_refused() -> None:
    with pytest.raises(ValueError, match=r"1\.\.28"):
        close_after(datetime(2026, 1, 1, tzinfo=UTC), 29, "UTC")
