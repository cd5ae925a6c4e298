"""The ledger's guarantees, held by PostgreSQL itself: stated balances must chain, a call is written once
however many writers race for it, and the figures the daemons load from it (sync, low-credit notices)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from a2bd.adapters import postgres
from a2bd.adapters.postgres import CallLine, WrittenLine
from a2bd.errors import InputError

pytestmark = pytest.mark.integration

ACCT_A, ACCT_B = "1000000001", "1000000002"
OPENING = 10_000_000
AT = datetime(2030, 1, 2, 12, 0, tzinfo=UTC)


async def setup(pg: asyncpg.Connection, *, opening: int = OPENING, **fields: object) -> dict[str, int]:
    """Tariff `t`, providers `carrier-a` and `carrier-b`, accounts A and B opened with `opening`: name -> id."""
    await postgres.replace_tariff(pg, "t", [])
    ids = {
        "carrier-a": await postgres.add_provider(pg, "carrier-a", "PJSIP/{number}@a"),
        "carrier-b": await postgres.add_provider(pg, "carrier-b", "PJSIP/{number}@b"),
    }
    for number in (ACCT_A, ACCT_B):
        acct = await postgres.create_account(pg, number=number, tariff="t", initial_balance_micro=opening,
                                             **fields)
        ids[number] = acct["id"]
    return ids


def call(call_id: str, account: str = ACCT_A, amount: int = -100_000, *, provider: str | None = "carrier-a",
         cost: int = 40_000, seconds: int = 60, ended: datetime = AT) -> CallLine:
    return CallLine(call_id=call_id, account=account, amount_micro=amount, seconds=seconds, destination="4930123",
                    description="Germany Berlin", answered_at=ended - timedelta(seconds=seconds), ended_at=ended,
                    provider=provider, provider_amount_micro=cost if provider else 0)


async def balance(pg: asyncpg.Connection, table: str, ident: int) -> int:
    value: int = await pg.fetchval(f"SELECT balance_micro FROM {table} WHERE id = $1", ident)  # noqa: S608
    return value


async def ledger_count(pg: asyncpg.Connection) -> int:
    count: int = await pg.fetchval("SELECT count(*) FROM ledger")
    return count


async def assert_chains(pg: asyncpg.Connection) -> None:
    """Every line's stated balances equal the running sums of the lines before it (every balance starts at 0)."""
    broken = await pg.fetch("""
        SELECT id FROM (
            SELECT id, account_id, balance_after_micro,
                   sum(amount_micro) OVER (PARTITION BY account_id ORDER BY id) AS running
            FROM ledger WHERE account_id IS NOT NULL) x
        WHERE balance_after_micro <> running
        UNION ALL
        SELECT id FROM (
            SELECT id, provider_balance_after_micro,
                   sum(provider_amount_micro) OVER (PARTITION BY provider_id ORDER BY id) AS running
            FROM ledger WHERE provider_id IS NOT NULL) y
        WHERE provider_balance_after_micro <> running""")
    assert [r["id"] for r in broken] == []
    drift = await pg.fetch("""
        SELECT a.id FROM accounts a
        WHERE a.balance_micro <> coalesce((SELECT sum(amount_micro) FROM ledger l WHERE l.account_id = a.id), 0)
        UNION ALL
        SELECT p.id FROM providers p
        WHERE p.balance_micro <> coalesce((SELECT sum(provider_amount_micro) FROM ledger l
                                           WHERE l.provider_id = p.id), 0)""")
    assert [r["id"] for r in drift] == []


# -- the statement trigger refuses balances that do not chain ------------------------------------------


