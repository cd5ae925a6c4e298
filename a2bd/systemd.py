"""The service manager's notification protocol (sd_notify), spoken directly: one datagram per message.

systemd starts a Type=notify service with NOTIFY_SOCKET naming an AF_UNIX datagram socket: a path
(`/run/systemd/notify`) or, with a leading `@`, a name in Linux's abstract namespace. A message is
newline-separated `KEY=value` fields (READY=1, RELOADING=1, STOPPING=1, STATUS=..., WATCHDOG=1, ...);
systemd learns the sender's PID from the kernel (SCM_CREDENTIALS), which is what NotifyAccess=main checks.
Without NOTIFY_SOCKET (a terminal, a test, a container without systemd) every call here does nothing.

Why no library. The protocol is one sendto(); what the alternatives on PyPI would add is a dependency:
- `sdnotify` (0.3.2, August 2017, the last release) is a 59-line sdist with Python 2 shims; it connects
  once when constructed, swallows every error with a bare `except:`, and has no watchdog helper.
- `systemd-python` (235, February 2023) ships no wheels: installing it builds a C extension against
  libsystemd's headers (libsystemd-dev, pkg-config and a compiler on every machine that installs a2bd).
- `cysystemd` has manylinux wheels, but each vendors its own libsystemd plus libgcrypt, liblzma, liblz4,
  libzstd and libcap: a lot of native code for one datagram, when the journal already gets our stderr.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("a2bd.systemd")

# A send blocks only when systemd does not drain its socket (it is wedged): then give up on the message
# rather than stall the event loop. A lost WATCHDOG=1 is followed by another; a lost READY=1 shows up as
# a start timeout, which is the truth about such a systemd anyway.
_SEND_TIMEOUT_S = 1.0


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `fields` (each `KEY=value`) to the service manager as one message.

    Returns True when the datagram was sent, False when there is no NOTIFY_SOCKET (not run by systemd,
    or an address family other than AF_UNIX, such as a newer systemd's `vsock:`) or sending failed; a
    failure is logged, never raised: a notification must not take the daemon down.
    """
    for item in fields:
        if "=" not in item or "\n" in item:
            raise ValueError(f"sd_notify field {item!r}: expected one KEY=value line")
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace: no file, the name starts with a NUL byte
    elif not address.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.warning("could not notify the service manager", fields=[f.partition("=")[0] for f in fields],
                    socket=environ.get("NOTIFY_SOCKET"), error=str(exc))
        return False
    return True


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd enforces on this process (WatchdogSec=), in seconds; None when off.

    systemd sets WATCHDOG_USEC (microseconds) and WATCHDOG_PID; as sd_watchdog_enabled() does, the value
    is ignored when WATCHDOG_PID names another process (the variables were inherited by a child). Send
    WATCHDOG=1 at least this often; systemd's advice, followed by the daemon, is every half of it.
    """
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the MONOTONIC_USEC= field systemd (>= 253) wants with RELOADING=1,
    to tell this reload from an earlier one."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
