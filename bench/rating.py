"""Rating benchmark: ended calls through charging (LedgerWriter) into the real PostgreSQL and Redis, beside a raw
batched INSERT of the same rows into a plain table of the ledger's shape.

    .venv/bin/python bench/rating.py [--calls 200000] [--accounts 1000] [--providers 3] [--batch 500]

Sets up the database a2bd_bench and Redis db 14 (--providers carriers with `postgres.add_provider`, --accounts
accounts with `postgres.create_account` on one connection, `a2bd sync`'s `sync_redis`), builds --calls answered
calls in memory (seeded: accounts, durations, 8 rate shapes, 1-3 routes of the carriers; not timed), then:

  raw insert   `INSERT INTO ledger_raw (...) SELECT * FROM unnest(...)`, --batch rows per statement and commit,
               one connection, the rows the writer writes (pre-built arrays): ledger_raw is `LIKE ledger` with
               its primary key and no trigger or other index. Run before and after the others (mean shown).
  charging     one LedgerWriter (batch_lines=--batch, batch_ms=--batch-ms), exactly as the daemon runs it:
               submit (rate the call, queue it) in slices of --batch with a yield between slices, write_calls
               (one statement per batch, the ledger_apply trigger), then, overlapping the next batch, settle.lua
               per account and provider_settle.lua per carrier in one Redis write and one PUBLISH of
               a2b:changed; timed from the first submit until drain()
               returns (every call committed and Redis settled). The books are then checked: one ledger line per
               call, every account's and carrier's balance in PostgreSQL and in Redis equal to the opening less the
               prices recomputed with cost_micro.
  write_calls  (for the analysis) postgres.write_calls alone on the same calls, --batch lines per statement, one
               connection, no Redis and no rating: what the ledger statement costs by itself.

Each pass starts from the same state (call lines removed, balances back to the opening, tables vacuumed; not
analyzed unless --analyze). write_calls is timed per batch inside the writer (commit latency p50/p99, lines per
batch) by wrapping the module function it calls. CPU is shown per call for this process and for the PostgreSQL
and Redis server processes (from /proc).

Target (issue): charging >= 50,000 calls/s end to end and >= 50% of the raw insert's rows/s.
--profile also runs the charging pass under cProfile (a separate pass on fresh data) and prints EXPLAIN ANALYZE
of one batch statement; --pg-set NAME=VALUE gives the writer's PostgreSQL sessions a setting (an experiment).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import importlib
import io
import os
import pstats
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from _common import (
    BENCH_REDIS_DB,
    REPO,
    BenchLock,
    bench_urls,
    calibrate_ms,
    create_bench_db,
    drop_bench_db,
    machine_busy_s,
    percentile,
    pin_code,
    print_machine,
)

ACCOUNT_BASE = 5_000_000_000  # account numbers are ACCOUNT_BASE + i, 10 digits
OPENING_MICRO = 10**12
TARGET_PER_S = 50_000
TARGET_RATIO = 0.5
# sell per minute (micro), connect, initial block s, increment s, grace s, minimal cost; buy per minute (micro)
RATE_SHAPES = [
    (12_000, 0, 60, 60, 0, 0, 6_000), (85_000, 0, 30, 6, 3, 0, 40_000), (9_000, 5_000, 60, 60, 0, 0, 4_000),
    (45_000, 0, 1, 1, 0, 0, 20_000), (8_000, 0, 6, 6, 0, 10_000, 3_500), (250_000, 0, 60, 60, 5, 0, 150_000),
    (130_000, 2_000, 30, 1, 0, 0, 70_000), (60_000, 0, 60, 1, 0, 0, 30_000),
]
RAW_COLUMNS = ("account_id", "provider_id", "kind", "amount_micro", "provider_amount_micro", "balance_after_micro",
               "provider_balance_after_micro", "call_id", "seconds", "destination", "description", "answered_at",
               "created_at")
RAW_INSERT = (
    "INSERT INTO ledger_raw (account_id, provider_id, kind, amount_micro, provider_amount_micro,"
    " balance_after_micro, provider_balance_after_micro, call_id, seconds, destination, description, answered_at,"
    " created_at) SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::bigint[], $5::bigint[],"
    " $6::bigint[], $7::bigint[], $8::text[], $9::int[], $10::text[], $11::text[], $12::timestamptz[],"
    " $13::timestamptz[])"
)


def server_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by every PostgreSQL process (backends, WAL writer, checkpointer, autovacuum...) and
    by redis-server, from /proc (the servers run on this machine); processes that ended meanwhile are not counted."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {"postgres": 0.0, "redis": 0.0}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        if comm == "postgres" or comm.startswith("postgres:"):
            used["postgres"] += cpu
        elif comm.startswith("redis-server"):
            used["redis"] += cpu
    return used


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


def carriers(count: int) -> list[str]:
    return [f"carrier-{chr(ord('a') + i)}" for i in range(count)]


def build_calls(args: argparse.Namespace, tag: str, now_ms: int) -> list[Any]:
    """--calls answered calls, seeded: each with its account, rate, routes and answered seconds."""
    from a2bd.domain.authorize import Route
    from a2bd.domain.calls import CallRecord, EndedCall
    from a2bd.domain.rating import SellRate
    from a2bd.domain.tariff import BuyRate

    rng = random.Random(f"{args.seed}-{tag}")
    names = carriers(args.providers)
    shapes = []
    for sell, connect, block, inc, grace, minimum, buy in RATE_SHAPES:
        rate = SellRate(sell, connect_micro=connect, initial_block_s=block, increment_s=inc, grace_s=grace,
                        min_cost_micro=minimum)
        routes = tuple(Route(n, f"PJSIP/{{number}}@{n}", BuyRate(buy + 500 * k, block, inc))
                       for k, n in enumerate(names))
        shapes.append((rate, routes))
    calls = []
    for i in range(args.calls):
        rate, routes = shapes[rng.randrange(len(shapes))]
        offered = routes[rng.randrange(len(routes)):] or routes
        offered = offered[: rng.randint(1, len(offered))]
        duration = int(rng.expovariate(1 / 150)) % 3_600
        end = now_ms - rng.randrange(60_000)
        answered = end - duration * 1000
        record = CallRecord(
            call_id=f"{tag}/{i}", account=str(ACCOUNT_BASE + rng.randrange(args.accounts)),
            destination="4930" + "".join(rng.choices("0123456789", k=7)), description="Germany Berlin",
            prefix="4930", sell=rate, routes=offered, reserved_ms=answered - 4_000, answered_ms=answered,
            channel=f"PJSIP/bench-{i:08x}", provider=offered[0].provider,
        )
        calls.append(EndedCall(record, end, duration, "ANSWERED"))
    return calls


def expected_books(calls: Sequence[Any]) -> tuple[Counter[str], Counter[str]]:
    """Account debits and carrier costs recomputed from the rule (cost_micro), independently of rate_call."""
    from a2bd.domain.rating import SellRate, cost_micro

    debit: Counter[str] = Counter()
    owed: Counter[str] = Counter()
    for c in calls:
        rec = c.record
        debit[rec.account] += cost_micro(rec.sell, c.duration_s)
        buy = next(r.buy for r in rec.routes if r.provider == rec.provider)
        owed[rec.provider] += cost_micro(SellRate(buy.rate_per_min_micro, initial_block_s=buy.initial_block_s,
                                                  increment_s=buy.increment_s), c.duration_s)
    return debit, owed


# -- setup -----------------------------------------------------------------------------------------------


async def setup(args: argparse.Namespace, pg_url: str, redis_url: str) -> None:
    from a2bd.adapters import postgres
    from a2bd.adapters.redis_store import RedisStore
    from a2bd.services.sync import sync_redis

    conn = await postgres.connect(pg_url)
    store = RedisStore.from_url(redis_url, timeout_s=5.0)
    try:
        await postgres.migrate(conn)
        for name in carriers(args.providers):
            await postgres.add_provider(conn, name, f"PJSIP/{{number}}@{name}")
        await postgres.replace_tariff(conn, "bench", [])  # calls carry their rates: no rate card needed
        for i in range(args.accounts):
            await postgres.create_account(conn, tariff="bench", number=str(ACCOUNT_BASE + i),
                                          initial_balance_micro=OPENING_MICRO, max_calls=1_000_000)
        await conn.execute("CREATE TABLE ledger_raw (LIKE ledger)")
        await conn.execute("CREATE SEQUENCE ledger_raw_id OWNED BY ledger_raw.id")
        await conn.execute("ALTER TABLE ledger_raw ALTER id SET DEFAULT nextval('ledger_raw_id'), ADD PRIMARY KEY (id)")
        await sync_redis(conn, store)
        await store.ping()  # loads the scripts
        await vacuum(conn, args.analyze)
    finally:
        await store.close()
        await conn.close()


async def vacuum(conn: Any, analyze: bool) -> None:
    """Every pass starts from the same state: tables vacuumed. Without --analyze the ledger has no statistics
    (autovacuum is off on the bench server, so none appear during a run); with it, statistics of a ledger of
    opening lines and no call line yet: the state in which write_calls' cached generic plan turns quadratic."""
    for table in ("ledger", "accounts", "providers", "ledger_raw"):
        await conn.execute(f"VACUUM {'ANALYZE ' if analyze else ''}{table}")


