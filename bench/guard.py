"""Credit guard benchmark: how late the guard hangs up after the credit runs out; the daemon's idle cost.

With 10,000 live calls on 1,000 accounts (by default): how late each guard hangup fires after the instant
the account's shared credit runs out, and what the daemon costs while it tracks the calls idle.

    .venv/bin/python bench/guard.py [--calls 10000] [--accounts 1000] [--rate 500] [--loop auto|asyncio|uvloop]
                                    [--idle 20] [--spread 60] [--profile-daemon]

The daemon runs as its own process (`python -m a2bd.cli serve --config <tmp toml>`, one [[asterisk]] server,
the bench database a2bd_bench and Redis db 14), so its CPU (/proc/<pid>/stat utime+stime) and RSS
(/proc/<pid>/status VmRSS) are its own. This process runs the simulated Asterisk (a2bd/sim/ami.py): it places
the calls, runs each one's FastAGI authorize against the daemon, emits the AMI events of the recordings and
obeys the daemon's AMI Hangup actions, stamping each with its wall clock (`hangup_actions`).

Seed: one tariff, prefix 99 at 0.60 a minute billed per second (10,000 micro-units a second, increment 1 s),
sold through one carrier; --accounts accounts, each with its own credit and no credit limit. Call i goes to
account i mod --accounts, so each account's calls are spread over the whole placement; each rings a random
0.2-2 s (seeded) before the answer. From the planned answer times, each account gets exactly the credit its
calls use up together at its own target instant: the targets are spread evenly (in a shuffled order) over
--spread seconds starting --lead seconds after the last planned answer. Talk times run 30 s past the target,
and the L() limit authorize gives each call alone is about ten times longer, so only the guard can end
a call in time.

Phases, timed by this process:
  placement   --calls calls at --rate a second (open loop); then wait until every call is answered
              (billing legs Up in sim.live_channels()) or over, and until the daemon has used under 5% of a
              core for 3 s (it has worked off the AMI events and guard recomputes the answers queued);
  idle        --idle seconds of the daemon tracking every call with no event flowing: CPU % of one core,
              RSS, and the same with no call at all (measured before placement) for comparison;
  exhaustion  the guard cuts them: wait for every call to end, then for the ledger and Redis to settle.

The exhaustion instant is recomputed here, independently of the daemon, once every call has ended: with
domain.calls.exhaustion_ms over the account's credit and its calls' answer times as the simulated Asterisk
stamped them (CallResult.answered_at: the instant DialEnd ANSWER was emitted). Taking them after the fact
is exact and needs no second AMI listener competing with the simulator for this process; what matters
during the run (everything answered before the idle window, nothing due inside it) is checked after the
fact too, from the same answer times and the Hangup actions' times. Lateness of a call = the sim's time of
the FIRST Hangup action naming its channel − its account's instant; an account's lateness is that of its
last call cut (the account overspends until then). The daemon's answer time is when it read DialEnd from
AMI, so the lateness includes the AMI delay at the answer as well as the timer and the Hangup action's
trip. The daemon's log line per fired timer (JSON; its time and late_ms against the daemon's own
instant) splits an account's lateness into: the daemon's instant − ours (answers seen late), the timer's
own lateness, the Hangup action's trip, and the spread of the account's Hangup actions.

The default --rate is 500/s: at 1,000/s the daemon (authorize + AMI tracking + guard) needs more than
one core on this 2-core box, FastAGI sessions time out and calls are lost; --profile-daemon shows where
its time goes.

Verdict: every call answered and cut by the guard (none by the callee or the L() limit), no Hangup action
before its account's instant, p99 account lateness < 250 ms (the target), one ledger line per call with
the billed seconds of its Cdr, every balance >= −(calls of the account × one increment) (the guard's bound,
DESIGN §2), and PostgreSQL balance == Redis balance for every account.

The reconciler's periodic pass (every 120 s by default) is pushed out of the run (3600 s): a pass lists
every channel over AMI, which would land in the idle window or the exhaustion window by chance.

The simulator is Python too, and what delays it is counted against the daemon: an event stamped and not
yet written makes the daemon see the answer late. So this process runs with its cyclic GC off during the
run (its gen2 pauses reached 340 ms with 10,000 calls in flight, and tripled the measured p99 at
1,000/s), and a probe task measures how late its loop wakes from a 5 ms sleep (printed per phase; the
probe costs it ~2% of a core).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from _common import (
    BENCH_REDIS_DB,
    REPO,
    BenchLock,
    bench_urls,
    create_bench_db,
    drop_bench_db,
    free_port,
    machine_busy_s,
    percentile,
    pin_code,
    print_machine,
    proc_cpu_s,
    proc_rss_mib,
    proc_status_kib,
)

from a2bd.domain.calls import exhaustion_ms, spent_micro
from a2bd.domain.rating import SellRate, cost_micro

SERVER = "pbx1"
SECRET = secrets.token_hex(16)  # the simulated Asterisk's manager secret, given to the daemon by environment
TARIFF = "guard"
PROVIDER = "carrier-a"
PREFIX = "99"
RATE = SellRate(rate_per_min_micro=600_000)  # 0.60 a minute, per second from the first: 10,000 a second
INCREMENT_MICRO = cost_micro(RATE, RATE.increment_s)  # what one billing increment costs
ACCOUNT_BASE = 6_000_000_000  # account numbers are ACCOUNT_BASE + i
RING_S = (0.2, 2.0)  # each call rings a random time in this range before the answer
TALK_PAST_TARGET_S = 30.0  # a call the guard misses ends this long after its account's target
SETTLE_S = 3.0  # after the last answer, the daemon must stay under QUIET_PCT this long before the idle window
QUIET_PCT = 5.0  # % of one core
BASELINE_S = 5.0  # the idle daemon with no call, for comparison
HORIZON_MS = 4 * 3600 * 1000  # billing.max_call_s as shipped


# -- the plan: who calls when, and how much credit each account gets --------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedCall:
    account: int
    due_s: float  # placement, from the start of placement
    ring_s: float
    talk_s: float


@dataclass(slots=True)
class Plan:
    calls: list[PlannedCall]
    credit_micro: list[int]  # per account
    target_s: list[float]  # per account, from the start of placement
    calls_of: list[int]  # per account


def make_plan(args: argparse.Namespace) -> Plan:
    """Calls round-robin over the accounts at --rate a second; each account's credit is what its calls cost
    together at its target (taken from the planned answer times: the real instant is recomputed from the
    real ones, so this only shapes the spread)."""
    rng = random.Random(args.seed)
    rings = [rng.uniform(*RING_S) for _ in range(args.calls)]
    answers = [i / args.rate + rings[i] for i in range(args.calls)]
    last_answer = max(answers)
    order = list(range(args.accounts))
    rng.shuffle(order)
    target = [0.0] * args.accounts
    for rank, account in enumerate(order):
        target[account] = last_answer + args.lead + args.spread * rank / max(1, args.accounts - 1)
    planned: dict[int, list[tuple[int, SellRate]]] = defaultdict(list)
    calls = []
    for i in range(args.calls):
        account = i % args.accounts
        planned[account].append((round(answers[i] * 1000), RATE))
        calls.append(PlannedCall(account, i / args.rate, rings[i], target[account] + TALK_PAST_TARGET_S - answers[i]))
    credit = [spent_micro(planned[a], round(target[a] * 1000)) for a in range(args.accounts)]
    calls_of = [len(planned[a]) for a in range(args.accounts)]
    return Plan(calls, credit, target, calls_of)


def number(account: int) -> str:
    return str(ACCOUNT_BASE + account)


# -- setup ------------------------------------------------------------------------------------------------


def a2bd(env: dict[str, str], *words: str) -> str:
    done = subprocess.run([sys.executable, "-m", "a2bd.cli", *words], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise SystemExit(f"a2bd {' '.join(words)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


async def seed(pg_url: str, plan: Plan) -> None:
    from a2bd.adapters import postgres
    from a2bd.domain.tariff import BuyRate, RateEntry

    conn = await postgres.connect(pg_url)
    try:
        await postgres.add_provider(conn, PROVIDER, "PJSIP/{number}@" + PROVIDER)
        await postgres.replace_tariff(conn, TARIFF, [
            RateEntry(PREFIX, "Guard bench destination", RATE, PROVIDER, BuyRate(300_000)),
        ])
        for account, credit in enumerate(plan.credit_micro):
            await postgres.create_account(conn, tariff=TARIFF, number=number(account), initial_balance_micro=credit)
    finally:
        await conn.close()


def bench_redis(redis_url: str) -> Any:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5, decode_responses=True)
    db = client.connection_pool.connection_kwargs.get("db")
    if db != BENCH_REDIS_DB:
        raise SystemExit(f"refusing to use Redis db {db}: the bench owns db {BENCH_REDIS_DB} only")
    return client


def write_config(path: Path, args: argparse.Namespace, pg_url: str, redis_url: str, agi_port: int,
                 ami_port: int) -> None:
    path.write_text(
        f'[agi]\nhost = "127.0.0.1"\nport = {agi_port}\n\n'
        f'[redis]\nurl = "{redis_url}"\n\n'
        f'[postgres]\nurl = "{pg_url}"\n\n'
        f'[log]\nlevel = "info"\njson = true\n\n'
        f"[metrics]\nport = 0\n\n"
        f'[runtime]\nloop = "{args.loop}"\n\n'
        f"[billing]\nreconcile_interval_s = 3600\n\n"
        f'[[asterisk]]\nname = "{SERVER}"\nhost = "127.0.0.1"\nport = {ami_port}\nusername = "a2bd"\n'
    )


# -- measuring the daemon ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Window:
    """CPU of the daemon, this process (the simulated Asterisk), Redis and the whole machine over a span."""

    wall_s: float = 0.0
    daemon_s: float = 0.0
    sim_s: float = 0.0
    redis_s: float = 0.0
    machine_s: float = 0.0

    def pct_daemon(self) -> float:
        return self.pct(self.daemon_s)

    def pct(self, cpu_s: float) -> float:
        return 100 * cpu_s / self.wall_s if self.wall_s else float("nan")

    def line(self) -> str:
        other = self.machine_s - self.daemon_s - self.sim_s - self.redis_s
        return (f"daemon {self.pct(self.daemon_s):5.1f}%  simulator {self.pct(self.sim_s):5.1f}%  "
                f"Redis {self.pct(self.redis_s):5.1f}%  rest of the machine {self.pct(max(0.0, other)):5.1f}% "
                f"(% of one core over {self.wall_s:.1f} s)")


class Meter:
    def __init__(self, pid: int, rclient: Any) -> None:
        self.pid = pid
        self.rclient = rclient

    def _redis_s(self) -> float:
        info = self.rclient.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def sample(self) -> tuple[float, ...]:
        return (time.monotonic(), proc_cpu_s(self.pid), time.process_time(), self._redis_s(), machine_busy_s())

    def since(self, start: tuple[float, ...]) -> Window:
        end = self.sample()
        return Window(*(b - a for a, b in zip(start, end, strict=True)))


class LoopLag:
    """How late this process's loop wakes from a 5 ms sleep: the simulator's own stalls, which delay the
    events it emits (DialEnd after its answer was stamped) and its reading of Hangup actions."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (wall clock, ms late)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asleep = loop.time()
            await asyncio.sleep(0.005)
            self.samples.append((time.time(), (loop.time() - asleep - 0.005) * 1000))

    def between(self, start: float, end: float) -> list[float]:
        return [lag for at, lag in self.samples if start <= at <= end]


