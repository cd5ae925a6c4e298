"""sd_notify against real AF_UNIX datagram sockets, the watchdog's environment, and the shipped units
checked by `systemd-analyze verify`."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from a2bd import systemd

UNITS = Path(__file__).resolve().parents[2] / "systemd"
CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """systemd's end: a datagram socket bound to a path (a short one: sun_path holds 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="a2bd-") as tmp:
        path = os.path.join(tmp, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(2.0)
            yield sock, path


def test_notify_sends_the_fields_as_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    env = {"NOTIFY_SOCKET": path}
    assert systemd.notify("READY=1", "STATUS=serving FastAGI on 127.0.0.1:4573", environ=env)
    assert systemd.notify("WATCHDOG=1", environ=env)
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving FastAGI on 127.0.0.1:4573"
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_reads_the_process_environment(receiver: tuple[socket.socket, str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert systemd.notify("STOPPING=1")
    assert sock.recv(4096) == b"STOPPING=1"


def test_notify_to_an_abstract_socket() -> None:
    name = f"a2bd-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        usec = systemd.monotonic_usec()
        assert systemd.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == f"RELOADING=1\nMONOTONIC_USEC={usec}".encode()


def test_notify_carries_utf8(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert systemd.notify("STATUS=tarif « été » chargé", environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096).decode() == "STATUS=tarif « été » chargé"


@pytest.mark.parametrize("value", ["", "relative/notify", "vsock:2:1234"])
def test_notify_without_a_unix_socket_does_nothing(value: str) -> None:
    assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": value}) is False
    assert systemd.notify("READY=1", environ={}) is False


def test_notify_to_a_missing_socket_logs_and_returns_false(tmp_path: Path) -> None:
    with capture_logs() as logs:
        assert systemd.notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert [entry["event"] for entry in logs] == ["could not notify the service manager"]
    assert logs[0]["fields"] == ["WATCHDOG"]


@pytest.mark.parametrize("field", ["READY", "STATUS=two\nlines", "READY=1\nSTOPPING=1"])
def test_notify_refuses_what_is_not_one_field(field: str) -> None:
    with pytest.raises(ValueError, match="KEY=value"):
        systemd.notify(field, environ={})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "200000"}, 0.2),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # a parent's, inherited
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
    ],
)
def test_watchdog_interval_s(env: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval_s(env) == expected


def test_monotonic_usec_is_clock_monotonic() -> None:
    before = time.monotonic_ns() // 1000
    usec = systemd.monotonic_usec()
    assert before <= usec <= time.monotonic_ns() // 1000


# -- the units ------------------------------------------------------------------------------------------


def _directives(path: Path) -> dict[str, list[str]]:
    """KEY -> its values, in order (unit files repeat keys, e.g. After=)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_service_is_what_the_daemon_speaks() -> None:
    unit = _directives(UNITS / "a2bd.service")
    assert unit["Type"] == ["notify"]  # the daemon sends READY=1 (a2bd/daemon.py run())
    assert unit["NotifyAccess"] == ["main"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # SIGHUP is the daemon's reload
    assert unit["WatchdogSec"] == ["30"]
    assert unit["Restart"] == ["on-failure"]  # a watchdog kill counts as a failure
    assert unit["User"] == ["a2bd"]


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if CI:
            pytest.fail("CI requires systemd-analyze (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed")
    names = ["a2bd.service", "a2bd-billing.service", "a2bd-billing.timer"]
    for name in names:
        # verify checks that ExecStart's binary exists: point it at one that does.
        text = (UNITS / name).read_text().replace("/opt/a2bd/.venv/bin/a2bd", sys.executable)
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [tool, "verify", "--man=no", "--recursive-errors=no", *(str(tmp_path / n) for n in names)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    output = result.stdout + result.stderr
    ours = [line for line in output.splitlines() if any(n in line for n in names) or str(tmp_path) in line]
    assert ours == [], output
    assert result.returncode == 0, output