async def reset(pg_url: str, redis_url: str, analyze: bool) -> None:
    """Back to the opening books between passes: the call lines go, the balances are rebuilt from the rest."""
    from a2bd.adapters import postgres
    from a2bd.adapters.redis_store import RedisStore
    from a2bd.services.sync import sync_redis

    conn = await postgres.connect(pg_url)
    store = RedisStore.from_url(redis_url, timeout_s=5.0)
    try:
        # The ledger is append-only for everything but this bench's own teardown (replica mode skips triggers).
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("DELETE FROM ledger WHERE kind = 'call'")
        await conn.execute("UPDATE accounts SET balance_micro = $1, low_credit = false", OPENING_MICRO)
        await conn.execute("UPDATE providers SET balance_micro = 0")
        await conn.execute("TRUNCATE ledger_raw, notices")
        await conn.execute("SET session_replication_role = DEFAULT")
        await vacuum(conn, analyze)
        await store.client.flushdb()
        await sync_redis(conn, store)
        await store.ping()
    finally:
        await store.close()
        await conn.close()


# -- the raw insert (baseline) ----------------------------------------------------------------------------


def raw_batches(args: argparse.Namespace, calls: Sequence[Any]) -> list[list[list[Any]]]:
    """The writer's rows as column arrays, --batch rows each (ids of the first account and carrier: the values
    are the same shape as the ledger's; the raw table has no foreign keys to check)."""
    from a2bd.domain.calls import rate_call
    from a2bd.services.charging import to_line

    batches = []
    for start in range(0, len(calls), args.batch):
        cols: list[list[Any]] = [[] for _ in RAW_COLUMNS]
        for c in calls[start:start + args.batch]:
            rated = rate_call(c)
            assert rated is not None
            line = to_line(rated)
            row = (1, 1, "call", line.amount_micro, line.provider_amount_micro, 0, 0, line.call_id, line.seconds,
                   line.destination, line.description, line.answered_at, line.ended_at)
            for col, value in zip(cols, row, strict=True):
                col.append(value)
        batches.append(cols)
    return batches