# -- the run ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    results: list[Any] = field(default_factory=list)  # CallResult per planned call (None if it raised)
    errors: Counter[str] = field(default_factory=Counter)
    hangups: list[Any] = field(default_factory=list)  # the sim's HangupAction list
    placement_s: float = 0.0
    placement_late_ms: list[float] = field(default_factory=list)
    answered_wait_s: float = 0.0
    answered_live: int = 0
    t0: float = 0.0  # wall clock at the start of placement
    idle_start: float = 0.0  # wall clock
    idle_end: float = 0.0
    baseline: Window = field(default_factory=Window)
    placement: Window = field(default_factory=Window)
    idle: Window = field(default_factory=Window)
    exhaustion: Window = field(default_factory=Window)
    rss_start_mib: float = 0.0
    rss_idle_mib: float = 0.0
    rss_end_mib: float = 0.0
    settle_s: float = 0.0
    settled: bool = False
    ledger: list[Any] = field(default_factory=list)
    balances: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # number -> (PostgreSQL, Redis)
    exit_code: int | None = None
    lag: LoopLag = field(default_factory=LoopLag)
    sim_peak_rss_mib: float = 0.0  # this process, its cyclic GC off during the run
    answered_at: float = 0.0  # wall clock when every call was seen answered
    ended_at: float = 0.0  # wall clock when every call had ended


