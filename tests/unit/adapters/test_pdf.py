"""pdf: invoices rendered with reportlab and read back with pypdf.

`sample_document()` is also what bench/pdf_render.py times and docs/render_sample.py draws: a small telecom
customer's month (calls per destination, two DIDs, four trunk channels, a VAT-exempt report fee, a payment
of the previous invoice and a partial payment).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from dataclasses import replace
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pypdf import PdfReader

from a2bd.adapters.pdf import render_invoice
from a2bd.domain.money import MICRO, format_amount, parse_amount
from a2bd.domain.statement import (
    CallSummary,
    InvoiceDocument,
    LineGroup,
    Party,
    StatementLine,
    TaxRow,
)

REPO = Path(__file__).resolve().parents[3]
LONDON = ZoneInfo("Europe/London")
_NAMES = (
    "Local (UK geographic)",
    "Long distance (UK national)",
    "UK mobile",
    "Non-geographic (03)",
    "Ireland",
    "France",
    "Germany",
    "Spain",
    "USA and Canada",
    "Netherlands",
)
_RATES_PER_MIN_MICRO = (10_000, 50_000, 80_000, 10_000, 20_000, 18_000, 19_000, 21_000, 12_000, 22_000)
VAT_PPM = 200_000


def _at(day: int, hour: int = 9, minute: int = 0) -> datetime:
    return datetime(2024, 3, day, hour, minute, tzinfo=LONDON)


def _line(day: int, kind: str, description: str, amount: str, hour: int = 0) -> StatementLine:
    return StatementLine(_at(day, hour), kind, description, parse_amount(amount))


def _vat(net_micro: int, rate_ppm: int) -> int:
    """Tax on `net_micro`, rounded half up to the cent (sample data only)."""
    return (net_micro * rate_ppm + 5_000_000_000) // 10_000_000_000 * 10_000


def sample_document(destinations: int = 10, *, status: str = "confirmed") -> InvoiceDocument:
    """March 2024 of a small business on a UK carrier: `destinations` call destinations (the first two are
    local and long-distance calls), 5 other charges (2 DIDs, 4 trunk channels on one line, voicemail to
    e-mail, a VAT-exempt call report fee), 2 payments, 2 tax rows; it owed 357.00 before and pays it."""
    calls = []
    for index in range(destinations):
        name = _NAMES[index] if index < len(_NAMES) else f"International zone {index + 1:03d}"
        rate = _RATES_PER_MIN_MICRO[index] if index < len(_RATES_PER_MIN_MICRO) else 30_000 + 137 * index
        count = (412, 97)[index] if index < 2 else (index * 37) % 90 + 3
        seconds = 38_745 if index == 0 else 14_012 if index == 1 else count * (60 + (index * 53) % 180) + index
        cost = -(-seconds * rate // 60)  # per second, rounded up to the micro-unit
        calls.append(CallSummary(name, count, seconds, -(-cost // 10_000) * 10_000))  # then up to the penny
    groups = (
        LineGroup(
            "DID numbers",
            (
                _line(1, "did", "DID +44 20 7946 0018, monthly rental", "-5.00"),
                _line(1, "did", "DID +44 117 496 0742, monthly rental", "-5.00"),
            ),
            -10 * MICRO,
        ),
        LineGroup("Trunk channels", (_line(1, "trunk", "SIP trunk channels, 4 × 10.00", "-40.00"),), -40 * MICRO),
        LineGroup("Services", (_line(1, "service", "Voicemail to e-mail", "-1.50"),), -1_500_000),
        LineGroup("Fees", (_line(31, "fee", "Itemised call report (VAT exempt)", "-2.50", hour=23),), -2_500_000),
    )
    payments = (
        replace(_line(5, "payment", "Payment received, bank transfer (thank you)", "357.00"), at=_at(5, 14, 12)),
        replace(_line(20, "payment", "Partial payment, card ending 4242", "50.00"), at=_at(20, 11, 3)),
    )
    call_total = sum(c.amount_micro for c in calls)
    standard_net = call_total + 10 * MICRO + 40 * MICRO + 1_500_000
    exempt_net = 2_500_000
    taxes = (
        TaxRow("VAT standard rate", VAT_PPM, standard_net, _vat(standard_net, VAT_PPM)),
        TaxRow("VAT exempt", 0, exempt_net, 0),
    )
    net = standard_net + exempt_net
    tax = sum(t.tax_micro for t in taxes)
    opening = -357 * MICRO
    payments_total = sum(p.amount_micro for p in payments)
    return InvoiceDocument(
        issuer=Party(
            name="Northwind Telecom Ltd",
            address="Unit 4, Riverside Business Park\n1 Bankside\nLondon SE1 9DT\nUnited Kingdom",
            vat_number="GB 123 4567 89",
            email="billing@northwind.example",
        ),
        customer=Party(
            name="Zoë Müller",
            company="Harbourview Dental Practice",
            address="12 Quay Street\nBristol BS1 4DB\nUnited Kingdom",
            vat_number="GB 987 6543 21",
            email="accounts@harbourview.example",
        ),
        account_number="100234",
        status=status,
        number="INV-2024-000412" if status == "confirmed" else None,
        issued_on=date(2024, 4, 1),
        period_start=_at(1),
        period_end=datetime(2024, 4, 1, tzinfo=LONDON),
        timezone="Europe/London",
        currency="GBP",
        opening_micro=opening,
        calls=tuple(calls),
        call_lines_total_micro=call_total,
        groups=groups,
        payments=payments,
        payments_total_micro=payments_total,
        taxes=taxes,
        net_micro=net,
        tax_micro=tax,
        gross_micro=net + tax,
        closing_micro=opening + payments_total - (net + tax),
    )


def text_of(pdf: bytes) -> list[str]:
    """The extracted text of each page."""
    return [page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages]


def lines_of(pdf: bytes) -> list[str]:
    return [line for page in text_of(pdf) for line in page.splitlines()]


def line_with(lines: list[str], needle: str) -> str:
    found = [line for line in lines if needle in line]
    assert found, f"{needle!r} not in {lines}"
    return found[0]


def on_one_line(lines: list[str], *needles: str) -> bool:
    """Whether some line of text holds all of `needles` (a label and its value, a row's cells)."""
    return any(all(needle in line for needle in needles) for line in lines)


def test_the_sample_adds_up() -> None:
    assert sample_document().problems() == ()
    assert sample_document(300).problems() == ()


def test_an_invoice_shows_every_figure() -> None:
    doc = sample_document()
    pdf = render_invoice(doc)
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    lines = lines_of(pdf)
    text = "\n".join(lines)

    assert "Invoice INV-2024-000412" in text
    assert "Preview" not in text and "DRAFT" not in text
    assert "Northwind Telecom Ltd" in text and "VAT No. GB 123 4567 89" in text
    assert "Harbourview Dental Practice" in text and "VAT No. GB 987 6543 21" in text
    assert on_one_line(lines, "Account number", "100234")
    assert on_one_line(lines, "Invoice date", "01 Apr 2024")
    assert on_one_line(lines, "Billing period", "01 Mar 2024 – 31 Mar 2024")
    assert on_one_line(lines, "Balance carried forward", "-357.00 GBP")

    for call in doc.calls:
        row = line_with(lines, call.destination)
        assert format_amount(call.amount_micro) in row
        assert str(call.calls) in row
        assert f"{call.seconds // 60}:{call.seconds % 60:02d}" in row
    assert on_one_line(lines, "Total calls", format_amount(doc.call_lines_total_micro))
    for group in doc.groups:
        for line in group.lines:
            assert on_one_line(lines, line.description, format_amount(-line.amount_micro))
        assert group.title in lines
        lower = [line.lower() for line in lines]
        assert on_one_line(lower, f"total {group.title.lower()}", format_amount(-group.total_micro))
    assert "Total did numbers" not in text and "Total DID numbers" in text
    assert on_one_line(lines, "Total charges and credits", format_amount(-sum(g.total_micro for g in doc.groups)))
    assert on_one_line(lines, "bank transfer", "05 Mar 2024")
    assert on_one_line(lines, "bank transfer", "357.00")
    assert on_one_line(lines, "card ending 4242", "50.00")
    assert on_one_line(lines, "Total payments received", format_amount(doc.payments_total_micro))

    standard = doc.taxes[0]
    net, tax = format_amount(standard.net_micro), format_amount(standard.tax_micro)
    assert on_one_line(lines, "VAT standard rate", "20%", net, tax)
    assert on_one_line(lines, "VAT exempt", "0%", "2.50", "0.00")

    assert on_one_line(lines, "Net", f"{format_amount(doc.net_micro)} GBP")
    assert on_one_line(lines, "Total (gross)", f"{format_amount(doc.gross_micro)} GBP")
    assert on_one_line(lines, "Closing balance", f"{format_amount(doc.closing_micro)} GBP")
    assert doc.amount_due_micro > 0
    assert on_one_line(lines, "Amount to pay", f"{format_amount(doc.amount_due_micro)} GBP")
    assert "In credit" not in text
    assert "Page 1 of 2" in text and "Page 2 of 2" in text


def test_amounts_are_exact_to_the_micro_unit() -> None:
    doc = sample_document(2)
    local = replace(doc.calls[0], amount_micro=6_457_500)
    long_distance = replace(doc.calls[1], amount_micro=11_676_667)
    lines = lines_of(render_invoice(replace(doc, calls=(local, long_distance), call_lines_total_micro=18_134_167)))
    assert on_one_line(lines, local.destination, "6.4575")
    assert on_one_line(lines, long_distance.destination, "11.676667")
    assert on_one_line(lines, "Total calls", "18.134167")


@pytest.mark.parametrize(
    ("status", "title", "marker"),
    [
        ("preview", "Preview (not an invoice)", "NOT AN INVOICE – FOR CHECKING ONLY"),
        ("draft", "Draft invoice", "DRAFT – NOT YET ISSUED"),
    ],
)
def test_a_document_that_is_not_an_invoice_says_so(status: str, title: str, marker: str) -> None:
    doc = sample_document(status=status)
    text = "\n".join(text_of(render_invoice(doc)))
    assert title in text
    assert marker in text
    assert "Invoice INV" not in text


def test_hundreds_of_destinations_flow_onto_further_pages() -> None:
    doc = sample_document(300)
    pages = text_of(render_invoice(doc))
    assert len(pages) >= 4
    for number, page in enumerate(pages, 1):
        assert f"Page {number} of {len(pages)}" in page
    assert "Calls (continued)" in pages[1]
    lines = [line for page in pages for line in page.splitlines()]
    for call in doc.calls:
        assert on_one_line(lines, call.destination, format_amount(call.amount_micro))
    assert on_one_line(lines, "Amount to pay", f"{format_amount(doc.amount_due_micro)} GBP")


def test_a_long_group_continues_under_its_title() -> None:
    doc = sample_document(2)
    lines = tuple(
        StatementLine(_at(1 + i % 28), "did", f"DID +44 20 7946 {i:04d} (rental)", -MICRO) for i in range(120)
    )
    dids = LineGroup("DID numbers", lines, -120 * MICRO)
    doc = replace(doc, groups=(dids,))  # totals no longer add up: not what is tested here
    pages = text_of(render_invoice(doc))
    assert len(pages) >= 3
    assert "DID numbers (continued)" in pages[1] and "Charges and credits (continued)" in pages[1]
    text = "\n".join(pages)
    for line in lines:
        assert line.description in text
    assert on_one_line(text.splitlines(), "Total DID numbers", "120.00")


def test_pdf_string_delimiters_are_escaped() -> None:
    doc = sample_document(1)
    call = replace(doc.calls[0], destination=r"Odd (name) with \ backslash )(")
    text = "\n".join(text_of(render_invoice(replace(doc, calls=(call,)))))
    assert r"Odd (name) with \ backslash )(" in text


def test_names_outside_ascii_survive() -> None:
    doc = sample_document()
    customer = replace(doc.customer, name="Zoë Müller", company="Café Ørsted Łódź", address="Straße 5\n€ zone")
    text = "\n".join(text_of(render_invoice(replace(doc, customer=customer))))
    assert "Zoë Müller" in text
    assert "Café Ørsted Lódz" in text  # Ł is not in WinAnsi: its base letter; ź decomposes to z
    assert "Straße 5" in text and "€ zone" in text


def test_an_account_in_credit_says_so() -> None:
    doc = sample_document()
    extra = StatementLine(_at(28), "payment", "Prepayment", 500 * MICRO)
    payments = (*doc.payments, extra)
    total = doc.payments_total_micro + extra.amount_micro
    doc = replace(doc, payments=payments, payments_total_micro=total, closing_micro=doc.closing_micro + 500 * MICRO)
    assert doc.problems() == () and doc.in_credit_micro > 0
    lines = lines_of(render_invoice(doc))
    assert on_one_line(lines, "In credit", f"{format_amount(doc.in_credit_micro)} GBP")
    assert not [line for line in lines if "Amount to pay" in line]


def test_the_same_document_gives_the_same_bytes() -> None:
    assert render_invoice(sample_document()) == render_invoice(sample_document())
    assert render_invoice(sample_document(300)) == render_invoice(sample_document(300))


def test_another_process_renders_the_same_bytes() -> None:
    script = (
        "import hashlib; from tests.unit.adapters.test_pdf import render_invoice, sample_document; "
        "print(hashlib.sha256(render_invoice(sample_document(12, status='draft'))).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == hashlib.sha256(render_invoice(sample_document(12, status="draft"))).hexdigest()


def test_dates_are_printed_in_the_accounts_time_zone() -> None:
    doc = sample_document(status="confirmed")
    # 23:30 UTC on 31 March is 00:30 on 1 April in London (BST) but 19:30 on 31 March in New York.
    late = StatementLine(datetime(2024, 3, 31, 23, 30, tzinfo=ZoneInfo("UTC")), "fee", "Late fee", -MICRO)
    fees = LineGroup("Fees", (late,), -MICRO)
    for zone, day in (("Europe/London", "01 Apr 2024"), ("America/New_York", "31 Mar 2024")):
        lines = lines_of(render_invoice(replace(doc, groups=(fees,), timezone=zone)))
        assert on_one_line(lines, "Late fee", day)


def test_long_text_is_cut_but_amounts_never_are() -> None:
    doc = sample_document(1)
    huge = 123_456_789_012_345_678
    call = CallSummary("Somewhere " * 40, 1, 61, huge)
    lines = lines_of(render_invoice(replace(doc, calls=(call,), call_lines_total_micro=huge)))
    row = line_with(lines, "Somewhere Somewhere")
    assert "…" in row and "Somewhere " * 40 not in row
    assert format_amount(huge) in row


def test_a_huge_balance_is_printed_whole_everywhere() -> None:
    doc = sample_document()
    opening = -123_456_789_012_345_678
    doc = replace(doc, opening_micro=opening, closing_micro=doc.closing_micro - doc.opening_micro + opening)
    assert doc.problems() == ()
    text = "\n".join(text_of(render_invoice(doc)))
    assert text.count(f"{format_amount(opening)} GBP") == 2  # the summary at the top, the balance at the end
    assert text.count(f"{format_amount(doc.closing_micro)} GBP") == 2
    assert on_one_line(text.splitlines(), "Amount to pay", f"{format_amount(doc.amount_due_micro)} GBP")


def test_an_empty_period_still_renders() -> None:
    doc = sample_document(0)
    doc = replace(doc, groups=(), payments=(), payments_total_micro=0, taxes=(), net_micro=0, tax_micro=0,
                  gross_micro=0, call_lines_total_micro=0, opening_micro=0, closing_micro=0)
    assert doc.problems() == ()
    text = "\n".join(text_of(render_invoice(doc)))
    assert "No calls in this period." in text and "No payments received in this period." in text
    assert "Amount to pay" in text


def test_problems_name_what_does_not_add_up() -> None:
    doc = sample_document()
    broken = replace(doc, gross_micro=doc.gross_micro + 1, status="confirmed", number=None)
    problems = broken.problems()
    assert any(p.startswith("gross_micro") for p in problems)
    assert any(p.startswith("closing_micro") for p in problems)
    assert "a confirmed invoice has no number" in problems


def test_a_naive_datetime_or_an_unknown_status_is_refused() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        StatementLine(datetime(2024, 3, 1), "fee", "x", 0)
    with pytest.raises(ValueError, match="status"):
        replace(sample_document(), status="final")


printable = st.text(st.characters(codec="cp1252", categories=("L", "N", "P", "S")), min_size=1, max_size=20)


@settings(max_examples=40, deadline=None)
@given(name=printable, destination=printable)
def test_windows_1252_text_reads_back_as_written(name: str, destination: str) -> None:
    doc = sample_document(1)
    call = replace(doc.calls[0], destination=destination)
    doc = replace(doc, customer=replace(doc.customer, company=name), calls=(call,))
    text = "\n".join(text_of(render_invoice(doc)))
    assert name in text
    assert destination in text


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=60))
def test_any_text_renders(text: str) -> None:
    doc = sample_document(1)
    line = StatementLine(_at(2), "fee", text, -MICRO)
    doc = replace(doc, customer=Party(text, text, text, text, text), groups=(LineGroup(text, (line,), -MICRO),))
    pages = text_of(render_invoice(doc))
    assert f"Page 1 of {len(pages)}" in pages[0]
