"""The storm's plan and its verdict, without servers: the verdict must catch every way the books go wrong."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from a2bd.domain.rating import cost_micro
from a2bd.errors import InputError
from a2bd.sim.ami import CallResult
from a2bd.sim.storm import (
    Outcome,
    PlannedCall,
    StormAccount,
    StormPlan,
    check_books,
    destinations,
    load_entries,
    make_accounts,
    plan_calls,
    read_calls_csv,
)

ENTRIES = load_entries()
FRANCE = next(e for e in ENTRIES if e.prefix == "33")
PREPAID = StormAccount("3000000000", "prepaid", 1_000_000, 0, 2)
BLOCKED = StormAccount("3000000001", "blocked", 10_000_000)


def test_a_plan_is_seeded_and_keeps_its_rate() -> None:
    plan = StormPlan(rate=200, calls=4000, accounts=50)
    accounts = make_accounts(plan)
    numbers = destinations(ENTRIES, plan.seed)
    calls = plan_calls(plan, accounts, numbers)
    assert calls == plan_calls(plan, accounts, numbers)  # the same storm every time
    kinds = Counter(a.kind for a in make_accounts(StormPlan(accounts=4000)))
    assert kinds["prepaid"] / 4000 == pytest.approx(0.6, abs=0.03)  # the plan's mix, 60/30/5/5
    assert kinds["postpaid"] / 4000 == pytest.approx(0.3, abs=0.03)
    assert kinds["blocked"] and kinds["expired"]
    span = calls[-1].at_s
    assert 4000 / span == pytest.approx(200, rel=0.1)  # Poisson arrivals at the rate asked
    assert all(c.talk_s <= plan.max_talk_s for c in calls)
    answered = sum(c.outcome == "answer" for c in calls) / len(calls)
    assert answered == pytest.approx(plan.answer_ratio, abs=0.03)


def test_a_csv_of_calls_is_read_and_every_bad_row_reported(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text("start_s,account,destination,talk_s,outcome\n1.5,3000000000,33123456789,10,answer\n"
                    "0.5,3000000000,4412345678,0,busy\n")
    assert [c.at_s for c in read_calls_csv(good)] == [0.5, 1.5]
    bad = tmp_path / "bad.csv"
    bad.write_text("start_s,account,destination,talk_s,outcome\n-1,3000000000,331,1,answer\n"
                   "1,300x,331,1,answer\n2,3000000000,331,nan,answer\n3,3000000000,331,1,voicemail\n"
                   "1_0,3000000000,331,1,answer\n1e3,3000000000,331,1,answer\n")
    with pytest.raises(InputError, match="6 bad row") as err:
        read_calls_csv(bad)
    assert all(f"line {n}" in str(err.value) for n in (2, 3, 4, 5, 6, 7))
    headless = tmp_path / "headless.csv"
    headless.write_text("when,who\n1,2\n")
    with pytest.raises(InputError, match="lacks"):
        read_calls_csv(headless)
    with pytest.raises(InputError, match=r"missing\.csv: cannot read it: No such file or directory"):
        read_calls_csv(tmp_path / "missing.csv")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("start_s,account,destination,talk_s\n1,3000000000,331,1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin\.csv: not UTF-8 text"):
        read_calls_csv(latin)


def answered(uniqueid: str, account: StormAccount = PREPAID, billable_s: int = 65) -> Outcome:
    result = CallResult(uniqueid=uniqueid, channel="Local/x", linkedid=uniqueid, status="OK",
                        disposition="ANSWERED", billable_s=billable_s, ended_by="callee", authorize_s=0.003)
    return Outcome(PlannedCall(0.0, account.number, "33123456789", 65), result, 1_790_000_000.0)


def books(outcomes: list[Outcome], ledger: list[tuple[str, str, int]], pg: dict[str, int],
          redis: dict[str, int | None]) -> list[str]:
    return check_books([PREPAID, BLOCKED], outcomes, ENTRIES, ledger, pg, redis).discrepancies


def test_exact_books_pass() -> None:
    price = cost_micro(FRANCE.sell, 65)
    balances = {PREPAID.number: 1_000_000 - price, BLOCKED.number: 10_000_000}
    assert books([answered("1")], [("storm/1", PREPAID.number, -price)], balances, dict(balances)) == []


@pytest.mark.parametrize(("ledger", "pg", "redis", "expected"), [
    ([], None, None, "missing from the ledger"),
    ([("storm/1", PREPAID.number, -1), ("storm/1", PREPAID.number, -1)], None, None, "doubled"),
    ([("storm/1", PREPAID.number, -1)], None, None, "billed 0.000001"),
    ([("storm/1", PREPAID.number, None), ("storm/9", PREPAID.number, -5)], None, None, "not answered"),
    (None, {PREPAID.number: 0}, None, "PostgreSQL balance"),
    (None, None, {PREPAID.number: 5}, "Redis balance"),
])
def test_each_way_the_books_go_wrong_is_a_discrepancy(ledger: list[tuple[str, str, int]] | None,
                                                     pg: dict[str, int] | None, redis: dict[str, int | None] | None,
                                                     expected: str) -> None:
    price = cost_micro(FRANCE.sell, 65)
    good_pg = {PREPAID.number: 1_000_000 - price, BLOCKED.number: 10_000_000}
    good_ledger = [("storm/1", PREPAID.number, -price)]
    if ledger is not None:
        ledger = [(c, a, -price if amount is None else amount) for c, a, amount in ledger]
    pg_now = {**good_pg, **(pg or {})}
    found = books([answered("1")], good_ledger if ledger is None else ledger, pg_now, {**pg_now, **(redis or {})})
    assert any(expected in line for line in found), found


def test_an_authorized_blocked_account_and_an_overspent_one_are_discrepancies() -> None:
    blocked_call = answered("2", BLOCKED, 0)
    found = books([blocked_call], [("storm/2", BLOCKED.number, 0)], {PREPAID.number: 1_000_000,
                  BLOCKED.number: 10_000_000}, {PREPAID.number: 1_000_000, BLOCKED.number: 10_000_000})
    assert any("(blocked) was authorized" in line for line in found)
    # 10 minutes to France on 1.00 of credit: far past one increment per live call below zero
    long_call = answered("3", PREPAID, 60_000)
    price = cost_micro(FRANCE.sell, 60_000)
    balances = {PREPAID.number: 1_000_000 - price, BLOCKED.number: 10_000_000}
    found = books([long_call], [("storm/3", PREPAID.number, -price)], balances, dict(balances))
    assert any("below the guard's bound" in line for line in found)


def test_past_the_guards_bound_is_only_reported_when_a_fault_blinded_the_guard() -> None:
    long_call = answered("3", PREPAID, 60_000)
    price = cost_micro(FRANCE.sell, 60_000)
    balances = {PREPAID.number: 1_000_000 - price, BLOCKED.number: 10_000_000}
    ledger = [("storm/3", PREPAID.number, -price)]
    seen = check_books([PREPAID, BLOCKED], [long_call], ENTRIES, ledger, balances, dict(balances))
    blinded = check_books([PREPAID, BLOCKED], [long_call], ENTRIES, ledger, balances, dict(balances),
                          guard_blinded=True)
    assert len(seen.over_bound) == len(blinded.over_bound) == 1
    assert seen.discrepancies == seen.over_bound and blinded.discrepancies == []