def log_text(log_path: Path) -> str:
    return log_path.read_text(errors="replace")


async def wait_serving(log_path: Path, proc: asyncio.subprocess.Process, timeout_s: float = 60.0) -> None:
    """Until the daemon logs that it serves (a probe connection would be logged as a rejected session)."""
    async with asyncio.timeout(timeout_s):
        while '"a2bd serving"' not in log_text(log_path):
            if proc.returncode is not None:
                raise SystemExit(f"the daemon exited with {proc.returncode}: {log_text(log_path)[-2000:]}")
            await asyncio.sleep(0.1)


def answered_live(sim: Any) -> int:
    """Billing legs (Local/...@billing-N;2) that are Up: answered calls still live."""
    return sum(1 for ch in sim.live_channels() if ch.state == 6 and ch.name.endswith(";2") and "@billing-" in ch.name)


async def run_calls(args: argparse.Namespace, plan: Plan, pg_url: str, redis_url: str, rclient: Any,
                    tmp: Path, env: dict[str, str]) -> Run:
    """Start the simulated Asterisk and the daemon, and run the three phases (see the module docstring)."""
    from a2bd.sim.ami import SimAsterisk

    run = Run()
    lag_task = asyncio.create_task(run.lag.run())
    sim = SimAsterisk(username="a2bd", secret=SECRET, seed=args.seed)
    await sim.start()
    agi_port = free_port()
    config = tmp / "a2bd.toml"
    write_config(config, args, pg_url, redis_url, agi_port, sim.port)
    log_path = tmp / "daemon.log"
    daemon_env = {**env, f"A2BD_AMI_SECRET_{SERVER.upper()}": SECRET}
    with log_path.open("wb") as log:
        profiler = ["-m", "cProfile", "-o", str(tmp / "daemon.prof")] if args.profile_daemon else []
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *profiler, "-m", "a2bd.cli", "serve", "--config", str(config),
            env=daemon_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    tasks: list[asyncio.Task[Any]] = []
    # The simulator's own cyclic-GC pauses (gen2 took up to 340 ms here with 10,000 calls in flight) would
    # hold back the events it has already stamped, and count as the daemon's lateness: GC is off in this
    # process for the run (what is allocated meanwhile is freed by reference counting, or at the end).
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        await wait_serving(log_path, proc)
        async with asyncio.timeout(10):
            await sim.wait_logged_in()
        sim.agi = ("127.0.0.1", agi_port)
        meter = Meter(proc.pid, rclient)
        await asyncio.sleep(1.0)  # start-up work (first reconciliation pass) out of the way
        start = meter.sample()
        await asyncio.sleep(BASELINE_S)
        run.baseline = meter.since(start)
        run.rss_start_mib = proc_rss_mib(proc.pid)

        await place_calls(args, plan, sim, run, meter, tasks)
        settle_s = await wait_quiet(meter)
        print(f"   answered {run.answered_live:,} live calls {run.answered_wait_s:.1f} s after the last was placed; "
              f"the daemon quiet {settle_s:.1f} s later; idle window of {args.idle:.0f} s next", flush=True)
        run.idle_start = time.time()
        start = meter.sample()
        await asyncio.sleep(args.idle)
        run.idle = meter.since(start)
        run.idle_end = time.time()
        run.rss_idle_mib = proc_rss_mib(proc.pid)

        print("   waiting  for the guard to cut the calls", flush=True)
        start = meter.sample()
        budget = max(plan.target_s) + TALK_PAST_TARGET_S + 60 - (time.time() - run.t0)
        done, _pending = await asyncio.wait(tasks, timeout=max(budget, 10))
        run.exhaustion = meter.since(start)
        run.ended_at = time.time()
        for task in tasks:
            if task in done and task.exception() is None:
                run.results.append(task.result())
            else:
                run.results.append(None)
                run.errors["call raised" if task in done else "call still up at the deadline"] += 1
        run.hangups = list(sim.hangup_actions)
        await read_books(args, run, pg_url, rclient)
        run.rss_end_mib = proc_rss_mib(proc.pid)
    finally:
        for task in [*tasks, lag_task]:
            task.cancel()
        await asyncio.gather(*tasks, lag_task, return_exceptions=True)
        run.exit_code = await stop(proc)
        await sim.close()
        run.sim_peak_rss_mib = proc_status_kib("VmHWM") / 1024
        gc.enable()
        gc.unfreeze()
    return run


