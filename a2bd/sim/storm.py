"""Call storms: a simulated Asterisk drives a real a2bd daemon, then the money is checked, not only the speed.

    a2bd storm --rate 200 --calls 2000 [--csv calls.csv] [--plot storm.png] [--json]

The storm owns a scratch database (`a2bd_storm`) and Redis db 12, which it creates and drops. It imports the
sample rate card, creates a mix of accounts (pre-paid with little credit, post-paid with a limit, blocked,
expired), starts a simulated Asterisk (a2bd.sim.ami: an AMI server a2bd logs into, a FastAGI session per
call as Asterisk opens it, the recorded event sequences of answered, busy, unanswered and cut calls, the
L() limit and the Hangup action obeyed) and `a2bd serve` as a separate process, then places the calls at
their planned instants: Poisson arrivals at --rate, talk times drawn from an exponential distribution, a mix
of outcomes, or the rows of a CSV (start_s, account, destination, talk_s[, outcome]).

At the end it checks the books independently of the daemon's bookkeeping: for every account the balance
expected from what the simulator did (each answered call's billable seconds priced by the rate card)
against PostgreSQL and Redis; one ledger line per answered call and none for the others; no OK for a
blocked or expired account; no account below the guard's bound (one billing increment per live call
under zero). It prints calls/s reached, the authorization latency p50/p99/max, the calls the guard cut,
and a verdict, and exits 1 on any discrepancy. `--plot` draws calls/s, live calls and latency over time.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import itertools
import math
import os
import random
import re
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from a2bd.adapters import postgres
from a2bd.adapters.redis_store import RedisStore
from a2bd.domain.money import ceil_div, format_amount
from a2bd.domain.ratecard import parse_ratecard
from a2bd.domain.rating import cost_micro
from a2bd.domain.tariff import RateEntry, Tariff
from a2bd.errors import InputError
from a2bd.sim.ami import CallResult, CallSpec, SimAsterisk, manager_event_names
from a2bd.sim.cdr import CdrTable, create_table
from a2bd.sim.faults import Fault, Injection, RedisServer, fault_report, inject
from a2bd.sim.measure import free_port, histogram_quantile, percentile, proc_cpu_s, proc_rss_mib
from a2bd.sim.proxy import TcpProxy, proxied

SAMPLE = Path(__file__).resolve().parent.parent.parent / "examples" / "sample_tariff.csv"
# The AMI user's event filters come from the manager.conf the project ships: the simulated Asterisk sends
# what a real one configured with it would.
MANAGER_CONF = SAMPLE.parent.parent / "asterisk_conf" / "manager.conf"
DB = "a2bd_storm"
REDIS_DB = 12
OUTCOMES = ("answer", "busy", "noanswer", "congestion")
SERVER = "storm"  # the simulated Asterisk's name in the daemon's settings: the prefix of every call id
MAX_IN_FLIGHT = 20_000  # calls the simulator runs at once, at most (its own memory)
DRAIN_S = 30.0  # how long the books wait for the daemon's last ledger batch
KINDS = ("prepaid", "postpaid", "blocked", "expired")
# Runs beside a storm with the daemon's FastAGI address (hostile clients in bench/agi_hostile.py).
SideLoad = Callable[[tuple[str, int]], Coroutine[Any, Any, None]]


# -- the plan (pure) -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StormAccount:
    number: str
    kind: str  # prepaid | postpaid | blocked | expired
    opening_micro: int
    credit_limit_micro: int = 0
    max_calls: int = 0


@dataclass(frozen=True, slots=True)
class PlannedCall:
    at_s: float  # after the storm's start
    account: str
    destination: str
    talk_s: float
    outcome: str = "answer"


@dataclass(frozen=True, slots=True)
class StormPlan:
    rate: float = 100.0  # calls started per second
    calls: int = 1000
    accounts: int = 200
    mean_talk_s: float = 3.0
    max_talk_s: float = 30.0
    mix: tuple[float, float, float, float] = (0.6, 0.3, 0.05, 0.05)  # prepaid, postpaid, blocked, expired
    answer_ratio: float = 0.8  # the rest: busy, no answer, congestion in equal parts
    seed: int = 20261123


def make_accounts(plan: StormPlan) -> list[StormAccount]:
    """The account mix: pre-paid with a little credit (some run out mid-call), post-paid with a limit."""
    rng = random.Random(plan.seed)
    out = []
    for i in range(plan.accounts):
        kind = rng.choices(KINDS, weights=plan.mix)[0]
        number = f"{3_000_000_000 + i}"
        if kind == "prepaid":
            out.append(StormAccount(number, kind, rng.randrange(5, 100) * 10_000, 0, rng.choice((1, 2, 4))))
        elif kind == "postpaid":
            out.append(StormAccount(number, kind, 0, rng.randrange(20, 200) * 1_000_000, 20))
        else:
            out.append(StormAccount(number, kind, 10_000_000))
    return out


def destinations(entries: Sequence[RateEntry], seed: int, per_prefix: int = 3) -> list[str]:
    """Numbers to call: a few per prefix of the rate card, long enough to be real numbers."""
    rng = random.Random(seed)
    out = []
    for entry in entries:
        for _ in range(per_prefix):
            tail = "".join(rng.choice("0123456789") for _ in range(max(11 - len(entry.prefix), 3)))
            out.append(entry.prefix + tail)
    return sorted(set(out))


def plan_calls(plan: StormPlan, accounts: Sequence[StormAccount], numbers: Sequence[str]) -> list[PlannedCall]:
    """Poisson arrivals at `plan.rate`, talk times exponential (capped), outcomes by `answer_ratio`."""
    if plan.rate <= 0 or plan.calls <= 0:
        raise InputError("a storm needs a rate > 0 and at least one call")
    rng = random.Random(plan.seed + 1)
    at = 0.0
    out = []
    others = OUTCOMES[1:]
    for _ in range(plan.calls):
        at += rng.expovariate(plan.rate)
        talk = min(rng.expovariate(1 / plan.mean_talk_s), plan.max_talk_s) if plan.mean_talk_s > 0 else 0.0
        outcome = "answer" if rng.random() < plan.answer_ratio else rng.choice(others)
        out.append(PlannedCall(round(at, 4), rng.choice(accounts).number, rng.choice(numbers), round(talk, 3),
                               outcome))
    return out


_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")  # float() alone would also take "1_0", "inf" and "1e3"


def read_calls_csv(path: Path) -> list[PlannedCall]:
    """start_s,account,destination,talk_s[,outcome] with a header; every bad row is reported by line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    calls: list[PlannedCall] = []
    errors: list[str] = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = {"start_s", "account", "destination", "talk_s"} - set(reader.fieldnames or ())
    if missing:
        raise InputError(f"{path}: the header lacks {', '.join(sorted(missing))}")
    for row in reader:
        line = reader.line_num
        try:
            if not all(_SECONDS.fullmatch((row[k] or "").strip()) for k in ("start_s", "talk_s")):
                raise ValueError("start_s and talk_s are seconds >= 0, in plain decimals")
            start, talk = float(row["start_s"]), float(row["talk_s"])
            outcome = (row.get("outcome") or "answer").strip()
            if outcome not in OUTCOMES:
                raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
            if not row["account"].isdigit() or not row["destination"].isdigit():
                raise ValueError("account and destination are digits")
            calls.append(PlannedCall(start, row["account"], row["destination"], talk, outcome))
        except (ValueError, TypeError, AttributeError) as exc:
            errors.append(f"line {line}: {exc}")
    if errors:
        raise InputError(f"{path}: {len(errors)} bad row(s): " + "; ".join(errors[:20]))
    return sorted(calls, key=lambda c: c.at_s)


