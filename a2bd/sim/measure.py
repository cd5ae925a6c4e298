"""What the storm, the benchmarks and the tests measure with: percentiles, free ports, a process's CPU and RSS.

Linux /proc for the process figures (no disk I/O: reading them in a coroutine does not block).
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list; NaN when it is empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' histogram_quantile (q in 0..1) over cumulative bucket counts {upper bound: count}, +Inf
    included: linear within the bucket the rank falls in; the highest finite bound if it falls in +Inf. NaN
    when the histogram is empty."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if not total:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below) if count > below else bound
        lower, below = bound, count
    return lower


def free_port() -> int:
    """A TCP port on loopback nobody listens on now (the OS's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads. Raises OSError once it is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    """Resident set of a process in MiB (NaN when /proc does not say). Raises OSError once it is gone."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
