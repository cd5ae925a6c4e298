"""Tariff benchmark: load a big rate card from PostgreSQL the way the daemon does, then time lookups.

    .venv/bin/python bench/tariff_lookup.py [--prefixes 1000000] [--lookups 1000000] [--seed 20260114]

Prints, with the machine it ran on and the commit it measured:
  (a) seconds to import the card (postgres.replace_tariff: records + COPY, in a child process, reported
      apart), then to load it back as a daemon does (TariffCatalog.refresh: postgres.load_tariff_entries
      + Tariff.build, with the collector paused, then a collection and gc.freeze()), and, in a second
      child, each of those steps alone, with and without the cyclic GC;
  (b) Tariff.lookup calls per second on random 12-digit numbers (mostly matching), one thread, after a
      warm-up, beside a plain dict.get of the exact prefix's key on the same dict (one probe: the floor);
  (c) the RSS (VmRSS of /proc/self/status) the loaded tariff holds, the peak while loading, and how long
      a full collection takes with the tariff held (frozen, as the daemon leaves it, and not).
Targets (issue): load < 10 s, > 500,000 lookups/s. When lookups miss the target (or with --profile) it
also prints a cProfile of Tariff.lookup and a step-by-step cost breakdown. The allocator settings that
decide whether big tables sit on huge pages (GLIBC_TUNABLES, PYTHONMALLOC, the kernel's THP mode) are
printed with the machine: run it again with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 to compare.

Uses the PostgreSQL database a2bd_bench (created, dropped) of the server `make test` finds.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ctypes
import gc
import json
import pstats
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from _common import (
    BenchLock,
    bench_urls,
    calibrate_ms,
    create_bench_db,
    drop_bench_db,
    machine_busy_s,
    pin_code,
    print_machine,
    proc_status_kib,
)

from a2bd.adapters import postgres
from a2bd.domain.rating import SellRate
from a2bd.domain.tariff import BuyRate, Match, RateEntry, Tariff
from a2bd.services.catalog import TariffCatalog

TARIFF = "bench"
PROVIDERS = ("carrier-a", "carrier-b", "carrier-c")
LOAD_TARGET_S = 10.0
LOOKUP_TARGET_PER_S = 500_000
NUMBER_DIGITS = 12
# A Wednesday, 10:30 local time: inside the peak window of the windowed prefixes.
AT = datetime(2026, 1, 14, 10, 30)
PEAK = (480, 4 * 1440 + 18 * 60 - 1)  # Monday 08:00 .. Friday 17:59
OFF_PEAK = (4 * 1440 + 18 * 60, 479)  # Friday 18:00 .. Monday 07:59, wraps past Sunday midnight

# E.164 country calling codes, weighted roughly by how many prefixes real worldwide cards carry.
COUNTRIES: dict[str, int] = {
    "1": 12, "7": 6, "20": 2, "27": 2, "30": 1, "31": 2, "32": 1, "33": 4, "34": 3, "36": 1, "39": 4,
    "40": 1, "41": 1, "43": 1, "44": 5, "45": 1, "46": 1, "47": 1, "48": 2, "49": 5, "51": 1, "52": 3,
    "53": 1, "54": 2, "55": 4, "56": 1, "57": 2, "58": 1, "60": 2, "61": 2, "62": 4, "63": 3, "64": 1,
    "65": 1, "66": 2, "81": 3, "82": 2, "84": 2, "86": 8, "90": 2, "91": 8, "92": 3, "93": 1, "94": 1,
    "95": 1, "98": 2, "212": 1, "213": 1, "216": 1, "221": 1, "225": 1, "233": 1, "234": 3, "237": 1,
    "243": 1, "251": 1, "254": 1, "255": 1, "256": 1, "351": 1, "352": 1, "353": 1, "355": 1, "356": 1,
    "357": 1, "358": 1, "359": 1, "370": 1, "371": 1, "372": 1, "380": 2, "381": 1, "385": 1, "386": 1,
    "420": 1, "421": 1, "852": 1, "853": 1, "855": 1, "880": 2, "886": 1, "961": 1, "962": 1, "964": 1,
    "965": 1, "966": 2, "971": 2, "972": 1, "974": 1, "977": 1, "994": 1, "995": 1, "998": 1,
}
# Prefix lengths of area and mobile ranges (digits, country code included).
LENGTH_WEIGHTS = {3: 1, 4: 3, 5: 8, 6: 18, 7: 30, 8: 25, 9: 15}
KINDS = ("Fixed", "Mobile", "Mobile Premium", "Special Services", "Fixed Capital")


# -- the rate card ------------------------------------------------------------------------------------


def generate_prefixes(count: int, seed: int) -> list[str]:
    """`count` distinct prefixes of 3..9 digits: every country's 3-digit fallback, then area/mobile
    ranges drawn by country weight and length weight. Deterministic for a seed."""
    rng = random.Random(seed)
    prefixes: dict[str, None] = {}
    for cc in COUNTRIES:  # "rest of country": 1xx, 44x, 212, ...
        if len(cc) >= 3:
            prefixes[cc] = None
        else:
            for n in range(10 ** (3 - len(cc))):
                prefixes[cc + str(n).zfill(3 - len(cc))] = None
    codes, weights = list(COUNTRIES), list(COUNTRIES.values())
    lengths, lweights = list(LENGTH_WEIGHTS), list(LENGTH_WEIGHTS.values())
    attempts = 0
    while len(prefixes) < count:
        attempts += 1
        if attempts > 50 * count + 10_000:
            raise SystemExit(f"could not draw {count} distinct prefixes (got {len(prefixes)})")
        cc = rng.choices(codes, weights)[0]
        length = rng.choices(lengths, lweights)[0]
        if length <= len(cc):
            continue
        rest = length - len(cc)
        prefixes[cc + str(rng.randint(1, 9)) + "".join(rng.choices("0123456789", k=rest - 1))] = None
    return list(prefixes)[:count]


def generate_entries(count: int, seed: int) -> list[RateEntry]:
    """One entry per prefix (one of three carriers), except ~2% with two carriers x peak/off-peak."""
    rng = random.Random(seed + 1)
    sells = [
        SellRate(
            rate_per_min_micro=rng.choice((4_000, 8_500, 12_000, 19_900, 35_000, 80_000, 150_000, 420_000))
            + rng.randrange(0, 5000, 100),
            connect_micro=rng.choice((0, 0, 0, 10_000)),
            initial_block_s=rng.choice((0, 1, 30, 60)),
            increment_s=rng.choice((1, 1, 6, 30, 60)),
        )
        for _ in range(400)
    ]
    buys = [BuyRate(rate_per_min_micro=s.rate_per_min_micro * 7 // 10, increment_s=s.increment_s) for s in sells]
    entries: list[RateEntry] = []
    for prefix in generate_prefixes(count, seed):
        cc = next(prefix[:n] for n in (3, 2, 1) if prefix[:n] in COUNTRIES)
        destination = f"CC{cc} {KINDS[len(prefix) % len(KINDS)]}"
        i = rng.randrange(len(sells))
        if rng.random() < 0.02:
            off = (i + 1) % len(sells)
            for provider in PROVIDERS[:2]:
                entries.append(RateEntry(prefix, destination, sells[i], provider, buys[i], *PEAK))
                entries.append(RateEntry(prefix, destination, sells[off], provider, buys[off], *OFF_PEAK))
        else:
            entries.append(RateEntry(prefix, destination, sells[i], rng.choice(PROVIDERS), buys[i]))
    return entries


def generate_numbers(prefixes: Sequence[str], count: int, seed: int) -> list[str]:
    """12-digit numbers: 90% extend a prefix of the card, 8% a random number in a listed country,
    2% start with 0 (no country: no match)."""
    rng = random.Random(seed + 2)
    codes = list(COUNTRIES)
    digits = "0123456789"
    numbers = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.90:
            head = rng.choice(prefixes)
        elif roll < 0.98:
            head = rng.choice(codes)
        else:
            head = "0"
        numbers.append(head + "".join(rng.choices(digits, k=NUMBER_DIGITS - len(head))))
    return numbers


# -- measuring ----------------------------------------------------------------------------------------


def malloc_trim() -> None:
    """Give freed heap back to the kernel so VmRSS shows what is held, not what glibc keeps cached."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def settle() -> int:
    gc.collect()
    malloc_trim()
    return proc_status_kib("VmRSS")


