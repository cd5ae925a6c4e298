"""What the benchmarks share: the machine they ran on, RSS, and the bench database and Redis db.

Not a benchmark itself (pytest does not collect bench/, and this file runs nothing when imported).
The bench owns exactly two things on the servers: the PostgreSQL database ``a2bd_bench`` (created and
dropped by each run) and Redis db 14 (flushed before and after). Nothing else is touched.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

BENCH_DB = "a2bd_bench"
BENCH_REDIS_DB = 14
REPO = Path(__file__).resolve().parent.parent  # the snapshot's folder when the run is pinned
_CHECKOUT = Path(os.environ.get("A2BD_BENCH_CHECKOUT", REPO))


def machine() -> list[str]:
    """Lines describing this machine: CPU model, cores, memory, kernel, Python."""
    model, logical, mhz = "?", 0, "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and model == "?":
                model = value
            elif key == "processor":
                logical += 1
            elif key == "cpu MHz" and mhz == "?":
                mhz = value
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = "?"
    tunables = " ".join(f"{k}={os.environ[k]}" for k in ("GLIBC_TUNABLES", "PYTHONMALLOC") if k in os.environ)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"cpu      {model} ({mhz} MHz)",
        f"cores    {logical or os.cpu_count()} logical, {usable} usable by this process",
        f"memory   {mem}",
        f"kernel   {platform.system()} {platform.release()}",
        f"python   {platform.python_implementation()} {sys.version.split()[0]} ({sys.executable})",
        f"memory   transparent huge pages: {thp}; allocator environment: {tunables or 'none'}",
    ]


_PINNED = "A2BD_BENCH_PINNED"


def pin_code(script: str, argv: list[str]) -> None:
    """Run `script` again from a snapshot of the commit at HEAD, and exit with its status.

    Others commit to this checkout while a benchmark runs (a run takes minutes and starts fresh
    processes throughout); measuring a mix of commits would mean nothing. So a2bd/ and sql/ are taken
    from `git archive HEAD` (read-only: the checkout and its git state are untouched) and bench/ is
    copied beside them, into a temporary folder that is removed afterwards. Uncommitted changes to a2bd/
    are not measured (--no-pin measures the work tree as it is, changes and all).
    """
    import io
    import shutil
    import subprocess
    import tarfile
    import tempfile

    if os.environ.get(_PINNED):
        return
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", head, "a2bd", "sql"],
                             capture_output=True, timeout=60, check=True).stdout
    snapshot = Path(tempfile.mkdtemp(prefix="a2bd-bench-code-"))
    try:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(snapshot, filter="data")  # our own repository's files, filtered anyway
        shutil.copytree(REPO / "bench", snapshot / "bench", ignore=shutil.ignore_patterns("__pycache__"))
        pythonpath = os.pathsep.join(p for p in (str(snapshot), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, _PINNED: head, "PYTHONPATH": pythonpath, "A2BD_BENCH_CHECKOUT": str(REPO)}
        done = subprocess.run([sys.executable, str(snapshot / "bench" / Path(script).name), *argv], env=env,
                              check=False)
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)
    sys.exit(done.returncode)


def code_version() -> str:
    """The commit benchmarked, and whether a2bd/ or sql/ differ from it (read-only git commands)."""
    import subprocess

    pinned = os.environ.get(_PINNED)
    if pinned:
        subject = subprocess.run(["git", "-C", str(_CHECKOUT), "log", "-1", "--format=%h %s", pinned],
                                 capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return f"{subject or pinned} (a2bd/ and sql/ of this commit, from git archive; not the work tree)"
    try:
        head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "a2bd", "sql"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "? (not a git checkout)"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def print_machine(title: str) -> None:
    print(f"== {title}")
    for line in machine():
        print(f"   {line}")
    print(f"   code     {code_version()}")


def proc_status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def bench_urls() -> tuple[str, str, str]:
    """(admin PostgreSQL URL, bench PostgreSQL URL, bench Redis URL), found as `make test` finds them."""
    from a2bd.devservers import find_servers, with_database, with_redis_db

    servers = find_servers()
    if servers._keep:
        # An embedded server lives only as long as `servers`; keep it for the whole run.
        _KEEP.append(servers)
    return (with_database(servers.pg_url, "postgres"), with_database(servers.pg_url, BENCH_DB),
            with_redis_db(servers.redis_url, BENCH_REDIS_DB))


_KEEP: list[object] = []

# Measuring helpers shared with the storm and the tests (a2bd/sim/measure.py), re-exported for the scripts.
from a2bd.sim.measure import free_port, percentile, proc_cpu_s, proc_rss_mib  # noqa: E402

__all__ = ["free_port", "percentile", "proc_cpu_s", "proc_rss_mib"]


async def create_bench_db(admin_url: str) -> None:
    """Drop a leftover a2bd_bench (from an interrupted run) and create it empty."""
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {BENCH_DB}")
    finally:
        await conn.close()


async def drop_bench_db(admin_url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
    finally:
        await conn.close()


def calibrate_ms() -> float:
    """A fixed pure-Python loop, timed: this VM's speed drifts with its neighbours; this shows by how much."""
    import time

    started = time.perf_counter()
    total = 0
    for i in range(300_000):
        total += i * i
    return (time.perf_counter() - started) * 1000


def machine_busy_s() -> float:
    """Busy seconds of all cores since boot (/proc/stat): with process_time(), what others used meanwhile."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


_LOCK_KEY = 0x61326262  # "a2bb": one benchmark run at a time on these servers


class BenchLock:
    """Hold a PostgreSQL advisory lock for a whole run, so that two runs (by two people, say) never drop
    each other's a2bd_bench or flush each other's Redis db 14. A second run waits, up to `wait_s`.

    The lock lives on its own connection in a thread of its own: the benchmarks call asyncio.run
    several times, and a connection cannot outlive its event loop.
    """

    def __init__(self, admin_url: str, wait_s: float = 1800.0) -> None:
        import threading

        self.admin_url = admin_url
        self.wait_s = wait_s
        self._ready = threading.Event()
        self._release = threading.Event()
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, name="bench-lock", daemon=True)

    def __enter__(self) -> BenchLock:
        self._thread.start()
        self._ready.wait(self.wait_s + 30)
        if self._error or not self._ready.is_set():
            raise SystemExit(self._error or "could not take the benchmark lock")
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._thread.join(10)

    def _run(self) -> None:
        import asyncio

        asyncio.run(self._hold())

    async def _hold(self) -> None:
        import asyncio
        import time

        import asyncpg

        try:
            conn = await asyncpg.connect(self.admin_url, timeout=5)
        except (OSError, asyncpg.PostgresError) as exc:
            self._error = f"cannot reach PostgreSQL for the benchmark lock: {exc}"
            self._ready.set()
            return
        try:
            deadline = time.monotonic() + self.wait_s
            told = False
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
                if time.monotonic() > deadline:
                    self._error = f"another benchmark run held the lock for over {self.wait_s:.0f} s"
                    return
                if not told:
                    print("   waiting  another benchmark run is using a2bd_bench and Redis db 14", flush=True)
                    told = True
                await asyncio.sleep(5)
            self._ready.set()
            await asyncio.to_thread(self._release.wait)
        finally:
            self._ready.set()
            await conn.close()  # ends the session: the lock goes with it
