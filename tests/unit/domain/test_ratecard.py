"""ratecard: A2Billing-style rate card CSV → RateEntry values and every error, with its line and column."""

from __future__ import annotations

import io
from datetime import date, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from a2bd.domain.money import format_amount
from a2bd.domain.ratecard import (
    IGNORED_COLUMNS,
    UNSUPPORTED_UNLESS_ZERO,
    RowError,
    parse_ratecard,
)
from a2bd.domain.rating import SellRate
from a2bd.domain.tariff import BuyRate, RateEntry, Tariff

FULL_HEADER = (
    "dialprefix,destination,rateinitial,initblock,billingblock,connectcharge,disconnectcharge,minimal_cost,"
    "grace,buyrate,buyrateinitblock,buyrateincrement,provider,starttime,endtime,startdate,stopdate"
)
GOOD = f"""{FULL_HEADER}
44,United Kingdom,0.0125,30,6,0.05,0.01,0.02,3,0.004,60,60,alpha,0,10079,2025-01-01,2025-12-31
44,United Kingdom,0.0125,30,6,0.05,0.01,0.02,3,0.0035,1,1,beta,0,10079,2025-01-01,2025-12-31
+447,"UK, mobile",0.10,60,60,,,,,,,,alpha,,,,
33,France night,0.01,0,0,0,0,0,0,0,0,0,,6840,480,,
"""
UK = SellRate(
    rate_per_min_micro=12_500,
    connect_micro=50_000,
    disconnect_micro=10_000,
    initial_block_s=30,
    increment_s=6,
    grace_s=3,
    min_cost_micro=20_000,
)
YEAR_2025 = {"start_date": date(2025, 1, 1), "stop_date": date(2025, 12, 31)}
EXPECTED = [
    RateEntry("44", "United Kingdom", UK, "alpha", BuyRate(4_000, 60, 60), **YEAR_2025),  # type: ignore[arg-type]
    RateEntry("44", "United Kingdom", UK, "beta", BuyRate(3_500, 1, 1), **YEAR_2025),  # type: ignore[arg-type]
    RateEntry("447", "UK, mobile", SellRate(100_000, initial_block_s=60, increment_s=60), "alpha", BuyRate()),
    RateEntry("33", "France night", SellRate(10_000), None, BuyRate(), week_start_min=6840, week_end_min=480),
]


def parse(text: str) -> tuple[list[RateEntry], list[RowError]]:
    return parse_ratecard(io.StringIO(text, newline=""))


def test_good_file() -> None:
    entries, errors = parse(GOOD)
    assert errors == []
    assert entries == EXPECTED


def test_equal_prices_are_one_object() -> None:
    entries, _ = parse(GOOD)
    assert entries[0].sell is entries[1].sell
    ours = parse("dialprefix,rateinitial\n1,0.01\n2,0.010\n3,0.01000\n")[0]
    assert ours[0].sell is ours[1].sell is ours[2].sell  # equal values, whatever the spelling
    assert ours[0].buy is ours[2].buy


def test_minimal_file_takes_a2billing_defaults() -> None:
    entries, errors = parse("dialprefix,rateinitial\n4420,0.5\n")
    assert errors == []
    assert entries == [RateEntry("4420", "", SellRate(500_000), None, BuyRate())]
    entry = entries[0]
    window = (entry.week_start_min, entry.week_end_min, entry.start_date, entry.stop_date)
    assert window == (0, 10079, None, None)
    assert entry.sell.increment_s == 1 and entry.buy.increment_s == 1


def test_billingblock_zero_means_one_second() -> None:
    entries, errors = parse("dialprefix,rateinitial,billingblock,buyrateincrement\n44,0.01,0,0\n")
    assert errors == []
    assert entries[0].sell.increment_s == 1
    assert entries[0].buy.increment_s == 1


@pytest.mark.parametrize("name", ["grace", "minimal_time_charge", "Minimal_Time_Charge", " GRACE "])
def test_grace_goes_by_either_name(name: str) -> None:
    entries, errors = parse(f"dialprefix,rateinitial,{name}\n44,0.01,5\n")
    assert errors == []
    assert entries[0].sell.grace_s == 5


