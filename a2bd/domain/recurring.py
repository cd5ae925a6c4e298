"""Recurring charges and account expiry, as date arithmetic: when a service renews, which local days a charge
covers, when an account expires, when a renewal reminder is due.

Pure: no clock, no I/O. Instants are timezone-aware `datetime`s (naive ones are refused) and are returned in
UTC; calendar reasoning happens in the account's time zone (an IANA name or a `ZoneInfo`). A service
renews at the start of a local day: local midnight, or, on a day whose midnight a DST change skips, the
first instant of that day (never the day before, never twice).

Periods are 'day', 'week' (7 local days), 'month' and 'year', taken `every` times. Monthly and yearly
services keep an anchor day of the month: a service anchored on the 31st renews on Feb 28 (29 in a leap
year), then on Mar 31 again: the anchor is kept, never drifted to the clamped day. Day counts of expiry
and reminders are 24-hour days.
"""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal, get_args
from zoneinfo import ZoneInfo

Period = Literal["day", "week", "month", "year"]
PERIODS: tuple[str, ...] = get_args(Period)

ExpiryMode = Literal["none", "date", "after_first_use", "after_creation"]
EXPIRY_MODES: tuple[str, ...] = get_args(ExpiryMode)


def zone(tz: ZoneInfo | str) -> ZoneInfo:
    """The time zone named `tz` (ZoneInfoNotFoundError, a KeyError, for an unknown name)."""
    return tz if isinstance(tz, ZoneInfo) else ZoneInfo(tz)