async def place_calls(args: argparse.Namespace, plan: Plan, sim: Any, run: Run, meter: Meter,
                      tasks: list[asyncio.Task[Any]]) -> None:
    """Open loop: call i starts at i / --rate s whatever the others do; then wait until every call is
    answered (its billing leg Up) or over (refused)."""
    from a2bd.sim.ami import CallSpec

    print(f"   placing  {args.calls:,} calls at {args.rate:,.0f}/s", flush=True)
    loop = asyncio.get_running_loop()
    start = meter.sample()
    run.t0 = time.time()
    begin = loop.time()
    for call in plan.calls:
        due = begin + call.due_s
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        run.placement_late_ms.append((loop.time() - due) * 1000)
        spec = CallSpec(extension=f"{PREFIX}{call.account:09d}", accountcode=number(call.account),
                        ring_s=call.ring_s, talk_s=call.talk_s, callerid="4930100000")
        tasks.append(asyncio.create_task(sim.call(spec)))
    run.placement_s = loop.time() - begin
    placed = loop.time()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(RING_S[1] + 30):
            # The simulator has no "all answered" event: its channels are polled.
            while answered_live(sim) + sum(t.done() for t in tasks) < args.calls:  # noqa: ASYNC110
                await asyncio.sleep(0.25)
    run.answered_live = answered_live(sim)
    run.answered_wait_s = loop.time() - placed
    run.answered_at = time.time()
    run.placement = meter.since(start)


async def wait_quiet(meter: Meter, timeout_s: float = 60.0) -> float:
    """Wait until the daemon has used under QUIET_PCT of a core for SETTLE_S (it has worked off the AMI
    events and guard recomputes the answers queued); return how long that took."""
    loop = asyncio.get_running_loop()
    began = quiet_since = loop.time()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while loop.time() - quiet_since < SETTLE_S:
                probe = meter.sample()
                await asyncio.sleep(SETTLE_S / 3)
                if meter.since(probe).pct_daemon() >= QUIET_PCT:
                    quiet_since = loop.time()
    return loop.time() - began


async def read_books(args: argparse.Namespace, run: Run, pg_url: str, rclient: Any) -> None:
    """Once every call ended: wait until the ledger has a line per answered call and Redis no live call,
    then read the call lines and every balance (PostgreSQL and Redis; settle.lua frees a call and sets the
    balance in one step)."""
    import asyncpg

    from a2bd.adapters.redis_store import account_key, calls_key

    loop = asyncio.get_running_loop()
    began = loop.time()
    answered = sum(1 for r in run.results if r is not None and r.answered_at is not None)
    pg = await asyncpg.connect(pg_url)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                while True:
                    lines = await pg.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'")
                    pipe = rclient.pipeline(transaction=False)
                    for account in range(args.accounts):
                        pipe.hlen(calls_key(number(account)))
                    if lines >= answered and sum(pipe.execute()) == 0:
                        run.settled = True
                        break
                    await asyncio.sleep(0.5)
        run.settle_s = loop.time() - began
        run.ledger = list(await pg.fetch(
            "SELECT call_id, seconds, amount_micro, description FROM ledger WHERE kind = 'call'"))
        rows = await pg.fetch("SELECT number, balance_micro FROM accounts")
    finally:
        await pg.close()
    pipe = rclient.pipeline(transaction=False)
    for row in rows:
        pipe.hget(account_key(row["number"]), "balance")
    for row, raw in zip(rows, pipe.execute(), strict=True):
        run.balances[row["number"]] = (row["balance_micro"], None if raw is None else int(raw))


async def stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(30):
            return await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -9


# -- the daemon's log -------------------------------------------------------------------------------------


@dataclass(slots=True)
class DaemonLog:
    loop: str = "?"
    # account -> (time of the log line, Unix ms; late_ms it reports) per timer fired, in order
    fires: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))
    problems: Counter[str] = field(default_factory=Counter)  # "level: event" of warnings and errors
    lines: int = 0
    unparsed: int = 0