def test_grace_and_minimal_time_charge_together_is_an_error() -> None:
    entries, errors = parse("dialprefix,rateinitial,grace,minimal_time_charge\n44,0.01,5,5\n")
    assert entries == []
    assert errors == [RowError(1, "minimal_time_charge", "means the same as 'grace'; keep one")]


def test_semicolon_file_with_bom_quotes_and_crlf() -> None:
    text = (
        "\ufeffdialprefix;destination;rateinitial;provider\r\n"
        '44;"UK; fixed, landline";"0,5";alpha\r\n'  # a ';' and a ',' inside quoted fields
        '"33";"France ""Paris""";0.02;"beta"\r\n'
    )
    entries, errors = parse(text)
    assert [(e.prefix, e.destination, e.provider) for e in entries] == [("33", 'France "Paris"', "beta")]
    # "0,5" is not a number with a '.' decimal point: reported, not misread as 5 or 0.5.
    assert [(e.line, e.column) for e in errors] == [(2, "rateinitial")]


def test_bom_on_a_comma_file() -> None:
    entries, errors = parse("\ufeffdialprefix,rateinitial\n44,0.01\n")
    assert errors == []
    assert entries[0].prefix == "44"


def test_quoted_field_spanning_lines_keeps_line_numbers_true() -> None:
    text = 'dialprefix,destination,rateinitial\n44,"United\nKingdom",0.01\n33,France,oops\n'
    entries, errors = parse(text)
    assert entries[0].destination == "United\nKingdom"
    assert [(e.line, e.column) for e in errors] == [(4, "rateinitial")]  # the row starts on line 4


def test_blank_lines_are_skipped_but_counted() -> None:
    text = "\n\ndialprefix,rateinitial\n\n44,0.01\n,\n  \n33,x\n\n"
    entries, errors = parse(text)
    assert [e.prefix for e in entries] == ["44"]
    assert [(e.line, e.column) for e in errors] == [(8, "rateinitial")]


@pytest.mark.parametrize(
    "lines",
    [
        "dialprefix,rateinitial\n44,0.01\n",  # one str
        ["dialprefix,rateinitial\n", "44,0.01\n"],
        ["dialprefix,rateinitial", "44,0.01"],  # lines without their ends
        io.StringIO("dialprefix,rateinitial\r\n44,0.01\r\n", newline=""),
    ],
)
def test_any_iterable_of_lines(lines: object) -> None:
    entries, errors = parse_ratecard(lines)  # type: ignore[arg-type]
    assert errors == []
    assert [e.prefix for e in entries] == ["44"]


HEADER = "dialprefix,rateinitial,initblock,billingblock,connectcharge,disconnectcharge,minimal_cost,grace,buyrate,buyrateinitblock,buyrateincrement,starttime,endtime,startdate,stopdate,chargea,rounding_calltime"  # noqa: E501
COLUMNS = HEADER.split(",")
GOOD_ROW = dict.fromkeys(COLUMNS, "")
GOOD_ROW.update(dialprefix="44", rateinitial="0.01")