# -- the verdict (pure) --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """One placed call as the simulator saw it."""

    planned: PlannedCall
    result: CallResult
    started_at: float  # wall clock


@dataclass(slots=True)
class Verdict:
    discrepancies: list[str] = field(default_factory=list)
    expected_micro: dict[str, int] = field(default_factory=dict)
    missing: int = 0  # answered calls with no ledger line
    doubled: int = 0  # calls with more than one ledger line
    # Accounts past the guard's bound. A discrepancy, unless the run took the guard's eyes or hands away
    # (AMI cut, daemon killed): then only the Dial L() limit bounds a call, and the overspend is reported.
    over_bound: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.discrepancies


def check_books(
    accounts: Sequence[StormAccount], outcomes: Sequence[Outcome], entries: Sequence[RateEntry],
    ledger: Sequence[tuple[str, str, int]], pg_balances: dict[str, int], redis_balances: dict[str, int | None],
    *, guard_blinded: bool = False,
) -> Verdict:
    """Compare what the simulator did with the books. `ledger`: (call id, account, amount) of every call
    line; balances by account number. Prices come from the rate card and the simulator's billable
    seconds, not from anything the daemon computed."""
    tariff = Tariff.build("storm", entries)
    increment = _max_increment_micro(entries)
    verdict = Verdict()
    by_number = {a.number: a for a in accounts}
    expected = {a.number: a.opening_micro for a in accounts}
    answered: dict[str, tuple[str, int]] = {}
    for o in outcomes:
        r = o.result
        if by_number.get(o.planned.account) and by_number[o.planned.account].kind in ("blocked", "expired") \
                and r.status == "OK":
            verdict.discrepancies.append(f"{o.planned.account} ({by_number[o.planned.account].kind}) was authorized")
        if r.disposition == "ANSWERED":
            match = tariff.lookup(o.planned.destination, datetime.fromtimestamp(o.started_at, UTC))
            if match is None:
                verdict.discrepancies.append(f"{SERVER}/{r.uniqueid}: answered but the rate card has no rate")
                continue
            price = cost_micro(match.sell, r.billable_s)
            answered[f"{SERVER}/{r.uniqueid}"] = (o.planned.account, price)
            expected[o.planned.account] = expected.get(o.planned.account, 0) - price
    seen = Counter(call_id for call_id, _, _ in ledger)
    for call_id, count in seen.items():
        if count > 1:
            verdict.doubled += 1
            verdict.discrepancies.append(f"{call_id}: {count} ledger lines (doubled)")
        if call_id not in answered:
            verdict.discrepancies.append(f"{call_id}: a ledger line for a call that was not answered")
    for call_id, account, amount in ledger:
        if call_id in answered and answered[call_id] != (account, -amount):
            verdict.discrepancies.append(f"{call_id}: billed {format_amount(-amount)} to {account}, expected "
                                         f"{format_amount(answered[call_id][1])} to {answered[call_id][0]}")
    for call_id in answered.keys() - seen.keys():
        verdict.missing += 1
        verdict.discrepancies.append(f"{call_id}: answered but missing from the ledger")
    for number, want in expected.items():
        if pg_balances.get(number) != want:
            verdict.discrepancies.append(f"account {number}: PostgreSQL balance {pg_balances.get(number)} != "
                                         f"{want} expected")
        if redis_balances.get(number) != pg_balances.get(number):
            verdict.discrepancies.append(f"account {number}: Redis balance {redis_balances.get(number)} != "
                                         f"PostgreSQL {pg_balances.get(number)}")
        acct = by_number[number]
        live_max = acct.max_calls or 20
        bound = -live_max * increment
        if want + acct.credit_limit_micro < bound:
            line = f"account {number}: available credit {format_amount(want)} below the guard's bound " \
                   f"{format_amount(bound)}"
            verdict.over_bound.append(line)
            if not guard_blinded:
                verdict.discrepancies.append(line)
    verdict.expected_micro = expected
    return verdict