async def raw_insert(pg_url: str, batches: list[list[list[Any]]], analyze: bool) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("TRUNCATE ledger_raw")
        await vacuum(conn, analyze)
        rows = sum(len(b[0]) for b in batches)
        servers0, started = server_cpu_s(), time.perf_counter()
        for cols in batches:
            async with conn.transaction():
                await conn.execute(RAW_INSERT, *cols)
        wall = time.perf_counter() - started
        servers = cpu_delta(servers0, server_cpu_s())
        assert await conn.fetchval("SELECT count(*) FROM ledger_raw") == rows
    finally:
        await conn.close()
    return {"rows": rows, "wall_s": wall, "per_s": rows / wall, "servers": servers}


# -- charging -------------------------------------------------------------------------------------------------


class BatchTimer:
    """Wraps postgres.write_calls (the writer looks it up on the module at each batch): time and size of each."""

    def __init__(self) -> None:
        from a2bd.adapters import postgres

        self.module = postgres
        self.original = postgres.write_calls
        self.seconds: list[float] = []
        self.lines: list[int] = []

    def __enter__(self) -> BatchTimer:
        original = self.original

        async def timed(conn: Any, lines: Sequence[Any]) -> Any:
            started = time.perf_counter()
            written = await original(conn, lines)
            self.seconds.append(time.perf_counter() - started)
            self.lines.append(len(lines))
            return written

        self.module.write_calls = timed
        return self

    def __exit__(self, *exc: object) -> None:
        self.module.write_calls = self.original