def one_row(**values: str) -> str:
    row = {**GOOD_ROW, **values}
    return f"{HEADER}\n{','.join(row[c] for c in COLUMNS)}\n"


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("dialprefix", "", "is empty"),
        ("dialprefix", "_44X.", "is an Asterisk pattern"),
        ("dialprefix", "_44", "is an Asterisk pattern"),
        ("dialprefix", "44a", "is not a prefix of digits"),
        ("dialprefix", "+", "is not a prefix of digits"),
        ("dialprefix", "44 20", "is not a prefix of digits"),
        ("dialprefix", "٤٤", "is not a prefix of digits"),
        ("rateinitial", "", "is empty"),
        ("rateinitial", "abc", "is not a number"),
        ("rateinitial", "-0.01", "is negative"),
        ("rateinitial", "0.0000001", "more than 6 decimal places"),
        ("rateinitial", "NaN", "not a finite number"),
        ("rateinitial", "inf", "not a finite number"),
        ("rateinitial", "1_0", "not a plain decimal number"),
        ("connectcharge", "x", "is not a number"),
        ("disconnectcharge", "-1", "is negative"),
        ("minimal_cost", "-0.5", "is negative"),
        ("buyrate", "0.0000005", "more than 6 decimal places"),
        ("initblock", "-1", "is negative"),
        ("initblock", "1.5", "is not a whole number of seconds"),
        ("initblock", "9999999", "more than 999999 seconds"),
        ("billingblock", "six", "is not a whole number of seconds"),
        ("grace", "x", "is not a whole number of seconds"),
        ("buyrateinitblock", "-3", "is negative"),
        ("buyrateincrement", "1.5", "is not a whole number of seconds"),
        ("starttime", "10080", "is not a minute of the week"),
        ("starttime", "-1", "is not a minute of the week"),
        ("endtime", "99999999999", "is not a minute of the week"),
        ("endtime", "8:00", "is not a minute of the week"),
        ("startdate", "01/02/2025", "is not an ISO date"),
        ("startdate", "2025-01-01 00:00:00", "is not an ISO date"),
        ("stopdate", "2025-02-30", "is not an ISO date"),
        ("stopdate", "20250101", "is not an ISO date"),
        ("chargea", "0.5", "chargea is not supported"),
        ("chargea", "x", "chargea is not supported"),
        ("rounding_calltime", "1", "rounding_calltime is not supported"),
    ],
)
def test_bad_field(column: str, value: str, message: str) -> None:
    entries, errors = parse(one_row(**{column: value}))
    assert entries == []
    assert len(errors) == 1
    assert (errors[0].line, errors[0].column) == (2, column)
    assert message in errors[0].message
    assert str(errors[0]).startswith(f"line 2, column {column}: ")


@pytest.mark.parametrize(
    "values",
    [
        {"chargea": "0", "rounding_calltime": "0"},
        {"chargea": "0.00000", "rounding_calltime": "00"},
        {"dialprefix": " +44 ", "rateinitial": " 0.01 "},
        {"starttime": "10079", "endtime": "0"},
        {"startdate": "2025-01-01", "stopdate": "2025-01-01"},  # one day
        {"initblock": "999999", "billingblock": "0000060"},
        {"rateinitial": "0"},  # free destinations exist (toll-free)
    ],
)
def test_good_field(values: dict[str, str]) -> None:
    entries, errors = parse(one_row(**values))
    assert errors == []
    assert len(entries) == 1


def test_stopdate_before_startdate() -> None:
    errors = parse(one_row(startdate="2025-02-01", stopdate="2025-01-31"))[1]
    assert errors == [RowError(2, "stopdate", "2025-01-31 is before startdate 2025-02-01")]


def test_every_error_of_a_row_is_reported() -> None:
    errors = parse(one_row(dialprefix="_X", rateinitial="", initblock="-1", stopdate="tomorrow"))[1]
    assert [(e.line, e.column) for e in errors] == [
        (2, "dialprefix"),
        (2, "rateinitial"),
        (2, "initblock"),
        (2, "stopdate"),
    ]


def test_every_bad_row_is_reported_in_one_pass() -> None:
    text = """dialprefix,destination,rateinitial,initblock
44,UK,0.01,30
_33X.,France,0.01,30
49,Germany,0.01,thirty
39,Italy,0.01
1,USA,0.01,6,extra
34,Spain,-0.01,-6
351,Portugal,0.02,60
"""
    entries, errors = parse(text)
    assert [e.prefix for e in entries] == ["44", "351"]  # the good rows are still read
    assert [(e.line, e.column) for e in errors] == [
        (3, "dialprefix"),
        (4, "initblock"),
        (5, None),  # too few fields
        (6, None),  # too many
        (7, "rateinitial"),
        (7, "initblock"),
    ]
    assert "has 3 fields but the header has 4" in errors[2].message
    assert "has 5 fields but the header has 4" in errors[3].message