def _max_increment_micro(entries: Sequence[RateEntry]) -> int:
    """The most one billing increment (or initial block) of any rate can cost: the guard's bound per call."""
    worst = 0
    for entry in entries:
        sell = entry.sell
        step = max(sell.increment_s, sell.initial_block_s, 1)
        worst = max(worst, sell.connect_micro + sell.disconnect_micro + ceil_div(step * sell.rate_per_min_micro, 60),
                    sell.min_cost_micro)
    return worst


# -- the run -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class StormReport:
    outcomes: list[Outcome]
    started: float
    live_samples: list[tuple[float, int]]
    verdict: Verdict
    daemon_log: list[str] = field(default_factory=list)  # what the daemon logged (level warning and up)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of each process during the storm
    scrapes: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # the daemon's /metrics, 1/s
    fault: dict[str, Any] | None = None  # a2bd.sim.faults.fault_report, when a fault was injected

    def daemon_quantile_ms(self, q: float, name: str = "a2bd_authorize_seconds") -> float | None:
        """histogram_quantile(q) of the histogram `name` in the last scrape of the daemon's /metrics (one
        daemon: the last started), or None without a scrape."""
        if not self.scrapes:
            return None
        value = histogram_quantile(q, histogram_buckets(self.scrapes[-1][1], name=name))
        return None if math.isnan(value) else _ms(value)

    def agi_rejected(self) -> dict[str, int]:
        """FastAGI connections the daemon closed unanswered, by reason (its last /metrics scrape; the reasons
        it counted at least once): over capacity and shed sessions show here, not as simulator timeouts."""
        if not self.scrapes:
            return {}
        prefix = "a2bd_agi_rejected_total{reason="
        return {key[len(prefix):-1]: int(value) for key, value in self.scrapes[-1][1].items()
                if key.startswith(prefix) and value}

    def summary(self) -> dict[str, Any]:
        lat = sorted(o.result.authorize_s for o in self.outcomes if o.result.authorize_s is not None)
        span = max(max((o.started_at for o in self.outcomes), default=self.started) - self.started, 1e-9)
        statuses = Counter(o.result.status or "none" for o in self.outcomes)
        return {
            "calls": len(self.outcomes),
            "calls_per_s": round(len(self.outcomes) / span, 1),
            "authorize_p50_ms": _ms(percentile(lat, 50) if lat else None),
            "authorize_p99_ms": _ms(percentile(lat, 99) if lat else None),
            "authorize_max_ms": _ms(lat[-1] if lat else None),
            # The daemon's own view (environment in to answer out, its histogram on /metrics): what the
            # simulator's figures add on top is connecting, the kernel and the simulator's own turns.
            "daemon_authorize_p99_ms": self.daemon_quantile_ms(0.99),
            "daemon_loop_lag_p99_ms": self.daemon_quantile_ms(0.99, "a2bd_loop_lag_seconds"),
            "agi_rejected": self.agi_rejected(),
            "answered": sum(o.result.disposition == "ANSWERED" for o in self.outcomes),
            "cut_by_guard": sum(o.result.ended_by == "ami_hangup" for o in self.outcomes),
            "cut_by_limit": sum(o.result.ended_by == "limit" for o in self.outcomes),
            "statuses": dict(statuses),
            **self.cpu,
            "daemon_cpu_us_per_call": round(self.cpu.get("daemon_cpu_s", 0) * 1e6 / max(len(self.outcomes), 1)),
            "live_calls_max": max((n for _, n in self.live_samples), default=0),
            "discrepancies": len(self.verdict.discrepancies),
            "over_guard_bound": len(self.verdict.over_bound),
            "daemon_warnings": len(self.daemon_log),
            "verdict": "OK" if self.verdict.ok else "WRONG",
            **({"fault": self.fault} if self.fault is not None else {}),
        }


