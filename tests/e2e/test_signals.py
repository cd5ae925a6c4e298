"""`a2bd serve` under a service manager: the test plays systemd's part.

The daemon runs as a real process (as in test_serve_process.py) with NOTIFY_SOCKET on a datagram socket
the test reads and WATCHDOG_USEC at 200 ms; the test sends the signals systemd would (SIGHUP for
`systemctl reload`, SIGTERM for stop) and reads what the daemon tells it back. Every wait is bounded; the
process is killed by its PID in a `finally` whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from structlog.testing import capture_logs

from a2bd.adapters.redis_store import RedisStore
from a2bd.config import Settings
from a2bd.daemon import LIVE_KEYS, Daemon, changed_keys, with_keys
from a2bd.sim.agi import SimResult, make_environment, run_session
from tests.e2e.test_daemon_authorize import seed, settings_for
from tests.e2e.test_serve_process import free_port

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

WATCHDOG_USEC = 200_000
_uniqueids = iter(range(1795400100, 1795409999))


class Notifications:
    """systemd's end of NOTIFY_SOCKET: every datagram the daemon sends, parsed, in arrival order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.received: list[dict[str, str]] = []

    async def next(self, timeout_s: float) -> dict[str, str]:
        async with asyncio.timeout(timeout_s):
            data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        message = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.received.append(message)
        return message

    async def wait_for(self, key: str, timeout_s: float = 10.0) -> tuple[dict[str, str], list[dict[str, str]]]:
        """The next message carrying `key`, and the messages other than WATCHDOG=1 seen before it."""
        deadline = time.monotonic() + timeout_s
        skipped = []
        while True:
            message = await self.next(max(deadline - time.monotonic(), 0.001))
            if key in message:
                return message, skipped
            if message != {"WATCHDOG": "1"}:
                skipped.append(message)

    def close(self) -> None:
        self.sock.close()