def test_max_errors_stops_the_parse() -> None:
    text = "dialprefix,rateinitial\n" + "".join(f"{n},x\n" for n in range(10))
    _, errors = parse_ratecard(text, max_errors=3)
    assert [e.line for e in errors] == [2, 3, 4, 4]
    assert errors[-1] == RowError(4, None, "stopped after 3 errors; fix these and try again")


def test_bad_csv_quoting_is_reported_and_the_parse_goes_on() -> None:
    entries, errors = parse('dialprefix,rateinitial\n44,"0.01"x\n33,0.02\n')
    assert [e.prefix for e in entries] == ["33"]
    assert [(e.line, e.column) for e in errors] == [(2, None)]
    assert "not valid CSV" in errors[0].message


class TestCrossRow:
    HEADER = "dialprefix,rateinitial,initblock,provider,starttime,endtime,startdate"

    def check(self, *rows: str) -> tuple[list[RateEntry], list[RowError]]:
        return parse("\n".join([self.HEADER, *rows]) + "\n")

    def test_same_price_from_several_carriers(self) -> None:
        entries, errors = self.check("44,0.01,30,alpha,,,", "44,0.01,30,beta,,,", "44,0.010,30,gamma,,,")
        assert errors == []
        assert [e.provider for e in entries] == ["alpha", "beta", "gamma"]

    def test_a_different_sell_price_is_reported_on_the_later_row(self) -> None:
        entries, errors = self.check("44,0.01,30,alpha,,,", "44,0.02,30,beta,,,", "44,0.01,60,gamma,,,")
        assert [e.provider for e in entries] == ["alpha"]
        assert [(e.line, e.column) for e in errors] == [(3, "rateinitial"), (4, "initblock")]
        assert "differs from line 2" in errors[0].message
        assert "rateinitial 0.02 here, 0.01 there" in errors[0].message
        assert "initblock 60 s here, 30 s there" in errors[1].message

    def test_a_carrier_twice_is_reported(self) -> None:
        entries, errors = self.check("44,0.01,30,alpha,,,", "44,0.01,30,beta,,,", "44,0.01,30,alpha,,,")
        assert len(entries) == 2
        assert [(e.line, e.column) for e in errors] == [(4, "provider")]
        assert errors[0].message == (
            "provider 'alpha' already has a rate for this prefix and time window on line 2"
        )

    def test_two_rows_without_carrier_are_reported(self) -> None:
        errors = self.check("44,0.01,30,,,,", "44,0.01,30,,,,")[1]
        assert [(e.line, e.column) for e in errors] == [(3, "provider")]
        assert "without provider" in errors[0].message

    def test_both_faults_on_one_row(self) -> None:
        errors = self.check("44,0.01,30,alpha,,,", "44,0.02,30,alpha,,,")[1]
        assert [(e.line, e.column) for e in errors] == [(3, "rateinitial"), (3, "provider")]

    def test_other_windows_and_dates_may_have_other_prices(self) -> None:
        entries, errors = self.check(
            "44,0.01,30,alpha,,,",
            "44,0.02,30,alpha,6840,480,",  # night
            "44,0.03,30,alpha,,,2026-01-01",  # next year's price
            "44,0.04,30,alpha,0,10079,2026-01-01",  # the explicit full window is the same window...
        )
        assert len(entries) == 3
        # ... so that row clashes with the row before it, in price and in carrier.
        assert [(e.line, e.column) for e in errors] == [(5, "rateinitial"), (5, "provider")]

    def test_the_explicit_full_week_is_the_default_window(self) -> None:
        errors = self.check("44,0.01,30,alpha,,,", "44,0.02,30,beta,0,10079,")[1]
        assert [(e.line, e.column) for e in errors] == [(3, "rateinitial")]

    def test_a_bad_row_does_not_become_the_reference(self) -> None:
        entries, errors = self.check("44,x,30,alpha,,,", "44,0.02,30,alpha,,,")
        assert [(e.line, e.column) for e in errors] == [(2, "rateinitial")]
        assert [e.sell.rate_per_min_micro for e in entries] == [20_000]