@pytest.mark.parametrize("stated", [OPENING - 100 + 1, OPENING - 100 - 1, OPENING, -100])
async def test_an_account_line_whose_balance_does_not_chain_is_refused(pg: asyncpg.Connection, stated: int) -> None:
    ids = await setup(pg)
    before = await ledger_count(pg)
    with pytest.raises(asyncpg.CheckViolationError, match="account balance that does not follow"):
        await pg.execute("INSERT INTO ledger (account_id, kind, amount_micro, balance_after_micro)"
                         " VALUES ($1, 'charge', -100, $2)", ids[ACCT_A], stated)
    assert await balance(pg, "accounts", ids[ACCT_A]) == OPENING
    assert await ledger_count(pg) == before


async def test_an_account_line_that_chains_is_accepted_and_moves_the_balance(pg: asyncpg.Connection) -> None:
    ids = await setup(pg)
    await pg.execute("INSERT INTO ledger (account_id, kind, amount_micro, balance_after_micro)"
                     " VALUES ($1, 'charge', -100, $2)", ids[ACCT_A], OPENING - 100)
    assert await balance(pg, "accounts", ids[ACCT_A]) == OPENING - 100
    await assert_chains(pg)


@pytest.mark.parametrize("stated", [1_000 + 1, 999, 0])
async def test_a_provider_line_whose_balance_does_not_chain_is_refused(pg: asyncpg.Connection, stated: int) -> None:
    ids = await setup(pg)
    with pytest.raises(asyncpg.CheckViolationError, match="provider balance that does not follow"):
        await pg.execute("INSERT INTO ledger (provider_id, kind, amount_micro, provider_amount_micro,"
                         " provider_balance_after_micro) VALUES ($1, 'provider_call', 0, 1000, $2)",
                         ids["carrier-a"], stated)
    assert await balance(pg, "providers", ids["carrier-a"]) == 0
    await pg.execute("INSERT INTO ledger (provider_id, kind, amount_micro, provider_amount_micro,"
                     " provider_balance_after_micro) VALUES ($1, 'provider_call', 0, 1000, 1000)", ids["carrier-a"])
    assert await balance(pg, "providers", ids["carrier-a"]) == 1000


async def test_a_call_line_must_chain_for_the_account_and_the_provider_alike(pg: asyncpg.Connection) -> None:
    ids = await setup(pg)
    insert = ("INSERT INTO ledger (account_id, provider_id, kind, amount_micro, provider_amount_micro,"
              " balance_after_micro, provider_balance_after_micro, call_id) VALUES ($1, $2, 'call', -500, 200, $3, $4,"
              " 'ast1/1')")
    with pytest.raises(asyncpg.CheckViolationError, match="provider balance"):
        await pg.execute(insert, ids[ACCT_A], ids["carrier-a"], OPENING - 500, 199)
    assert await balance(pg, "accounts", ids[ACCT_A]) == OPENING  # the account's half was rolled back too
    await pg.execute(insert, ids[ACCT_A], ids["carrier-a"], OPENING - 500, 200)
    assert await balance(pg, "accounts", ids[ACCT_A]) == OPENING - 500
    assert await balance(pg, "providers", ids["carrier-a"]) == 200


async def test_a_line_without_its_stated_balance_is_refused(pg: asyncpg.Connection) -> None:
    ids = await setup(pg)
    with pytest.raises(asyncpg.CheckViolationError, match="ledger_account_chain"):
        await pg.execute("INSERT INTO ledger (account_id, kind, amount_micro) VALUES ($1, 'charge', -1)",
                         ids[ACCT_A])
    with pytest.raises(asyncpg.CheckViolationError, match="ledger_provider_chain"):
        await pg.execute("INSERT INTO ledger (account_id, provider_id, kind, amount_micro, provider_amount_micro,"
                         " balance_after_micro) VALUES ($1, $2, 'call', -1, 1, $3)",
                         ids[ACCT_A], ids["carrier-a"], OPENING - 1)