async def charge(args: argparse.Namespace, pg_url: str, redis_url: str, calls: Sequence[Any],
                 profile: cProfile.Profile | None = None) -> dict[str, Any]:
    from a2bd.adapters import postgres
    from a2bd.adapters.redis_store import RedisStore
    from a2bd.services.charging import LedgerWriter

    if args.pg_set:  # an experiment: the writer's sessions with these settings (the daemon sets none)
        import asyncpg

        pool = await asyncpg.create_pool(pg_url, min_size=2, max_size=2, server_settings=dict(args.pg_set))
    else:
        pool = await postgres.create_pool(pg_url, min_size=2, max_size=2)
    store = RedisStore.from_url(redis_url, timeout_s=10.0)
    await store.ping()
    writer = LedgerWriter(pool, store, batch_lines=args.batch, batch_ms=args.batch_ms)
    writer.start()
    try:
        with BatchTimer() as timer:
            if profile is not None:
                profile.enable()
            servers0 = server_cpu_s()
            busy0, cpu0, started = machine_busy_s(), time.process_time(), time.perf_counter()
            for start in range(0, len(calls), args.batch):
                for c in calls[start:start + args.batch]:
                    writer.submit(c)
                await asyncio.sleep(0)  # calls end over time: let the writer run between slices
            drained = await writer.drain(timeout_s=3_600)
            wall = time.perf_counter() - started
            cpu, busy = time.process_time() - cpu0, machine_busy_s() - busy0
            servers = cpu_delta(servers0, server_cpu_s())
            if profile is not None:
                profile.disable()
    finally:
        await writer.close(timeout_s=60)
        await store.close()
        await pool.close()
    return {"calls": len(calls), "drained": drained, "written": writer.written, "rejected": len(writer.rejected),
            "wall_s": wall, "per_s": len(calls) / wall, "cpu_s": cpu, "busy_s": busy, "servers": servers,
            "commit_s": sorted(timer.seconds), "batch_lines": sorted(timer.lines)}


async def write_calls_alone(args: argparse.Namespace, pg_url: str, calls: Sequence[Any]) -> dict[str, Any]:
    """postgres.write_calls alone: the writer's batches (rated and converted beforehand), one connection, one after
    the other; no Redis, no rating. What the ledger statement costs by itself."""
    import asyncpg

    from a2bd.adapters import postgres
    from a2bd.domain.calls import rate_call
    from a2bd.services.charging import to_line

    lines = [to_line(r) for r in (rate_call(c) for c in calls) if r is not None]
    conn = await asyncpg.connect(pg_url, server_settings=dict(args.pg_set))
    seconds = []
    try:
        servers0, started = server_cpu_s(), time.perf_counter()
        for start in range(0, len(lines), args.batch):
            t0 = time.perf_counter()
            await postgres.write_calls(conn, lines[start:start + args.batch])
            seconds.append(time.perf_counter() - t0)
        wall = time.perf_counter() - started
        servers = cpu_delta(servers0, server_cpu_s())
    finally:
        await conn.close()
    return {"rows": len(lines), "wall_s": wall, "per_s": len(lines) / wall, "commit_s": sorted(seconds),
            "servers": servers}


async def check_books(pg_url: str, redis_url: str, calls: Sequence[Any]) -> list[str]:
    """Problems found (none expected): lines per call, and PostgreSQL and Redis balances against the rule."""
    from a2bd.adapters import postgres
    from a2bd.adapters.redis_store import RedisStore, account_key, provider_key

    debit, owed = expected_books(calls)
    problems = []
    conn = await postgres.connect(pg_url)
    store = RedisStore.from_url(redis_url, timeout_s=10.0)
    try:
        lines, distinct = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT call_id) FROM ledger WHERE kind = 'call'")
        if lines != len(calls) or distinct != len(calls):
            problems.append(f"{lines:,} call lines ({distinct:,} distinct) for {len(calls):,} calls")
        pipe = store.client.pipeline(transaction=False)
        accounts = await conn.fetch("SELECT number, balance_micro FROM accounts ORDER BY id")
        for r in accounts:
            pipe.hget(account_key(r["number"]), "balance")
        hot = await pipe.execute()
        for r, redis_balance in zip(accounts, hot, strict=True):
            want = OPENING_MICRO - debit[r["number"]]
            if r["balance_micro"] != want or int(redis_balance) != want:
                problems.append(f"account {r['number']}: PostgreSQL {r['balance_micro']}, Redis {redis_balance}, "
                                f"expected {want}")
        for r in await conn.fetch("SELECT name, balance_micro FROM providers"):
            redis_balance = await store.client.hget(provider_key(r["name"]), "balance")
            if r["balance_micro"] != owed[r["name"]] or int(redis_balance) != owed[r["name"]]:
                problems.append(f"carrier {r['name']}: PostgreSQL {r['balance_micro']}, Redis {redis_balance}, "
                                f"expected {owed[r['name']]}")
        left = [k async for k in store.client.scan_iter(match="a2b:{acct:*}:ended", count=1000)]
        if left:
            problems.append(f"{len(left)} accounts still have ended calls kept in Redis")
    finally:
        await store.close()
        await conn.close()
    return problems