def test_unknown_column_is_reported_and_rows_still_checked() -> None:
    entries, errors = parse("dialprefix,rateinitial,initblok,colour\n44,0.01,30,red\n33,x,30,blue\n")
    assert [e.prefix for e in entries] == ["44"]
    assert [(e.line, e.column) for e in errors] == [(1, "initblok"), (1, "colour"), (3, "rateinitial")]
    assert errors[0].message == "unknown column: did you mean 'initblock'?"
    assert "a2bd reads dialprefix, rateinitial" in errors[1].message


def test_nameless_column_is_reported() -> None:
    errors = parse("dialprefix,rateinitial,\n44,0.01,\n")[1]
    assert errors == [RowError(1, None, "column 3 has no name (a stray delimiter?)")]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("destination,rateinitial", [(1, "dialprefix")]),
        ("dialprefix,destination", [(1, "rateinitial")]),
        ("dialprefix,rateinital", [(1, "rateinital"), (1, "rateinitial")]),  # a typo: unknown, and missing
        ("dialprefix,rateinitial,destination,destination", [(1, "destination")]),
        ("dialprefix\trateinitial", [(1, "dialprefix\trateinitial"), (1, "dialprefix"), (1, "rateinitial")]),
    ],
)
def test_header_errors_stop_the_parse(header: str, expected: list[tuple[int, str]]) -> None:
    entries, errors = parse(f"{header}\n44,0.01\n")
    assert entries == []
    assert [(e.line, e.column) for e in errors] == expected


@pytest.mark.parametrize("text", ["", "\n", "\n \n\r\n", "\ufeff"])
def test_empty_file(text: str) -> None:
    entries, errors = parse(text)
    assert entries == []
    assert len(errors) == 1
    assert errors[0].line == 1 and errors[0].column is None
    assert "the file is empty" in errors[0].message


@pytest.mark.parametrize(
    "text", ["dialprefix,rateinitial\n", "dialprefix,rateinitial\n\n,\n", "dialprefix;rateinitial"]
)
def test_header_only_file(text: str) -> None:
    entries, errors = parse(text)
    assert entries == []
    assert errors == [RowError(1, None, "the file has a header but no rates")]


def test_a2billing_export_header_loads() -> None:
    # cc_ratecard's columns as A2Billing exports them, with its defaults for the features a2bd lacks.
    columns = [
        "id", "idtariffplan", "dialprefix", "buyrate", "buyrateinitblock", "buyrateincrement", "rateinitial",
        "initblock", "billingblock", "connectcharge", "disconnectcharge", "stepchargea", "chargea",
        "timechargea", "billingblocka", "stepchargeb", "chargeb", "timechargeb", "billingblockb",
        "stepchargec", "chargec", "timechargec", "billingblockc", "startdate", "stopdate", "starttime",
        "endtime", "id_trunk", "musiconhold", "id_outbound_cidgroup", "rounding_calltime",
        "rounding_threshold", "additional_block_charge", "additional_block_charge_time", "tag",
        "disconnectcharge_after", "is_merged", "additional_grace", "minimal_cost",
        "announce_time_correction", "destination",
    ]  # fmt: skip
    assert set(columns) - {
        "dialprefix",
        "buyrate",
        "buyrateinitblock",
        "buyrateincrement",
        "rateinitial",
        "initblock",
        "billingblock",
        "connectcharge",
        "disconnectcharge",
        "startdate",
        "stopdate",
        "starttime",
        "endtime",
        "minimal_cost",
        "destination",
    } == (IGNORED_COLUMNS | UNSUPPORTED_UNLESS_ZERO)
    values = dict.fromkeys(columns, "0")
    values.update(
        id="17", idtariffplan="3", dialprefix="4420", buyrate="0.00500", buyrateinitblock="60",
        buyrateincrement="60", rateinitial="0.01250", initblock="60", billingblock="60",
        connectcharge="0.00000", disconnectcharge="0.00000", startdate="2024-01-01", stopdate="",
        starttime="0", endtime="10079", id_trunk="-1", musiconhold="", id_outbound_cidgroup="-1",
        tag="london", additional_grace="10", minimal_cost="0.00000", announce_time_correction="1.000",
        destination="London",
    )  # fmt: skip
    text = ";".join(columns) + "\n" + ";".join(values[c] for c in columns) + "\n"
    entries, errors = parse(text)
    assert errors == []
    assert entries == [
        RateEntry("4420", "London", SellRate(12_500, initial_block_s=60, increment_s=60), None,
                  BuyRate(5_000, 60, 60), start_date=date(2024, 1, 1)),
    ]  # fmt: skip