def histogram_buckets(sample: dict[str, float], since: dict[str, float] | None = None,
                      name: str = "a2bd_authorize_seconds") -> dict[float, float]:
    """The buckets of the daemon's histogram `name` (unlabelled) in one scrape ({upper bound: cumulative
    count}), less those of an earlier scrape `since` if given."""
    prefix = f"{name}_bucket{{le="
    before = since or {}
    return {float(key[len(prefix):-1]): value - before.get(key, 0.0) for key, value in sample.items()
            if key.startswith(prefix)}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


async def _scrape(port: int, into: list[tuple[float, dict[str, float]]], every_s: float = 1.0) -> None:
    """The daemon's /metrics once a second, as Prometheus would scrape it: (time, sample -> value)."""
    from prometheus_client.parser import text_string_to_metric_families

    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: a2bd\r\n\r\n")
            async with asyncio.timeout(2):
                raw = await reader.read(-1)
            writer.close()
            body = raw.split(b"\r\n\r\n", 1)[-1].decode()
            samples: dict[str, float] = {}
            for family in text_string_to_metric_families(body):
                for sample in family.samples:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    samples[f"{sample.name}{{{labels}}}"] = sample.value
            into.append((time.time(), samples))
        except (OSError, TimeoutError, ValueError):
            pass  # a missed scrape is a gap in the plot, as in Prometheus
        await asyncio.sleep(every_s)


async def _peak_rss(pid: Callable[[], int | None], peak: list[float]) -> None:
    """The daemon's largest resident set (MiB) seen, sampled four times a second (across restarts)."""
    while True:
        number = pid()
        if number is not None:
            with contextlib.suppress(OSError):  # gone between the check and the read
                peak[0] = max(peak[0], proc_rss_mib(number))
        await asyncio.sleep(0.25)


