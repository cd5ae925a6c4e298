"""The metrics endpoint's bearer token: /metrics and /healthz answer 401 without it or with a wrong one, 200 with
it; /livez stays open; the token never reaches a log. Real HTTP requests over loopback, to the endpoint alone and
to `a2bd serve` as a separate process; and the settings that decide when a token is required."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from structlog.testing import capture_logs

from a2bd.adapters.redis_store import RedisStore
from a2bd.api.health import HealthReport
from a2bd.api.metrics import start_metrics_server
from a2bd.config import MetricsSettings, load_settings
from a2bd.errors import ConfigError
from tests.e2e.test_daemon_authorize import seed
from tests.e2e.test_metrics_endpoint import serve
from tests.e2e.test_serve_process import free_port, wait_for_port

pytestmark = pytest.mark.e2e

TOKEN = "3f9c1e7a5b2d48c6a0e4f1b7d9c3a5e8"  # what `openssl rand -hex 16` gives
WRONG = "0f9c1e7a5b2d48c6a0e4f1b7d9c3a5e8"  # one character off


async def http(port: int, path: str, *headers: str) -> tuple[str, list[str], str]:
    """Status line, header lines and body of one GET."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(("\r\n".join([f"GET {path} HTTP/1.1", "Host: x", *headers]) + "\r\n\r\n").encode())
    async with asyncio.timeout(5):
        data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, lines, body.decode()


async def failing_redis() -> HealthReport:
    return {"redis": "PING failed: ConnectionRefusedError", "postgresql": None}


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async for port in serve(failing_redis, token=TOKEN):
        yield port


@pytest.mark.parametrize("path", ["/metrics", "/healthz"])
@pytest.mark.parametrize("headers", [
    (),
    (f"Authorization: Bearer {WRONG}",),
    (f"Authorization: Bearer {TOKEN[:-1]}",),
    (f"Authorization: Bearer {TOKEN}0",),
    (f"Authorization: Basic {TOKEN}",),
    (f"Authorization: {TOKEN}",),
    ("Authorization: Bearer",),
    (f"Authorization: Bearer {TOKEN}", f"Authorization: Bearer {WRONG}"),  # two: which one counts? neither
    (f"X-Authorization: Bearer {TOKEN}",),
], ids=["none", "wrong", "prefix", "longer", "basic", "no-scheme", "empty", "two", "other-header"])
async def test_without_the_token_the_data_endpoints_answer_401(port: int, path: str,
                                                               headers: tuple[str, ...]) -> None:
    with capture_logs() as logs:
        status, lines, body = await http(port, path, *headers)
    assert status == "HTTP/1.1 401 Unauthorized"
    assert 'WWW-Authenticate: Bearer realm="a2bd"' in lines
    assert "a2bd_" not in body and "redis" not in body  # neither the figures nor the failing dependency
    assert [e["event"] for e in logs] == ["metrics request refused: no valid bearer token"]
    assert logs[0]["path"] == path and logs[0]["peer"] == "127.0.0.1"
    assert TOKEN not in repr(logs) and WRONG not in repr(logs)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
async def test_with_the_token_they_answer(port: int, scheme: str) -> None:
    with capture_logs() as logs:
        status, _, body = await http(port, "/metrics", f"Authorization: {scheme} {TOKEN}")
        assert status == "HTTP/1.1 200 OK" and "# TYPE a2bd_authorizations_total counter" in body
        status, _, body = await http(port, "/healthz", f"authorization:  {scheme}   {TOKEN} ")
        assert status == "HTTP/1.1 503 Service Unavailable" and "redis: PING failed" in body
    assert TOKEN not in repr(logs)


async def test_livez_stays_open_for_probes(port: int) -> None:
    status, _, body = await http(port, "/livez")
    assert (status, body) == ("HTTP/1.1 200 OK", "ok\n")
    status, _, _ = await http(port, "/nowhere")
    assert status == "HTTP/1.1 404 Not Found"


async def test_without_a_token_nothing_is_asked() -> None:
    server = await start_metrics_server("127.0.0.1", 0)
    try:
        status, _, body = await http(server.sockets[0].getsockname()[1], "/metrics")
    finally:
        server.close()
        await server.wait_closed()
    assert status == "HTTP/1.1 200 OK" and "a2bd_" in body