async def explain_batch(args: argparse.Namespace, pg_url: str, calls: Sequence[Any]) -> list[str]:
    """EXPLAIN ANALYZE of one write_calls statement (--batch fresh lines), rolled back."""
    from a2bd.adapters import postgres
    from a2bd.domain.calls import rate_call
    from a2bd.services.charging import to_line

    batch = [to_line(r) for r in (rate_call(c) for c in calls[: args.batch]) if r is not None]
    conn = await postgres.connect(pg_url)
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            rows = await conn.fetch(
                "EXPLAIN (ANALYZE, BUFFERS, TIMING) " + postgres._WRITE_CALLS,
                [x.call_id for x in batch], [x.account for x in batch], [x.provider for x in batch],
                [x.amount_micro for x in batch], [x.provider_amount_micro for x in batch],
                [x.seconds for x in batch], [x.destination for x in batch], [x.description for x in batch],
                [x.answered_at for x in batch], [x.ended_at for x in batch],
            )
        finally:
            await tx.rollback()
    finally:
        await conn.close()
    return [r[0] for r in rows]


def profile_report(profile: cProfile.Profile, calls: int, top: int = 22) -> list[str]:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    total = sum(v[2] for v in stats.stats.values())
    lines = [f"own time seen by cProfile: {total / calls * 1e6:.1f} us per call (profiler overhead included)"]
    groups: Counter[str] = Counter()
    for (file, _line, _func), v in stats.stats.items():
        label = ("a2bd " + file.split("/a2bd/", 1)[1] if "/a2bd/" in file else
                 "asyncpg" if "asyncpg" in file else "redis-py" if "/redis/" in file else
                 "asyncio" if "asyncio" in file else "json" if "/json/" in file else
                 "datetime/dataclasses" if file.endswith(("datetime.py", "dataclasses.py")) else
                 "built-ins (C)" if file == "~" else "other Python")
        groups[label] += v[2]
    lines.append("own time by module:")
    lines += [f"  {t / calls * 1e6:7.2f} us {100 * t / total:5.1f}%  {g}" for g, t in groups.most_common(14)]
    lines.append("top functions by own time:")
    ranked = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for (file, line, func), v in ranked:
        parts = Path(file).parts
        where = f"{'/'.join(parts[-3:])}:{line}({func})" if file != "~" else func
        lines.append(f"  {v[2] / calls * 1e6:7.2f} us {v[1] / calls:6.2f} calls/call  {where[:100]}")
    return lines


