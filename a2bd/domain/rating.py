"""Rating: the cost of a call of d seconds, and its exact inverse, the longest call a credit pays for.

The rule follows A2Billing's rate card (so operators can import what they have), with its fault fixed:
A2Billing's call timeout ignores the initial block, so calls shorter than the block end in debt.

    billable(d) = 0                                  if d <= grace
                = max(d, initial block), rounded up to a whole number of increments past the block
    cost(d)     = 0                                  if d <= grace
                = max(connect + ceil(billable(d) * rate_per_min / 60) + disconnect, minimal cost)

Durations are whole seconds (Asterisk's BillableSeconds is floor(end - answer)). All money is integer
micro-units. There is exactly one rounding, to the micro-unit and upward (in the operator's favour), of
the time charge of the whole call: the operator never under-bills by a fraction of a micro-unit, and the
customer pays at most one micro-unit more than the exact price.
"""

from __future__ import annotations

from dataclasses import dataclass

from a2bd.domain.money import ceil_div


@dataclass(frozen=True, slots=True)
class SellRate:
    """What the customer pays for one destination. Money in micro-units, times in seconds."""

    rate_per_min_micro: int
    connect_micro: int = 0
    disconnect_micro: int = 0
    initial_block_s: int = 0
    increment_s: int = 1
    grace_s: int = 0
    min_cost_micro: int = 0

    def __post_init__(self) -> None:
        if self.rate_per_min_micro < 0 or self.connect_micro < 0 or self.disconnect_micro < 0:
            raise ValueError("rates and charges must not be negative")
        if self.min_cost_micro < 0:
            raise ValueError("minimal cost must not be negative")
        if self.initial_block_s < 0 or self.grace_s < 0:
            raise ValueError("initial block and grace must not be negative")
        if self.increment_s < 1:
            raise ValueError("billing increment must be at least 1 second")


def billable_s(rate: SellRate, duration_s: int) -> int:
    """Seconds charged for a call that lasted `duration_s` answered seconds."""
    if duration_s <= rate.grace_s:
        return 0
    if duration_s <= rate.initial_block_s:
        return rate.initial_block_s
    past = duration_s - rate.initial_block_s
    return rate.initial_block_s + ceil_div(past, rate.increment_s) * rate.increment_s


def cost_micro(rate: SellRate, duration_s: int) -> int:
    """Price in micro-units of a call of `duration_s` answered seconds (0 within the grace)."""
    billable = billable_s(rate, duration_s)
    if billable == 0:
        return 0
    charge = rate.connect_micro + ceil_div(billable * rate.rate_per_min_micro, 60) + rate.disconnect_micro
    return max(charge, rate.min_cost_micro)


def cost_with_free_micro(rate: SellRate, duration_s: int, free_s: int) -> tuple[int, int]:
    """(price, seconds covered) of a call when up to `free_s` seconds of a free-minute package are left.

    The package covers the call's billable seconds first. A call it covers whole costs nothing (no
    connection charge either); a call it covers in part pays the rest at the rate, with the connection and
    disconnection charges and the minimal cost, the remainder rounded up to the micro-unit once:

        covered = min(free_s, billable(d));  rest = billable(d) - covered
        price   = cost(d)                                          if covered = 0
                = 0                                                if rest = 0
                = max(connect + ceil(rest × rate / 60) + disconnect, minimal cost)   otherwise
    """
    billable = billable_s(rate, duration_s)
    covered = min(max(free_s, 0), billable)
    if covered == 0:
        return cost_micro(rate, duration_s), 0
    rest = billable - covered
    if rest == 0:
        return 0, covered
    charge = rate.connect_micro + ceil_div(rest * rate.rate_per_min_micro, 60) + rate.disconnect_micro
    return max(charge, rate.min_cost_micro), covered


def first_block_micro(rate: SellRate) -> int:
    """Price of the shortest call that is billed at all (grace + 1 s): what any answered call costs."""
    return cost_micro(rate, rate.grace_s + 1)


def max_duration_s(rate: SellRate, credit_micro: int, cap_s: int) -> int:
    """The longest call, in whole seconds, whose cost fits `credit_micro`, at most `cap_s`.

    Exactly the inverse of cost_micro: cost(result) <= credit < cost(result + increment) unless capped.
    A result <= grace means the credit pays for no billed second (the caller gets NOFUNDS).
    """
    if credit_micro < first_block_micro(rate):
        return min(rate.grace_s, cap_s)
    if rate.rate_per_min_micro == 0:
        return cap_s  # the price does not grow with time
    budget = credit_micro - rate.connect_micro - rate.disconnect_micro
    # ceil(b * r / 60) <= budget  <=>  b * r <= 60 * budget, for an integer budget
    max_billable = (60 * budget) // rate.rate_per_min_micro
    # The first billed block fits (checked above), so max_billable >= initial block. Any larger
    # billable value is block + k * increment, and the longest call with that billable lasts exactly it.
    whole = (max_billable - rate.initial_block_s) // rate.increment_s
    longest = rate.initial_block_s + whole * rate.increment_s
    return min(max(longest, rate.grace_s), cap_s)