async def setup_world(pg_url: str, accounts: Sequence[StormAccount], entries: Sequence[RateEntry]) -> None:
    conn = await postgres.connect(pg_url)
    try:
        await postgres.migrate(conn)
        for name in sorted({e.provider for e in entries if e.provider}):
            await postgres.add_provider(conn, name, f"PJSIP/{{number}}@{name}")
        await postgres.replace_tariff(conn, "storm", list(entries))
        expired = datetime.now(UTC) - timedelta(days=1)
        for a in accounts:
            extra: dict[str, Any] = {"max_calls": a.max_calls, "credit_limit_micro": a.credit_limit_micro}
            if a.kind == "blocked":
                extra["status"] = "blocked"
            if a.kind == "expired":
                extra["expires_at"] = expired
            await postgres.create_account(conn, number=a.number, tariff="storm", initial_balance_micro=a.opening_micro,
                                          **extra)
    finally:
        await conn.close()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the storm's process dies, however it dies (a `finally` does
    not run on a signal), so that no `a2bd serve` outlives the storm that started it. Linux only."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class _Serve:
    """`a2bd serve` as a child process with its log in a file; the kill fault kills it and starts it again.
    Its CPU is summed over every process it was."""

    def __init__(self, config: Path, env: dict[str, str], log_path: Path, agi_port: int, metrics_port: int) -> None:
        self.config, self.env, self.log_path = config, env, log_path
        self.agi_port, self.metrics_port = agi_port, metrics_port
        self.proc: asyncio.subprocess.Process | None = None
        self._cpu_before = 0.0  # CPU of the processes already gone
        self._cpu0 = 0.0  # the current process's CPU when the count began

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    async def start(self) -> None:
        with self.log_path.open("ab") as log_file:  # the child keeps its own descriptor
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "a2bd", "--config", str(self.config), "serve", env=self.env,
                stdout=asyncio.subprocess.DEVNULL, stderr=log_file, preexec_fn=_die_with_parent)
        await _wait_port(self.agi_port, self.proc, self.log_path)
        self._cpu0 = 0.0

    def count_cpu_from_now(self) -> None:
        self._cpu_before, self._cpu0 = 0.0, proc_cpu_s(self.pid) if self.pid else 0.0

    def cpu_s(self) -> float:
        return self._cpu_before + (proc_cpu_s(self.pid) - self._cpu0 if self.pid else 0.0)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self._cpu_before += proc_cpu_s(self.proc.pid) - self._cpu0
            self.proc.kill()
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def run_storm(
    calls: Sequence[PlannedCall], accounts: Sequence[StormAccount], entries: Sequence[RateEntry], *,
    pg_url: str, redis_url: str, fault: Fault | None = None, side_load: SideLoad | None = None,
) -> StormReport:
    """Set up, start the simulator and the daemon, place the calls on time (injecting `fault`), then check
    the books. `side_load`, if given, runs beside the calls with the daemon's FastAGI address (hostile
    clients, in bench/agi_hostile.py) and is cancelled when they are done."""
    await setup_world(pg_url, accounts, entries)
    async with contextlib.AsyncExitStack() as stack:
        daemon_pg, daemon_redis, cdr_table = pg_url, redis_url, ""
        redis_server: RedisServer | None = None
        proxy: TcpProxy | None = None
        sink: CdrTable | None = None
        if fault is not None:
            # A fault run bills calls that ended unheard from cdr_pgsql's table, as a deployment should.
            conn = await asyncpg.connect(pg_url)
            try:
                await create_table(conn)
            finally:
                await conn.close()
            pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)
            stack.push_async_callback(pool.close)
            sink, cdr_table = CdrTable(pool), "cdr"
            if fault.kind == "redis":
                redis_server = RedisServer(free_port())
                await redis_server.start()
                stack.push_async_callback(redis_server.stop)
                daemon_redis = redis_url = redis_server.url
            elif fault.kind == "postgres":
                proxy, daemon_pg = await stack.enter_async_context(proxied(pg_url))
        secret = secrets.token_hex(16)  # the simulated Asterisk's AMI secret, for this run only
        sim = SimAsterisk(username="a2bd", secret=secret, seed=7, cdr_sink=sink,
                          event_names=manager_event_names(MANAGER_CONF.read_text(), "a2bd"))
        await sim.start()
        stack.push_async_callback(sim.close)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="a2bd-storm-")))
        # A fault run reconciles every 5 s and rates a gone call from the CDR table once it is 2 s old (the
        # AMI path's cdr_wait_s): the defaults (120 s, 60 s) are for a quiet production day, not a test.
        tuned = "reconcile_interval_s = 5\nreconcile_cdr_age_s = 2\n" if fault is not None else ""
        env = {**os.environ, "A2BD_PG_URL": daemon_pg, "A2BD_REDIS_URL": daemon_redis}
        serves: list[_Serve] = []
        for n in range(2 if fault is not None and fault.kind == "twin" else 1):
            agi_port, metrics_port = free_port(), free_port()
            config = tmp / f"a2bd-{n}.toml"
            config.write_text(
                f'[agi]\nhost = "127.0.0.1"\nport = {agi_port}\n'
                f'[metrics]\nhost = "127.0.0.1"\nport = {metrics_port}\n'
                f'[log]\nlevel = "warning"\n'
                f'[billing]\nscheduler_interval_s = 0\n{tuned}'
                f'[[asterisk]]\nname = "{SERVER}"\nhost = "127.0.0.1"\nport = {sim.port}\nusername = "a2bd"\n'
                f'secret = "{secret}"\n' + (f'cdr_table = "{cdr_table}"\n' if cdr_table else "")
            )
            # The daemon's log goes to a file: a pipe nobody reads fills up and blocks the daemon's writes.
            serve = _Serve(config, env, tmp / f"a2bd-{n}.log", agi_port, metrics_port)
            stack.push_async_callback(serve.stop)
            await serve.start()
            serves.append(serve)
        serve = serves[0]
        async with asyncio.timeout(20):
            await sim.wait_logged_in(len(serves))
        sim.agi = ("127.0.0.1", serves[0].agi_port)
        if len(serves) > 1:  # hagi:// with both in the SRV record: the second takes over when the first refuses
            sim.agi_backup = ("127.0.0.1", serves[1].agi_port)
        injection: Injection | None = None
        faulting: tuple[Injection, FaultSteps] | None = None
        if fault is not None:
            injection = Injection(fault)
            faulting = (injection, _fault_steps(fault, serve, redis_server, proxy, sim))
        sim_cpu0 = time.process_time()
        for one in serves:
            one.count_cpu_from_now()
        scrapes: list[tuple[float, dict[str, float]]] = []
        # The survivor's metrics in a twin run; else the only daemon's.
        scraper = asyncio.create_task(_scrape(serves[-1].metrics_port, scrapes))
        rss: list[float] = [0.0]
        watcher = asyncio.create_task(_peak_rss(lambda: serves[-1].pid, rss))  # a twin run: the survivor
        side: asyncio.Task[None] | None = None
        if side_load is not None:
            side = asyncio.create_task(side_load(("127.0.0.1", serves[-1].agi_port)))
        try:
            outcomes, live, started = await _place(sim, calls, faulting)
        finally:
            scraper.cancel()
            watcher.cancel()
            if side is not None:
                side.cancel()
                await asyncio.gather(side, return_exceptions=True)
        verdict = await _books(pg_url, redis_url, accounts, outcomes, entries,
                               drain_s=DRAIN_S if fault is None else 3 * DRAIN_S,
                               guard_blinded=fault is not None and fault.kind in ("ami", "kill"))
        cpu = {"daemon_cpu_s": round(sum(one.cpu_s() for one in serves), 2),
               "simulator_cpu_s": round(time.process_time() - sim_cpu0, 2),
               "daemon_peak_rss_mib": round(rss[0], 1)}
        log_lines: list[str] = []
        for one in serves:
            await one.stop()
            log_lines += one.log_path.read_text(errors="replace").splitlines()
        faults = None
        if injection is not None:
            faults = fault_report(injection, outcomes, scrapes, sim.login_times, verdict.missing, verdict.doubled)
    return StormReport(outcomes, started, live, verdict, log_lines, cpu, scrapes, faults)


