"""`a2bd serve` as systemd runs it: a separate process, on each event loop, answering and stopping on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import asyncpg
import pytest

from a2bd.adapters.redis_store import RedisStore
from a2bd.sim.agi import make_environment, run_session
from tests.e2e.test_daemon_authorize import seed

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for_port(port: int) -> None:
    for _ in range(100):  # bounded: start-up loads tariffs and Redis
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_serve_answers_and_stops_on_sigterm(loop: str, pg: asyncpg.Connection, pg_url: str,
                                                  store: RedisStore, redis_url: str) -> None:
    await seed(pg)
    port = free_port()
    env = {**os.environ, "A2BD_PG_URL": pg_url, "A2BD_REDIS_URL": redis_url, "A2BD_AGI_PORT": str(port),
           "A2BD_METRICS_PORT": "0", "A2BD_RUNTIME_LOOP": loop, "A2BD_LOG_LEVEL": "info"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "a2bd.cli", "serve", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_for_port(port)
        environment = make_environment(uniqueid="1795400000.1", channel="PJSIP/phone-00000001",
                                       extension="33123456789", accountcode="1000000001", port=port)
        result = await run_session("127.0.0.1", port, environment, timeout_s=5)
        assert result.variables["A2B_STATUS"] == "OK"
        assert result.variables["A2B_ROUTE_1"] == "PJSIP/33123456789@carrier-b"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert f"loop={loop}" in stderr.decode()
    assert "a2bd stopped" in stderr.decode()