def read_log(path: Path) -> DaemonLog:
    out = DaemonLog()
    for raw in log_text(path).splitlines():
        out.lines += 1
        try:
            entry = json.loads(raw)
        except ValueError:
            out.unparsed += 1
            continue
        event = str(entry.get("event", ""))
        if event == "a2bd serving":
            out.loop = str(entry.get("loop", "?"))
        elif event.startswith("credit used up"):
            at_ms = datetime.fromisoformat(str(entry["timestamp"])).timestamp() * 1000
            out.fires[str(entry.get("account"))].append((at_ms, int(entry.get("late_ms", 0))))
        if entry.get("level") in ("warning", "error", "critical"):
            why = entry.get("reason") or entry.get("error") or ""
            out.problems[f"{entry.get('level')}: {event[:70]} ({str(why)[:60]})"] += 1
    return out


# -- the daemon under cProfile (--profile-daemon) --------------------------------------------------------

_GROUPS = [  # (label, part of the file path), first match wins
    ("a2bd.ami (AMI client and parser)", "a2bd/ami/"),
    ("a2bd.services.tracker", "a2bd/services/tracker"),
    ("a2bd.services.guard", "a2bd/services/guard"),
    ("a2bd.services.charging (ledger writer)", "a2bd/services/charging"),
    ("a2bd.services.lifecycle", "a2bd/services/lifecycle"),
    ("a2bd.agi and services.authorization", "a2bd/agi/"),
    ("a2bd.agi and services.authorization", "a2bd/services/authorization"),
    ("a2bd.domain", "a2bd/domain/"),
    ("a2bd.adapters (Redis, PostgreSQL)", "a2bd/adapters/"),
    ("redis-py", "/redis/"),
    ("asyncpg", "/asyncpg/"),
    ("json", "/json/"),
    ("structlog", "/structlog/"),
    ("prometheus_client", "/prometheus_client/"),
    ("asyncio", "/asyncio/"),
]
_STEPS = [  # (label, file ending, function): inclusive time; coroutines count only while they run
    ("AmiClient._read: read, parse, queue every AMI event", "a2bd/ami/client.py", "_read"),
    ("  AmiParser.feed (bytes to messages)", "a2bd/ami/protocol.py", "feed"),
    ("CallTracker.handle (every event, in order)", "a2bd/services/tracker.py", "handle"),
    ("CallTracker._store_answer (EVALSHA update_call + PUBLISH)", "a2bd/services/tracker.py", "_store_answer"),
    ("CreditGuard.recompute", "a2bd/services/guard.py", "recompute"),
    ("  RedisStore.credit (MULTI: HMGET, HGETALL records, HGETALL ended)", "a2bd/adapters/redis_store.py",
     "credit"),
    ("  decode_record (JSON of a live call's record)", "a2bd/domain/calls.py", "decode_record"),
    ("  exhaustion_ms (the binary search)", "a2bd/domain/calls.py", "exhaustion_ms"),
    ("CreditGuard._listen (a2b:changed messages)", "a2bd/services/guard.py", "_listen"),
    ("CreditGuard._fire", "a2bd/services/guard.py", "_fire"),
    ("AgiServer._run (a FastAGI session, authorize included)", "a2bd/agi/server.py", "_run"),
    ("  Authorizer.handle", "a2bd/services/authorization.py", "handle"),
    ("LedgerWriter._write (PostgreSQL batch)", "a2bd/services/charging.py", "_write"),
    ("LedgerWriter._settle (Redis settle per line)", "a2bd/services/charging.py", "_settle"),
]


def print_profile(path: Path, calls: int) -> None:
    import pstats

    stats: dict[Any, Any] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    groups: Counter[str] = Counter()
    total = 0.0
    for (file, _line, func), (_cc, _nc, tottime, _cum, _callers) in stats.items():
        total += tottime
        label = next((g for g, part in _GROUPS if part in file), None)
        if label is None and "epoll" in func:
            label = "waiting in epoll (idle)"
        if label is None and file == "~":
            label = "built-ins (socket, str, bytes, ...)"
        groups[label or "other Python"] += tottime
    waited = groups.get("waiting in epoll (idle)", 0.0)
    print(f"\n   the daemon under cProfile (asyncio loop), whole run: {total - waited:.1f} s of own time seen "
          f"besides waiting in epoll, {1e6 * (total - waited) / calls:,.0f} us per call (the profiler's overhead "
          "included)")
    print("   own time by package, per call:")
    for label, t in groups.most_common():
        print(f"     {1e6 * t / calls:7.0f} us {100 * t / total:5.1f}%  {label}")
    print("   top functions by own time, per call:")
    busy = [kv for kv in stats.items() if "epoll" not in kv[0][2]]
    for (file, line, func), v in sorted(busy, key=lambda kv: kv[1][2], reverse=True)[:15]:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}({func})" if file != "~" else func
        print(f"     {1e6 * v[2] / calls:7.0f} us {v[1] / calls:8.1f} calls/call  {where[:100]}")
    print("   inclusive time of the steps, per call:")
    for label, file_part, func in _STEPS:
        hits = [v for (file, _l, f), v in stats.items() if f == func and file.endswith(file_part)]
        cum = sum(v[3] for v in hits)
        ncalls = sum(v[1] for v in hits)
        print(f"     {1e6 * cum / calls:7.0f} us {ncalls / calls:8.1f} calls/call  {label}")


