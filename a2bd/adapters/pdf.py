"""Invoices as PDF: an `InvoiceDocument` laid out on A4 like a bank statement or a telecom bill.

    render_invoice(doc) -> bytes    a complete PDF; the same document always gives the same bytes

How, and why:

- Speed (the target is > 200 PDFs/s on one core). reportlab's `drawString` costs about 25 µs a string in pure
  Python (its C accelerator, rl_accel, is not installed) and platypus much more, so the page content is
  written here as PDF operators (`_Page`: text, rules, shaded bands) and given to the canvas with its
  `addLiteral`; reportlab still writes the file itself: fonts, pages, metadata, cross-reference table.
  Streams are left uncompressed (`pageCompression=0`): zlib would cost more time than the few KiB it saves.
- Fonts: reportlab's built-in Helvetica and Helvetica-Bold (PDF standard fonts: not embedded, nothing to
  register, every reader has them) in WinAnsiEncoding, that is Windows-1252. Western European text prints as
  it is ("Zoë Müller", "Ça", "Łódź" is the exception: "Ł" is not in it). A character outside Windows-1252
  is printed as its base letter when it has one ("ł" → "l", "č" → "c", "ő" → "o"), else as "?": a name is
  never dropped and the PDF never shows a missing-glyph box. Text stays extractable (copy, search, pypdf).
- Layout: rows of fixed height placed from the top down. A section that does not fit continues on the next
  page under its heading ("continued") and its column titles; the heading of a section is kept with its first
  row. All pages are laid out before any is drawn, so each one can say "Page N of M".
- Amounts are printed with `format_amount` (exact, at least 2 decimals), never cut: a column too narrow for
  one shrinks its font instead. Descriptions that are too long end in "…".
- Dates and times are printed in the account's time zone (`doc.timezone`). The period's end is exclusive:
  a period ending at 1 April 00:00 prints as "… – 31 Mar".
- Determinism: `invariant=1` fixes the dates and the file ID reportlab would otherwise take from the clock.
"""

from __future__ import annotations

import io
import math
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from reportlab.lib.pagesizes import A4  # type: ignore[import-untyped]
from reportlab.pdfbase import pdfmetrics  # type: ignore[import-untyped]
from reportlab.pdfgen.canvas import Canvas  # type: ignore[import-untyped]

from a2bd.domain.invoice import format_rate
from a2bd.domain.money import format_amount
from a2bd.domain.statement import InvoiceDocument, Party

__all__ = ["render_invoice"]

# ---------------------------------------------------------------------------------------------------------
# Text: what Helvetica in WinAnsiEncoding can print, how wide it is, and how it is written in a PDF string

_REGULAR, _BOLD = "Helvetica", "Helvetica-Bold"
_CODEPAGE = "cp1252"  # WinAnsiEncoding; reportlab's widths for these fonts are indexed by its bytes

# Letters that Unicode does not decompose into a base letter and an accent.
_BASE_LETTERS = {
    "Ł": "L", "ł": "l", "Đ": "D", "đ": "d", "Ħ": "H", "ħ": "h", "ı": "i", "Ŧ": "T", "ŧ": "t", "ĸ": "k",
    "Ŋ": "N", "ŋ": "n", "ſ": "s", "Ə": "E", "ə": "e", "\u2212": "-", "\u2010": "-", "\u2011": "-",
}  # fmt: skip


def _printable(char: str) -> str:
    """What prints in place of one character that is not Windows-1252 printable (see the module doc)."""
    if char.isspace():
        return " "
    category = unicodedata.category(char)
    if category in ("Cc", "Cf"):  # controls, zero-width and direction marks
        return ""
    if char in _BASE_LETTERS:
        return _BASE_LETTERS[char]
    base = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
    if base and base != char:
        try:
            base.encode(_CODEPAGE)
        except UnicodeEncodeError:
            pass
        else:
            if base.isprintable():
                return base
    return "?"


class _PrintableTable(dict[int, str]):
    """A `str.translate` table, filled on first use of each character: for Windows-1252's printable
    characters the character itself, for any other its replacement. Bounded by the characters ever seen."""

    def __missing__(self, code: int) -> str:
        char = chr(code)
        try:
            char.encode(_CODEPAGE)
        except UnicodeEncodeError:
            printable = _printable(char)
        else:
            printable = char if char.isprintable() else _printable(char)
        self[code] = printable
        return printable