# -- the run --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, admin_url: str, pg_url: str, redis_url: str) -> int:
    import redis

    rclient = redis.Redis.from_url(redis_url, socket_timeout=5)
    if rclient.connection_pool.connection_kwargs.get("db") != BENCH_REDIS_DB:
        raise SystemExit(f"refusing to use Redis other than db {BENCH_REDIS_DB}")
    rclient.flushdb()
    asyncio.run(create_bench_db(admin_url))
    profile_lines: list[str] = []
    explain: list[str] = []
    try:
        t0 = time.perf_counter()
        asyncio.run(setup(args, pg_url, redis_url))
        now_ms = int(time.time() * 1000)
        calls = build_calls(args, "bench", now_ms)
        batches = raw_batches(args, calls)
        print(f"   setup    {args.accounts:,} accounts, {args.providers} carriers, {len(calls):,} calls built "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        calib = [calibrate_ms()]
        runner = loop_runner(args)
        raw_before = runner(raw_insert(pg_url, batches, args.analyze))
        print(f"   raw      {raw_before['per_s']:,.0f} rows/s (before)", flush=True)
        calib.append(calibrate_ms())
        charged = runner(charge(args, pg_url, redis_url, calls))
        print(f"   charging {charged['per_s']:,.0f} calls/s", flush=True)
        problems = runner(check_books(pg_url, redis_url, calls))
        runner(reset(pg_url, redis_url, args.analyze))
        calib.append(calibrate_ms())
        alone = runner(write_calls_alone(args, pg_url, calls))
        print(f"   ledger   {alone['per_s']:,.0f} lines/s (write_calls alone)", flush=True)
        calib.append(calibrate_ms())
        raw_after = runner(raw_insert(pg_url, batches, args.analyze))
        print(f"   raw      {raw_after['per_s']:,.0f} rows/s (after)", flush=True)
        if args.profile:
            runner(reset(pg_url, redis_url, args.analyze))
            explain = runner(explain_batch(args, pg_url, calls))
            profile = cProfile.Profile()
            profiled = runner(charge(args, pg_url, redis_url, calls, profile))
            profile_lines = [f"charging under cProfile: {profiled['per_s']:,.0f} calls/s (the profiler's overhead "
                             "included)", *profile_report(profile, len(calls))]
    finally:
        with contextlib.suppress(Exception):
            rclient.flushdb()
        asyncio.run(drop_bench_db(admin_url))
    return report(args, raw_before, raw_after, charged, alone, problems, calib, profile_lines, explain)


def loop_runner(args: argparse.Namespace) -> Any:
    """asyncio.run on the loop the daemon would use (runtime.loop = auto: uvloop when installed)."""
    if args.loop == "asyncio":
        return asyncio.run
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if args.loop == "uvloop":
            raise SystemExit("--loop uvloop: uvloop is not installed") from None
        return asyncio.run
    return uvloop.run


def report(args: argparse.Namespace, raw_before: dict[str, Any], raw_after: dict[str, Any], charged: dict[str, Any],
           alone: dict[str, Any], problems: list[str], calib: list[float], profile_lines: list[str],
           explain: list[str]) -> int:
    commits = charged["commit_s"]
    sizes = charged["batch_lines"]
    raw_per_s = (raw_before["per_s"] + raw_after["per_s"]) / 2
    ratio = charged["per_s"] / raw_per_s
    others = charged["busy_s"] - charged["cpu_s"]
    print()
    print(f"   raw insert   {raw_before['rows']:,} rows, {args.batch} per INSERT ... SELECT FROM unnest and commit: "
          f"{raw_before['per_s']:,.0f} rows/s before, {raw_after['per_s']:,.0f} rows/s after "
          f"(mean {raw_per_s:,.0f} rows/s)")
    print(f"   charging     {charged['calls']:,} calls submitted -> all written and settled in "
          f"{charged['wall_s']:.2f} s: {charged['per_s']:,.0f} calls/s end to end")
    books = "WRONG" if problems else "exact (PostgreSQL = Redis = recomputed, every account and carrier)"
    print(f"                {charged['written']:,} lines written, {charged['rejected']} rejected, drained "
          f"{charged['drained']}; books {books}")
    for p in problems[:10]:
        print(f"                PROBLEM {p}")
    print(f"                {len(commits):,} batches; lines per batch p50 {percentile(sizes, 50):.0f}, "
          f"min {sizes[0] if sizes else 0}, max {sizes[-1] if sizes else 0}")
    print(f"                commit latency (write_calls: statement + commit) "
          f"p50 {percentile(commits, 50) * 1000:.2f} ms, p99 {percentile(commits, 99) * 1000:.2f} ms, "
          f"max {commits[-1] * 1000 if commits else 0:.2f} ms; "
          f"{sum(commits):.2f} s of the {charged['wall_s']:.2f} s in write_calls")
    print(f"                CPU: this process {charged['cpu_s'] / charged['calls'] * 1e6:.1f} us per call "
          f"({charged['cpu_s'] / charged['wall_s']:.2f} cores); everything else on the machine (PostgreSQL, Redis, "
          f"others) {others / charged['calls'] * 1e6:.1f} us per call ({others / charged['wall_s']:.2f} cores)")
    print(f"                server CPU per call: PostgreSQL {per_call(charged, 'postgres')}, "
          f"Redis {per_call(charged, 'redis')}")
    print(f"   write_calls  alone (no Redis, no rating; --batch lines per statement, one connection): "
          f"{alone['per_s']:,.0f} lines/s; commit p50 {percentile(alone['commit_s'], 50) * 1000:.2f} ms, "
          f"p99 {percentile(alone['commit_s'], 99) * 1000:.2f} ms; PostgreSQL CPU {per_call(alone, 'postgres')} "
          f"(raw insert: {per_call(raw_before, 'postgres')})")
    print(f"   calibration loop {', '.join(f'{c:.1f}' for c in calib)} ms (the same work before each pass: the VM's "
          "speed drift)")
    if explain:
        print("\n   EXPLAIN ANALYZE of one write_calls statement (fresh lines, rolled back):")
        for line in explain:
            print(f"     {line}")
    if profile_lines:
        print()
        for line in profile_lines:
            print(f"   {line}")
    print("\n   targets")
    met_rate = charged["per_s"] >= TARGET_PER_S
    met_ratio = ratio >= TARGET_RATIO
    print(f"   charging {charged['per_s']:,.0f} calls/s end to end (target >= {TARGET_PER_S:,}): "
          f"{'MET' if met_rate else 'MISSED'}")
    print(f"   charging / raw insert = {charged['per_s']:,.0f} / {raw_per_s:,.0f} = {100 * ratio:.1f}% "
          f"(target >= {100 * TARGET_RATIO:.0f}%): {'MET' if met_ratio else 'MISSED'}")
    return 1 if problems else 0


def per_call(result: dict[str, Any], server: str) -> str:
    count = result.get("calls") or result["rows"]
    return f"{result['servers'][server] / count * 1e6:.1f} us"


def setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    return name, value


def head_has(path: str) -> bool:
    done = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"HEAD:{path}"], capture_output=True,
                          timeout=10, check=False)
    return done.returncode == 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--providers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=500, help="LedgerWriter batch_lines, and rows per raw INSERT")
    parser.add_argument("--batch-ms", type=int, default=5, help="LedgerWriter batch_ms")
    parser.add_argument("--seed", type=int, default=20260114)
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="event loop, as the daemon's runtime.loop (auto: uvloop when installed)")
    parser.add_argument("--pg-set", action="append", default=[], type=setting, metavar="NAME=VALUE",
                        help="an experiment: a PostgreSQL setting for the writer's sessions, e.g. "
                        "plan_cache_mode=force_custom_plan (the daemon sets none)")
    parser.add_argument("--analyze", action="store_true",
                        help="ANALYZE the tables before each pass (default: vacuumed, no statistics)")
    parser.add_argument("--profile", action="store_true",
                        help="also run charging under cProfile and EXPLAIN ANALYZE one batch statement")
    parser.add_argument("--no-pin", action="store_true",
                        help="measure the work tree as it is, not a snapshot of the commit at HEAD")
    args = parser.parse_args(argv)
    if not (1 <= args.calls <= 5_000_000 and 1 <= args.accounts <= 100_000 and 1 <= args.providers <= 26
            and 1 <= args.batch <= 20_000 and 0 <= args.batch_ms <= 1_000):
        parser.error("bounds: calls 1..5e6, accounts 1..1e5, providers 1..26, batch 1..20000, batch-ms 0..1000")
    if not args.no_pin and not os.environ.get("A2BD_BENCH_PINNED"):
        if head_has("a2bd/services/charging.py"):
            pin_code(__file__, list(sys.argv[1:] if argv is None else argv))
        else:
            print("   note     the commit at HEAD has no a2bd/services/charging.py: measuring the work tree "
                  "(as --no-pin)")
    print_machine("bench/rating.py")
    loop = "asyncio" if loop_runner(args) is asyncio.run else "uvloop"
    print(f"   args     --calls {args.calls} --accounts {args.accounts} --providers {args.providers} "
          f"--batch {args.batch} --batch-ms {args.batch_ms} --seed {args.seed}{' --profile' if args.profile else ''}"
          f"{' --analyze' if args.analyze else ''}"
          f"{''.join(f' --pg-set {k}={v}' for k, v in args.pg_set)}"
          f"; event loop {loop}")
    print("   one process (this one) runs the LedgerWriter; PostgreSQL and Redis on the same machine")
    admin_url, pg_url, redis_url = bench_urls()
    with BenchLock(admin_url):
        return run(args, admin_url, pg_url, redis_url)


if __name__ == "__main__":
    sys.exit(main())
