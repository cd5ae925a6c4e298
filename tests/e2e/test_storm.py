"""A small storm end to end: the simulated Asterisk against `a2bd serve` as a process, then the books."""

from __future__ import annotations

import asyncpg
import pytest

from a2bd.adapters.redis_store import RedisStore
from a2bd.sim.storm import StormPlan, destinations, load_entries, make_accounts, plan_calls, run_storm

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.mark.timeout(120)
async def test_a_storm_balances_to_the_micro_unit(pg: asyncpg.Connection, pg_url: str, store: RedisStore,
                                                  redis_url: str) -> None:
    plan = StormPlan(rate=60, calls=240, accounts=30, mean_talk_s=2.0, max_talk_s=6.0, seed=11)
    entries = load_entries()
    accounts = make_accounts(plan)
    calls = plan_calls(plan, accounts, destinations(entries, plan.seed))
    report = await run_storm(calls, accounts, entries, pg_url=pg_url, redis_url=redis_url)
    summary = report.summary()
    assert report.verdict.discrepancies == []
    assert summary["calls"] == 240 and summary["answered"] > 50
    assert summary["statuses"]["OK"] > 100 and len(summary["statuses"]) >= 2  # refusals too
    # every answered call is one ledger line, and the books the verdict read are PostgreSQL's own
    lines = await pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'")
    assert lines == summary["answered"]
    assert report.verdict.expected_micro == {r["number"]: r["balance_micro"]
                                             for r in await pg.fetch("SELECT number, balance_micro FROM accounts")}