def rate(fn: Callable[[str, datetime], object], numbers: Sequence[str], repeat: int) -> list[float]:
    """Calls per second of fn(number, AT) over `numbers`, once per repeat."""
    out = []
    at = AT
    for _ in range(repeat):
        started = time.perf_counter()
        for n in numbers:
            fn(n, at)
        out.append(len(numbers) / (time.perf_counter() - started))
    return out


def dict_rate(get: Callable[[int], object], keys: Sequence[int], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        for k in keys:
            get(k)
        out.append(len(keys) / (time.perf_counter() - started))
    return out


def fmt_rate(values: list[float]) -> str:
    return f"{statistics.median(values):>12,.0f}/s  ({1e9 / statistics.median(values):6.0f} ns each)"


def breakdown(tariff: Tariff, numbers: Sequence[str]) -> list[tuple[str, float]]:
    """ns per call of Tariff.lookup's steps, added one at a time (the same code as Tariff.lookup)."""
    index, max_len, at = tariff.index, tariff.max_prefix_len, AT

    def check(number: str) -> object:
        return number.isascii() and number.isdigit()

    def with_key(number: str) -> object:
        if not (number.isascii() and number.isdigit()):
            return None
        return int("1" + number[:max_len])

    def with_probes(number: str) -> object:
        if not (number.isascii() and number.isdigit()):
            return None
        probe = index.get
        key = int("1" + number[:max_len])
        while key > 1:
            found = probe(key)
            if found is not None:
                return found
            key //= 10
        return None

    def full(number: str) -> object:
        return tariff.lookup(number, at)

    steps = [("number.isascii() and number.isdigit()", check),
             ("+ key = int('1' + number[:max_prefix_len])", with_key),
             ("+ probes: index.get(key), key //= 10, until a hit", with_probes),
             ("+ rest of Tariff.lookup (call, type check, windows) = Tariff.lookup", full)]
    out = []
    for label, fn in steps:
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for n in numbers:
                fn(n)
            best = min(best, (time.perf_counter() - started) / len(numbers) * 1e9)
        out.append((label, best))
    return out


def probes_per_lookup(tariff: Tariff, numbers: Sequence[str]) -> float:
    """Dictionary probes Tariff.lookup makes per number, on average (counted, not timed)."""
    index, max_len, total = tariff.index, tariff.max_prefix_len, 0
    for number in numbers:
        key = int("1" + number[:max_len])
        while key > 1:
            total += 1
            if key in index:
                break
            key //= 10
    return total / len(numbers)


def profile(tariff: Tariff, numbers: Sequence[str]) -> list[str]:
    prof = cProfile.Profile()
    lookup, at = tariff.lookup, AT
    prof.enable()
    for n in numbers:
        lookup(n, at)
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(file).name}:{line}({func})" if line else func
        rows.append((tottime, ncalls, cumtime, where))
    rows.sort(reverse=True)
    lines = [f"   {'tottime s':>9} {'%':>5} {'ncalls':>10} {'cumtime s':>9}  function"]
    for tottime, ncalls, cumtime, where in rows[:8]:
        lines.append(f"   {tottime:9.3f} {100 * tottime / total:5.1f} {ncalls:10,d} {cumtime:9.3f}  {where}")
    lines.append(f"   total {total:.3f} s under cProfile for {len(numbers):,} lookups")
    return lines