# -- the report -------------------------------------------------------------------------------------------


def ms_stats(values: Sequence[float]) -> str:
    v = sorted(values)
    if not v:
        return "none"
    return (f"p50 {percentile(v, 50):7.1f}  p90 {percentile(v, 90):7.1f}  p99 {percentile(v, 99):7.1f}  "
            f"max {v[-1]:7.1f} ms  (n = {len(v):,})")


def report(args: argparse.Namespace, plan: Plan, run: Run, dlog: DaemonLog) -> int:
    results = run.results
    # -- per account: the independent instant, from the answer times the simulator stamped
    answered_of: dict[int, list[tuple[int, SellRate]]] = defaultdict(list)
    call_of_channel: dict[str, int] = {}
    for i, (call, r) in enumerate(zip(plan.calls, results, strict=True)):
        if r is not None and r.answered_at is not None:
            answered_of[call.account].append((int(r.answered_at * 1000), RATE))
            call_of_channel[r.channel] = i
    instant: dict[int, int] = {}
    for account, calls in answered_of.items():
        due = exhaustion_ms(plan.credit_micro[account], calls, min(a for a, _ in calls), HORIZON_MS)
        if due is not None:
            instant[account] = due

    first_hangup: dict[int, float] = {}  # call index -> the sim's time of the first Hangup action naming it
    per_channel: Counter[str] = Counter()
    for h in run.hangups:
        per_channel[h.channel] += 1
        i = call_of_channel.get(h.channel)
        if i is not None and i not in first_hangup:
            first_hangup[i] = h.at
    late_call: list[float] = []
    late_account: dict[int, float] = {}
    early: list[str] = []
    for i, at in first_hangup.items():
        account = plan.calls[i].account
        if account not in instant:
            early.append(f"{results[i].channel} hung up but its account {number(account)} never runs out")
            continue
        lateness = at * 1000 - instant[account]
        late_call.append(lateness)
        late_account[account] = max(late_account.get(account, lateness), lateness)
        if lateness < 0:
            early.append(f"{results[i].channel} hung up {-lateness:.1f} ms before {number(account)} ran out")
    ended_by = Counter(r.ended_by if r is not None else "did not end" for r in results)
    missed = [i for i, call in enumerate(plan.calls) if call.account in instant and i not in first_hangup]
    never_out = sorted(set(range(args.accounts)) - set(instant))

    # -- timing sanity: all answered before the idle window, nothing due inside it
    answers = [r.answered_at for r in results if r is not None and r.answered_at is not None]
    last_answer = max(answers) if answers else float("nan")
    first_instant = min(instant.values()) / 1000 if instant else float("nan")
    last_instant = max(instant.values()) / 1000 if instant else float("nan")
    idle_clean = last_answer < run.idle_start and first_instant > run.idle_end and not any(
        run.idle_start <= h.at <= run.idle_end for h in run.hangups)

    # -- ledger and balances
    by_call = {f"{SERVER}/{r.uniqueid}": r for r in results if r is not None}
    lines = run.ledger
    ids = [row["call_id"] for row in lines]
    wrong_lines = [row["call_id"] for row in lines
                   if row["call_id"] not in by_call
                   or row["seconds"] != by_call[row["call_id"]].billable_s
                   or row["amount_micro"] != -cost_micro(RATE, by_call[row["call_id"]].billable_s)]
    not_marked = sum(1 for row in lines if "cut by the credit guard" not in row["description"])
    floor_of = {number(a): -plan.calls_of[a] * INCREMENT_MICRO for a in range(args.accounts)}
    below_bound = {n: pg for n, (pg, _r) in run.balances.items() if pg < floor_of.get(n, 0)}
    mismatched = {n: (pg, r) for n, (pg, r) in run.balances.items() if pg != r}
    # What the lateness cost: the balance had every call ended exactly at the instant, against the real one.
    on_time = {number(a): plan.credit_micro[a] - spent_micro(calls, instant[a])
               for a, calls in answered_of.items() if a in instant}
    extra = [on_time[n] - run.balances[n][0] for n in on_time if n in run.balances]
    lowest = min((pg for pg, _r in run.balances.values()), default=0)

    # Where an account's lateness comes from, with the daemon's log line of its first timer (stamped when the
    # timer ran; late_ms against the daemon's own instant): the daemon's instant − ours (it saw the answers
    # late: AMI delay), the timer's own lateness, the trip of the first Hangup action (log line to the
    # sim's stamp), and the spread of the account's Hangup actions (first to last).
    fires = [len(v) for v in dlog.fires.values()]
    first_fire = {text: v[0] for text, v in dlog.fires.items() if v}
    hangups_of: dict[int, list[float]] = defaultdict(list)
    for i, at in first_hangup.items():
        hangups_of[plan.calls[i].account].append(at * 1000)
    skew, timer, trip, spread = [], [], [], []
    for account, ats in hangups_of.items():
        fire = first_fire.get(number(account))
        if fire is None or account not in instant:
            continue
        fired_ms, late_ms = fire
        skew.append(fired_ms - late_ms - instant[account])
        timer.append(float(late_ms))
        trip.append(min(ats) - fired_ms)
        spread.append(max(ats) - min(ats))
    hangups_per_call = Counter(per_channel[r.channel] for r in results if r is not None and r.channel in per_channel)

    w = run
    print(f"\n   placement   {args.calls:,} calls placed in {w.placement_s:.2f} s "
          f"({args.calls / w.placement_s:,.0f}/s achieved; start lateness {ms_stats(w.placement_late_ms)})")
    print(f"               {w.answered_live:,} answered and live {w.answered_wait_s:.1f} s after the last was placed; "
          f"statuses {dict(Counter(r.status for r in results if r is not None))}")
    print(f"               CPU during placement and answer: {w.placement.line()}")
    print(f"               daemon CPU per call placed: {1e6 * w.placement.daemon_s / args.calls:,.0f} us")
    print(f"               simulator's loop late on a 5 ms sleep: {ms_stats(w.lag.between(w.t0, w.answered_at))}")
    print(f"               (the simulator runs with its cyclic GC off; its peak RSS {w.sim_peak_rss_mib:,.0f} MiB)")
    print(f"\n   idle        {w.answered_live:,} live calls, {len(instant):,} accounts' timers armed, "
          f"no event for {args.idle:.0f} s")
    print(f"               {w.idle.line()}")
    print(f"               baseline, no call: {w.baseline.line()}")
    print(f"               daemon RSS {w.rss_start_mib:,.1f} MiB with no call, {w.rss_idle_mib:,.1f} MiB with "
          f"{w.answered_live:,} live calls (+{1024 * (w.rss_idle_mib - w.rss_start_mib) / max(1, w.answered_live):.1f}"
          f" KiB a call), {w.rss_end_mib:,.1f} MiB after they ended")
    print(f"               window clean (every answer before it, no instant and no Hangup inside): "
          f"{'yes' if idle_clean else 'NO'}; last answer {last_answer - w.t0:.1f} s, idle "
          f"{w.idle_start - w.t0:.1f}..{w.idle_end - w.t0:.1f} s, instants {first_instant - w.t0:.1f}.."
          f"{last_instant - w.t0:.1f} s after placement began")
    print(f"\n   exhaustion  {len(instant):,} accounts ran out, {len(late_account):,} cut by the guard; "
          f"{len(run.hangups):,} Hangup actions received for {len(first_hangup):,} calls "
          f"(actions per call: {dict(sorted(hangups_per_call.items()))})")
    print(f"               CPU while cutting: {w.exhaustion.line()}")
    print(f"               simulator's loop late on a 5 ms sleep: {ms_stats(w.lag.between(w.idle_end, w.ended_at))}")
    per_call_us = 1e6 * w.exhaustion.daemon_s / max(1, len(results))
    print(f"               daemon CPU per call cut and billed: {per_call_us:,.0f} us (Hangup action, end events, "
          "ledger line, Redis settle, guard recomputes)")
    print("   lateness    sim's time of the first Hangup action − the instant recomputed here")
    print(f"     per account (its last call cut)   {ms_stats(list(late_account.values()))}")
    print(f"     per call                          {ms_stats(late_call)}")
    print("     made of, per account (first timer fired, from the daemon's log; ±1 ms):")
    print(f"       the daemon's instant − ours     {ms_stats(skew)}   (it saw the answers late)")
    print(f"       its timer, late on its instant  {ms_stats(timer)}")
    print(f"       timer to the sim's first Hangup {ms_stats(trip)}")
    print(f"       first to last Hangup            {ms_stats(spread)}")
    print(f"     timers fired per account (log)    {dict(sorted(Counter(fires).items()))}")
    print(f"     Hangup before the instant         {len(early)}")
    for line in early[:5]:
        print(f"       {line}")
    print(f"     calls ended by                    {dict(ended_by)}")
    print(f"     calls of exhausted accounts not hung up  {len(missed)}; accounts never out: {len(never_out)}")
    if run.errors:
        print(f"     errors                            {dict(run.errors)}")

    print(f"\n   ledger      {len(lines):,} call lines for {len(by_call):,} calls ({len(set(ids)):,} distinct ids), "
          f"settled {run.settle_s:.1f} s after the last call ended{'' if run.settled else ' (NOT settled in 60 s)'}")
    print(f"               lines not matching their call's Cdr (seconds, amount) or unknown: {len(wrong_lines)}; "
          f"not marked as cut: {not_marked}")
    print(f"   balances    lowest {lowest / 1e6:+.6f} ({lowest / INCREMENT_MICRO:+.2f} increments); below the bound "
          f"(−calls × {INCREMENT_MICRO / 1e6:.2f}): {len(below_bound)}; PostgreSQL ≠ Redis: {len(mismatched)}")
    if extra:
        extra_sorted = sorted(extra)
        print(f"               overspend from lateness (vs every call cut at the instant): total "
              f"{sum(extra) / 1e6:.2f}, per account p50 {percentile(extra_sorted, 50) / INCREMENT_MICRO:.0f} "
              f"p99 {percentile(extra_sorted, 99) / INCREMENT_MICRO:.0f} max {extra_sorted[-1] / INCREMENT_MICRO:.0f}"
              " increments")
    print(f"\n   daemon      loop {dlog.loop}; exit {run.exit_code}; log {dlog.lines:,} lines "
          f"({dlog.unparsed} not JSON)")
    for what, count in dlog.problems.most_common(8):
        print(f"      {count:6,} x {what}")

    p99 = percentile(sorted(late_account.values()), 99) if late_account else float("inf")
    checks = [
        ("every call answered", w.answered_live == args.calls and len(answers) == args.calls),
        ("idle window clean", idle_clean),
        ("every account ran out within the run", not never_out),
        ("every call cut by the guard", ended_by.get("ami_hangup", 0) == args.calls and not missed),
        ("no Hangup before the instant", not early),
        ("p99 account lateness < 250 ms", p99 < 250),
        ("one ledger line per call, as its Cdr", len(lines) == len(set(ids)) == args.calls and not wrong_lines),
        ("balances within the guard's bound", not below_bound),
        ("PostgreSQL balance == Redis balance", not mismatched and len(run.balances) == args.accounts),
        ("daemon exited cleanly", run.exit_code == 0),
    ]
    print("\n   verdict")
    for label, ok in checks:
        print(f"   {'PASS' if ok else 'FAIL'}  {label}")
    good = all(ok for _label, ok in checks)
    print(f"   {'ALL PASS' if good else 'FAILED'}: p99 lateness {p99:.1f} ms per account (target < 250 ms); "
          f"idle daemon {w.idle.pct(w.idle.daemon_s):.2f}% of one core, {w.rss_idle_mib:,.0f} MiB RSS "
          f"with {w.answered_live:,} live calls")
    return 0 if good else 1