def _aware(name: str, at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {at.isoformat()}")
    return at


def _check(period: str, every: int, anchor_day: int) -> None:
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, not {period!r}")
    if every < 1:
        raise ValueError(f"every must be at least 1, not {every}")
    if not 1 <= anchor_day <= 31:
        raise ValueError(f"anchor_day must be a day of the month (1-31), not {anchor_day}")


def local_date(at: datetime, tz: ZoneInfo | str) -> date:
    """The calendar date in `tz` at the instant `at`."""
    return _aware("at", at).astimezone(zone(tz)).date()


def day_start(day: date, tz: ZoneInfo | str) -> datetime:
    """The first instant (UTC) whose local date in `tz` is `day` or later: local midnight when it exists.

    When a DST change skips midnight (America/Santiago, America/Havana, Asia/Beirut spring forward at
    00:00) it is the instant the clock jumps, i.e. local 01:00; when the whole day is skipped (Pacific/Apia,
    2011-12-30) it is the start of the next day. An ambiguous midnight (a clock set back to 00:00) is
    its first occurrence.
    """
    tzinfo = zone(tz)
    wall = datetime.combine(day, time(0), tzinfo=tzinfo)
    at = wall.astimezone(UTC)
    if at.astimezone(tzinfo).replace(tzinfo=None) == wall.replace(tzinfo=None):
        return at
    # Local midnight does not exist: bisect, to the second (zone transitions fall on whole seconds), between
    # an instant still on an earlier day and one already on `day` or later.
    def reached(seconds: int) -> bool:
        return datetime.fromtimestamp(seconds, UTC).astimezone(tzinfo).date() >= day

    hi = int(at.timestamp())
    while not reached(hi):  # defensive: fold=0 of a gap already reads later than the gap
        hi += 3600
    lo = int(wall.replace(fold=1).astimezone(UTC).timestamp())
    if reached(lo):
        lo = hi - 3 * 86_400
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if reached(mid):
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


def _clamped(year: int, month: int, anchor_day: int) -> date:
    return date(year, month, min(anchor_day, calendar.monthrange(year, month)[1]))


def advance(day: date, period: Period | str, every: int, anchor_day: int) -> date:
    """The local date `every` periods after `day`. Months and years land on `anchor_day`, clamped to the
    length of the month they land in; days and weeks ignore the anchor."""
    _check(period, every, anchor_day)
    if period == "day":
        return day + timedelta(days=every)
    if period == "week":
        return day + timedelta(days=7 * every)
    if period == "month":
        year, month0 = divmod(day.year * 12 + day.month - 1 + every, 12)
        return _clamped(year, month0 + 1, anchor_day)
    return _clamped(day.year + every, day.month, anchor_day)


def next_renewal(
    current: datetime, period: Period | str, every: int, anchor_day: int, tz: ZoneInfo | str
) -> datetime:
    """The next charge instant after `current` (UTC, strictly later than `current`).

    It is the start (`day_start`) of the local day `every` periods after `current`'s local day: for months
    the anchor day of the month `every` months later (clamped to its length), for years the anchor day of
    the same month `every` years later. Called on a renewal instant it gives the following one, so the
    schedule never drifts; called on any other instant (a resumption) it gives the renewal that follows
    from that instant's local day.
    """
    _aware("current", current)
    _check(period, every, anchor_day)
    return day_start(advance(local_date(current, tz), period, every, anchor_day), tz)


def first_charge_at(
    start: datetime, period: Period | str, every: int, anchor_day: int, tz: ZoneInfo | str
) -> datetime:
    """The instant (UTC) the first period of a service started at `start` begins: the start of the first local
    day on or after `start`'s local day that is on the schedule. Days and weeks begin on `start`'s day;
    months on the next anchor day (clamped) from it; years on the anchor day of `start`'s month, this
    year or the next. It may be a little before `start`: a service started at 14:00 on its anchor day
    begins that day at local midnight (the day is paid in full). `every` does not move the first period.
    """
    _aware("start", start)
    _check(period, every, anchor_day)
    day = local_date(start, tz)
    if period == "month":
        first = _clamped(day.year, day.month, anchor_day)
        if first < day:
            first = advance(day, "month", 1, anchor_day)
    elif period == "year":
        first = _clamped(day.year, day.month, anchor_day)
        if first < day:
            first = _clamped(day.year + 1, day.month, anchor_day)
    else:
        first = day
    return day_start(first, tz)


def period_dates(start: datetime, end: datetime, tz: ZoneInfo | str) -> tuple[date, date]:
    """The local dates a charge for [start, end) covers, both inclusive: (start's day, the day before end's).
    A one-day period gives the same date twice."""
    first = local_date(start, tz)
    last = local_date(end, tz) - timedelta(days=1)
    return first, max(first, last)


def expires_at_for(
    mode: ExpiryMode | str, days: int, created_at: datetime, first_use_at: datetime | None,
    fixed: datetime | None,
) -> datetime | None:
    """When an account expires under A2Billing's expiry modes; None: it does not (yet) expire.

    - 'none': never.
    - 'date': the fixed date the operator set (`fixed`, the account's expires_at).
    - 'after_first_use': `days` 24-hour days after the first call (None until there is one).
    - 'after_creation': `days` 24-hour days after the account was created.
    As in A2Billing, a day count of 0 sets no expiry in the two relative modes.
    """
    if days < 0:
        raise ValueError(f"expiry days must be 0 or more, not {days}")
    if mode == "none":
        return None
    if mode == "date":
        return None if fixed is None else _aware("fixed", fixed).astimezone(UTC)
    if mode == "after_first_use":
        if first_use_at is None or days == 0:
            return None
        return _aware("first_use_at", first_use_at).astimezone(UTC) + timedelta(days=days)
    if mode == "after_creation":
        return None if days == 0 else _aware("created_at", created_at).astimezone(UTC) + timedelta(days=days)
    raise ValueError(f"expiry mode must be one of {', '.join(EXPIRY_MODES)}, not {mode!r}")


def reminder_due(now: datetime, next_charge_at: datetime, reminder_days: int, reminded_for: datetime | None) -> bool:
    """True when a reminder of the renewal at `next_charge_at` should be recorded now: reminders are on
    (`reminder_days` > 0), the renewal is still ahead but at most `reminder_days` 24-hour days away, and no
    reminder was recorded for this very renewal (`reminded_for` is the renewal last reminded of)."""
    _aware("now", now)
    _aware("next_charge_at", next_charge_at)
    if reminder_days <= 0 or (reminded_for is not None and reminded_for == next_charge_at):
        return False
    return next_charge_at - timedelta(days=reminder_days) <= now < next_charge_at