# -- when a token is required, and where it comes from ---------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.5", "metrics.example.net"])
def test_listening_beyond_loopback_without_a_token_is_refused(host: str) -> None:
    with pytest.raises(ConfigError, match=r"^metrics.token_file: the metrics endpoint listens on .* give a token"):
        load_settings(environ={"A2BD_METRICS_HOST": host})
    # with a token, or with the endpoint off, it starts
    load_settings(environ={"A2BD_METRICS_HOST": host, "A2BD_METRICS_TOKEN": TOKEN})
    load_settings(environ={"A2BD_METRICS_HOST": host, "A2BD_METRICS_PORT": "0"})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_on_loopback_a_token_is_optional(host: str) -> None:
    assert load_settings(environ={"A2BD_METRICS_HOST": host}).metrics.read_token() == ""


def test_the_token_comes_from_the_environment_or_a_file_and_is_never_shown(tmp_path: Path) -> None:
    settings = load_settings(environ={"A2BD_METRICS_TOKEN": TOKEN})
    assert settings.metrics.read_token() == TOKEN
    assert TOKEN not in repr(settings)
    secret = tmp_path / "metrics.token"
    secret.write_text(TOKEN + "\n")
    config = tmp_path / "a2bd.toml"
    config.write_text(f'[metrics]\nhost = "0.0.0.0"\ntoken_file = "{secret}"\n')
    assert load_settings(config, environ={}).metrics.read_token() == TOKEN
    with pytest.raises(ConfigError, match="at most one of token"):
        load_settings(config, environ={"A2BD_METRICS_TOKEN": TOKEN})


@pytest.mark.parametrize("bad", ["short-token", "with space inside it", "x" * 15, "token\r\nX-Evil: 1xxxxxxxx"])
def test_a_weak_or_malformed_token_is_refused_without_repeating_it(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 16 characters") as raised:
        load_settings(environ={"A2BD_METRICS_TOKEN": bad})
    assert bad not in str(raised.value)
    secret = tmp_path / "metrics.token"
    secret.write_text(bad)
    with pytest.raises(ConfigError, match="at least 16 characters") as raised:
        MetricsSettings(token_file=str(secret)).read_token()
    assert bad not in str(raised.value)
    with pytest.raises(ConfigError, match="cannot read"):
        MetricsSettings(token_file=str(tmp_path / "missing")).read_token()


# -- the daemon as systemd runs it -------------------------------------------------------------------------


@pytest.mark.integration
async def test_serve_requires_the_token_and_never_logs_it(pg: asyncpg.Connection, pg_url: str, store: RedisStore,
                                                         redis_url: str, tmp_path: Path) -> None:
    await seed(pg)
    agi_port, metrics_port = free_port(), free_port()
    secret = tmp_path / "metrics.token"
    secret.write_text(TOKEN + "\n")
    env = {**os.environ, "A2BD_PG_URL": pg_url, "A2BD_REDIS_URL": redis_url, "A2BD_AGI_PORT": str(agi_port),
           "A2BD_METRICS_PORT": str(metrics_port), "A2BD_METRICS_TOKEN_FILE": str(secret),
           "A2BD_LOG_LEVEL": "debug"}
    env.pop("A2BD_METRICS_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "a2bd.cli", "serve", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await wait_for_port(metrics_port)
        assert (await http(metrics_port, "/metrics"))[0] == "HTTP/1.1 401 Unauthorized"
        assert (await http(metrics_port, "/healthz", f"Authorization: Bearer {WRONG}"))[0] == \
            "HTTP/1.1 401 Unauthorized"
        status, _, body = await http(metrics_port, "/metrics", f"Authorization: Bearer {TOKEN}")
        assert status == "HTTP/1.1 200 OK" and "a2bd_authorizations_total" in body
        assert (await http(metrics_port, "/healthz", f"Authorization: Bearer {TOKEN}"))[0] == "HTTP/1.1 200 OK"
        assert (await http(metrics_port, "/livez"))[0] == "HTTP/1.1 200 OK"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            stdout, stderr = await proc.communicate()
    output = (stdout + stderr).decode()
    assert proc.returncode == 0, output[-2000:]
    assert "metrics request refused" in output and "a2bd serving" in output  # the log was written...
    assert TOKEN not in output and WRONG not in output  # ...without either token


@pytest.mark.integration
async def test_serve_on_every_interface_without_a_token_does_not_start(pg_url: str, redis_url: str) -> None:
    env = {**os.environ, "A2BD_PG_URL": pg_url, "A2BD_REDIS_URL": redis_url, "A2BD_AGI_PORT": str(free_port()),
           "A2BD_METRICS_HOST": "0.0.0.0", "A2BD_METRICS_PORT": str(free_port())}
    env.pop("A2BD_METRICS_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "a2bd.cli", "serve", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(20):
        _, stderr = await proc.communicate()
    assert proc.returncode == 1
    assert stderr.decode().startswith("a2bd: metrics.token_file: the metrics endpoint listens on '0.0.0.0'")
