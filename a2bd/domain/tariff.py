"""Tariffs in memory: longest-prefix match, time-of-day and date aware, in a few dictionary probes.

A tariff maps destination prefixes to one or more RateEntry: one per carrier (provider) that can take
the call and per time window. The customer pays one price per destination and window whatever carrier
is used (the import refuses rows that disagree), so the sell rate of a match is the same on every route.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import NamedTuple

from a2bd.domain.rating import SellRate

WEEK_MINUTES = 7 * 24 * 60  # windows are minutes since Monday 00:00, 0..10079, as in A2Billing


@dataclass(frozen=True, slots=True)
class BuyRate:
    """What the carrier charges us, for ordering routes and for the provider's balance."""

    rate_per_min_micro: int = 0
    initial_block_s: int = 0
    increment_s: int = 1


class RateEntry(NamedTuple):
    """One row of a rate card. A NamedTuple, not a frozen dataclass: a tariff holds a million of these and
    one is built three times faster (bench/tariff_lookup.py prints both)."""

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


class Match(NamedTuple):
    """The rate found for a destination: the sell price and the carriers able to take it (a NamedTuple
    for the same reason as RateEntry: one per prefix)."""

    prefix: str
    destination: str
    sell: SellRate
    entries: tuple[RateEntry, ...]  # every active entry of the matched prefix


def _always_active(entry: RateEntry) -> bool:
    return (entry.week_start_min, entry.week_end_min) == (0, WEEK_MINUTES - 1) and (
        entry.start_date is None and entry.stop_date is None
    )


def _key(prefix: str) -> int:
    # A leading 1 keeps "044" and "44" apart; a shorter prefix of the same number is then key // 10.
    return int("1" + prefix)


@dataclass(slots=True)
class Tariff:
    """One tariff (rate card). Build with `Tariff.build(name, entries)`; read-only afterwards.

    `index` maps each prefix (as an int key, see _key) to its Match when every entry of the prefix is
    active at all times (nearly all of a real card: built once, returned as is), or to its entries when
    some have a time window or dates (filtered at lookup). A lookup probes the number's prefixes from
    the longest with one integer division each: a few dictionary probes, no string slicing.
    """

    name: str
    index: dict[int, Match | tuple[RateEntry, ...]] = field(default_factory=dict)
    max_prefix_len: int = 0

    @classmethod
    def build(cls, name: str, entries: Iterable[RateEntry]) -> Tariff:
        """Group `entries` by prefix, keeping their order (the first one names the destination)."""
        grouped: dict[str, list[RateEntry]] = {}
        for entry in entries:
            group = grouped.get(entry.prefix)
            if group is None:
                grouped[entry.prefix] = [entry]
            else:
                group.append(entry)
        index: dict[int, Match | tuple[RateEntry, ...]] = {}
        longest = 0
        for prefix, group in grouped.items():
            first = group[0]
            if all(_always_active(e) for e in group):
                index[_key(prefix)] = Match(prefix, first.destination, first.sell, tuple(group))
            else:
                index[_key(prefix)] = tuple(group)
            longest = max(longest, len(prefix))
        return cls(name=name, index=index, max_prefix_len=longest)

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, number: str, at: datetime) -> Match | None:
        """The longest prefix of `number` (ASCII digits) with an entry active at `at` (the account's
        local time); None when nothing matches or `number` is not ASCII digits."""
        if not (number.isascii() and number.isdigit()):
            return None  # int() would read other scripts' digits as 0-9
        probe = self.index.get
        key = _key(number[: self.max_prefix_len])
        while key > 1:
            found = probe(key)
            if found is not None:
                if isinstance(found, Match):
                    return found
                minute, day = minute_of_week(at), at.date()
                active = tuple(e for e in found if e.active_at(minute, day))
                if active:
                    first = active[0]
                    return Match(first.prefix, first.destination, first.sell, active)
            key //= 10
        return None


@dataclass(frozen=True, slots=True)
class TariffBook:
    """Every tariff a daemon holds, by name. Replaced whole on reload (readers never see half a load)."""

    tariffs: Mapping[str, Tariff] = field(default_factory=dict)

    def get(self, name: str) -> Tariff | None:
        return self.tariffs.get(name)