# -- phases -------------------------------------------------------------------------------------------


async def import_phase(pg_url: str, prefixes: int, seed: int) -> dict[str, float]:
    """Child process: generate the card and import it with replace_tariff (records + COPY)."""
    started = time.perf_counter()
    entries = generate_entries(prefixes, seed)
    generated = time.perf_counter()
    conn = await postgres.connect(pg_url)
    try:
        rows = await postgres.replace_tariff(conn, TARIFF, entries)
    finally:
        await conn.close()
    done = time.perf_counter()
    return {"generate_s": generated - started, "import_s": done - generated, "rows": rows,
            "prefixes": len({e.prefix for e in entries})}


@dataclass(frozen=True, slots=True)
class FrozenMatch:
    """Match's four fields as a frozen dataclass, as Match was before: each field is set through
    object.__setattr__ in Python, where a NamedTuple is built by tuple.__new__ in C."""

    prefix: str
    destination: str
    sell: SellRate
    entries: tuple[RateEntry, ...]


def construction_ns(entries: Sequence[RateEntry]) -> dict[str, float]:
    """ns to build one value of each kind Tariff.build and load_tariff_entries make, a million times
    (cyclic GC paused, as in TariffCatalog.refresh)."""
    sample = list(entries[:200_000])
    out: dict[str, float] = {}
    kinds: list[tuple[str, Callable[[RateEntry], object]]] = [
        ("RateEntry (NamedTuple, 9 fields)", lambda e: RateEntry(
            e.prefix, e.destination, e.sell, e.provider, e.buy, e.week_start_min, e.week_end_min, e.start_date,
            e.stop_date)),
        ("Match (NamedTuple, 4 fields)", lambda e: Match(e.prefix, e.destination, e.sell, (e,))),
        ("the same 4 fields as a frozen dataclass", lambda e: FrozenMatch(e.prefix, e.destination, e.sell, (e,))),
        ("key int('1' + prefix)", lambda e: int("1" + e.prefix)),
    ]
    gc.disable()
    try:
        for label, make in kinds:
            started = time.perf_counter()
            for e in sample:
                make(e)
            out[label] = (time.perf_counter() - started) / len(sample) * 1e9
    finally:
        gc.enable()
    return out