async def test_a_multi_line_statement_chains_through_its_own_lines(pg: asyncpg.Connection) -> None:
    ids = await setup(pg)
    a, b = ids[ACCT_A], ids[ACCT_B]
    # Interleaved accounts: each chains over its own lines, in id order.
    await pg.execute(
        "INSERT INTO ledger (account_id, kind, amount_micro, balance_after_micro) VALUES"
        " ($1, 'charge', -100, $3), ($2, 'charge', -7, $4), ($1, 'charge', -200, $5), ($1, 'payment', 50, $6)",
        a, b, OPENING - 100, OPENING - 7, OPENING - 300, OPENING - 250,
    )
    assert await balance(pg, "accounts", a) == OPENING - 250
    assert await balance(pg, "accounts", b) == OPENING - 7
    await assert_chains(pg)


@pytest.mark.parametrize("second", [
    OPENING - 200,  # as if the first line were not there: both state from the opening
    OPENING - 301,
])
async def test_one_broken_line_refuses_the_whole_statement(pg: asyncpg.Connection, second: int) -> None:
    ids = await setup(pg)
    before = await ledger_count(pg)
    with pytest.raises(asyncpg.CheckViolationError, match="1 ledger line"):
        await pg.execute(
            "INSERT INTO ledger (account_id, kind, amount_micro, balance_after_micro) VALUES"
            " ($1, 'charge', -100, $2), ($1, 'charge', -200, $3)", ids[ACCT_A], OPENING - 100, second,
        )
    assert await ledger_count(pg) == before
    assert await balance(pg, "accounts", ids[ACCT_A]) == OPENING


# -- post ------------------------------------------------------------------------------------------------


async def test_post_on_an_account_states_its_balance_after(pg: asyncpg.Connection) -> None:
    ids = await setup(pg)
    line = await postgres.post(pg, kind="charge", amount_micro=-1_250_000, account_id=ids[ACCT_A],
                               description="DID rental")
    assert (line["balance_after_micro"], line["provider_balance_after_micro"]) == (OPENING - 1_250_000, None)
    line = await postgres.post(pg, kind="payment", amount_micro=3_000_000, account_id=ids[ACCT_A])
    assert line["balance_after_micro"] == OPENING + 1_750_000
    assert await balance(pg, "accounts", ids[ACCT_A]) == OPENING + 1_750_000
    await assert_chains(pg)


async def test_post_on_a_provider_moves_only_the_provider(pg: asyncpg.Connection) -> None:
    ids = await setup(pg)
    line = await postgres.post(pg, kind="provider_call", provider_id=ids["carrier-b"], provider_amount_micro=900)
    assert (line["amount_micro"], line["balance_after_micro"], line["provider_balance_after_micro"]) == (0, None, 900)
    line = await postgres.post(pg, kind="provider_payment", provider_id=ids["carrier-b"],
                               provider_amount_micro=-1_000)
    assert line["provider_balance_after_micro"] == -100
    assert await balance(pg, "providers", ids["carrier-b"]) == -100
    assert await balance(pg, "providers", ids["carrier-a"]) == 0
    await assert_chains(pg)


async def test_post_of_a_call_moves_the_account_and_its_carrier(pg: asyncpg.Connection) -> None:
    ids = await setup(pg)
    line = await postgres.post(pg, kind="call", amount_micro=-300, account_id=ids[ACCT_A],
                               provider_id=ids["carrier-a"], provider_amount_micro=120, call_id="ast1/9")
    assert (line["balance_after_micro"], line["provider_balance_after_micro"]) == (OPENING - 300, 120)
    await assert_chains(pg)


async def test_post_to_an_unknown_party_writes_nothing(pg: asyncpg.Connection) -> None:
    ids = await setup(pg)
    before = await ledger_count(pg)
    with pytest.raises(InputError, match="account id 999 does not exist"):
        await postgres.post(pg, kind="charge", amount_micro=-1, account_id=999)
    with pytest.raises(InputError, match="provider id 999 does not exist"):
        await postgres.post(pg, kind="call", amount_micro=-1, account_id=ids[ACCT_A], provider_id=999,
                            provider_amount_micro=1)
    assert await ledger_count(pg) == before
    assert await balance(pg, "accounts", ids[ACCT_A]) == OPENING