# -- main -------------------------------------------------------------------------------------------------


def orchestrate(args: argparse.Namespace) -> int:
    print_machine("bench/guard.py")
    print(f"   args     --calls {args.calls} --accounts {args.accounts} --rate {args.rate:g} --loop {args.loop} "
          f"--idle {args.idle:g} --lead {args.lead:g} --spread {args.spread:g} --seed {args.seed}"
          f"{' --profile-daemon' if args.profile_daemon else ''}")
    print("   the daemon in its own process; the simulated Asterisk in this one (asyncio); Redis and PostgreSQL "
          "on the same machine")
    admin_url, pg_url, redis_url = bench_urls()
    with BenchLock(admin_url):
        plan = make_plan(args)
        env = {k: v for k, v in os.environ.items() if not k.startswith("A2BD_")}
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env |= {"A2BD_PG_URL": pg_url, "A2BD_REDIS_URL": redis_url, "PYTHONPATH": pythonpath}
        rclient = bench_redis(redis_url)
        rclient.flushdb()
        asyncio.run(create_bench_db(admin_url))
        tmp = Path(tempfile.mkdtemp(prefix="a2bd-bench-guard-"))
        try:
            started = time.perf_counter()
            a2bd(env, "db", "migrate")
            asyncio.run(seed(pg_url, plan))
            credits = sorted(plan.credit_micro)
            print(f"   setup    tariff {TARIFF}: {PREFIX} at {RATE.rate_per_min_micro / 1e6:.2f}/min, increment "
                  f"{RATE.increment_s} s; {args.accounts:,} accounts, credit {credits[0] / 1e6:.2f}.."
                  f"{credits[-1] / 1e6:.2f} ({time.perf_counter() - started:.1f} s)", flush=True)
            run = asyncio.run(run_calls(args, plan, pg_url, redis_url, rclient, tmp, env))
            dlog = read_log(tmp / "daemon.log")
            if args.profile_daemon:
                print_profile(tmp / "daemon.prof", args.calls)
        finally:
            with contextlib.suppress(Exception):
                rclient.flushdb()
            asyncio.run(drop_bench_db(admin_url))
            shutil.rmtree(tmp, ignore_errors=True)
    return report(args, plan, run, dlog)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--rate", type=float, default=500.0, help="calls placed per second")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="the daemon's runtime.loop (auto: uvloop when installed, as shipped)")
    parser.add_argument("--uvloop", dest="loop", action="store_const", const="uvloop", help="same as --loop uvloop")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of the idle measurement")
    parser.add_argument("--lead", type=float, default=None,
                        help="seconds from the last planned answer to the first account's target "
                        "(default: the settle and idle windows and 8 s more)")
    parser.add_argument("--spread", type=float, default=60.0, help="seconds over which the targets are spread")
    parser.add_argument("--seed", type=int, default=20260114)
    parser.add_argument("--profile-daemon", action="store_true",
                        help="run the daemon under cProfile, on asyncio's loop (under uvloop's C loop cProfile "
                        "charges the loop's waits to the last coroutine it saw), and print where its time went; "
                        "it slows the daemon, so the other figures of such a run are the profiler's")
    parser.add_argument("--no-pin", action="store_true",
                        help="measure the work tree as it is, not a snapshot of the commit at HEAD")
    args = parser.parse_args(argv)
    if not (1 <= args.accounts <= args.calls <= 100_000 and 1 <= args.rate <= 5_000 and 1 <= args.idle <= 600
            and 0 <= args.spread <= 600):
        parser.error("bounds: 1 <= accounts <= calls <= 100000, rate 1..5000, idle 1..600, spread 0..600")
    if args.profile_daemon:
        args.loop = "asyncio"
    if args.lead is None:
        args.lead = SETTLE_S + args.idle + 8.0
    if args.lead < SETTLE_S + args.idle + 2:
        parser.error(f"--lead must leave room for the settle ({SETTLE_S:g} s) and idle windows: >= "
                     f"{SETTLE_S + args.idle + 2:g}")
    if not args.no_pin:
        pin_code(__file__, list(sys.argv[1:] if argv is None else argv))
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