async def steps_phase(pg_url: str) -> dict[str, object]:
    """Child process: the steps of a load alone, each twice: with the cyclic GC paused (as
    TariffCatalog.refresh does) and running."""
    out: dict[str, object] = {}
    conn = await postgres.connect(pg_url)
    try:
        for label, collect in (("gc_off", False), ("gc_on", True)):
            gc.collect()
            if not collect:
                gc.disable()
            try:
                started = time.perf_counter()
                entries = await postgres.load_tariff_entries(conn, TARIFF)
                fetched = time.perf_counter()
                tariff = Tariff.build(TARIFF, entries)
                built = time.perf_counter()
            finally:
                gc.enable()
            out[f"{label}_fetch_s"] = fetched - started
            out[f"{label}_build_s"] = built - fetched
            providers = {id(e.provider) for e in entries if e.provider is not None}
            out["provider_objects"] = len(providers)
            if not collect:
                out["construction_ns"] = construction_ns(entries)
            del entries, tariff, providers
    finally:
        await conn.close()
    return out


async def setup_db(admin_url: str, pg_url: str) -> None:
    await create_bench_db(admin_url)
    conn = await postgres.connect(pg_url)
    try:
        await postgres.migrate(conn)
        for name in PROVIDERS:
            await postgres.add_provider(conn, name, f"PJSIP/{{number}}@{name}")
    finally:
        await conn.close()


