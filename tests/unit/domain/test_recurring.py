"""Renewal dates, expiry and reminders: tables of cases (each instant written out in UTC and in local time),
then properties over many zones, including those whose DST change skips or repeats midnight."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from a2bd.domain.recurring import (
    advance,
    day_start,
    expires_at_for,
    first_charge_at,
    local_date,
    next_renewal,
    period_dates,
    reminder_due,
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def local(tz: str, *args: int) -> datetime:
    return datetime(*args, tzinfo=ZoneInfo(tz)).astimezone(UTC)  # type: ignore[misc]


# -- next_renewal -------------------------------------------------------------------------------------

NEXT = [
    # (current, period, every, anchor, tz, expected)
    pytest.param(utc(2026, 1, 31), "month", 1, 31, "UTC", utc(2026, 2, 28), id="anchor-31-clamps-to-feb-28"),
    pytest.param(utc(2026, 2, 28), "month", 1, 31, "UTC", utc(2026, 3, 31), id="anchor-31-back-in-march"),
    pytest.param(utc(2024, 1, 31), "month", 1, 31, "UTC", utc(2024, 2, 29), id="leap-february"),
    pytest.param(utc(2026, 3, 31), "month", 1, 31, "UTC", utc(2026, 4, 30), id="30-day-month"),
    pytest.param(utc(2026, 2, 28), "month", 1, 30, "UTC", utc(2026, 3, 30), id="anchor-30-after-feb"),
    pytest.param(utc(2026, 11, 30), "month", 3, 30, "UTC", utc(2027, 2, 28), id="quarterly-over-new-year"),
    pytest.param(utc(2026, 12, 15), "month", 1, 15, "UTC", utc(2027, 1, 15), id="december-to-january"),
    pytest.param(utc(2026, 11, 15, 14, 30), "month", 1, 15, "UTC", utc(2026, 12, 15), id="mid-day-current"),
    pytest.param(utc(2026, 11, 15), "month", 1, 1, "UTC", utc(2026, 12, 1), id="off-anchor-current"),
    pytest.param(utc(2026, 11, 2), "week", 1, 2, "UTC", utc(2026, 11, 9), id="weekly"),
    pytest.param(utc(2026, 12, 28), "week", 2, 28, "UTC", utc(2027, 1, 11), id="fortnightly-over-new-year"),
    pytest.param(utc(2026, 11, 30), "day", 1, 30, "UTC", utc(2026, 12, 1), id="daily"),
    pytest.param(utc(2024, 2, 29), "year", 1, 29, "UTC", utc(2025, 2, 28), id="yearly-leap-day-clamps"),
    pytest.param(utc(2027, 2, 28), "year", 1, 29, "UTC", utc(2028, 2, 29), id="yearly-leap-day-kept"),
    pytest.param(utc(2026, 6, 10), "year", 2, 10, "UTC", utc(2028, 6, 10), id="every-two-years"),
    # Rome: midnight is 23:00 UTC in winter, 22:00 UTC in summer.
    pytest.param(local("Europe/Rome", 2026, 11, 1), "month", 1, 1, "Europe/Rome", utc(2026, 11, 30, 23),
                 id="rome-winter"),
    pytest.param(utc(2026, 9, 30, 22), "month", 1, 1, "Europe/Rome", utc(2026, 10, 31, 23), id="rome-over-dst-end"),
    # Los Angeles: a 23-hour and a 25-hour day.
    pytest.param(utc(2026, 3, 8, 8), "day", 1, 8, "America/Los_Angeles", utc(2026, 3, 9, 7), id="la-spring-23h"),
    pytest.param(utc(2026, 11, 1, 7), "day", 1, 1, "America/Los_Angeles", utc(2026, 11, 2, 8), id="la-fall-25h"),
    pytest.param(utc(2026, 2, 28, 8), "month", 1, 31, "America/Los_Angeles", utc(2026, 3, 31, 7),
                 id="la-monthly-over-dst"),
    # Auckland (+12 standard, +13 summer; DST from the last Sunday of September to the first of April).
    pytest.param(utc(2026, 9, 26, 12), "day", 1, 27, "Pacific/Auckland", utc(2026, 9, 27, 11),
                 id="auckland-spring-23h"),
    pytest.param(utc(2026, 4, 4, 11), "day", 1, 5, "Pacific/Auckland", utc(2026, 4, 5, 12), id="auckland-fall-25h"),
    pytest.param(utc(2026, 3, 30, 11), "month", 1, 31, "Pacific/Auckland", utc(2026, 4, 29, 12),
                 id="auckland-anchor-31-into-april"),
    # Midnight skipped by DST: the renewal is the first instant of the day (local 01:00), not the day before.
    pytest.param(utc(2023, 9, 2, 4), "day", 1, 2, "America/Santiago", utc(2023, 9, 3, 4), id="santiago-no-midnight"),
    pytest.param(utc(2023, 9, 3, 4), "day", 1, 3, "America/Santiago", utc(2023, 9, 4, 3), id="santiago-day-after"),
    pytest.param(utc(2024, 2, 10, 5), "month", 1, 10, "America/Havana", utc(2024, 3, 10, 5), id="havana-no-midnight"),
    # Beirut springs forward at 00:00 on 2024-03-31: 22:00 UTC the day before is already 01:00 on the 31st.
    pytest.param(utc(2024, 3, 30, 22), "day", 1, 31, "Asia/Beirut", utc(2024, 3, 31, 21), id="beirut-no-midnight"),
    # Midnight repeated (Havana sets the clock back from 01:00 to 00:00): its first occurrence, once.
    pytest.param(utc(2024, 11, 2, 4), "day", 1, 2, "America/Havana", utc(2024, 11, 3, 4), id="havana-double-midnight"),
    pytest.param(utc(2024, 11, 3, 4), "day", 1, 3, "America/Havana", utc(2024, 11, 4, 5), id="havana-after-double"),
    # A day that does not exist at all (Samoa crossed the date line): the next day that does.
    pytest.param(utc(2011, 12, 29, 10), "day", 1, 29, "Pacific/Apia", utc(2011, 12, 30, 10), id="apia-skipped-day"),
]


@pytest.mark.parametrize(("current", "period", "every", "anchor", "tz", "expected"), NEXT)
def test_next_renewal(current: datetime, period: str, every: int, anchor: int, tz: str, expected: datetime) -> None:
    got = next_renewal(current, period, every, anchor, tz)
    assert got == expected
    assert got.tzinfo is UTC


def test_next_renewal_accepts_a_zoneinfo_and_any_aware_current() -> None:
    rome = ZoneInfo("Europe/Rome")
    current = datetime(2026, 11, 1, tzinfo=rome)
    assert next_renewal(current, "month", 1, 1, rome) == utc(2026, 11, 30, 23)


# -- day_start ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("day", "tz", "expected"), [
    (date(2026, 11, 1), "UTC", utc(2026, 11, 1)),
    (date(2026, 7, 1), "Europe/Rome", utc(2026, 6, 30, 22)),
    (date(2023, 9, 3), "America/Santiago", utc(2023, 9, 3, 4)),   # 00:00 skipped: starts at 01:00 -03
    (date(2024, 4, 7), "America/Santiago", utc(2024, 4, 7, 4)),   # clock set back at "24:00": midnight once
    (date(2024, 3, 31), "Asia/Beirut", utc(2024, 3, 30, 22)),     # 00:00 skipped: starts at 01:00 +03
    (date(2018, 11, 4), "America/Sao_Paulo", utc(2018, 11, 4, 3)),
    (date(2024, 11, 3), "America/Havana", utc(2024, 11, 3, 4)),   # 00:00 twice: the first
    (date(2011, 12, 30), "Pacific/Apia", utc(2011, 12, 30, 10)),  # no such day: Dec 31 00:00 +14
])
def test_day_start(day: date, tz: str, expected: datetime) -> None:
    assert day_start(day, tz) == expected


# -- first_charge_at ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("start", "period", "anchor", "tz", "expected"), [
    pytest.param(utc(2026, 11, 15, 14), "month", 15, "UTC", utc(2026, 11, 15), id="anchor-day-starts-at-midnight"),
    pytest.param(utc(2026, 11, 15, 14), "month", 1, "UTC", utc(2026, 12, 1), id="next-anchor"),
    pytest.param(utc(2026, 11, 15, 14), "month", 20, "UTC", utc(2026, 11, 20), id="anchor-later-this-month"),
    pytest.param(utc(2026, 2, 10), "month", 31, "UTC", utc(2026, 2, 28), id="anchor-clamped"),
    pytest.param(utc(2026, 3, 15), "year", 10, "UTC", utc(2027, 3, 10), id="yearly-next-year"),
    pytest.param(utc(2026, 3, 5), "year", 10, "UTC", utc(2026, 3, 10), id="yearly-this-year"),
    pytest.param(utc(2026, 11, 15, 14), "day", 3, "UTC", utc(2026, 11, 15), id="daily-ignores-anchor"),
    pytest.param(utc(2026, 11, 15, 14), "week", 3, "UTC", utc(2026, 11, 15), id="weekly-ignores-anchor"),
    pytest.param(utc(2026, 10, 31, 23, 30), "month", 1, "Europe/Rome", utc(2026, 10, 31, 23),
                 id="local-day-not-utc-day"),
    pytest.param(utc(2023, 9, 3, 12), "day", 3, "America/Santiago", utc(2023, 9, 3, 4), id="day-without-midnight"),
])
def test_first_charge_at(start: datetime, period: str, anchor: int, tz: str, expected: datetime) -> None:
    assert first_charge_at(start, period, 1, anchor, tz) == expected


@pytest.mark.parametrize(("start", "end", "tz", "expected"), [
    (utc(2026, 11, 1), utc(2026, 12, 1), "UTC", (date(2026, 11, 1), date(2026, 11, 30))),
    (utc(2026, 10, 31, 23), utc(2026, 11, 30, 23), "Europe/Rome", (date(2026, 11, 1), date(2026, 11, 30))),
    (utc(2026, 11, 1), utc(2026, 11, 2), "UTC", (date(2026, 11, 1), date(2026, 11, 1))),
])
def test_period_dates(start: datetime, end: datetime, tz: str, expected: tuple[date, date]) -> None:
    assert period_dates(start, end, tz) == expected


@pytest.mark.parametrize(("call", "message"), [
    (lambda: next_renewal(datetime(2026, 1, 1), "month", 1, 1, "UTC"), "timezone-aware"),
    (lambda: next_renewal(utc(2026, 1, 1), "fortnight", 1, 1, "UTC"), "period must be one of"),
    (lambda: next_renewal(utc(2026, 1, 1), "month", 0, 1, "UTC"), "every must be at least 1"),
    (lambda: next_renewal(utc(2026, 1, 1), "month", 1, 32, "UTC"), "anchor_day"),
    (lambda: first_charge_at(utc(2026, 1, 1), "month", 1, 0, "UTC"), "anchor_day"),
    (lambda: advance(date(2026, 1, 1), "hour", 1, 1), "period must be one of"),
    (lambda: expires_at_for("soon", 3, utc(2026, 1, 1), None, None), "expiry mode"),
    (lambda: expires_at_for("after_creation", -1, utc(2026, 1, 1), None, None), "0 or more"),
    (lambda: reminder_due(datetime(2026, 1, 1), utc(2026, 1, 2), 1, None), "timezone-aware"),
])
def test_refusals(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


# -- expiry -------------------------------------------------------------------------------------------

CREATED = utc(2026, 1, 10, 9, 30)
FIRST_USE = utc(2026, 2, 1, 18, 45)
FIXED = utc(2026, 12, 31, 23)


@pytest.mark.parametrize(("mode", "days", "first_use", "fixed", "expected"), [
    ("none", 30, FIRST_USE, FIXED, None),
    ("date", 30, FIRST_USE, FIXED, FIXED),
    ("date", 0, None, None, None),
    ("after_first_use", 30, FIRST_USE, FIXED, utc(2026, 3, 3, 18, 45)),
    ("after_first_use", 30, None, FIXED, None),            # not used yet
    ("after_first_use", 0, FIRST_USE, None, None),          # 0 days: no expiry, as A2Billing
    ("after_creation", 30, None, None, utc(2026, 2, 9, 9, 30)),
    ("after_creation", 365, FIRST_USE, FIXED, utc(2027, 1, 10, 9, 30)),
    ("after_creation", 0, None, FIXED, None),
])
def test_expires_at_for(mode: str, days: int, first_use: datetime | None, fixed: datetime | None,
                        expected: datetime | None) -> None:
    assert expires_at_for(mode, days, CREATED, first_use, fixed) == expected


def test_expiry_days_are_24_hours_across_dst() -> None:
    created = local("Europe/Rome", 2026, 3, 28, 12)  # the clocks go forward on the 29th
    assert expires_at_for("after_creation", 2, created, None, None) == created + timedelta(hours=48)


# -- reminders ----------------------------------------------------------------------------------------

RENEWAL = utc(2026, 12, 1)


@pytest.mark.parametrize(("now", "days", "reminded_for", "due"), [
    (utc(2026, 11, 23), 7, None, False),              # 8 days before: too early
    (utc(2026, 11, 24), 7, None, True),               # exactly 7 days before
    (utc(2026, 11, 30, 23, 59), 7, None, True),
    (utc(2026, 12, 1), 7, None, False),               # the renewal itself is the charge, not a reminder
    (utc(2026, 11, 28), 7, RENEWAL, False),           # recorded already for this renewal
    (utc(2026, 11, 28), 7, utc(2026, 11, 1), True),   # recorded for the previous one
    (utc(2026, 11, 30), 0, None, False),              # reminders off
])
def test_reminder_due(now: datetime, days: int, reminded_for: datetime | None, due: bool) -> None:
    assert reminder_due(now, RENEWAL, days, reminded_for) is due


# -- properties ---------------------------------------------------------------------------------------

ZONES = ("UTC", "Pacific/Auckland", "America/Los_Angeles", "Europe/Rome", "America/Santiago", "America/Havana",
         "Asia/Beirut", "Australia/Lord_Howe", "Pacific/Apia", "Asia/Kolkata", "Pacific/Chatham")
MIDNIGHT_ALWAYS = ("UTC", "Pacific/Auckland", "America/Los_Angeles", "Europe/Rome", "Asia/Kolkata")

instants = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1),
                        timezones=st.just(UTC))
periods = st.sampled_from(("day", "week", "month", "year"))
anchors = st.integers(1, 31)
everys = st.integers(1, 13)


def schedule(start: datetime, period: str, every: int, anchor: int, tz: str, n: int) -> list[datetime]:
    out = [first_charge_at(start, period, every, anchor, tz)]
    for _ in range(n - 1):
        out.append(next_renewal(out[-1], period, every, anchor, tz))
    return out


def is_day_start(at: datetime, tz: str) -> bool:
    """`at` is the first instant of its local day: one microsecond earlier it was an earlier day."""
    return local_date(at - timedelta(microseconds=1), tz) < local_date(at, tz)


@given(instants, periods, everys, anchors, st.sampled_from(ZONES))
def test_renewals_strictly_increase_and_start_a_day(start: datetime, period: str, every: int, anchor: int,
                                                   tz: str) -> None:
    renewals = schedule(start, period, every, anchor, tz, 30)
    assert all(a < b for a, b in pairwise(renewals))
    assert all(is_day_start(r, tz) for r in renewals)
    assert renewals[0] < start + timedelta(days=366)
    assert local_date(renewals[0], tz) >= local_date(start, tz)


@given(instants, st.sampled_from(("month", "year")), everys, anchors, st.sampled_from(ZONES))
def test_anchor_day_is_kept_across_months(start: datetime, period: str, every: int, anchor: int, tz: str) -> None:
    import calendar

    for r in schedule(start, period, every, anchor, tz, 30):
        day = local_date(r, tz)
        if tz == "Pacific/Apia" and day == date(2011, 12, 31):
            continue  # 2011-12-30 did not exist there (Samoa crossed the date line): the next day that did
        assert day.day == min(anchor, calendar.monthrange(day.year, day.month)[1])


@given(instants, periods, everys, anchors, st.sampled_from(MIDNIGHT_ALWAYS))
def test_every_renewal_is_local_midnight(start: datetime, period: str, every: int, anchor: int, tz: str) -> None:
    for r in schedule(start, period, every, anchor, tz, 30):
        assert r.astimezone(ZoneInfo(tz)).time() == time(0)


@given(instants, st.integers(1, 3), st.sampled_from(("Pacific/Auckland", "America/Los_Angeles")))
def test_daily_renewals_are_23_24_or_25_hours_apart_and_skip_no_day(start: datetime, every: int, tz: str) -> None:
    renewals = schedule(start, "day", every, 1, tz, 400)
    for a, b in pairwise(renewals):
        assert local_date(b, tz) - local_date(a, tz) == timedelta(days=every)
        assert b - a in {timedelta(hours=24 * every + h) for h in (-1, 0, 1)}


@given(instants, periods, everys, anchors, st.sampled_from(ZONES))
def test_next_renewal_depends_only_on_the_local_day(at: datetime, period: str, every: int, anchor: int,
                                                    tz: str) -> None:
    got = next_renewal(at, period, every, anchor, tz)
    assert got > at
    assert got == next_renewal(day_start(local_date(at, tz), tz), period, every, anchor, tz)


@given(instants, st.integers(1, 365), st.integers(0, 400 * 86_400))
def test_one_reminder_per_renewal(renewal: datetime, days: int, before_s: int) -> None:
    now = renewal - timedelta(seconds=before_s)
    due = reminder_due(now, renewal, days, None)
    assert due == (0 < before_s <= days * 86_400)
    assert not reminder_due(now, renewal, days, renewal)  # once recorded, never again for this renewal


@given(instants, st.integers(1, 3650))
def test_relative_expiry_is_whole_days_after_its_base(base: datetime, days: int) -> None:
    assert expires_at_for("after_creation", days, base, None, None) == base + timedelta(days=days)
    assert expires_at_for("after_first_use", days, base - timedelta(days=9), base, None) == base + timedelta(days=days)