async def test_concurrent_posts_to_one_account_all_chain(pg: asyncpg.Connection, pg_url: str) -> None:
    ids = await setup(pg)
    conns = [await asyncpg.connect(pg_url) for _ in range(4)]

    async def poster(conn: asyncpg.Connection, amounts: range) -> None:
        for amount in amounts:
            await postgres.post(conn, kind="charge", amount_micro=-amount, account_id=ids[ACCT_A])

    try:
        await asyncio.wait_for(asyncio.gather(*(poster(conn, range(w + 1, 41, 4)) for w, conn in enumerate(conns))),
                               30)
    finally:
        for conn in conns:
            await conn.close()
    assert await balance(pg, "accounts", ids[ACCT_A]) == OPENING - sum(range(1, 41))
    await assert_chains(pg)


# -- write_calls ---------------------------------------------------------------------------------------


def by_call(written: Sequence[WrittenLine]) -> dict[str, WrittenLine]:
    result = {w.call_id: w for w in written}
    assert len(result) == len(written), "one WrittenLine per call"
    return result


async def test_write_calls_chains_a_batch_and_moves_each_balance_once(pg: asyncpg.Connection) -> None:
    ids = await setup(pg)
    lines = [call("c1", amount=-100), call("c2", ACCT_B, -20, provider="carrier-b", cost=5),
             call("c3", amount=-300, cost=70), call("c4", amount=-1, provider=None)]
    written = by_call(await postgres.write_calls(pg, lines))
    assert all(w.fresh for w in written.values())
    assert [written[c].balance_after_micro for c in ("c1", "c3", "c4")] == [OPENING - 100, OPENING - 400,
                                                                              OPENING - 401]
    assert (written["c1"].provider_balance_after_micro, written["c3"].provider_balance_after_micro) == (40_000,
                                                                                                         40_070)
    assert (written["c4"].provider, written["c4"].provider_balance_after_micro) == (None, None)
    assert written["c2"].balance_after_micro == OPENING - 20
    assert written["c2"].provider_balance_after_micro == 5
    assert written["c1"].line_id < written["c3"].line_id < written["c4"].line_id  # in batch order
    assert await balance(pg, "accounts", ids[ACCT_A]) == OPENING - 401
    assert await balance(pg, "providers", ids["carrier-a"]) == 40_070
    row = await pg.fetchrow("SELECT * FROM ledger WHERE call_id = 'c1'")
    assert (row["kind"], row["seconds"], row["destination"], row["created_at"]) == ("call", 60, "4930123", AT)
    await assert_chains(pg)


async def test_the_same_call_twice_in_one_batch_is_one_line(pg: asyncpg.Connection) -> None:
    ids = await setup(pg)
    written = await postgres.write_calls(pg, [call("c1"), call("c2"), call("c1")])
    assert sorted((w.call_id, w.fresh) for w in written) == [("c1", True), ("c2", True)]
    assert await pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'") == 2
    assert await balance(pg, "accounts", ids[ACCT_A]) == OPENING - 200_000
    assert await balance(pg, "providers", ids["carrier-a"]) == 80_000


async def test_a_call_replayed_in_a_later_batch_comes_back_as_it_stands(pg: asyncpg.Connection) -> None:
    ids = await setup(pg)
    first = by_call(await postgres.write_calls(pg, [call("c1"), call("c2", seconds=30)]))
    # A replay may carry another price (a re-rated event): the ledger keeps the line it has.
    again = by_call(await postgres.write_calls(pg, [call("c2", amount=-999_999), call("c3")]))
    assert again["c2"] == WrittenLine("c2", first["c2"].line_id, ACCT_A, OPENING - 200_000, "carrier-a", 80_000, 30,
                                      False)
    assert again["c3"].fresh
    assert again["c3"].balance_after_micro == OPENING - 300_000
    replay_only = await postgres.write_calls(pg, [call("c1"), call("c3")])
    assert not any(w.fresh for w in replay_only)
    assert await pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'") == 3
    assert await balance(pg, "accounts", ids[ACCT_A]) == OPENING - 300_000
    assert await balance(pg, "providers", ids["carrier-a"]) == 120_000
    await assert_chains(pg)


