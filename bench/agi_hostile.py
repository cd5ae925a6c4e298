"""Hostile FastAGI clients beside honest calls: do honest calls keep their latency?

    .venv/bin/python bench/agi_hostile.py [--rate 200] [--seconds 20] [--slow 200] [--flood 600] [--long 20]

Two storms of the same honest calls (`a2bd storm`'s simulated Asterisk against `a2bd serve`, the books
checked), back to back in one run: first quiet, then with hostile clients connected to the daemon's FastAGI
port throughout:

  slow    --slow connections, each trickling a valid environment at one byte per second (a slowloris);
  flood   --flood connections held silent, each opened again half a second after the daemon closes it, so
          that with the slow ones they are far past the daemon's connection cap (agi.max_connections, set
          to --cap here);
  long    --long connections each sending one over-long line (1 MiB without a newline), again and again.

Hostile connections come from 127.0.0.1, an address the daemon accepts (a stranger's would be closed
unread, tests/e2e/test_agi_server.py). The table shows the honest calls' authorization p50/p99 in both
storms, the calls that got no answer, and the daemon's own a2bd_agi_rejected_total by reason (from its
/metrics), i.e. what was shed. In a2bd_bench and Redis db 14, under the bench lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from _common import BenchLock, bench_urls, calibrate_ms, print_machine

from a2bd.sim.agi import encode_environment, make_environment
from a2bd.sim.storm import SideLoad, StormPlan, storm_main


async def _until_closed(reader: asyncio.StreamReader, limit_s: float) -> bool:
    """Wait up to `limit_s` for the daemon to close the connection; True if it did."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit_s):
            while await reader.read(4096):
                pass
            return True
    return False


async def _hold(address: tuple[str, int], kind: str, data: bytes, stop: asyncio.Event,
                connects: dict[str, int]) -> None:
    """One hostile client until `stop`: connect, misbehave as `kind`, and connect again half a second after
    the daemon closes it. Counts its connections in `connects[kind]`."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(*address)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        connects[kind] = connects.get(kind, 0) + 1
        try:
            if kind == "slow":  # one byte a second of an honest environment
                for i in range(len(data)):
                    writer.write(data[i:i + 1])
                    if await _until_closed(reader, 1.0):
                        break
            elif kind == "long":  # one line far past agi.max_env_bytes, as fast as the daemon reads it
                for i in range(0, len(data), 65536):
                    writer.write(data[i:i + 65536])
                    await writer.drain()
                await _until_closed(reader, 30.0)
            else:  # flood: silent until closed
                await _until_closed(reader, 30.0)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
        await asyncio.sleep(0.5)


def hostile(args: argparse.Namespace, connects: dict[str, int]) -> SideLoad:
    env = encode_environment(make_environment(uniqueid="1.1", channel="Local/1@x-0;2", extension="1"))
    overlong = b"agi_network: yes\n" + b"x" * (1 << 20)

    async def load(address: tuple[str, int]) -> None:
        stop = asyncio.Event()
        kinds = (("slow", args.slow, env), ("flood", args.flood, b""), ("long", args.long, overlong))
        tasks = [asyncio.create_task(_hold(address, kind, data, stop, connects))
                 for kind, n, data in kinds for _ in range(n)]
        try:
            await asyncio.Event().wait()  # until the storm's calls are done and it cancels us
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return load


async def main(args: argparse.Namespace, urls: tuple[str, str, str]) -> int:
    print(f"   calibration loop {calibrate_ms():.1f} ms")
    os.environ["A2BD_AGI_MAX_CONNECTIONS"] = str(args.cap)  # the daemon's cap, for both storms
    if args.shed_after is not None:
        os.environ["A2BD_AGI_SHED_AFTER_S"] = str(args.shed_after)
    plan = StormPlan(rate=args.rate, calls=int(args.rate * args.seconds), accounts=2000, mean_talk_s=3.0,
                     max_talk_s=8.0, seed=20261123)
    for label in ("quiet", "hostile"):
        connects: dict[str, int] = {}
        report = await storm_main(plan, None, None, urls, side_load=hostile(args, connects)
                                  if label == "hostile" else None)
        s = report.summary()
        unanswered = s["statuses"].get("none", 0)
        print(f"{label:<8} {s['calls']:>6} calls {s['calls_per_s']:>7}/s  p50 {s['authorize_p50_ms']:>7} ms  "
              f"p99 {s['authorize_p99_ms']:>8} ms  max {s['authorize_max_ms']:>8} ms  unanswered {unanswered}  "
              f"daemon {s['daemon_cpu_us_per_call']} us/call  books {s['verdict']} ({s['discrepancies']})  "
              f"rejected {s['agi_rejected']}  hostile connects {connects}", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=200.0, help="honest calls per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--slow", type=int, default=200, help="slowloris connections")
    parser.add_argument("--flood", type=int, default=600, help="silent connections")
    parser.add_argument("--long", type=int, default=20, help="over-long-line connections")
    parser.add_argument("--cap", type=int, default=500, help="the daemon's agi.max_connections")
    parser.add_argument("--shed-after", type=float, help="the daemon's agi.shed_after_s (default: its default)")
    arguments = parser.parse_args()
    if not (0 < arguments.rate <= 2000 and 0 < arguments.seconds <= 300 and 0 <= arguments.slow <= 5000
            and 0 <= arguments.flood <= 5000 and 0 <= arguments.long <= 500 and 1 <= arguments.cap <= 10000):
        parser.error("bounds: rate 0..2000, seconds 0..300, slow/flood 0..5000, long 0..500, cap 1..10000")
    print_machine("bench/agi_hostile.py")
    print(f"   args     --rate {arguments.rate:g} --seconds {arguments.seconds:g} --slow {arguments.slow} "
          f"--flood {arguments.flood} --long {arguments.long} --cap {arguments.cap}"
          + (f" --shed-after {arguments.shed_after:g}" if arguments.shed_after is not None else ""))
    bench = bench_urls()
    with BenchLock(bench[0]), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sys.exit(runner.run(main(arguments, bench)))
