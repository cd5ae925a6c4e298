"""tariff: longest-prefix lookup, aware of the minute of the week and of start/stop dates."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from a2bd.domain.rating import SellRate
from a2bd.domain.tariff import WEEK_MINUTES, BuyRate, RateEntry, Tariff, TariffBook, minute_of_week

DAY = 1440
FRI_1800 = 4 * DAY + 18 * 60  # 6840
MON_0800 = 8 * 60  # 480


def sell(rate: int) -> SellRate:
    return SellRate(rate_per_min_micro=rate)


def entry(prefix: str, rate: int, **kwargs: object) -> RateEntry:
    return RateEntry(prefix=prefix, destination=f"dest {prefix}", sell=sell(rate), **kwargs)  # type: ignore[arg-type]


# 2025-03-03 is a Monday.
def at(day: int, hour: int = 12, minute: int = 0, *, month: int = 3) -> datetime:
    return datetime(2025, month, day, hour, minute)


@pytest.mark.parametrize(
    ("when", "minute"),
    [
        (datetime(2025, 3, 3, 0, 0), 0),  # Monday 00:00
        (datetime(2025, 3, 3, 0, 0, 59), 0),
        (datetime(2025, 3, 3, 8, 0), 480),
        (datetime(2025, 3, 5, 12, 30), 2 * DAY + 750),  # Wednesday
        (datetime(2025, 3, 7, 18, 0), FRI_1800),
        (datetime(2025, 3, 9, 23, 59), WEEK_MINUTES - 1),  # Sunday 23:59 = 10079
        (datetime(2025, 3, 9, 23, 59, tzinfo=timezone(timedelta(hours=-5))), 10079),  # its own wall clock
    ],
)
def test_minute_of_week(when: datetime, minute: int) -> None:
    assert minute_of_week(when) == minute


RETAIL = [
    entry("1", 10_000),
    entry("44", 20_000),
    entry("447", 70_000),
    entry("4479", 79_000),
    entry("33", 30_000),
    entry("331", 31_000),
]
PREFIXES = Tariff.build("retail", RETAIL)


@pytest.mark.parametrize(
    ("number", "prefix"),
    [
        ("4479123456", "4479"),  # the longest prefix wins
        ("447123456", "447"),
        ("4412345", "44"),
        ("44", "44"),  # exactly the prefix
        ("4", None),  # shorter than every prefix that could match
        ("", None),
        ("4479", "4479"),
        ("331", "331"),
        ("33", "33"),
        ("3", None),
        ("12125551234", "1"),
        ("99", None),
        ("0044", None),  # no normalization here: the caller passes digits in international form
    ],
)
def test_longest_prefix_wins(number: str, prefix: str | None) -> None:
    match = PREFIXES.lookup(number, at(5))
    if prefix is None:
        assert match is None
    else:
        assert match is not None
        assert match.prefix == prefix
        assert match.destination == f"dest {prefix}"
        assert match.sell == next(e.sell for e in RETAIL if e.prefix == prefix)


def test_build_groups_by_prefix_and_measures_the_longest() -> None:
    assert len(PREFIXES) == 6
    assert PREFIXES.max_prefix_len == 4
    assert Tariff.build("empty", []).max_prefix_len == 0
    assert Tariff.build("empty", []).lookup("44", at(5)) is None


class CountingDict(dict[int, object]):
    def __init__(self, contents: dict[int, object]) -> None:
        super().__init__(contents)
        self.probes: list[int] = []

    def get(self, key: int, default: object = None) -> object:  # type: ignore[override]
        self.probes.append(key)
        return super().get(key, default)


def test_lookup_probes_no_longer_than_max_prefix_len() -> None:
    tariff = Tariff.build("t", [entry("44", 1), entry("4420", 2)])
    probes = CountingDict(dict(tariff.index))
    tariff.index = probes  # type: ignore[assignment]
    match = tariff.lookup("442071234567890", at(5))
    assert match is not None and match.prefix == "4420"
    assert probes.probes == [14420]  # started at 4 digits, not 15 (keys carry a leading 1)

    probes.probes.clear()
    assert tariff.lookup("449", at(5)) is not None
    assert probes.probes == [1449, 144]  # a number shorter than max_prefix_len starts at its own length


def test_max_prefix_len_is_honoured() -> None:
    # A prefix longer than max_prefix_len is never probed (build sets it; this shows lookup obeys it).
    tariff = Tariff.build("t", [entry("44", 1), entry("44207", 2)])
    tariff.max_prefix_len = 3
    match = tariff.lookup("442071234", at(5))
    assert match is not None and match.prefix == "44"


def test_leading_zeros_are_distinct_prefixes() -> None:
    tariff = Tariff.build("t", [entry("44", 1), entry("044", 2), entry("0", 3)])
    assert [tariff.lookup(n, at(5)).prefix for n in ("4412", "04412", "0912")] == ["44", "044", "0"]  # type: ignore[union-attr]


@pytest.mark.parametrize("number", ["", "44a1", "\u0664\u0664123", "+4412", " 4412"])
def test_anything_but_ascii_digits_matches_nothing(number: str) -> None:
    # Arabic-Indic digits would read as 4412 through int(): they must not reach the index.
    assert Tariff.build("t", [entry("44", 1)]).lookup(number, at(5)) is None


WEEKDAYS = entry("44", 100, week_start_min=0, week_end_min=5 * DAY - 1)  # Monday 00:00 .. Friday 23:59
WEEKEND = entry("44", 50, week_start_min=5 * DAY, week_end_min=WEEK_MINUTES - 1)  # Saturday, Sunday
NIGHT = entry("33", 10, week_start_min=FRI_1800, week_end_min=MON_0800)  # wraps past Sunday midnight
DAYTIME = entry("33", 20, week_start_min=MON_0800 + 1, week_end_min=FRI_1800 - 1)
WINDOWS = Tariff.build("windows", [WEEKDAYS, WEEKEND, NIGHT, DAYTIME])


@pytest.mark.parametrize(
    ("number", "when", "rate"),
    [
        ("4412", at(3, 0, 0), 100),  # Monday 00:00
        ("4412", at(7, 23, 59), 100),  # Friday 23:59
        ("4412", at(8, 0, 0), 50),  # Saturday 00:00
        ("4412", at(9, 23, 59), 50),  # Sunday 23:59
        ("3312", at(7, 17, 59), 20),  # Friday 17:59: still day
        ("3312", at(7, 18, 0), 10),  # Friday 18:00: night begins
        ("3312", at(8, 12, 0), 10),  # Saturday
        ("3312", at(9, 23, 59), 10),  # Sunday 23:59
        ("3312", at(10, 0, 0), 10),  # Monday 00:00, past the wrap
        ("3312", at(10, 8, 0), 10),  # Monday 08:00: the end minute is inclusive
        ("3312", at(10, 8, 1), 20),  # Monday 08:01: day again
        ("3312", at(5, 12, 0), 20),  # Wednesday noon
    ],
)
def test_time_windows(number: str, when: datetime, rate: int) -> None:
    match = WINDOWS.lookup(number, when)
    assert match is not None
    assert match.sell.rate_per_min_micro == rate
    assert len(match.entries) == 1


@pytest.mark.parametrize(
    ("minute", "active"),
    [
        (FRI_1800 - 1, False),
        (FRI_1800, True),
        (WEEK_MINUTES - 1, True),
        (0, True),
        (MON_0800, True),
        (MON_0800 + 1, False),
        (3 * DAY, False),
    ],
)
def test_wrapping_window_active_at(minute: int, active: bool) -> None:
    assert NIGHT.active_at(minute, date(2025, 3, 5)) is active


JANUARY = entry("49", 5, start_date=date(2025, 1, 1), stop_date=date(2025, 1, 31))
FROM_FEBRUARY = entry("49", 6, start_date=date(2025, 2, 1))
UNTIL_2024 = entry("49", 4, stop_date=date(2024, 12, 31))
DATED = Tariff.build("dated", [UNTIL_2024, JANUARY, FROM_FEBRUARY])


@pytest.mark.parametrize(
    ("when", "rate"),
    [
        (datetime(2024, 6, 1, 12, 0), 4),
        (datetime(2024, 12, 31, 23, 59), 4),  # stop date inclusive
        (datetime(2025, 1, 1, 0, 0), 5),  # start date inclusive
        (datetime(2025, 1, 31, 23, 59), 5),
        (datetime(2025, 2, 1, 0, 0), 6),
        (datetime(2030, 1, 1, 0, 0), 6),  # no stop date: open-ended
    ],
)
def test_start_and_stop_dates_are_inclusive(when: datetime, rate: int) -> None:
    match = DATED.lookup("4930", when)
    assert match is not None
    assert match.sell.rate_per_min_micro == rate


def test_no_entry_active_on_the_day_means_no_match() -> None:
    only_january = Tariff.build("t", [JANUARY])
    assert only_january.lookup("4930", datetime(2025, 1, 15)) is not None
    assert only_january.lookup("4930", datetime(2024, 12, 31, 23, 59)) is None
    assert only_january.lookup("4930", datetime(2025, 2, 1)) is None


def test_falls_back_to_a_shorter_prefix_when_the_longest_is_inactive() -> None:
    tariff = Tariff.build(
        "t",
        [
            entry("44", 20_000),
            entry("447", 70_000),
            entry("4479", 79_000, start_date=date(2030, 1, 1)),  # not yet valid
            entry("44791", 80_000, week_start_min=5 * DAY, week_end_min=WEEK_MINUTES - 1),  # weekends only
        ],
    )
    weekday = tariff.lookup("447912345", at(5))
    assert weekday is not None and weekday.prefix == "447"
    weekend = tariff.lookup("447912345", at(8))
    assert weekend is not None and weekend.prefix == "44791"
    assert tariff.lookup("447912345", datetime(2030, 1, 2, 12)) is not None
    later = tariff.lookup("447922222", datetime(2030, 1, 2, 12))
    assert later is not None and later.prefix == "4479"


def test_match_carries_every_active_entry_of_the_prefix_only() -> None:
    price = sell(20_000)
    alpha = RateEntry("44", "UK", price, provider="alpha", buy=BuyRate(10_000))
    beta = RateEntry("44", "UK", price, provider="beta", buy=BuyRate(8_000))
    gamma_weekend = RateEntry(
        "44",
        "UK",
        price,
        provider="gamma",
        buy=BuyRate(1_000),
        week_start_min=5 * DAY,
        week_end_min=WEEK_MINUTES - 1,
    )
    delta_short = RateEntry("4", "Europe", sell(99), provider="delta")
    tariff = Tariff.build("t", [alpha, beta, gamma_weekend, delta_short])

    weekday = tariff.lookup("4412", at(5))
    assert weekday is not None
    assert weekday.entries == (alpha, beta)  # in file order; gamma is off on weekdays, delta is shorter
    weekend = tariff.lookup("4412", at(8))
    assert weekend is not None
    assert weekend.entries == (alpha, beta, gamma_weekend)
    assert weekend.sell is price


def test_tariff_book() -> None:
    book = TariffBook({"retail": PREFIXES})
    assert book.get("retail") is PREFIXES
    assert book.get("wholesale") is None
    assert TariffBook().get("retail") is None