FaultSteps = tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]  # bring down, bring back


def _fault_steps(fault: Fault, serve: _Serve, redis_server: RedisServer | None, proxy: TcpProxy | None,
                 sim: SimAsterisk) -> FaultSteps:
    """(take the part down, bring it back) for `fault`."""
    if fault.kind == "kill":
        return serve.kill, serve.start
    if fault.kind == "twin":  # the first of two daemons is killed for good; the second carries on
        async def stays_down() -> None:
            return None

        return serve.kill, stays_down
    if fault.kind == "redis":
        assert redis_server is not None
        return redis_server.kill, redis_server.start
    if fault.kind == "postgres":
        assert proxy is not None
        return proxy.refuse, proxy.restore
    return sim.cut_ami, sim.restore_ami


async def _wait_port(port: int, proc: asyncio.subprocess.Process, log_path: Path) -> None:
    for _ in range(300):  # bounded: 30 s for the daemon to load and listen
        if proc.returncode is not None:
            err = (await asyncio.to_thread(log_path.read_text, errors="replace"))[-2000:]
            raise InputError(f"a2bd serve exited at start ({proc.returncode}): {err}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise InputError("a2bd serve did not listen within 30 s")


async def _place(sim: SimAsterisk, calls: Sequence[PlannedCall],
                 faulting: tuple[Injection, FaultSteps] | None = None,
                 ) -> tuple[list[Outcome], list[tuple[float, int]], float]:
    outcomes: list[Outcome] = []
    live: list[tuple[float, int]] = []
    tasks: set[asyncio.Task[None]] = set()
    room = asyncio.Semaphore(MAX_IN_FLIGHT)  # bounded: the simulator's own memory
    start = time.monotonic()
    wall0 = time.time()

    async def one(planned: PlannedCall) -> None:
        spec = CallSpec(extension=planned.destination, accountcode=planned.account,
                        outcome=planned.outcome,  # type: ignore[arg-type]
                        ring_s=0.2 if planned.outcome == "answer" else 0.5, talk_s=planned.talk_s,
                        dial_timeout_s=1.0)
        began = time.time()
        try:
            result = await sim.call(spec)
        finally:
            room.release()
        outcomes.append(Outcome(planned, result, began))

    async def sample() -> None:
        while True:
            live.append((time.time() - wall0, len(tasks)))
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    fault: asyncio.Task[None] | None = None
    if faulting is not None:
        injection, steps = faulting
        fault = asyncio.create_task(inject(injection, *steps, in_flight=lambda: len(tasks), started=start))
    try:
        for planned in calls:
            delay = start + planned.at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await room.acquire()
            task = asyncio.create_task(one(planned))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        async with asyncio.timeout(max((c.talk_s for c in calls), default=0) + 120):
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
        if faulting is not None and fault is not None:  # a fault outlasting the calls still ends before the books
            async with asyncio.timeout(faulting[0].fault.at_s + faulting[0].fault.for_s + 60):
                await fault
    finally:
        if fault is not None:
            fault.cancel()
            await asyncio.gather(fault, return_exceptions=True)  # a part left down is brought back up
        sampler.cancel()
        for task in list(tasks):
            task.cancel()
    return outcomes, live, wall0


async def _books(pg_url: str, redis_url: str, accounts: Sequence[StormAccount], outcomes: Sequence[Outcome],
                 entries: Sequence[RateEntry], drain_s: float = DRAIN_S, guard_blinded: bool = False) -> Verdict:
    answered = sum(o.result.disposition == "ANSWERED" for o in outcomes)
    conn = await asyncpg.connect(pg_url)
    store = RedisStore.from_url(redis_url, 2.0)
    try:
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:  # the daemon writes in batches: wait for the last one (bounded)
            if await conn.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'") >= answered:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # and for Redis to be settled after it
        ledger = [(r["call_id"], r["number"], r["amount_micro"]) for r in await conn.fetch(
            "SELECT l.call_id, a.number, l.amount_micro FROM ledger l JOIN accounts a ON a.id = l.account_id"
            " WHERE l.kind = 'call'")]
        pg_balances = {r["number"]: r["balance_micro"] for r in await conn.fetch(
            "SELECT number, balance_micro FROM accounts")}
        redis_balances: dict[str, int | None] = {}
        for a in accounts:
            credit = await store.credit(a.number)
            redis_balances[a.number] = credit.balance_micro if credit is not None else None
    finally:
        await conn.close()
        await store.close()
    return check_books(accounts, outcomes, entries, ledger, pg_balances, redis_balances, guard_blinded=guard_blinded)


def dashboard_path(plot_path: Path) -> Path:
    """Where the dashboard panels go beside a storm plot: storm.png -> storm-dashboard.png."""
    return plot_path.with_name(plot_path.stem + "-dashboard" + plot_path.suffix)


def plot(report: StormReport, path: Path) -> None:
    """calls/s started, live calls and authorization latency (p50/p99 per second) over the storm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = report.started
    per_s: Counter[int] = Counter(int(o.started_at - t0) for o in report.outcomes)
    lat_by_s: dict[int, list[float]] = {}
    for o in report.outcomes:
        if o.result.authorize_s is not None:
            lat_by_s.setdefault(int(o.started_at - t0), []).append(o.result.authorize_s * 1000)
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    seconds = sorted(per_s)
    axes[0].bar(seconds, [per_s[s] for s in seconds], width=0.9, color="#1f4e79")
    axes[0].set_ylabel("calls started / s")
    axes[1].plot([t for t, _ in report.live_samples], [n for _, n in report.live_samples], color="#2e7d32")
    axes[1].set_ylabel("live calls")
    lat_s = sorted(lat_by_s)
    axes[2].plot(lat_s, [percentile(sorted(lat_by_s[s]), 50) for s in lat_s], label="p50", color="#1f4e79")
    axes[2].plot(lat_s, [percentile(sorted(lat_by_s[s]), 99) for s in lat_s], label="p99", color="#c62828")
    axes[2].set_ylabel("authorize (ms)")
    axes[2].set_xlabel("seconds since the storm began")
    axes[2].legend()
    summary = report.summary()
    fig.suptitle(f"a2bd storm: {summary['calls']} calls at {summary['calls_per_s']}/s, "
                 f"p99 {summary['authorize_p99_ms']} ms, verdict {summary['verdict']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Beside the sample card, a destination priced by the second at 6.00 a minute: small pre-paid credits run
# out within a few seconds of talk, so a storm shows the credit guard (and the L() limit) at work.
EXPENSIVE = ("8816,Satellite (per second),6.0000,1,1,0,0,0,0,carrier-a,3.0000,1,1,0,10079",)


def plot_dashboard(report: StormReport, path: Path) -> None:
    """The Grafana dashboard's main panels (docs/grafana-dashboard.json), drawn from the daemon's own
    /metrics scraped each second during the storm: the same series, computed as its queries do."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scrapes = report.scrapes
    if len(scrapes) < 2:
        raise InputError("fewer than two scrapes of /metrics: nothing to plot")
    t0 = scrapes[0][0]
    times = [t - t0 for t, _ in scrapes[1:]]

    def total(sample: dict[str, float], prefix: str, label: str = "") -> float:
        return sum(v for k, v in sample.items() if k.startswith(prefix + "{") and label in k)

    def rate(prefix: str, label: str = "") -> list[float]:
        return [max(0.0, (total(b, prefix, label) - total(a, prefix, label)) / max(tb - ta, 1e-9))
                for (ta, a), (tb, b) in itertools.pairwise(scrapes)]

    def quantile(q: float, name: str = "a2bd_authorize_seconds") -> list[float]:
        return [histogram_quantile(q, histogram_buckets(b, a, name)) * 1000
                for (_, a), (_, b) in itertools.pairwise(scrapes)]

    statuses = sorted({k.split("status=")[1].rstrip("}") for _, s in scrapes for k in s
                       if k.startswith("a2bd_authorizations_total{")})
    fig, axes = plt.subplots(3, 2, figsize=(12, 9))
    ax = axes[0][0]
    for status in statuses:
        ax.plot(times, rate("a2bd_authorizations_total", f"status={status}"), label=status)
    ax.set_title("Authorizations by status (/s)")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    ax.plot(times, quantile(0.5), label="p50")
    ax.plot(times, quantile(0.99), label="p99", color="#c62828")
    ax.plot(times, quantile(0.99, "a2bd_loop_lag_seconds"), label="event loop lag p99", color="#777777")
    ax.set_title("Authorization latency (ms)")
    ax.legend(fontsize=7)
    ax = axes[1][0]
    for state in ("dialling", "answered"):
        ax.plot(times, [total(s, "a2bd_live_calls", f"state={state}") for _, s in scrapes[1:]], label=state)
    ax.set_title("Live calls")
    ax.legend(fontsize=7)
    axes[1][1].plot(times, rate("a2bd_calls_rated_total"), color="#2e7d32")
    axes[1][1].set_title("Calls rated into the ledger (/s)")
    axes[2][0].plot(times, [total(s, "a2bd_ledger_backlog") for _, s in scrapes[1:]], color="#6a1b9a")
    axes[2][0].set_title("Ledger backlog (calls)")
    axes[2][1].plot(times, rate("a2bd_guard_hangups_total"), color="#c62828")
    axes[2][1].set_title("Credit guard hangups (/s)")
    for row in axes:
        for a in row:
            a.set_xlabel("s", fontsize=8)
            a.tick_params(labelsize=8)
    fig.suptitle("a2bd dashboard panels during a storm (from the daemon's /metrics, scraped every second)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_entries(path: Path = SAMPLE) -> list[RateEntry]:
    with path.open(newline="") as fh:
        lines = [*fh.read().splitlines(), *EXPENSIVE]
    entries, errors = parse_ratecard(lines)
    if errors:
        raise InputError(f"{path}: {errors[0]}")
    return entries


async def storm_main(plan: StormPlan, csv_path: Path | None, plot_path: Path | None,
                     urls: tuple[str, str, str] | None = None, fault: Fault | None = None,
                     side_load: SideLoad | None = None) -> StormReport:
    """`a2bd storm`: a scratch database and Redis db, created and dropped. `urls`: (admin PostgreSQL, the
    scratch database, the Redis db) to use instead of `a2bd_storm` and db 12 on the machine's servers."""
    from a2bd.devservers import find_servers, with_database, with_redis_db

    if urls is None:
        servers = find_servers()
        urls = (servers.pg_url, with_database(servers.pg_url, DB), with_redis_db(servers.redis_url, REDIS_DB))
    admin_url, pg_url, redis_url = urls
    db = urlsplit(pg_url).path.lstrip("/")
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {db}")
    store = RedisStore.from_url(redis_url, 2.0)
    await store.client.flushdb()
    try:
        entries = load_entries()
        accounts = make_accounts(plan)
        calls = read_calls_csv(csv_path) if csv_path else plan_calls(plan, accounts, destinations(entries, plan.seed))
        known = {a.number for a in accounts}
        strangers = sorted({c.account for c in calls} - known)
        if strangers:
            raise InputError(f"calls name accounts the storm does not create: {', '.join(strangers[:10])} "
                             f"(its accounts are {min(known)}..{max(known)})")
        report = await run_storm(calls, accounts, entries, pg_url=pg_url, redis_url=redis_url, fault=fault,
                                 side_load=side_load)
        if plot_path is not None:
            plot(report, plot_path)
            plot_dashboard(report, dashboard_path(plot_path))
        return report
    finally:
        await store.client.flushdb()
        await store.close()
        await admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        await admin.close()
