"""Tariffs in memory: longest-prefix match, time-of-day and date aware, in a few dictionary probes.

A tariff maps destination prefixes to one or more RateEntry: one per carrier (provider) that can take
the call and per time window. The customer pays one price per destination and window whatever carrier
is used (the import refuses rows that disagree), so the sell rate of a match is the same on every route.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime

from a2bd.domain.rating import SellRate

WEEK_MINUTES = 7 * 24 * 60  # windows are minutes since Monday 00:00, 0..10079, as in A2Billing


@dataclass(frozen=True, slots=True)
class BuyRate:
    """What the carrier charges us, for ordering routes and for the provider's balance."""

    rate_per_min_micro: int = 0
    initial_block_s: int = 0
    increment_s: int = 1


@dataclass(frozen=True, slots=True)
class RateEntry:
    prefix: str
    destination: str
    sell: SellRate
    provider: str | None = None
    buy: BuyRate = BuyRate()
    week_start_min: int = 0
    week_end_min: int = WEEK_MINUTES - 1  # inclusive
    start_date: date | None = None
    stop_date: date | None = None  # inclusive

    def active_at(self, minute_of_week: int, day: date) -> bool:
        if self.start_date is not None and day < self.start_date:
            return False
        if self.stop_date is not None and day > self.stop_date:
            return False
        if self.week_start_min <= self.week_end_min:
            return self.week_start_min <= minute_of_week <= self.week_end_min
        # A window that wraps past Sunday midnight (Friday 18:00 .. Monday 08:00).
        return minute_of_week >= self.week_start_min or minute_of_week <= self.week_end_min


def minute_of_week(at: datetime) -> int:
    """Minutes since Monday 00:00 of the wall-clock time `at` (already in the account's time zone)."""
    return at.weekday() * 1440 + at.hour * 60 + at.minute


@dataclass(frozen=True, slots=True)
class Match:
    """The rate found for a destination: the sell price and the carriers able to take it."""

    prefix: str
    destination: str
    sell: SellRate
    entries: tuple[RateEntry, ...]  # every active entry of the matched prefix


@dataclass(slots=True)
class Tariff:
    """One tariff (rate card). Build with `Tariff.build(name, entries)`; read-only afterwards."""

    name: str
    by_prefix: dict[str, tuple[RateEntry, ...]] = field(default_factory=dict)
    max_prefix_len: int = 0

    @classmethod
    def build(cls, name: str, entries: Iterable[RateEntry]) -> Tariff:
        grouped: dict[str, list[RateEntry]] = {}
        for entry in entries:
            grouped.setdefault(entry.prefix, []).append(entry)
        by_prefix = {prefix: tuple(group) for prefix, group in grouped.items()}
        longest = max((len(p) for p in by_prefix), default=0)
        return cls(name=name, by_prefix=by_prefix, max_prefix_len=longest)

    def __len__(self) -> int:
        return len(self.by_prefix)

    def lookup(self, number: str, at: datetime) -> Match | None:
        """The longest prefix of `number` with an entry active at `at` (the account's local time)."""
        minute = minute_of_week(at)
        day = at.date()
        probe = self.by_prefix.get
        for length in range(min(len(number), self.max_prefix_len), 0, -1):
            candidates = probe(number[:length])
            if candidates is None:
                continue
            active = tuple(e for e in candidates if e.active_at(minute, day))
            if active:
                first = active[0]
                return Match(first.prefix, first.destination, first.sell, active)
        return None


@dataclass(frozen=True, slots=True)
class TariffBook:
    """Every tariff a daemon holds, by name. Replaced whole on reload (readers never see half a load)."""

    tariffs: Mapping[str, Tariff] = field(default_factory=dict)

    def get(self, name: str) -> Tariff | None:
        return self.tariffs.get(name)