_TO_PRINTABLE = _PrintableTable()

# Inside a PDF literal string: escape the delimiters and the backslash; write bytes >= 0x80 as octal so that
# the content stream stays ASCII whatever reportlab encodes it with.
_ESCAPES: dict[int, str] = {ord("("): "\\(", ord(")"): "\\)", ord("\\"): "\\\\"}
_WIDTHS: dict[str, dict[str, float]] = {}  # font -> character -> width in 1/1000 of the font size
for _font in (_REGULAR, _BOLD):
    _metrics = pdfmetrics.getFont(_font).widths
    _WIDTHS[_font] = {}
    for _byte in range(0x20, 0x100):
        try:
            _char = bytes([_byte]).decode(_CODEPAGE)
        except UnicodeDecodeError:
            continue
        _WIDTHS[_font][_char] = float(_metrics[_byte])
        if _byte >= 0x80:
            _ESCAPES[ord(_char)] = f"\\{_byte:03o}"


def _clean(text: str) -> str:
    """`text` as Helvetica/WinAnsi can print it, on one line."""
    return text if text.isascii() and text.isprintable() else text.translate(_TO_PRINTABLE)


def _width(text: str, font: str, size: float) -> float:
    """Width in points of cleaned `text`."""
    return sum(map(_WIDTHS[font].__getitem__, text)) * size / 1000.0


def _ellipsize(text: str, font: str, size: float, width: float) -> str:
    """Cleaned `text` cut to `width` points, ending in "…" when cut."""
    if _width(text, font, size) <= width:
        return text
    table = _WIDTHS[font]
    budget = width * 1000.0 / size - table["…"]
    used = 0.0
    for index, char in enumerate(text):
        used += table[char]
        if used > budget:
            return text[:index].rstrip() + "…"
    return text


# ---------------------------------------------------------------------------------------------------------
# Page geometry and look (points; A4 portrait)

_PAGE_W, _PAGE_H = float(A4[0]), float(A4[1])
_LEFT = 48.0
_RIGHT = _PAGE_W - 48.0
_WIDTH = _RIGHT - _LEFT
_TOP = _PAGE_H - 46.0
_BOTTOM = 64.0  # lowest baseline of content; the footer sits below
_PAD = 6.0  # text inside a table's band
_ROW = 13.0
_BODY = 8.5  # font size of table rows
_SMALL = 7.5

_INK = "0.12 0.13 0.15"
_MUTED = "0.42 0.44 0.47"
_ACCENT = "0.07 0.24 0.42"  # navy: headings, rules, the amount to pay
_WARN = "0.70 0.12 0.10"  # the not-an-invoice marker
_BAND = "0.925 0.935 0.95"  # column titles
_ZEBRA = "0.972 0.975 0.98"  # every other row
_HAIR = "0.80 0.82 0.85"
_WHITE = "1 1 1"

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

_AMOUNT_X = _RIGHT - _PAD  # where amounts end


