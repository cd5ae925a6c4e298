"""Faults injected into a storm, for real: the daemon killed, Redis restarted empty, PostgreSQL cut, AMI cut.

    a2bd storm --rate 200 --calls 10000 --fault kill --fault-at 20 --fault-for 2

Each fault acts on a real part of the run, never on a stand-in:

- ``kill``: ``a2bd serve`` gets SIGKILL; after --fault-for seconds the same command starts again. FastAGI is
  refused meanwhile (the dialplan refuses those calls, transcript 07); calls already up go on in Asterisk.
- ``redis``: the storm's own ``redis-server`` (started for the run on a free port) is killed and, after
  --fault-for seconds, started again empty on the same port.
- ``postgres``: the daemon reaches PostgreSQL through a TCP proxy (a2bd.sim.proxy), which refuses every
  connection for --fault-for seconds.
- ``ami``: the simulated Asterisk drops every AMI connection and refuses new ones for --fault-for seconds.
- ``twin``: two daemons share Redis and PostgreSQL, both follow AMI, and FastAGI goes to the first and to
  the second when the first refuses (``hagi://`` with both in the SRV record). The first gets SIGKILL and
  stays down; the second must go on authorizing and guarding alone. --fault-for only bounds the window
  whose authorizations are counted as "during the fault".

The books are checked as for any storm (a2bd.sim.storm.check_books). The fault's own report says how many
calls were in flight at the injection, how many answered calls are missing from the ledger or in it twice
(both must be 0), how authorizations fared during the fault, and how long recovery took after it ended.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from a2bd.errors import InputError

FAULTS = ("kill", "redis", "postgres", "ami", "twin")


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    at_s: float  # after the storm's first call
    for_s: float  # how long the part stays down

    def __post_init__(self) -> None:
        if self.kind not in FAULTS:
            raise InputError(f"--fault: one of {', '.join(FAULTS)}, not {self.kind!r}")
        if not (0 <= self.at_s <= 3600 and 0 <= self.for_s <= 600):
            raise InputError("--fault-at must be 0..3600 s and --fault-for 0..600 s")


@dataclass(slots=True)
class Injection:
    """What happened when: wall-clock instants of the injection and of the restore (the moment the part
    is brought back, before it is up again)."""

    fault: Fault
    injected_at: float = 0.0
    down_at: float = 0.0  # when the part was down (the kill reaped, the proxy closed...)
    restored_at: float = 0.0
    in_flight: int = 0  # calls the simulator had under way at the injection


class RedisServer:
    """A redis-server of the storm's own on a free loopback port, which the redis fault kills and restarts
    empty. Started by PID and stopped by PID; nothing is saved to disk."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise InputError("the redis fault needs redis-server on PATH (the storm starts its own)")
        self._proc = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--daemonize", "no", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        for _ in range(100):  # bounded: 5 s to listen
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                if self._proc.returncode is not None:
                    raise InputError(f"redis-server exited at start ({self._proc.returncode})") from None
                await asyncio.sleep(0.05)
        raise InputError(f"redis-server did not listen on {self.port} within 5 s")

    async def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        self._proc = None

    stop = kill  # nothing to save: a stop is a kill


async def inject(injection: Injection, down: Callable[[], Awaitable[None]], up: Callable[[], Awaitable[None]],
                 in_flight: Callable[[], int], started: float) -> None:
    """At `fault.at_s` after `started` (monotonic), take the part down, and after `fault.for_s` bring it up."""
    fault = injection.fault
    await asyncio.sleep(max(0.0, started + fault.at_s - time.monotonic()))
    injection.in_flight = in_flight()
    injection.injected_at = time.time()
    try:
        await down()
        injection.down_at = time.time()
        await asyncio.sleep(fault.for_s)
    finally:  # cancelled or failed while down: the part is brought back all the same
        injection.restored_at = time.time()  # recovery counts from here: a restart's own time is part of it
        await up()


def fault_report(injection: Injection, outcomes: Sequence[Any], scrapes: Sequence[tuple[float, dict[str, float]]],
                 logins: Sequence[float], missing: int, doubled: int) -> dict[str, Any]:
    """The fault's row: calls in flight, lost and doubled, authorizations during it, time to recover.

    Recovery is measured from the restore: for ``kill`` and ``redis`` until the first call placed after
    it gets OK; for ``postgres`` until the daemon's ledger backlog (its /metrics) is back to 0; for ``ami``
    until the daemon is logged in again; for ``twin`` from the kill until a call placed after it gets OK
    (from the survivor). None when it did not happen before the storm ended.
    """
    fault, t0, t1 = injection.fault, injection.injected_at, injection.restored_at
    during = [o for o in outcomes if t0 <= o.started_at < t1]
    statuses = Counter(o.result.status or "no answer (AGI failed)" for o in during)
    recover: float | None = None
    if fault.kind in ("kill", "redis", "twin"):
        since = t0 if fault.kind == "twin" else t1
        oks = [o.started_at + (o.result.authorize_s or 0.0) for o in outcomes
               if o.started_at >= since and o.result.status == "OK"]
        recover = min(oks) - since if oks else None
    elif fault.kind == "postgres":
        drained = [t for t, sample in scrapes if t >= t1 and sample.get("a2bd_ledger_backlog{}", 1.0) == 0.0]
        recover = min(drained) - t1 if drained else None
    elif fault.kind == "ami":
        back = [t for t in logins if t >= t1]
        recover = min(back) - t1 if back else None
    backlog = max((s.get("a2bd_ledger_backlog{}", 0.0) for _, s in scrapes), default=0.0)
    return {
        "fault": fault.kind,
        "fault_at_s": fault.at_s,
        "fault_for_s": fault.for_s,
        "injected_at": round(t0, 3),  # wall clock
        "down_at": round(injection.down_at, 3),
        "restored_at": round(t1, 3),
        "calls_in_flight": injection.in_flight,
        "calls_lost": missing,
        "calls_doubled": doubled,
        "calls_during_fault": len(during),
        "statuses_during_fault": dict(statuses),
        "ledger_backlog_max": int(backlog),
        "recover_s": None if recover is None else round(max(recover, 0.0), 2),
    }