async def test_a_call_of_an_unknown_account_is_neither_written_nor_returned(pg: asyncpg.Connection) -> None:
    ids = await setup(pg)
    written = await postgres.write_calls(pg, [call("c1"), call("ghost", "9999999999"), call("c2")])
    assert sorted(w.call_id for w in written) == ["c1", "c2"]
    assert await pg.fetchval("SELECT count(*) FROM ledger WHERE call_id = 'ghost'") == 0
    assert await balance(pg, "providers", ids["carrier-a"]) == 80_000  # the ghost's carrier cost neither
    assert await postgres.write_calls(pg, [call("ghost", "9999999999")]) == []


async def test_a_call_of_an_unknown_provider_bills_the_account_only(pg: asyncpg.Connection) -> None:
    ids = await setup(pg)
    written = by_call(await postgres.write_calls(pg, [call("c1", provider="gone")]))
    assert (written["c1"].provider, written["c1"].provider_balance_after_micro) == (None, None)
    assert await balance(pg, "accounts", ids[ACCT_A]) == OPENING - 100_000
    await assert_chains(pg)


async def test_an_empty_batch_writes_nothing(pg: asyncpg.Connection) -> None:
    await setup(pg)
    before = await ledger_count(pg)
    assert await postgres.write_calls(pg, []) == []
    assert await ledger_count(pg) == before


@pytest.fixture
async def two_conns(pg_url: str) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection]]:
    a, b = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def wait_until_blocked(pg: asyncpg.Connection, backends: Sequence[int], timeout_s: float = 10.0) -> None:
    """Until every backend in `backends` waits on a lock (both writers are inside their statement)."""
    async with asyncio.timeout(timeout_s):
        while True:
            waiting = await pg.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[]) AND wait_event_type = 'Lock'",
                list(backends),
            )
            if waiting == len(backends):
                return
            await asyncio.sleep(0.01)