class _Page:
    """One page's content as PDF operators: graphics (bands, rules) under one text object."""

    __slots__ = ("_color", "_font", "_fonts", "gfx", "text_ops")

    def __init__(self, fonts: dict[str, str]) -> None:
        self._fonts = fonts  # reportlab's resource names ("/F1") of _REGULAR and _BOLD
        self._font: tuple[str, float] = ("", 0.0)
        self._color = ""
        self.gfx: list[str] = []
        self.text_ops: list[str] = []

    def text(
        self,
        x: float,
        y: float,
        text: str,
        *,
        font: str = _REGULAR,
        size: float = _BODY,
        align: str = "l",
        color: str = _INK,
        fit: float = 0.0,
        shrink: bool = False,
    ) -> None:
        """Draw `text` with its baseline at `y`, starting at `x` ("l"), ending at it ("r") or centred ("c").

        `fit` > 0 is the width it must not exceed: left-aligned text is cut with "…" unless `shrink`; other
        text (amounts are right-aligned) and text to `shrink` (an amount on its own) gets a smaller font.
        """
        if not (text.isascii() and text.isprintable()):
            text = text.translate(_TO_PRINTABLE)
        if not text:
            return
        if align == "l" and not shrink:
            # Measured only when it might not fit: no Helvetica glyph is wider than 1.015 em.
            if fit and len(text) * size * 1.015 > fit and _width(text, font, size) > fit:
                text = _ellipsize(text, font, size, fit)
        else:
            width = _width(text, font, size)
            if fit and width > fit:
                size = math.floor(size * fit / width * 10) / 10
                width = _width(text, font, size)
            if align != "l":
                x -= width if align == "r" else width / 2
        ops = self.text_ops
        if self._font != (font, size):
            self._font = (font, size)
            ops.append(f"{self._fonts[font]} {size:g} Tf")
        if self._color != color:
            self._color = color
            ops.append(f"{color} rg")
        if not text.isascii() or "(" in text or ")" in text or "\\" in text:
            text = text.translate(_ESCAPES)
        ops.append(f"1 0 0 1 {x:.2f} {y:.2f} Tm ({text}) Tj")

    def band(self, x: float, y: float, width: float, height: float, color: str) -> None:
        """A filled rectangle, `y` its bottom."""
        self.gfx.append(f"{color} rg {x:.2f} {y:.2f} {width:.2f} {height:.2f} re f")

    def rule(self, x1: float, x2: float, y: float, *, color: str = _HAIR, weight: float = 0.5) -> None:
        self.gfx.append(f"{color} RG {weight:g} w {x1:.2f} {y:.2f} m {x2:.2f} {y:.2f} l S")

    def content(self) -> str:
        return "\n".join([*self.gfx, "BT", *self.text_ops, "ET"])


def _watermark(canvas: Any, text: str) -> None:
    """`text` across the page at 35°, translucent, over everything (a band would hide it from below).
    Drawn with the canvas's own API: only documents that are not invoices have one, so speed does not matter."""
    canvas.saveState()
    canvas.setFillColorRGB(0.70, 0.12, 0.10, alpha=0.09)
    canvas.setFont(_BOLD, 110)
    canvas.translate(_PAGE_W / 2, _PAGE_H / 2)
    canvas.rotate(35)
    canvas.drawCentredString(0, -38, text)
    canvas.restoreState()


# ---------------------------------------------------------------------------------------------------------
# Printing values


def _date(day: date) -> str:
    return f"{day.day:02d} {_MONTHS[day.month - 1]} {day.year}"


def _money(micro: int, currency: str = "") -> str:
    text = format_amount(micro)
    return f"{text} {currency}" if currency else text


def _signed(micro: int, currency: str) -> str:
    """A movement of the balance: "+407.00 GBP", "-86.06 GBP"."""
    return ("+" if micro > 0 else "") + _money(micro, currency)


def _duration(seconds: int) -> str:
    """Minutes and seconds, "1093:05"."""
    minutes, rest = divmod(abs(seconds), 60)
    return f"{'-' if seconds < 0 else ''}{minutes}:{rest:02d}"


def _title(doc: InvoiceDocument) -> str:
    if doc.status == "preview":
        return "Preview (not an invoice)"
    if doc.status == "draft":
        return "Draft invoice"
    return f"Invoice {doc.number}" if doc.number else "Invoice"


def _party_lines(party: Party) -> list[str]:
    """The lines under a party's first (bold) line."""
    lines = [line.strip() for line in party.address.splitlines() if line.strip()]
    if party.vat_number:
        lines.append(f"VAT No. {party.vat_number}")
    if party.email:
        lines.append(party.email)
    return lines


# ---------------------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True, slots=True)
class _Column:
    title: str
    x: float  # left edge ("l") or right edge ("r") of the text
    align: str
    width: float  # what the text may take


@dataclass(frozen=True, slots=True)
class _Row:
    cells: tuple[str, ...]  # one per column; a "group" row has only its title
    style: str = "row"  # "row", "group" (a group's title), "subtotal" (a group's), "total" (the table's)


def _lower_first(title: str) -> str:
    """Lower-case a title's first letter for use mid-sentence, unless it begins an acronym ("DID numbers")."""
    return title[:1].lower() + title[1:] if title[1:2].islower() else title


