"""FastAGI authorize benchmark: the real daemon against a trivial FastAGI server, same client, same machine.

    .venv/bin/python bench/agi_authorize.py [--sessions 20000] [--concurrency 50] [--rate 1000]

Sets up the database a2bd_bench and Redis db 14 with the CLI an operator uses (`a2bd db migrate`,
`a2bd provider add`, `a2bd tariff import` of a small CSV, ~1000 accounts through
postgres.create_account on one connection, `a2bd sync`), then for each server:

  trivial               an AgiServer in its own process; its one route answers ``SET VARIABLE A2B_STATUS OK``
  authorize, log debug  `a2bd serve`, A2BD_LOG_LEVEL=debug: one structlog line per call (stderr to a file)
  authorize, log info   `a2bd serve` as shipped (info: a line per refusal; OKs log at debug since 9ec3bd3)
  authorize, log warn   `a2bd serve`, A2BD_LOG_LEVEL=warning
  trivial, 7 lines      (extra) the trivial server answering the 7 SET VARIABLE lines authorize sends

starts it, waits for its AGI port, and drives it from a separate client process (this file, --role
client) running a2bd.sim.agi.run_session sessions, each with its own agi_uniqueid and an account's
accountcode:
  A  closed loop, --concurrency sessions in flight: sessions/s and latency (connect to server close);
  B  open loop, a new session every 1/--rate s whatever the answers: achieved rate and latency.
Each mode starts with a warm-up of --warmup sessions (not counted). Every answer's A2B_STATUS is
counted: a run where authorize does not answer OK is reported, not hidden. Reservations are never settled
here (no AMI), so the live calls of the accounts are cleared between runs.

Targets (issue): authorize >= 80% of trivial's sessions/s (mode A); p99 < 5 ms at 1,000 sessions/s (B).
Server, client and Redis share this machine's cores; the CPU each used per session is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import importlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
    free_port,
    percentile,
    pin_code,
    print_machine,
    proc_cpu_s,
)

TARIFF = "bench"
PROVIDERS = {"carrier-a": "PJSIP/{number}@carrier-a", "carrier-b": "PJSIP/{number}@carrier-b"}
ACCOUNT_BASE = 5_000_000_000  # account numbers are ACCOUNT_BASE + i, 10 digits
# dialprefix, destination, sell per minute, initial block s, increment s (each sold through both carriers)
RATES = [
    ("4930", "Germany Berlin", "0.0120", 60, 60), ("4940", "Germany Hamburg", "0.0120", 60, 60),
    ("4989", "Germany Munich", "0.0120", 60, 60), ("49151", "Germany Mobile T", "0.0850", 30, 6),
    ("49160", "Germany Mobile V", "0.0850", 30, 6), ("49170", "Germany Mobile T", "0.0850", 30, 6),
    ("49", "Germany", "0.0150", 60, 60), ("331", "France Paris", "0.0110", 60, 60),
    ("336", "France Mobile", "0.0700", 30, 6), ("337", "France Mobile", "0.0700", 30, 6),
    ("33", "France", "0.0140", 60, 60), ("4420", "UK London", "0.0090", 60, 60),
    ("447", "UK Mobile", "0.0450", 1, 1), ("44", "UK", "0.0120", 60, 60), ("1212", "USA New York", "0.0080", 6, 6),
    ("1310", "USA Los Angeles", "0.0080", 6, 6), ("1", "USA/Canada", "0.0090", 6, 6),
    ("3906", "Italy Rome", "0.0130", 30, 1), ("393", "Italy Mobile", "0.0650", 30, 1),
    ("34", "Spain", "0.0130", 60, 1), ("346", "Spain Mobile", "0.0600", 60, 1),
    ("3120", "Netherlands Amsterdam", "0.0140", 60, 60), ("316", "Netherlands Mobile", "0.0900", 60, 60),
    ("41", "Switzerland", "0.0300", 60, 60), ("4179", "Switzerland Mobile", "0.2500", 60, 60),
]
DESTINATIONS = [p for p, *_ in RATES if len(p) >= 3]  # sessions dial numbers under these


# -- the client ---------------------------------------------------------------------------------------


def environments(args: argparse.Namespace, count: int, tag: str) -> list[dict[str, str]]:
    from a2bd.sim.agi import make_environment

    rng = random.Random(f"{args.seed}-{tag}")
    envs = []
    for i in range(count):
        prefix = rng.choice(DESTINATIONS)
        number = prefix + "".join(rng.choices("0123456789", k=11 - len(prefix)))
        account = str(ACCOUNT_BASE + rng.randrange(args.accounts))
        envs.append(make_environment(
            uniqueid=f"{tag}.{i}", channel=f"PJSIP/bench-{i:08x}", extension=number, callerid="4915100000000",
            accountcode=account, host=args.host, port=args.port,
        ))
    return envs


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.from_due: list[float] = []  # open loop: from the scheduled start (client lateness included)
        self.late: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    async def one(self, host: str, port: int, env: dict[str, str], due: float | None = None) -> None:
        from a2bd.sim.agi import run_session

        loop = asyncio.get_running_loop()
        if due is not None:
            self.late.append(loop.time() - due)
        try:
            result = await run_session(host, port, env, timeout_s=5.0)
        except OSError as exc:
            self.errors[type(exc).__name__] += 1
            return
        if not result.server_closed:
            self.errors["timeout"] += 1
            return
        self.latencies.append(result.elapsed_s)
        if due is not None:
            self.from_due.append(loop.time() - due)
        self.statuses[result.variables.get("A2B_STATUS", "<unset>")] += 1


async def closed_loop(args: argparse.Namespace, envs: list[dict[str, str]], tally: Tally) -> float:
    pending = iter(envs)

    async def worker() -> None:
        for env in pending:  # one iterator shared by the workers: each env runs once
            await tally.one(args.host, args.port, env)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return time.perf_counter() - started


async def open_loop(args: argparse.Namespace, envs: list[dict[str, str]], tally: Tally) -> float:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    start = loop.time() + 0.05
    started = time.perf_counter() + 0.05
    for i, env in enumerate(envs):
        due = start + i / args.rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= args.max_inflight:
            tally.errors["client_inflight_cap"] += 1  # the server fell behind: counted, not queued
            continue
        task = asyncio.create_task(tally.one(args.host, args.port, env, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    return time.perf_counter() - started


def summary(tally: Tally, wall_s: float, sessions: int, cpu_s: float) -> dict[str, Any]:
    lat = sorted(tally.latencies)
    due = sorted(tally.from_due)
    late = sorted(tally.late)
    ms = 1000.0
    return {
        "sessions": sessions, "completed": len(lat), "wall_s": wall_s, "per_s": len(lat) / wall_s,
        "p50_ms": percentile(lat, 50) * ms, "p90_ms": percentile(lat, 90) * ms,
        "p99_ms": percentile(lat, 99) * ms, "p999_ms": percentile(lat, 99.9) * ms, "max_ms": lat[-1] * ms if lat else 0,
        "due_p99_ms": percentile(due, 99) * ms if due else None,
        "late_p99_ms": percentile(late, 99) * ms if late else None,
        "statuses": dict(tally.statuses), "errors": dict(tally.errors), "client_cpu_s": cpu_s,
    }


async def client(args: argparse.Namespace) -> dict[str, Any]:
    warm = environments(args, args.warmup, f"{args.tag}-warm")
    envs = environments(args, args.sessions, args.tag)
    await closed_loop(args, warm, Tally())
    tally = Tally()
    cpu0 = time.process_time()
    wall = await (closed_loop(args, envs, tally) if args.mode == "closed" else open_loop(args, envs, tally))
    return summary(tally, wall, len(envs), time.process_time() - cpu0)


# -- the trivial server -------------------------------------------------------------------------------


async def trivial_server(args: argparse.Namespace) -> None:
    from a2bd.agi.protocol import set_variable
    from a2bd.agi.server import AgiServer, AgiSession
    from a2bd.config import AgiSettings
    from a2bd.observability import configure_logging

    configure_logging("warning")
    if args.answer_lines == 1:
        answer = [set_variable("A2B_STATUS", "OK")]
    else:  # what authorize sends for an OK with two routes
        answer = [set_variable("CHANNEL(accountcode)", "5000000000"), set_variable("A2B_ACCOUNT", "5000000000"),
                  set_variable("A2B_LIMIT_MS", "14400000"), set_variable("A2B_ROUTES", "2"),
                  set_variable("A2B_ROUTE_1", "PJSIP/49301234567@carrier-a"),
                  set_variable("A2B_ROUTE_2", "PJSIP/49301234567@carrier-b"), set_variable("A2B_STATUS", "OK")]

    async def handle(session: AgiSession) -> None:
        await session.execute(*answer)

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server = AgiServer(AgiSettings(host=args.host, port=args.port), {"authorize": handle})
    await server.start()
    await stop.wait()
    await server.close()


# -- the orchestrator ---------------------------------------------------------------------------------




def machine_cpu() -> tuple[float, float, float]:
    """(busy, steal, total) seconds of all cores since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick, sum(fields) / tick


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def redis_cpu_s(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def a2bd(env: dict[str, str], *words: str) -> str:
    done = subprocess.run([sys.executable, "-m", "a2bd.cli", *words], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise SystemExit(f"a2bd {' '.join(words)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


def write_ratecard(path: Path) -> None:
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["dialprefix", "destination", "rateinitial", "initblock", "billingblock", "provider", "buyrate"])
        for prefix, destination, sell, init, block in RATES:
            for n, provider in enumerate(PROVIDERS):
                buy = f"{float(sell) * (0.6 + 0.1 * n):.4f}"
                out.writerow([prefix, destination, sell, init, block, provider, buy])


async def create_accounts(pg_url: str, count: int) -> None:
    from a2bd.adapters import postgres

    conn = await postgres.connect(pg_url)
    try:
        for i in range(count):
            await postgres.create_account(conn, tariff=TARIFF, number=str(ACCOUNT_BASE + i),
                                          initial_balance_micro=10**12, max_calls=1_000_000)
    finally:
        await conn.close()


def bench_redis(redis_url: str) -> Any:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    db = client.connection_pool.connection_kwargs.get("db")
    if db != BENCH_REDIS_DB:
        raise SystemExit(f"refusing to use Redis db {db}: the bench owns db {BENCH_REDIS_DB} only")
    return client


def clear_live_calls(client: Any) -> int:
    keys = list(client.scan_iter(match="a2b:{acct:*}:calls", count=1000))
    if keys:
        client.delete(*keys)
    return len(keys)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> int:
    """Wait until `port` accepts; return the local port of the probe (the server logs its early close)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as sock:
            return int(sock.getsockname()[1])
        time.sleep(0.1)
    raise SystemExit(f"server did not listen on {port} within {timeout_s} s")


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return -9


SERVERS = [
    ("trivial", "trivial", {"answer_lines": "1"}),
    ("authorize, log debug", "daemon", {"A2BD_LOG_LEVEL": "debug"}),
    ("authorize, log info", "daemon", {"A2BD_LOG_LEVEL": "info"}),
    ("authorize, log warning", "daemon", {"A2BD_LOG_LEVEL": "warning"}),
    ("trivial, 7 lines (extra)", "trivial", {"answer_lines": "7"}),
]


def start_server(args: argparse.Namespace, label: str, kind: str, extra: dict[str, str], env: dict[str, str],
                 tmp: Path) -> dict[str, Any]:
    port = free_port()
    log_path = tmp / f"server-{len(list(tmp.iterdir()))}.stderr"
    prof_path = tmp / "daemon.prof"
    if kind in ("daemon", "daemon-uvloop"):
        # The daemon's loop is a setting (runtime.loop): each row names it, so that it runs on the same
        # loop as the trivial server it is compared with.
        loop = "uvloop" if kind == "daemon-uvloop" else "asyncio"
        server_env = {**env, "A2BD_AGI_PORT": str(port), "A2BD_METRICS_PORT": "0", "A2BD_RUNTIME_LOOP": loop,
                      **extra}
        console = Path(sys.executable).with_name("a2bd")
        cmd = [str(console), "serve"] if console.exists() else [sys.executable, "-m", "a2bd.cli", "serve"]
    elif kind == "daemon-profiled":
        server_env = {**env, "A2BD_AGI_PORT": str(port), "A2BD_METRICS_PORT": "0", "A2BD_RUNTIME_LOOP": "asyncio",
                      **extra}
        cmd = [sys.executable, "-m", "cProfile", "-o", str(prof_path), "-m", "a2bd.cli", "serve"]
    else:
        server_env = env
        cmd = [sys.executable, __file__, "--role", "trivial", "--port", str(port),
               "--answer-lines", extra["answer_lines"], *(["--uvloop"] if kind == "trivial-uvloop" else [])]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=server_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    srv: dict[str, Any] = {"label": label, "kind": kind, "proc": proc, "port": port, "log_path": log_path,
                           "prof_path": prof_path, "runs": {"closed": [], "open": []}}
    try:
        srv["probe_port"] = wait_for_port(port, proc)
    except SystemExit as exc:
        stop(proc)
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"{label}: {exc}; its stderr ends with:\n" + "\n".join(tail)) from None
    return srv


def measure(args: argparse.Namespace, srv: dict[str, Any], mode: str, rep: int, env: dict[str, str],
            rclient: Any) -> None:
    """One client run (warm-up + --sessions) against a started server; appended to srv["runs"][mode]."""
    proc, port = srv["proc"], srv["port"]
    clear_live_calls(rclient)
    calib = calibrate_ms()
    cpu0, rcpu0 = proc_cpu_s(proc.pid), redis_cpu_s(rclient)
    (busy0, steal0, all0), child0, wall0 = machine_cpu(), children_cpu_s(), time.monotonic()
    budget = args.sessions / (args.rate if mode == "open" else 100) + args.warmup / 100 + 120
    done = subprocess.run(
        [sys.executable, __file__, "--role", "client", "--mode", mode, "--port", str(port),
         "--sessions", str(args.sessions), "--concurrency", str(args.concurrency),
         "--rate", str(args.rate), "--warmup", str(args.warmup), "--accounts", str(args.accounts),
         "--seed", str(args.seed), "--max-inflight", str(args.max_inflight),
         "--tag", f"{srv['label'][:3]}{port}{mode}{rep}"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=budget, check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"client failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    total = args.sessions + args.warmup
    server_s, redis_s = proc_cpu_s(proc.pid) - cpu0, redis_cpu_s(rclient) - rcpu0
    (busy1, steal1, all1), wall = machine_cpu(), time.monotonic() - wall0
    # CPU the machine spent on anything but this server, this client and Redis during the run
    # (another test suite, say): a run with much of it is not a clean measurement.
    ours = server_s + redis_s + children_cpu_s() - child0
    result["other_cores"] = max(0.0, busy1 - busy0 - ours) / wall
    result["steal_pct"] = 100 * (steal1 - steal0) / max(all1 - all0, 1e-9)
    result["calib_ms"] = calib
    result["server_cpu_us"] = server_s / total * 1e6
    result["redis_cpu_us"] = redis_s / total * 1e6
    result["client_cpu_us"] = result["client_cpu_s"] / args.sessions * 1e6
    srv["runs"][mode].append(result)


def finish(args: argparse.Namespace, srv: dict[str, Any]) -> dict[str, Any]:
    """Stop the server; the median run of each mode, its logs, its profile."""
    out: dict[str, Any] = {"label": srv["label"], "exit": stop(srv["proc"])}
    for mode, runs in srv["runs"].items():
        if not runs:
            continue
        # The median run: by sessions/s in the closed loop, by p99 in the open loop.
        key = "per_s" if mode == "closed" else "p99_ms"
        ordered = sorted(runs, key=lambda r: r[key])
        out[mode] = dict(ordered[len(ordered) // 2])
        out[mode]["runs"] = [r[key] for r in runs]
        out[mode]["others"] = [r["other_cores"] for r in runs]
        out[mode]["calib"] = [r["calib_ms"] for r in runs]
        out[mode]["steal"] = [r["steal_pct"] for r in runs]
        out[mode]["all_statuses"] = sum((Counter(r["statuses"]) for r in runs), Counter())
        out[mode]["all_errors"] = sum((Counter(r["errors"]) for r in runs), Counter())
    text = srv["log_path"].read_text(errors="replace")
    lines = text.splitlines()
    out["log_lines"] = len(lines)
    out["log_bytes"] = len(text.encode())
    # The readiness probe (a connect and close) is the one expected warning.
    out["log_problems"] = [ln for ln in lines if ("[warning" in ln or "[error" in ln or "Traceback" in ln)
                           and f"peer=127.0.0.1:{srv['probe_port']} " not in ln][:3]
    if srv["kind"] == "daemon-profiled":
        out["profile"] = summarize_profile(srv["prof_path"], args.sessions + args.warmup)
    return out


_GROUPS = [  # (label, substring of the code's file path), first match wins
    ("redis-py client (redis.asyncio)", "/redis/"),
    ("structlog", "/structlog/"),
    ("prometheus_client", "/prometheus_client/"),
    ("a2bd.agi (protocol, server)", "/a2bd/agi/"),
    ("a2bd.services (authorize, catalog)", "/a2bd/services/"),
    ("a2bd.adapters (redis_store)", "/a2bd/adapters/"),
    ("a2bd.domain (plan, tariff, rating)", "/a2bd/domain/"),
    ("asyncio event loop, streams, timeouts", "/asyncio/"),
    ("zoneinfo, datetime, enum, dataclasses", "/zoneinfo/"),
]
# Inclusive CPU (cProfile cumtime, suspended time excluded) of the steps of one authorize.
_STEPS = [
    ("AgiServer._run: a whole session after accept", "a2bd/agi/server.py", "_run"),
    ("  parse_environment", "a2bd/agi/protocol.py", "parse_environment"),
    ("  Authorizer.handle", "a2bd/services/authorization.py", "handle"),
    ("    Authorizer.authorize (the decision and the reservation)", "a2bd/services/authorization.py",
     "authorize"),
    ("      Authorizer._plan (time zone, plan: checks, Tariff.lookup, routes)", "a2bd/services/authorization.py",
     "_plan"),
    ("      RedisStore.reserve (EVALSHA reserve.lua)", "a2bd/adapters/redis_store.py", "reserve"),
    ("      RedisStore.account (HGETALL; first call of an account only)", "a2bd/adapters/redis_store.py",
     "account"),
    ("      RedisMux.execute (every authorize-path Redis command)", "a2bd/adapters/redis_mux.py", "execute"),
    ("    answer_commands (7 SET VARIABLE lines)", "a2bd/services/authorization.py", "answer_commands"),
    ("    AgiSession.execute (write, read 7 replies)", "a2bd/agi/server.py", "execute"),
    ("    structlog line (filtered at warning)", "structlog/_native.py", "meth"),
    ("    prometheus Histogram.observe", "prometheus_client/metrics.py", "observe"),
    ("    prometheus Counter.inc", "prometheus_client/metrics.py", "inc"),
]


def summarize_profile(path: Path, sessions: int) -> dict[str, Any]:
    import pstats

    stats: dict[Any, Any] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    groups: Counter[str] = Counter()
    total = 0.0
    for (file, _line, func), (_cc, _nc, tottime, _cum, _callers) in stats.items():
        total += tottime
        label = next((g for g, part in _GROUPS if part in file), None)
        if label is None and file == "~":
            label = ("socket and epoll calls" if any(w in func for w in ("socket", "epoll", "select", "send", "recv"))
                     else "other built-ins")
        if label is None and file.endswith(("datetime.py", "enum.py", "dataclasses.py")):
            label = "zoneinfo, datetime, enum, dataclasses"
        groups[label or "other Python"] += tottime
    steps = []
    for label, file_part, func in _STEPS:
        cum = sum(v[3] for (file, _l, f), v in stats.items() if f == func and file.endswith(file_part))
        steps.append((label, cum / sessions * 1e6))
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]
    own = [(f"{Path(file).parent.name}/{Path(file).name}:{line}({func})" if file != "~" else func,
            v[1], v[2] / sessions * 1e6) for (file, line, func), v in top]
    return {"total_us": total / sessions * 1e6, "top": own,
            "groups": [(g, t / sessions * 1e6, 100 * t / total) for g, t in groups.most_common()],
            "steps": steps}


async def redis_costs(redis_url: str, args: argparse.Namespace, calls: int = 10_000) -> list[tuple[str, float, float]]:
    """CPU per Redis call of the authorize path, from one asyncio process with the daemon's pool settings
    and --concurrency calls in flight: what each round trip costs the daemon, apart from the AGI."""
    from a2bd.adapters.redis_store import RedisStore
    from a2bd.config import RedisSettings

    settings = RedisSettings()
    store = RedisStore.from_url(redis_url, settings.timeout_s, settings.max_connections)
    await store.ping()
    numbers = [str(ACCOUNT_BASE + i % args.accounts) for i in range(calls)]
    now_ms = int(time.time() * 1000)

    async def run(label: str, make: Any) -> tuple[str, float, float]:
        pending = iter(range(calls))

        async def worker() -> None:
            for i in pending:
                await make(i)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))  # warm the pool
        pending = iter(range(calls))
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return label, (time.process_time() - cpu0) / calls * 1e6, calls / (time.perf_counter() - t0)

    try:
        return [
            await run("PING, redis-py pool (store.client)", lambda i: store.client.ping()),
            await run("HGETALL account, redis-py pool (store.client.hgetall)",
                      lambda i: store.client.hgetall(f"a2b:{{acct:{numbers[i]}}}")),
            await run("PING, RedisMux (store.mux)", lambda i: store.mux.execute("PING")),
            await run("HGETALL account: RedisStore.account (RedisMux)", lambda i: store.account(numbers[i])),
            await run("EVALSHA reserve.lua: RedisStore.reserve (RedisMux)",
                      lambda i: store.reserve(numbers[i], f"micro/{i}", 10_000, now_ms, now_ms + 60_000)),
        ]
    finally:
        await store.close()


def orchestrate(args: argparse.Namespace) -> int:
    print_machine("bench/agi_authorize.py")
    print(f"   args     --sessions {args.sessions} --concurrency {args.concurrency} --rate {args.rate} "
          f"--warmup {args.warmup} --accounts {args.accounts} --repeat {args.repeat}"
          f"{' --uvloop' if args.uvloop else ''}{' --profile-server' if args.profile_server else ''}")
    print(f"   one server process and one client process (asyncio, {args.concurrency} sessions in flight in A), "
          "Redis and PostgreSQL on the same machine")
    admin_url, pg_url, redis_url = bench_urls()
    with BenchLock(admin_url):
        return run(args, admin_url, pg_url, redis_url)


def run(args: argparse.Namespace, admin_url: str, pg_url: str, redis_url: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("A2BD_")}
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env |= {"A2BD_PG_URL": pg_url, "A2BD_REDIS_URL": redis_url, "PYTHONPATH": pythonpath}
    rclient = bench_redis(redis_url)
    rclient.flushdb()
    asyncio.run(create_bench_db(admin_url))
    tmp = Path(tempfile.mkdtemp(prefix="a2bd-bench-"))
    results: list[dict[str, Any]] = []
    try:
        setup_started = time.perf_counter()
        a2bd(env, "db", "migrate")
        for name, dial in PROVIDERS.items():
            a2bd(env, "provider", "add", name, "--dial", dial)
        write_ratecard(tmp / "ratecard.csv")
        print(f"   setup    {a2bd(env, 'tariff', 'import', str(tmp / 'ratecard.csv'), '--tariff', TARIFF)}")
        asyncio.run(create_accounts(pg_url, args.accounts))
        print(f"   setup    {a2bd(env, 'sync')} ({time.perf_counter() - setup_started:.1f} s in all)")
        servers = list(SERVERS)
        if args.uvloop:
            servers += [("uvloop: trivial", "trivial-uvloop", {"answer_lines": "1"}),
                        ("uvloop: authorize, log warning", "daemon-uvloop", {"A2BD_LOG_LEVEL": "warning"})]
        servers = [t for t in servers if not args.only or any(o in t[0] for o in args.only)]
        # Every server runs at once (an idle one costs nothing) and the runs go round-robin, so a drift
        # of this VM's speed hits every server alike instead of whichever ran last.
        started: list[dict[str, Any]] = []
        try:
            for label, kind, extra in servers:
                try:
                    started.append(start_server(args, label, kind, extra, env, tmp))
                except SystemExit as exc:
                    if not label.startswith("uvloop"):
                        raise
                    print(f"   FAILED   {exc}".replace("\n", "\n            "))
            print(f"   running  {', '.join(srv['label'] for srv in started)}: {args.repeat} round(s)", flush=True)
            for rep in range(args.repeat):
                for srv in started:
                    for mode in ("closed", "open"):
                        measure(args, srv, mode, rep, env, rclient)
        finally:
            results = [finish(args, srv) for srv in started]
        if args.profile_server:
            print("   running  authorize under cProfile (alone, after the others)", flush=True)
            srv = start_server(args, "authorize under cProfile", "daemon-profiled", {"A2BD_LOG_LEVEL": "warning"},
                               env, tmp)
            try:
                measure(args, srv, "closed", 0, env, rclient)
            finally:
                results.append(finish(args, srv))
        clear_live_calls(rclient)
        costs = asyncio.run(redis_costs(redis_url, args))
        clear_live_calls(rclient)
    finally:
        with contextlib.suppress(Exception):
            rclient.flushdb()
        asyncio.run(drop_bench_db(admin_url))
        shutil.rmtree(tmp, ignore_errors=True)
    return report(args, results, costs)


def report(args: argparse.Namespace, all_results: list[dict[str, Any]], costs: list[tuple[str, float, float]]) -> int:
    results = [r for r in all_results if "open" in r]
    def row(r: dict[str, Any], mode: str) -> str:
        m = r[mode]
        ok = 100 * m["statuses"].get("OK", 0) / m["sessions"]
        return (f"   {r['label']:<26s} {m['per_s']:9,.0f} {m['p50_ms']:7.2f} {m['p90_ms']:7.2f} {m['p99_ms']:7.2f} "
                f"{m['max_ms']:8.2f} {ok:6.1f}% {m['server_cpu_us']:8.0f} {m['client_cpu_us']:8.0f} "
                f"{m['redis_cpu_us']:8.0f} {m['other_cores']:6.2f}")

    head = (f"   {'server':<26s} {'sess/s':>9s} {'p50 ms':>7s} {'p90 ms':>7s} {'p99 ms':>7s} {'max ms':>8s} "
            f"{'OK':>7s} {'srv us':>8s} {'cli us':>8s} {'redis us':>8s} {'other':>6s}")
    print("\n   latency: connect to server close, in the client; us: CPU microseconds per session "
          "(server process, client process, Redis server);\n   other: cores used by anything else on the machine "
          "during the run (should be ~0 for a clean run)")
    print(f"\nA  closed loop, {args.concurrency} in flight, {args.sessions:,} sessions")
    print(head)
    for r in results:
        print(row(r, "closed"))
    print(f"\nB  open loop at {args.rate:,} sessions/s, {args.sessions:,} sessions")
    print(head)
    for r in results:
        print(row(r, "open"))
    for r in results:
        m = r["open"]
        print(f"   {r['label']:<26s} achieved {m['per_s']:,.0f}/s; p99 from the scheduled start "
              f"{m['due_p99_ms']:.2f} ms (client start lateness p99 {m['late_p99_ms']:.2f} ms)")
    print()
    print(f"\n   each row above is the median of {args.repeat} run(s), the servers taking turns; all runs:")
    if results:
        for r in results:
            print(f"   {r['label']:<26s} A sessions/s {', '.join(f'{v:,.0f}' for v in r['closed']['runs'])};"
                  f"  B p99 ms {', '.join(f'{v:.2f}' for v in r['open']['runs'])};"
                  f"  other cores A {max(r['closed']['others']):.2f} B {max(r['open']['others']):.2f} (max)")
        calib = [c for r in results for mode in ("closed", "open") for c in r[mode]["calib"]]
        steal = [c for r in results for mode in ("closed", "open") for c in r[mode]["steal"]]
        print(f"   calibration loop before each run: {min(calib):.1f} .. {max(calib):.1f} ms "
              f"(the same work; the spread is this VM's speed drift); steal {max(steal):.1f}% at most")
    print()
    for r in results:
        problems = r["closed"]["all_errors"] + r["open"]["all_errors"]
        statuses = r["closed"]["all_statuses"] + r["open"]["all_statuses"]
        print(f"   {r['label']:<26s} statuses {dict(statuses)}; errors {dict(problems) or 'none'}; exit {r['exit']}; "
              f"stderr {r['log_lines']:,} lines, {r['log_bytes'] / 1024:,.0f} KiB")
        for line in r["log_problems"]:
            print(f"      {line[:160]}")

    for r in all_results:
        if "profile" not in r:
            continue
        p, m = r["profile"], r["closed"]
        print(f"\n   {r['label']}: closed loop {m['per_s']:,.0f} sessions/s, {m['statuses']}; time seen by "
              f"cProfile {p['total_us']:.0f} us per session (wall clock: profiler overhead, start-up and waits in "
              "epoll included)")
        print("   own time by package:")
        for label, us, pct in p["groups"]:
            print(f"     {us:7.1f} us {pct:5.1f}%  {label}")
        print("   top functions by own time:")
        for where, calls, us in p["top"]:
            print(f"     {us:7.1f} us {calls / (args.sessions + args.warmup):6.1f} calls/session  {where[:110]}")
        print("   inclusive time of the steps (cumtime per session; coroutines count only while running):")
        for label, us in p["steps"]:
            print(f"     {us:7.1f} us  {label}")

    print(f"\n   Redis calls alone, from one asyncio process, {args.concurrency} in flight, the daemon's settings "
          "(redis-py pool: everything but authorize; RedisMux: authorize since 9ec3bd3):")
    for label, cpu_us, per_s in costs:
        print(f"     {cpu_us:6.0f} us client CPU per call {per_s:9,.0f} calls/s  {label}")

    trivial = next((r for r in results if r["label"] == "trivial"), None)
    authorize = [r for r in results if "authorize" in r["label"]]
    if trivial and authorize:
        print("\n   targets")
        for r in authorize:
            base = trivial
            if r["label"].startswith("uvloop"):
                base = next((t for t in results if t["label"] == "uvloop: trivial"), trivial)
            ratio = r["closed"]["per_s"] / base["closed"]["per_s"]
            print(f"   {r['label']:<26s} sessions/s {100 * ratio:5.1f}% of {base['label']} (target >= 80%): "
                  f"{'MET' if ratio >= 0.8 else 'MISSED'}")
            p99 = r["open"]["p99_ms"]
            achieved = r["open"]["per_s"] >= 0.98 * args.rate
            print(f"   {r['label']:<26s} p99 at {args.rate:,}/s {p99:.2f} ms (target < 5 ms): "
                  f"{'MET' if p99 < 5 and achieved else 'MISSED'}"
                  f"{'' if achieved else ' (rate not achieved)'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rate", type=float, default=1000.0, help="open loop sessions per second")
    parser.add_argument("--warmup", type=int, default=1000, help="uncounted sessions before each mode")
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--max-inflight", type=int, default=2000, help="open loop: cap of sessions in flight")
    parser.add_argument("--seed", type=int, default=20260114)
    parser.add_argument("--repeat", type=int, default=1, help="client runs per mode and server (median shown)")
    parser.add_argument("--only", action="append", help="run only the servers whose label contains this")
    parser.add_argument("--no-pin", action="store_true",
                        help="measure the work tree as it is, not a snapshot of the commit at HEAD")
    parser.add_argument("--uvloop", action="store_true",
                        help="also run the trivial server and the daemon on uvloop (needs `pip install uvloop`); "
                        "the client stays on asyncio's own loop")
    parser.add_argument("--profile-server", action="store_true",
                        help="also run the daemon under cProfile (log warning, closed loop) and print where it spends")
    parser.add_argument("--role", choices=("orchestrator", "client", "trivial"), default="orchestrator",
                        help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("closed", "open"), default="closed", help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="run", help=argparse.SUPPRESS)
    parser.add_argument("--answer-lines", type=int, choices=(1, 7), default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (1 <= args.sessions <= 1_000_000 and 1 <= args.concurrency <= 1000 and 1 <= args.rate <= 20_000
            and 0 <= args.warmup <= 100_000 and 1 <= args.accounts <= 100_000 and 1 <= args.repeat <= 9):
        parser.error("bounds: sessions 1..1e6, concurrency 1..1000, rate 1..20000, warmup 0..1e5, accounts 1..1e5, "
                     "repeat 1..9")
    if args.role == "orchestrator" and not args.no_pin:
        pin_code(__file__, list(sys.argv[1:] if argv is None else argv))
    if args.role == "client":
        print(json.dumps(asyncio.run(client(args))))
        return 0
    if args.role == "trivial":
        if args.uvloop:
            uvloop = importlib.import_module("uvloop")  # optional: pip install uvloop
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.run(trivial_server(args))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
