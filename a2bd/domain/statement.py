"""What an invoice says, as frozen values: the data a PDF (or any other rendering) is drawn from.

Pure: no clock, no I/O, no rounding. Money is integer micro-units (1e-6 of `InvoiceDocument.currency`).
Two sign conventions meet here, each named where it applies:

- the ledger's, for balances and `StatementLine.amount_micro`: + credits the account (a payment, a refund),
  - debits it (a charge); a balance > 0 is money the customer has in credit, < 0 money owed;
- the invoice's, for `CallSummary.amount_micro`, `TaxRow` and the `net/tax/gross` totals: a charge is a
  positive number.

So `net_micro == call_lines_total_micro - sum(group.total_micro)` and
`closing_micro == opening_micro + payments_total_micro - gross_micro`; `InvoiceDocument.problems()` lists
what does not add up without refusing to build the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

STATUSES = ("preview", "draft", "confirmed")  # preview: never stored; draft: stored, not numbered; confirmed


def _require_aware(at: datetime, field: str) -> None:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{field}: {at.isoformat()} has no time zone; give an aware datetime (UTC is fine)")


@dataclass(frozen=True, slots=True)
class Party:
    """The issuer or the customer as printed: `address` is several lines joined by "\\n"."""

    name: str
    company: str = ""
    address: str = ""
    vat_number: str = ""
    email: str = ""


@dataclass(frozen=True, slots=True)
class CallSummary:
    """The calls of the period to one destination: `amount_micro` is the charge, a positive number."""

    destination: str
    calls: int
    seconds: int  # billed seconds, summed
    amount_micro: int


@dataclass(frozen=True, slots=True)
class StatementLine:
    """One ledger line: `amount_micro` is signed as in the ledger (+ payment or credit, - charge)."""

    at: datetime  # aware; printed in the account's time zone
    kind: str  # the ledger's kind ("did", "trunk", "fee", "payment", ...), not printed
    description: str
    amount_micro: int

    def __post_init__(self) -> None:
        _require_aware(self.at, "StatementLine.at")


@dataclass(frozen=True, slots=True)
class LineGroup:
    """A titled group of ledger lines ("DID numbers", "Fees", ...): `total_micro` is their sum, ledger-signed."""

    title: str
    lines: tuple[StatementLine, ...]
    total_micro: int


@dataclass(frozen=True, slots=True)
class TaxRow:
    """One tax rate of the invoice: `rate_ppm` in parts per million (200_000 = 20 %); net and tax positive."""

    label: str
    rate_ppm: int
    net_micro: int
    tax_micro: int


@dataclass(frozen=True, slots=True)
class InvoiceDocument:
    """Everything an invoice or a statement shows, already computed: the renderer adds nothing up.

    `period_end` is exclusive (the first instant after the period); a period of March in the account's
    time zone is printed "01 Mar – 31 Mar". `opening_micro` and `closing_micro` are balances (ledger sign).
    """

    issuer: Party
    customer: Party
    account_number: str
    status: str  # one of STATUSES
    number: str | None  # None until confirmed
    issued_on: date
    period_start: datetime
    period_end: datetime
    timezone: str  # IANA name, e.g. "Europe/London": dates are printed in it
    currency: str  # ISO 4217 code
    opening_micro: int
    calls: tuple[CallSummary, ...]
    call_lines_total_micro: int  # sum of calls' amounts (charges, positive)
    groups: tuple[LineGroup, ...]
    payments: tuple[StatementLine, ...]
    payments_total_micro: int  # sum of payments (ledger sign: normally positive)
    taxes: tuple[TaxRow, ...]
    net_micro: int
    tax_micro: int
    gross_micro: int
    closing_micro: int

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"InvoiceDocument.status: {self.status!r} is not one of {', '.join(STATUSES)}")
        _require_aware(self.period_start, "InvoiceDocument.period_start")
        _require_aware(self.period_end, "InvoiceDocument.period_end")

    @property
    def amount_due_micro(self) -> int:
        """What the customer has to pay: the closing debt, or 0 when the account is not in debt."""
        return max(0, -self.closing_micro)

    @property
    def in_credit_micro(self) -> int:
        """What the customer has in credit after this invoice, or 0."""
        return max(0, self.closing_micro)

    def problems(self) -> tuple[str, ...]:
        """Each total that is not the sum it stands for, as a sentence; () when the document adds up."""
        found: list[str] = []

        def check(what: str, shown: int, expected: int) -> None:
            if shown != expected:
                found.append(f"{what} is {shown} micro-units but its parts add up to {expected}")

        check("call_lines_total_micro", self.call_lines_total_micro, sum(c.amount_micro for c in self.calls))
        for group in self.groups:
            check(f"total of {group.title!r}", group.total_micro, sum(line.amount_micro for line in group.lines))
        check("payments_total_micro", self.payments_total_micro, sum(p.amount_micro for p in self.payments))
        check("net_micro", self.net_micro, self.call_lines_total_micro - sum(g.total_micro for g in self.groups))
        if self.taxes:
            check("net_micro (tax rows)", self.net_micro, sum(t.net_micro for t in self.taxes))
        check("tax_micro", self.tax_micro, sum(t.tax_micro for t in self.taxes))
        check("gross_micro", self.gross_micro, self.net_micro + self.tax_micro)
        check("closing_micro", self.closing_micro, self.opening_micro + self.payments_total_micro - self.gross_micro)
        if self.status == "confirmed" and not self.number:
            found.append("a confirmed invoice has no number")
        if self.period_end <= self.period_start:
            found.append("the period ends before it starts")
        return tuple(found)