class Serve:
    """`python -m a2bd.cli --config FILE serve`, its stderr collected line by line as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, config: Path) -> None:
        self.proc = proc
        self.port = port
        self.config = config
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def log(self, *words: str) -> list[str]:
        return [line for line in self.lines if all(w in line for w in words)]

    async def wait_log(self, *words: str, timeout_s: float = 10.0) -> str:
        """The latest stderr line holding every word, waiting up to `timeout_s` for one."""
        deadline = time.monotonic() + timeout_s
        while not (found := self.log(*words)):
            if time.monotonic() > deadline:
                tail = "\n".join(self.lines[-20:])
                pytest.fail(f"no log line with {words} within {timeout_s} s; the last ones:\n{tail}")
            await asyncio.sleep(0.02)
        return found[-1]

    async def authorize(self, account: str = "1000000006") -> tuple[str, SimResult]:
        """One FastAGI authorization (an account with no call limit: no AMI ever ends these calls)."""
        uniqueid = f"{next(_uniqueids)}.1"
        environment = make_environment(uniqueid=uniqueid, channel="PJSIP/phone-00000001",
                                       extension="33123456789", accountcode=account, port=self.port)
        return uniqueid, await run_session("127.0.0.1", self.port, environment, timeout_s=5)

    async def wait(self, timeout_s: float = 20.0) -> int:
        async with asyncio.timeout(timeout_s):
            code = await self.proc.wait()
            await self._reader
        return code


@pytest.fixture
def notifications() -> Iterator[Notifications]:
    # A short directory: a socket's path holds 108 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="a2bd-") as tmp:
        listener = Notifications(os.path.join(tmp, "notify"))
        try:
            yield listener
        finally:
            listener.close()


@pytest.fixture(params=["uvloop", "asyncio"])  # each loop has its own signal handling
async def serve(request: pytest.FixtureRequest, pg: asyncpg.Connection, pg_url: str, store: RedisStore,
                redis_url: str, tmp_path: Path, notifications: Notifications) -> AsyncIterator[Serve]:
    await seed(pg)
    port = free_port()
    config = tmp_path / "a2bd.toml"
    config.write_text(_toml(level="info"))
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("A2BD_LOG_", "NOTIFY_", "WATCHDOG_"))}  # the file decides log.*
    env.update({"A2BD_PG_URL": pg_url, "A2BD_REDIS_URL": redis_url, "A2BD_AGI_PORT": str(port),
                "A2BD_METRICS_PORT": "0", "A2BD_BILLING_SCHEDULER_INTERVAL_S": "0", "A2BD_RUNTIME_LOOP": request.param,
                "NOTIFY_SOCKET": notifications.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "a2bd.cli", "--config", str(config), "serve", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    daemon = Serve(proc, port, config)
    try:
        yield daemon
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            async with asyncio.timeout(10):
                await proc.wait()
        daemon._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await daemon._reader


def _toml(level: str, extra: str = "") -> str:
    return f'[log]\nlevel = "{level}"\n{extra}'


async def _ready(serve: Serve, notifications: Notifications) -> dict[str, str]:
    message, before = await notifications.wait_for("READY", timeout_s=30)
    # READY=1 only once FastAGI listens: the port answers at the first try.
    _, writer = await asyncio.open_connection("127.0.0.1", serve.port)
    writer.close()
    assert before == [], before
    return message


async def _reload(serve: Serve, notifications: Notifications) -> tuple[dict[str, str], dict[str, str]]:
    """SIGHUP as `systemctl reload` sends it: RELOADING=1 (with MONOTONIC_USEC), then READY=1."""
    serve.proc.send_signal(signal.SIGHUP)
    reloading, before = await notifications.wait_for("RELOADING")
    assert before == []
    assert int(reloading["MONOTONIC_USEC"]) > 0
    ready, between = await notifications.wait_for("READY")
    assert between == []
    return reloading, ready


async def _change_route_without_notify(pg: asyncpg.Connection) -> None:
    """carrier-b becomes dearer than carrier-a for France, and the tariff's version moves, with the
    triggers off: no NOTIFY, so the daemon learns of it only by a reload (or its 60 s poll)."""
    async with pg.transaction():
        await pg.execute("SET LOCAL session_replication_role = replica")
        await pg.execute("UPDATE rates SET buy_rate_per_min_micro = 20000 WHERE prefix = '33'"
                         " AND provider_id = (SELECT id FROM providers WHERE name = 'carrier-b')")
        await pg.execute("UPDATE tariffs SET version = version + 1 WHERE name = 'retail'")


async def test_ready_watchdog_reload_and_stop(serve: Serve, notifications: Notifications,
                                              pg: asyncpg.Connection) -> None:
    ready = await _ready(serve, notifications)
    assert ready["STATUS"] == f"serving FastAGI on 127.0.0.1:{serve.port}"

    # The watchdog is fed every half of WATCHDOG_USEC (100 ms) while the loop turns (the interval itself:
    # tests/unit/test_systemd.py). Three feeds in a row, however slowly this machine delivers them.
    fed = 0
    for _ in range(50):  # bounded: other messages may come between
        message = await notifications.next(timeout_s=10.0)
        fed += message == {"WATCHDOG": "1"}
        if fed == 3:
            break
    assert fed == 3

    before_id, before = await serve.authorize()
    assert before.variables["A2B_STATUS"] == "OK"
    assert before.variables["A2B_ROUTE_1"] == "PJSIP/33123456789@carrier-b"
    await _change_route_without_notify(pg)
    _, unchanged = await serve.authorize()
    assert unchanged.variables["A2B_ROUTE_1"] == "PJSIP/33123456789@carrier-b"  # not reloaded yet

    serve.config.write_text(_toml(level="debug"))
    _, ready = await _reload(serve, notifications)
    assert ready["STATUS"] == f"serving FastAGI on 127.0.0.1:{serve.port}"
    assert "log.level" in await serve.wait_log("settings reloaded")
    assert "retail" in await serve.wait_log("tariffs refreshed")

    after_id, after = await serve.authorize()
    assert after.variables["A2B_STATUS"] == "OK"
    assert after.variables["A2B_ROUTE_1"] == "PJSIP/33123456789@carrier-a"  # the tariff took effect
    # ... and so did the log level: an OK answer is a debug line, which info did not show before.
    await serve.wait_log("authorize", after_id, "debug")
    assert serve.log("authorize", before_id) == []

    serve.proc.send_signal(signal.SIGTERM)
    await notifications.wait_for("STOPPING")
    assert await serve.wait() == 0, "\n".join(serve.lines[-30:])
    assert serve.log("a2bd stopped")


async def test_bad_settings_on_sighup_keep_the_daemon_running(serve: Serve, notifications: Notifications) -> None:
    await _ready(serve, notifications)

    serve.config.write_text("[log\nlevel = ")  # not TOML
    _, ready = await _reload(serve, notifications)
    assert "rejected the settings file" in ready["STATUS"]
    assert "is not valid TOML" in await serve.wait_log("settings not reloaded")
    assert len(serve.log("settings not reloaded")) == 1
    assert serve.log("error", "settings not reloaded")
    assert serve.proc.returncode is None
    assert (await serve.authorize())[1].variables["A2B_STATUS"] == "OK"

    serve.config.write_text(_toml(level="loud"))  # TOML, but not a level
    _, ready = await _reload(serve, notifications)
    assert "rejected the settings file" in ready["STATUS"]
    assert "log.level: must be debug, info, warning or error" in await serve.wait_log("settings not reloaded",
                                                                                       "log.level")
    assert len(serve.log("settings not reloaded")) == 2

    # A key bound at start: logged and shown as waiting for a restart, the rest is applied.
    serve.config.write_text(_toml(level="info", extra="[agi]\nmax_connections = 10\n"))
    _, ready = await _reload(serve, notifications)
    assert ready["STATUS"] == f"serving FastAGI on 127.0.0.1:{serve.port}; restart to apply agi.max_connections"
    assert "agi.max_connections" in await serve.wait_log("take effect at the next restart")
    assert (await serve.authorize())[1].variables["A2B_STATUS"] == "OK"

    serve.proc.send_signal(signal.SIGTERM)
    await notifications.wait_for("STOPPING")
    assert await serve.wait() == 0, "\n".join(serve.lines[-30:])


async def test_reload_applies_live_keys_only(pg: asyncpg.Connection, pg_url: str, store: RedisStore,
                                            redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: which settings a reload swaps in, and where they land."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)  # never notify whatever runs the tests
    await seed(pg)
    started = settings_for(pg_url, redis_url)
    edited = dataclasses.replace(
        started,
        billing=dataclasses.replace(started.billing, fail_open_limit_ms=30_000, max_call_s=600),
        agi=dataclasses.replace(started.agi, pin_attempts=1, allow="127.0.0.2", shed_after_s=0.25),
    )
    daemon = Daemon(started, reload_settings=lambda: edited)
    await daemon.start()
    try:
        with capture_logs() as logs:
            await daemon.reload()
        assert daemon.authorizer is not None
        assert daemon.authorizer.settings is daemon.settings
        assert daemon.settings.billing.fail_open_limit_ms == 30_000
        assert daemon.settings.agi.pin_attempts == 1
        assert daemon.settings.billing.max_call_s == started.billing.max_call_s  # the guard's horizon too
        events = {entry["event"]: entry for entry in logs}
        assert events["changed settings take effect at the next restart"]["keys"] == ["billing.max_call_s"]
        assert sorted(events["settings reloaded"]["applied"]) == [
            "agi.allow", "agi.pin_attempts", "agi.shed_after_s", "billing.fail_open_limit_ms"]
        assert daemon.agi is not None and "127.0.0.2/32" in [str(n) for n in daemon.agi.allowed]
        assert daemon.agi.shed_after_s == 0.25
        assert events["tariffs refreshed"]["changed"] == []
    finally:
        await daemon.close()


def test_with_keys_takes_only_the_named_keys() -> None:
    base = Settings()
    new = dataclasses.replace(base, log=dataclasses.replace(base.log, level="debug", json=True),
                              agi=dataclasses.replace(base.agi, port=5000))
    assert changed_keys(base, new) == ["agi.port", "log.level", "log.json"]
    assert not set(changed_keys(base, new)) - {"agi.port"} - LIVE_KEYS
    merged = with_keys(base, new, ["log.level"])
    assert (merged.log.level, merged.log.json, merged.agi.port) == ("debug", False, base.agi.port)


async def test_a_background_task_that_dies_is_logged() -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    async def finished() -> None:
        return None

    daemon = Daemon(Settings())
    with capture_logs() as logs:
        daemon._spawn(broken(), "broken")
        daemon._spawn(finished(), "finished")
        async with asyncio.timeout(5):
            while daemon._tasks:
                await asyncio.sleep(0.01)
    assert [(entry["event"], entry["task"]) for entry in logs] == [("background task died", "broken")]
    assert "RuntimeError('boom')" in logs[0]["error"]