async def test_overlapping_batches_from_two_writers_write_each_call_once(
    pg: asyncpg.Connection, two_conns: tuple[asyncpg.Connection, asyncpg.Connection]
) -> None:
    ids = await setup(pg)
    one, two = two_conns
    batch_one = [call(f"c{i}", ACCT_A if i % 2 else ACCT_B, -(1_000 + i), cost=10 + i) for i in range(0, 30)]
    batch_two = [call(f"c{i}", ACCT_A if i % 2 else ACCT_B, -(1_000 + i), cost=10 + i) for i in range(20, 50)]
    # Hold both accounts so that both statements take their snapshot before either writes: a true race.
    holder = pg
    tx = holder.transaction()
    await tx.start()
    await holder.execute("SELECT 1 FROM accounts ORDER BY id FOR UPDATE")
    racing = asyncio.gather(postgres.write_calls(one, batch_one), postgres.write_calls(two, batch_two),
                            return_exceptions=True)
    try:
        await wait_until_blocked(holder, [one.get_server_pid(), two.get_server_pid()])
    finally:
        await tx.rollback()
    results = await asyncio.wait_for(racing, 10)
    # The first to get the locks writes its batch; the other's statement meets the winner's lines on the
    # unique index (its filter saw the ledger as it was when the statement began) and writes nothing.
    winners = [r for r in results if isinstance(r, list)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1 and len(losers) == 1
    assert isinstance(losers[0], asyncpg.UniqueViolationError)
    assert all(w.fresh for w in winners[0])
    lost_conn, lost_batch = (two, batch_two) if results[1] is losers[0] else (one, batch_one)
    assert await pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'") == 30  # only the winner's
    # The writer retries the same batch: the overlap comes back as written by the winner, the rest is fresh.
    retried = by_call(await postgres.write_calls(lost_conn, lost_batch))
    overlap = {f"c{i}" for i in range(20, 30)}
    assert {c for c, w in retried.items() if not w.fresh} == overlap
    assert len(retried) == 30
    assert await pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'") == 50
    assert await pg.fetchval("SELECT count(DISTINCT call_id) FROM ledger WHERE kind = 'call'") == 50
    assert await balance(pg, "accounts", ids[ACCT_A]) == OPENING - sum(1_000 + i for i in range(1, 50, 2))
    assert await balance(pg, "accounts", ids[ACCT_B]) == OPENING - sum(1_000 + i for i in range(0, 50, 2))
    assert await balance(pg, "providers", ids["carrier-a"]) == sum(10 + i for i in range(50))
    await assert_chains(pg)


async def test_many_concurrent_writers_with_overlapping_batches_retrying_write_each_call_once(
    pg: asyncpg.Connection, pg_url: str
) -> None:
    ids = await setup(pg)
    conns = [await asyncpg.connect(pg_url) for _ in range(4)]

    async def writer(conn: asyncpg.Connection, batches: list[list[CallLine]]) -> None:
        for lines in batches:
            for _ in range(100):  # as LedgerWriter: retry the batch on the unique index
                try:
                    await postgres.write_calls(conn, lines)
                    break
                except asyncpg.UniqueViolationError:
                    continue
            else:
                raise AssertionError("a batch never got through")

    calls = [call(f"c{i}", (ACCT_A, ACCT_B)[i % 2], -(i + 1), provider=("carrier-a", "carrier-b", None)[i % 3],
                  cost=i) for i in range(200)]
    try:
        # Each writer (one connection) takes overlapping slices of 40, one batch after the other.
        await asyncio.wait_for(asyncio.gather(*(
            writer(conns[w], [calls[start:start + 40] for start in range(w * 10, 200, 40)]) for w in range(4)
        )), 30)
    finally:
        for conn in conns:
            await conn.close()
    assert await pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'") == 200
    assert await balance(pg, "accounts", ids[ACCT_A]) == OPENING - sum(i + 1 for i in range(0, 200, 2))
    assert await balance(pg, "accounts", ids[ACCT_B]) == OPENING - sum(i + 1 for i in range(1, 200, 2))
    assert await balance(pg, "providers", ids["carrier-a"]) == sum(i for i in range(0, 200, 3))
    assert await balance(pg, "providers", ids["carrier-b"]) == sum(i for i in range(1, 200, 3))
    await assert_chains(pg)


# -- low-credit notices ----------------------------------------------------------------------------------


async def test_a_low_credit_notice_is_recorded_once_per_downward_crossing(pg: asyncpg.Connection) -> None:
    ids = await setup(pg, opening=3_000_000, low_credit_threshold_micro=1_000_000, credit_limit_micro=200_000)
    a = ids[ACCT_A]
    assert await postgres.notices(pg, a) == []
    await postgres.post(pg, kind="charge", amount_micro=-1_900_000, account_id=a)  # available 1.3: above
    assert await postgres.notices(pg, a) == []
    await postgres.post(pg, kind="charge", amount_micro=-500_000, account_id=a)  # available 0.8: crossed
    await postgres.write_calls(pg, [call("c1", amount=-300_000)])  # available 0.5: still below
    await postgres.post(pg, kind="charge", amount_micro=-1, account_id=a)
    [first] = await postgres.notices(pg, a)
    assert (first["kind"], first["sent_at"]) == ("low_credit", None)
    assert json.loads(first["detail"]) == {"available_micro": 800_000, "threshold_micro": 1_000_000}
    await postgres.post(pg, kind="payment", amount_micro=600_000, account_id=a)  # available 1.1: above again
    assert len(await postgres.notices(pg, a)) == 1
    assert await pg.fetchval("SELECT low_credit FROM accounts WHERE id = $1", a) is False
    await postgres.write_calls(pg, [call("c2", amount=-200_000)])  # available 0.9: crossed again, by a call
    notes = await postgres.notices(pg, a)
    assert len(notes) == 2
    assert json.loads(notes[1]["detail"])["available_micro"] == 899_999
    assert await postgres.notices(pg, ids[ACCT_B]) == []


async def test_exactly_at_the_threshold_is_not_low(pg: asyncpg.Connection) -> None:
    ids = await setup(pg, opening=2_000_000, low_credit_threshold_micro=1_000_000)
    await postgres.post(pg, kind="charge", amount_micro=-1_000_000, account_id=ids[ACCT_A])
    assert await postgres.notices(pg, ids[ACCT_A]) == []
    await postgres.post(pg, kind="charge", amount_micro=-1, account_id=ids[ACCT_A])
    assert len(await postgres.notices(pg, ids[ACCT_A])) == 1


async def test_no_threshold_means_no_notice(pg: asyncpg.Connection) -> None:
    ids = await setup(pg, opening=1_000)
    await postgres.post(pg, kind="charge", amount_micro=-1_000_000, account_id=ids[ACCT_A])
    assert await postgres.notices(pg, ids[ACCT_A]) == []


async def test_one_batch_crossing_for_several_accounts_notes_each_once(pg: asyncpg.Connection) -> None:
    ids = await setup(pg, opening=1_500_000, low_credit_threshold_micro=1_000_000)
    await postgres.write_calls(pg, [call(f"c{i}", (ACCT_A, ACCT_B)[i % 2], -200_000) for i in range(8)])
    assert len(await postgres.notices(pg, ids[ACCT_A])) == 1
    assert len(await postgres.notices(pg, ids[ACCT_B])) == 1


# -- what sync loads -------------------------------------------------------------------------------------


async def test_accounts_for_sync_give_the_newest_line_and_todays_seconds(pg: asyncpg.Connection) -> None:
    ids = await setup(pg)
    await postgres.replace_tariff(pg, "t2", [])
    silent = await postgres.create_account(pg, number="1000000003", tariff="t2", initial_balance_micro=0)
    today: datetime = await pg.fetchval("SELECT date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'")
    await postgres.write_calls(pg, [
        call("old", seconds=500, ended=today - timedelta(minutes=1)),  # yesterday: not counted today
        call("c1", seconds=30, ended=today + timedelta(seconds=1)),
        call("c2", ACCT_B, seconds=7, provider="carrier-b", ended=today + timedelta(seconds=2)),
        call("c3", seconds=45, ended=today + timedelta(seconds=3), provider=None),
    ])
    newest_a = await postgres.post(pg, kind="payment", amount_micro=5, account_id=ids[ACCT_A])
    rows = {r["number"]: r for r in await postgres.accounts_for_sync(pg)}
    a, b, s = rows[ACCT_A], rows[ACCT_B], rows["1000000003"]
    assert (a["last_line_id"], a["today_s"], a["balance_micro"]) == (newest_a["id"], 75, OPENING - 300_000 + 5)
    last_b = await pg.fetchval("SELECT id FROM ledger WHERE call_id = 'c2'")
    assert (b["last_line_id"], b["today_s"], b["balance_micro"]) == (last_b, 7, OPENING - 100_000)
    assert (s["last_line_id"], s["today_s"], s["balance_micro"]) == (0, 0, 0)
    assert (s["id"], s["tariff"], list(s["callerids"])) == (silent["id"], "t2", [])
    providers = {r["name"]: r for r in await postgres.providers_for_sync(pg)}
    last_a = await pg.fetchval("SELECT id FROM ledger WHERE call_id = 'c1'")
    assert (providers["carrier-a"]["last_line_id"], providers["carrier-a"]["today_s"]) == (last_a, 30)
    assert (providers["carrier-b"]["last_line_id"], providers["carrier-b"]["today_s"]) == (last_b, 7)
    assert providers["carrier-a"]["balance_micro"] == 80_000