class _Layout:
    """Places the document's rows on as many pages as it takes."""

    def __init__(self, doc: InvoiceDocument, fonts: dict[str, str]) -> None:
        self.doc = doc
        self.fonts = fonts
        self.zone = ZoneInfo(doc.timezone)
        self.pages: list[_Page] = []
        self.page = self._add_page()
        self.y = _TOP
        self._resume: Callable[[], None] | None = None  # redraws a section's heading on a new page

    # pages ------------------------------------------------------------------------------------------------

    def _add_page(self) -> _Page:
        page = _Page(self.fonts)
        self.pages.append(page)
        return page

    def _room(self, height: float) -> None:
        """Make sure `height` points fit above the bottom margin, starting a page if not."""
        if self.y - height >= _BOTTOM:
            return
        self.page = self._add_page()
        doc, page = self.doc, self.page
        page.text(_LEFT, _TOP - 8, doc.issuer.company or doc.issuer.name, font=_BOLD, size=9, fit=_WIDTH / 2)
        reference = f"{_title(doc)}  ·  Account {doc.account_number}  ·  {self._period()}"
        page.text(_RIGHT, _TOP - 8, reference, size=_SMALL, align="r", color=_MUTED, fit=_WIDTH / 2)
        page.rule(_LEFT, _RIGHT, _TOP - 15, color=_ACCENT, weight=0.8)
        self.y = _TOP - 36
        if self._resume is not None:
            self._resume()

    def finish(self) -> list[_Page]:
        """Footers, now that the number of pages is known."""
        issuer = self.doc.issuer
        left = "  ·  ".join(part for part in (issuer.company or issuer.name, _vat(issuer), issuer.email) if part)
        for number, page in enumerate(self.pages, 1):
            page.rule(_LEFT, _RIGHT, 44)
            page.text(_LEFT, 32, left, size=_SMALL, color=_MUTED, fit=_WIDTH - 90)
            page.text(_RIGHT, 32, f"Page {number} of {len(self.pages)}", size=_SMALL, align="r", color=_MUTED)
        return self.pages

    # values -----------------------------------------------------------------------------------------------

    def _local_date(self, at: datetime) -> str:
        return _date(at.astimezone(self.zone).date())

    def _period(self) -> str:
        start = self.doc.period_start.astimezone(self.zone).date()
        last = max(start, (self.doc.period_end - timedelta(microseconds=1)).astimezone(self.zone).date())
        return f"{_date(start)} – {_date(last)}"

    # blocks -----------------------------------------------------------------------------------------------

    def header(self) -> None:
        """Issuer top left, customer top right, then the title, its dates and the account summary."""
        doc, page = self.doc, self.page
        column = _LEFT + _WIDTH * 0.56
        column_w = _RIGHT - column

        issuer = doc.issuer
        y = _TOP - 12
        page.text(_LEFT, y, issuer.company or issuer.name, font=_BOLD, size=13, color=_ACCENT, fit=column - _LEFT - 20)
        y -= 15
        details = ([issuer.name] if issuer.company and issuer.name != issuer.company else []) + _party_lines(issuer)
        for line in details:
            page.text(_LEFT, y, line, size=8.5, color=_MUTED, fit=column - _LEFT - 20)
            y -= 11
        left_end = y

        customer = doc.customer
        y = _TOP - 4
        page.text(column, y, "BILL TO", font=_BOLD, size=6.5, color=_MUTED)
        y -= 13
        page.text(column, y, customer.company or customer.name, font=_BOLD, size=10, fit=column_w)
        y -= 12.5
        lines = [customer.name] if customer.company and customer.name != customer.company else []
        for line in lines + _party_lines(customer):
            page.text(column, y, line, size=8.5, fit=column_w)
            y -= 11
        page.text(column, y, "Account number", size=8.5, color=_MUTED)
        page.text(_RIGHT, y, doc.account_number, font=_BOLD, size=8.5, align="r", fit=column_w - 70)
        y -= 11

        y = min(left_end, y) - 10
        page.rule(_LEFT, _RIGHT, y, color=_ACCENT, weight=1.2)

        # title (left) and its dates (right)
        y -= 26
        title_y = y
        page.text(_LEFT, y, _title(doc), font=_BOLD, size=18, fit=column - _LEFT - 10)
        if doc.status != "confirmed":
            y -= 16
            marker = "NOT AN INVOICE – FOR CHECKING ONLY" if doc.status == "preview" else "DRAFT – NOT YET ISSUED"
            page.text(_LEFT, y, marker, font=_BOLD, size=9, color=_WARN)
            y -= 11
            note = (
                "Figures may still change. Do not pay from this document."
                if doc.status == "preview"
                else "This invoice gets its number when it is confirmed. Do not pay from this draft."
            )
            page.text(_LEFT, y, note, size=_SMALL, color=_WARN, fit=column - _LEFT - 10)
        left_end = y

        y = title_y + 8
        meta = [
            ("Invoice date", _date(doc.issued_on)),
            ("Billing period", self._period()),
            ("Time zone", doc.timezone),
            ("Currency", doc.currency),
        ]
        for label, value in meta:
            page.text(column, y, label, size=8.5, color=_MUTED)
            page.text(_RIGHT, y, value, size=8.5, align="r", fit=column_w - 70)
            y -= 11.5

        # the account at a glance, as on a bank statement
        y = min(left_end, y) - 14
        height = 40.0
        page.band(_LEFT, y - height, _WIDTH, height, _BAND)
        due = doc.amount_due_micro
        cells = [
            ("Balance carried forward", _signed(doc.opening_micro, doc.currency), _INK),
            ("Payments received", _signed(doc.payments_total_micro, doc.currency), _INK),
            ("This invoice", _signed(-doc.gross_micro, doc.currency), _INK),
            ("Closing balance", _signed(doc.closing_micro, doc.currency), _INK),
            ("Amount to pay", _money(due, doc.currency), _WHITE)
            if due or not doc.in_credit_micro
            else ("In credit", _money(doc.in_credit_micro, doc.currency), _WHITE),
        ]
        cell_w = _WIDTH / len(cells)
        page.band(_RIGHT - cell_w, y - height, cell_w, height, _ACCENT)
        for index, (label, value, color) in enumerate(cells):
            x = _LEFT + index * cell_w + 8
            page.text(x, y - 15, label, size=_SMALL, color=_MUTED if color == _INK else _WHITE)
            page.text(x, y - 30, value, font=_BOLD, size=10.5, color=color, fit=cell_w - 14, shrink=True)
        self.y = y - height - 26

    def _heading(self, title: str) -> None:
        self.page.text(_LEFT, self.y, title, font=_BOLD, size=10.5, color=_ACCENT)
        self.y -= 8

    def table(self, title: str, columns: Sequence[_Column], rows: Sequence[_Row], empty: str) -> None:
        """A titled table. On each page it runs onto, its heading, its column titles and the title of the
        group it is in are drawn again."""
        group = ""

        def head(continued: bool) -> None:
            self._heading(f"{title} (continued)" if continued else title)
            page = self.page
            page.band(_LEFT, self.y - 16, _WIDTH, 16, _BAND)
            for column in columns:
                page.text(column.x, self.y - 11, column.title, font=_BOLD, size=_SMALL, align=column.align)
            self.y -= 16 + _ROW

        def resume() -> None:
            head(True)
            if group:
                self._group_row(f"{group} (continued)")

        self._room(10.5 + 8 + 16 + 2 * _ROW)
        head(False)
        self._resume = resume
        if not rows:
            self.page.text(_LEFT + _PAD, self.y, empty, size=_BODY, color=_MUTED)
            self.y -= _ROW
        shade = False
        for index, row in enumerate(rows):
            if row.style == "group":
                group = ""  # not "continued" if the page breaks before it
                self._room(_ROW + 4 + _ROW if index else _ROW)
                if index:
                    self.y -= 4
                self._group_row(row.cells[0])
                group, shade = row.cells[0], False
                continue
            self._room(_ROW + (7 if row.style != "row" else 0))
            page = self.page
            if row.style == "row":
                if shade:
                    page.band(_LEFT, self.y - 4, _WIDTH, _ROW, _ZEBRA)
                shade = not shade
                for column, cell in zip(columns, row.cells, strict=True):
                    page.text(column.x, self.y, cell, align=column.align, fit=column.width)
                self.y -= _ROW
                continue
            self.y -= 3  # room for the rule above a total
            if row.style == "subtotal":
                page.rule(_RIGHT - 110, _RIGHT, self.y + _ROW - 1.5, color=_HAIR, weight=0.6)
                group = ""
            else:
                page.rule(_LEFT, _RIGHT, self.y + _ROW - 1.5, color=_ACCENT, weight=0.7)
            for column, cell in zip(columns, row.cells, strict=True):
                page.text(column.x, self.y - 1, cell, font=_BOLD, align=column.align, fit=column.width)
            self.y -= _ROW + (4 if row.style == "total" else 0)
        self._resume = None
        self.y -= 16

    def _group_row(self, title: str) -> None:
        self.page.text(_LEFT + _PAD, self.y, title, font=_BOLD, size=9, color=_ACCENT, fit=_WIDTH - 2 * _PAD)
        self.y -= _ROW

    def calls(self) -> None:
        doc = self.doc
        columns = (
            _Column("Destination", _LEFT + _PAD, "l", 270),
            _Column("Calls", _LEFT + 340, "r", 60),
            _Column("Minutes (m:ss)", _LEFT + 420, "r", 70),
            _Column(f"Amount ({doc.currency})", _AMOUNT_X, "r", 100),
        )
        rows = [_Row((c.destination, str(c.calls), _duration(c.seconds), _money(c.amount_micro))) for c in doc.calls]
        if rows:
            total = (
                "Total calls",
                str(sum(c.calls for c in doc.calls)),
                _duration(sum(c.seconds for c in doc.calls)),
                _money(doc.call_lines_total_micro),
            )
            rows.append(_Row(total, "total"))
        self.table("Calls", columns, rows, "No calls in this period.")

    def _line_columns(self) -> tuple[_Column, ...]:
        return (
            _Column("Date", _LEFT + _PAD, "l", 70),
            _Column("Description", _LEFT + 84, "l", _WIDTH - 84 - 110),
            _Column(f"Amount ({self.doc.currency})", _AMOUNT_X, "r", 100),
        )

    def groups(self) -> None:
        """Every group of ledger lines in one table: charges as positive amounts, a credit among them (a
        refund, a correction in the customer's favour) as negative, as on the invoice's totals."""
        rows: list[_Row] = []
        groups = [group for group in self.doc.groups if group.lines]
        for group in groups:
            rows.append(_Row((group.title,), "group"))
            rows.extend(
                _Row((self._local_date(line.at), line.description, _money(-line.amount_micro))) for line in group.lines
            )
            rows.append(_Row(("", f"Total {_lower_first(group.title)}", _money(-group.total_micro)), "subtotal"))
        if groups:
            total = -sum(group.total_micro for group in groups)
            rows.append(_Row(("", "Total charges and credits", _money(total)), "total"))
            self.table("Charges and credits", self._line_columns(), rows, "")

    def payments(self) -> None:
        doc = self.doc
        rows = [_Row((self._local_date(p.at), p.description, _money(p.amount_micro))) for p in doc.payments]
        if rows:
            rows.append(_Row(("", "Total payments received", _money(doc.payments_total_micro)), "total"))
        self.table("Payments received", self._line_columns(), rows, "No payments received in this period.")

    def taxes(self) -> None:
        doc = self.doc
        columns = (
            _Column("Tax", _LEFT + _PAD, "l", 220),
            _Column("Rate", _LEFT + 290, "r", 60),
            _Column(f"Net ({doc.currency})", _LEFT + 390, "r", 95),
            _Column(f"Tax ({doc.currency})", _AMOUNT_X, "r", 95),
        )
        rows = [_Row((t.label, format_rate(t.rate_ppm), _money(t.net_micro), _money(t.tax_micro))) for t in doc.taxes]
        if rows:
            total = ("Total", "", _money(sum(t.net_micro for t in doc.taxes)), _money(doc.tax_micro))
            rows.append(_Row(total, "total"))
        self.table("Tax summary", columns, rows, "No tax charged.")

    def totals(self) -> None:
        """Invoice totals (right) beside the account's balance (left), then what to pay, kept together."""
        doc = self.doc
        self._room(6 * 15 + 40 + 20)
        page, y = self.page, self.y
        half = _WIDTH / 2 - 12
        right = _RIGHT - half

        page.text(_LEFT, y, "Account balance", font=_BOLD, size=10.5, color=_ACCENT)
        page.text(right, y, "Invoice totals", font=_BOLD, size=10.5, color=_ACCENT)
        y -= 8
        page.rule(_LEFT, _LEFT + half, y, color=_ACCENT, weight=0.7)
        page.rule(right, _RIGHT, y, color=_ACCENT, weight=0.7)

        balance = [
            ("Balance carried forward", _signed(doc.opening_micro, doc.currency)),
            ("Payments received", _signed(doc.payments_total_micro, doc.currency)),
            ("This invoice (gross)", _signed(-doc.gross_micro, doc.currency)),
        ]
        totals = [
            ("Net", _money(doc.net_micro, doc.currency)),
            ("Tax", _money(doc.tax_micro, doc.currency)),
        ]
        row_y = y - 14
        for label, value in balance:
            page.text(_LEFT + _PAD, row_y, label, size=9)
            page.text(_LEFT + half - _PAD, row_y, value, size=9, align="r", fit=half - 140)
            row_y -= 15
        page.rule(_LEFT, _LEFT + half, row_y + 10, color=_INK, weight=0.6)
        page.text(_LEFT + _PAD, row_y - 2, "Closing balance", font=_BOLD, size=9.5)
        closing = _signed(doc.closing_micro, doc.currency)
        page.text(_LEFT + half - _PAD, row_y - 2, closing, font=_BOLD, size=9.5, align="r", fit=half - 140)
        end_y = row_y - 2

        row_y = y - 14
        for label, value in totals:
            page.text(right + _PAD, row_y, label, size=9)
            page.text(_AMOUNT_X, row_y, value, size=9, align="r", fit=half - 110)
            row_y -= 15
        row_y -= 15
        page.rule(right, _RIGHT, row_y + 10, color=_INK, weight=0.6)
        page.text(right + _PAD, row_y - 2, "Total (gross)", font=_BOLD, size=9.5)
        gross = _money(doc.gross_micro, doc.currency)
        page.text(_AMOUNT_X, row_y - 2, gross, font=_BOLD, size=9.5, align="r", fit=half - 110)
        y = min(end_y, row_y - 2) - 18

        height = 30.0
        page.band(_LEFT, y - height, _WIDTH, height, _ACCENT)
        if doc.amount_due_micro or not doc.in_credit_micro:
            label, value = "Amount to pay", _money(doc.amount_due_micro, doc.currency)
            note = "" if doc.status == "confirmed" else "(when this invoice is issued)"
        else:
            label, value = "In credit", _money(doc.in_credit_micro, doc.currency)
            note = "Nothing to pay: the credit is carried forward."
        page.text(_LEFT + 10, y - 19, label, font=_BOLD, size=12, color=_WHITE)
        if note:
            page.text(_LEFT + 110, y - 18.5, note, size=8, color=_WHITE)
        page.text(_RIGHT - 10, y - 19.5, value, font=_BOLD, size=13, color=_WHITE, align="r", fit=_WIDTH / 2)
        self.y = y - height - 10