def test_default_provider_fills_rows_without_one() -> None:
    text = "dialprefix,rateinitial,provider\n44,0.01,\n44,0.01,beta\n33,0.02,\n"
    entries, errors = parse_ratecard(text, default_provider="alpha")
    assert errors == []
    assert [(e.prefix, e.provider) for e in entries] == [("44", "alpha"), ("44", "beta"), ("33", "alpha")]
    clash = parse_ratecard(text + "44,0.01,alpha\n", default_provider="alpha")[1]
    assert [(e.line, e.column) for e in clash] == [(5, "provider")]


def test_entries_build_a_tariff() -> None:
    entries, _ = parse(GOOD)
    tariff = Tariff.build("retail", entries)
    night = tariff.lookup("33123", datetime(2025, 3, 8, 2, 0))  # Saturday 02:00
    assert night is not None and night.sell.rate_per_min_micro == 10_000
    assert tariff.lookup("33123", datetime(2025, 3, 5, 12, 0)) is None  # Wednesday noon: no day rate
    uk = tariff.lookup("4420", datetime(2025, 6, 1, 12, 0))
    assert uk is not None and [e.provider for e in uk.entries] == ["alpha", "beta"]
    mobile = tariff.lookup("447911", datetime(2025, 6, 1, 12, 0))
    assert mobile is not None and mobile.prefix == "447"


def test_row_error_text() -> None:
    assert str(RowError(3, "rateinitial", "is empty")) == "line 3, column rateinitial: is empty"
    assert str(RowError(5, None, "has 3 fields")) == "line 5: has 3 fields"


prices = st.integers(min_value=0, max_value=10**9)
seconds = st.integers(min_value=0, max_value=3600)
rows = st.lists(
    st.tuples(
        st.text(alphabet="0123456789", min_size=1, max_size=8),
        prices, prices, prices, prices, seconds, seconds, seconds, prices,
    ),
    min_size=1,
    max_size=5,
    unique_by=lambda row: row[0],
)  # fmt: skip


@settings(max_examples=50)
@given(rows, st.sampled_from([",", ";"]))
def test_written_then_parsed_is_identity(
    written: list[tuple[str, int, int, int, int, int, int, int, int]], delimiter: str
) -> None:
    header = ["dialprefix", "rateinitial", "connectcharge", "disconnectcharge", "minimal_cost", "initblock",
              "billingblock", "grace", "buyrate"]  # fmt: skip
    lines = [delimiter.join(header)]
    for prefix, rate, connect, disconnect, min_cost, block, increment, grace, buy in written:
        money = [format_amount(m, p) for m, p in ((rate, 0), (connect, 2), (disconnect, 5), (min_cost, 6))]
        times = [str(block), str(increment), str(grace)]
        lines.append(delimiter.join([prefix, *money, *times, format_amount(buy)]))
    entries, errors = parse_ratecard(lines)
    assert errors == []
    assert [(e.prefix, e.sell, e.buy.rate_per_min_micro) for e in entries] == [
        (prefix, SellRate(rate, connect, disconnect, block, increment or 1, grace, min_cost), buy)
        for prefix, rate, connect, disconnect, min_cost, block, increment, grace, buy in written
    ]