async def load_phase(pg_url: str) -> tuple[Tariff, dict[str, float]]:
    """As the daemon loads at start and on reload: TariffCatalog.refresh on one connection."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # no "tariff loaded" line
    rss0 = settle()
    hwm0 = proc_status_kib("VmHWM")
    catalog = TariffCatalog(pg_url)
    conn = await postgres.connect(pg_url)
    try:
        started = time.perf_counter()
        await catalog.refresh(conn)
        refreshed = time.perf_counter() - started
    finally:
        await conn.close()
    tariff = catalog.get(TARIFF)
    assert tariff is not None
    rss1 = settle()
    hwm1 = proc_status_kib("VmHWM")
    gc_started = time.perf_counter()
    gc.collect()  # the tariff is frozen, as refresh leaves it
    gc_frozen_s = time.perf_counter() - gc_started
    gc.unfreeze()
    gc_started = time.perf_counter()
    gc.collect()
    gc_full_s = time.perf_counter() - gc_started
    gc.freeze()
    return tariff, {
        "refresh_s": refreshed, "gc_full_s": gc_full_s, "gc_frozen_s": gc_frozen_s,
        "rss_before_mib": rss0 / 1024, "rss_delta_mib": (rss1 - rss0) / 1024,
        "peak_delta_mib": (hwm1 - hwm0) / 1024,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--prefixes", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=20260114)
    parser.add_argument("--repeat", type=int, default=3, help="timed passes over the numbers (median shown)")
    parser.add_argument("--profile", action="store_true", help="profile even when the target is met")
    parser.add_argument("--no-pin", action="store_true",
                        help="measure the work tree as it is, not a snapshot of the commit at HEAD")
    parser.add_argument("--phase", choices=("import", "steps"), help=argparse.SUPPRESS)
    parser.add_argument("--pg-url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.prefixes <= 5_000_000 or not 1 <= args.lookups <= 20_000_000:
        parser.error("--prefixes must be 1..5,000,000 and --lookups 1..20,000,000")
    args.repeat = max(1, min(args.repeat, 10))
    if args.phase is None and not args.no_pin:
        pin_code(__file__, list(sys.argv[1:] if argv is None else argv))

    if args.phase == "import":
        print(json.dumps(asyncio.run(import_phase(args.pg_url, args.prefixes, args.seed))))
        return 0
    if args.phase == "steps":
        print(json.dumps(asyncio.run(steps_phase(args.pg_url))))
        return 0

    print_machine("bench/tariff_lookup.py")
    print(f"   args     --prefixes {args.prefixes} --lookups {args.lookups} --seed {args.seed} "
          f"--repeat {args.repeat}")
    admin_url, pg_url, _ = bench_urls()
    with BenchLock(admin_url):
        return run(args, admin_url, pg_url)


def run(args: argparse.Namespace, admin_url: str, pg_url: str) -> int:
    asyncio.run(setup_db(admin_url, pg_url))
    try:
        # The import runs in a child so that this process's RSS starts clean for the load.
        imported = run_child(["--phase", "import", "--prefixes", str(args.prefixes), "--seed", str(args.seed),
                              "--pg-url", pg_url])
        tariff, loaded = asyncio.run(load_phase(pg_url))
        steps = run_child(["--phase", "steps", "--pg-url", pg_url])
    finally:
        asyncio.run(drop_bench_db(admin_url))
    return report(args, tariff, imported, loaded, steps)


def run_child(extra: list[str]) -> dict[str, Any]:
    child = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True, timeout=900,
                           check=False)
    if child.returncode != 0:
        print(child.stderr, file=sys.stderr)
        raise SystemExit(f"child {extra[:2]} failed with exit {child.returncode}")
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def report(
    args: argparse.Namespace, tariff: Tariff, imported: dict[str, Any], loaded: dict[str, float],
    steps: dict[str, Any],
) -> int:
    load_s = loaded["refresh_s"]
    prefixes = [str(key)[1:] for key in tariff.index]
    windowed = sum(1 for v in tariff.index.values() if type(v) is not Match)
    lengths = [len(p) for p in prefixes]
    print(f"\n(a) load  {len(tariff):,} prefixes ({windowed:,} with 2 carriers x peak/off-peak), "
          f"{int(imported['rows']):,} rates, prefix length {min(lengths)}..{max(lengths)}")
    print(f"   generate rate card in Python (not timed by the target)  {imported['generate_s']:7.2f} s")
    print(f"   import: postgres.replace_tariff (records + COPY)         {imported['import_s']:7.2f} s"
          "   (no target; reported apart)")
    print(f"   load:   TariffCatalog.refresh (as the daemon loads)      {load_s:7.2f} s   "
          f"target < {LOAD_TARGET_S:.0f} s: {'MET' if load_s < LOAD_TARGET_S else 'MISSED'}")
    print("   its steps alone, in a child process:")
    for label, key in (("cyclic GC paused, as refresh does", "gc_off"), ("cyclic GC running", "gc_on")):
        fetch, build = steps[f"{key}_fetch_s"], steps[f"{key}_build_s"]
        print(f"     postgres.load_tariff_entries {fetch:6.2f} s + Tariff.build {build:5.2f} s = "
              f"{fetch + build:6.2f} s   ({label})")
    print(f"     provider name objects held by the entries: {steps['provider_objects']:,}")
    print("   what one object costs to build (ns, cyclic GC paused; load_tariff_entries makes a RateEntry per "
          "rate, Tariff.build a key and a Match per prefix):")
    for label, ns in steps["construction_ns"].items():
        print(f"     {ns:6.0f} ns  {label}")

    print(f"\n(c) memory  VmRSS before load {loaded['rss_before_mib']:.0f} MiB")
    print(f"   RSS held by the tariff (after load, gc, malloc_trim)     {loaded['rss_delta_mib']:7.0f} MiB"
          f"  ({loaded['rss_delta_mib'] * 1024 * 1024 / len(tariff):.0f} B per prefix)")
    print(f"   peak RSS growth while loading (VmHWM delta)              {loaded['peak_delta_mib']:7.0f} MiB")
    print(f"   a full gc.collect(), tariff frozen (as refresh leaves it) {loaded['gc_frozen_s']:7.3f} s")
    print(f"   a full gc.collect(), tariff not frozen                    {loaded['gc_full_s']:7.3f} s"
          "   (a pause of every call in flight)")

    numbers = generate_numbers(prefixes, args.lookups, args.seed)
    matches = [tariff.lookup(n, AT) for n in numbers]
    matched = [m for m in matches if m is not None]
    exact = [int("1" + m.prefix) for m in matched]
    mean_len = statistics.fmean(len(m.prefix) for m in matched)
    print(f"\n(b) lookups  {len(numbers):,} numbers of {NUMBER_DIGITS} digits at {AT:%a %H:%M}: "
          f"{100 * len(matched) / len(numbers):.1f}% match, matched prefix {mean_len:.2f} digits on average, "
          f"{probes_per_lookup(tariff, numbers):.2f} dict probes per lookup")
    warm = numbers[: min(100_000, len(numbers))]
    rate(tariff.lookup, warm, 1)
    calib0 = calibrate_ms()
    busy0, cpu0, wall0 = machine_busy_s(), time.process_time(), time.perf_counter()
    lookup_rates = rate(tariff.lookup, numbers, args.repeat)
    dict_rates = dict_rate(tariff.index.get, exact, args.repeat)
    others = (machine_busy_s() - busy0 - (time.process_time() - cpu0)) / (time.perf_counter() - wall0)
    calib1 = calibrate_ms()
    lookup_med = statistics.median(lookup_rates)
    print(f"   Tariff.lookup (longest prefix, time-aware)   {fmt_rate(lookup_rates)}   "
          f"target > {LOOKUP_TARGET_PER_S:,}/s: {'MET' if lookup_med > LOOKUP_TARGET_PER_S else 'MISSED'}")
    print(f"   baseline: index.get(key of exact prefix)     {fmt_rate(dict_rates)}   "
          f"lookup is {statistics.median(dict_rates) / lookup_med:.1f}x slower")
    print(f"   passes: lookup {', '.join(f'{r:,.0f}' for r in lookup_rates)}; "
          f"dict.get {', '.join(f'{r:,.0f}' for r in dict_rates)}")
    print(f"   conditions: calibration loop {calib0:.1f} ms before, {calib1:.1f} ms after (the same work); "
          f"other processes used {max(0.0, others):.2f} cores meanwhile")

    if lookup_med <= LOOKUP_TARGET_PER_S or args.profile:
        sample = numbers[: min(200_000, len(numbers))]
        print(f"\n   cProfile of Tariff.lookup over {len(sample):,} numbers (by own time):")
        for line in profile(tariff, sample):
            print(line)
        print(f"\n   cost breakdown over {len(sample):,} numbers (best of 3, ns per call, cumulative):")
        previous = 0.0
        for label, ns in breakdown(tariff, sample):
            print(f"   {ns:7.0f} ns  (+{ns - previous:4.0f})  {label}")
            previous = ns
    return 0


if __name__ == "__main__":
    sys.exit(main())