def _vat(party: Party) -> str:
    return f"VAT No. {party.vat_number}" if party.vat_number else ""


def render_invoice(doc: InvoiceDocument) -> bytes:
    """`doc` as a PDF file (A4, uncompressed, deterministic: the same document gives the same bytes)."""
    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=A4, invariant=1, pageCompression=0, lang="en")
    canvas.setTitle(_clean(f"{_title(doc)} – {doc.customer.company or doc.customer.name}"))
    canvas.setAuthor(doc.issuer.company or doc.issuer.name)
    canvas.setSubject(f"Account {doc.account_number}")
    canvas.setCreator("a2bd")
    # Registers both fonts with the document (every page's resources) and gives their resource names.
    canvas.setFont(_BOLD, _BODY)
    canvas.setFont(_REGULAR, _BODY)
    fonts = {name: str(canvas._doc.getInternalFontName(name)) for name in (_REGULAR, _BOLD)}

    layout = _Layout(doc, fonts)
    layout.header()
    layout.calls()
    layout.groups()
    layout.payments()
    layout.taxes()
    layout.totals()
    for page in layout.finish():
        canvas.addLiteral(page.content())
        if doc.status != "confirmed":
            _watermark(canvas, doc.status.upper())
        canvas.showPage()
    canvas.save()
    return buffer.getvalue()
