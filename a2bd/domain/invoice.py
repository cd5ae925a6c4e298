"""Invoice maths: taxes and their one rounding, the invoice day in an account's time zone, period totals.

Pure and synchronous. Money is integer micro-units; a rate is parts per million (200_000 = 20 %).

Tax rule (the only rounding an invoice makes). Per invoice, the lines are grouped by tax class and rate;
each group's net is the exact sum of its lines (a charge of 1.234567 stays 1.234567); its tax is
`net × rate`, rounded once to the cent (10,000 micro-units), half away from zero, so a credit note (a
negative net) mirrors an invoice. Gross = net + tax, exactly. Nothing is rounded per line.

A pre-paid account taxed at payment: a gross payment G at rate r carries the tax `G × r / (1 + r)` rounded
once to the cent the same way; the payment credits G and a tax line debits that tax, so the balance moves
by the net part.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from a2bd.domain.recurring import day_start

PPM = 1_000_000
CENT_MICRO = 10_000  # taxes are rounded to the cent


def _div_round_half_away(numerator: int, denominator: int) -> int:
    """numerator / denominator (denominator > 0) rounded to the nearest integer, halves away from zero."""
    quotient, remainder = divmod(abs(numerator), denominator)
    if 2 * remainder >= denominator:
        quotient += 1
    return quotient if numerator >= 0 else -quotient


def tax_on_net(net_micro: int, rate_ppm: int) -> int:
    """Tax on a net amount: net × rate, rounded once to the cent, halves away from zero."""
    if not 0 <= rate_ppm <= PPM:
        raise ValueError(f"tax rate {rate_ppm} ppm is not between 0 and 1,000,000")
    return _div_round_half_away(net_micro * rate_ppm, PPM * CENT_MICRO) * CENT_MICRO


def tax_in_gross(gross_micro: int, rate_ppm: int) -> int:
    """The tax contained in a gross amount: gross × rate / (1 + rate), rounded once to the cent."""
    if not 0 <= rate_ppm <= PPM:
        raise ValueError(f"tax rate {rate_ppm} ppm is not between 0 and 1,000,000")
    return _div_round_half_away(gross_micro * rate_ppm, (PPM + rate_ppm) * CENT_MICRO) * CENT_MICRO


def format_rate(rate_ppm: int) -> str:
    """A rate in parts per million as a percentage, exactly: 200000 -> "20%", 55000 -> "5.5%"."""
    whole, frac = divmod(rate_ppm, 10_000)
    return f"{whole}%" if frac == 0 else f"{whole}.{f'{frac:04d}'.rstrip('0')}%"


@dataclass(frozen=True, slots=True)
class TaxBase:
    """Net charges of one tax class at one rate (charges positive, credits negative)."""

    tax_class: str
    rate_ppm: int
    net_micro: int


@dataclass(frozen=True, slots=True)
class TaxRow:
    tax_class: str
    rate_ppm: int
    net_micro: int
    tax_micro: int

    @property
    def gross_micro(self) -> int:
        return self.net_micro + self.tax_micro


def invoice_taxes(bases: Iterable[TaxBase]) -> list[TaxRow]:
    """One row per (class, rate) with its tax rounded once; empty groups dropped; ordered by class, rate."""
    nets: dict[tuple[str, int], int] = {}
    for base in bases:
        key = (base.tax_class, base.rate_ppm)
        nets[key] = nets.get(key, 0) + base.net_micro
    return [
        TaxRow(tax_class, rate, net, tax_on_net(net, rate))
        for (tax_class, rate), net in sorted(nets.items())
        if net != 0
    ]


# -- the invoice day ---------------------------------------------------------------------------------

def close_after(after: datetime, invoice_day: int, tz: ZoneInfo | str) -> datetime:
    """The first instant strictly after `after` at which an account whose invoice day is `invoice_day`
    (1..28) closes its period: the start of that day of the month in the account's time zone."""
    if not 1 <= invoice_day <= 28:
        raise ValueError(f"invoice day {invoice_day} is not 1..28")
    zone = ZoneInfo(tz) if isinstance(tz, str) else tz
    local = after.astimezone(zone).date()
    year, month = local.year, local.month
    while True:
        candidate = day_start(date(year, month, invoice_day), zone)
        if candidate > after:
            return candidate
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)


# -- a period's totals -------------------------------------------------------------------------------

CREDIT_KINDS = frozenset({"payment", "refill"})  # money received, never taxed
OPENING_KINDS = frozenset({"initial"})  # an account's opening balance: neither a charge nor a payment


@dataclass(frozen=True, slots=True)
class PeriodLine:
    """A ledger line as an invoice sees it."""

    kind: str
    amount_micro: int  # + credits the account, - debits it
    tax_class: str | None  # effective class; None: not a taxable supply
    rate_ppm: int | None  # the class's rate for this account (None when tax_class is None)
    count: int = 1  # how many ledger lines it stands for (lines of one kind and class can come summed)


@dataclass(frozen=True, slots=True)
class PeriodTotals:
    lines_micro: int  # sum of the period's lines
    payments_micro: int  # money received (payments, refills)
    net_micro: int  # taxable charges, net (charges positive)
    taxes: tuple[TaxRow, ...]  # the tax this invoice charges (empty when taxed at payment)
    line_count: int

    @property
    def tax_micro(self) -> int:
        return sum(row.tax_micro for row in self.taxes)


def period_totals(lines: Iterable[PeriodLine], *, taxed_here: bool) -> PeriodTotals:
    """Totals of an invoice period. `taxed_here`: the account is taxed on its invoice (post-paid style),
    else its tax was charged at payment and the invoice adds none."""
    total = payments = net = count = 0
    bases: list[TaxBase] = []
    for line in lines:
        count += line.count
        total += line.amount_micro
        if line.kind in CREDIT_KINDS:
            payments += line.amount_micro
        if line.tax_class is not None and line.rate_ppm is not None:
            net -= line.amount_micro
            bases.append(TaxBase(line.tax_class, line.rate_ppm, -line.amount_micro))
    taxes = tuple(invoice_taxes(bases)) if taxed_here else ()
    return PeriodTotals(total, payments, net, taxes, count)
