"""GET /metrics on the daemon's loop: Prometheus text with a2bd's own series; bad requests get 4xx."""

from __future__ import annotations

import asyncio

import pytest

from a2bd.api.metrics import start_metrics_server
from a2bd.observability import AUTHORIZATIONS


async def http(port: int, request: bytes) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    async with asyncio.timeout(5):
        data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), body


@pytest.fixture
async def port() -> object:
    server = await start_metrics_server("127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_metrics_exposes_authorizations_by_status(port: int) -> None:
    AUTHORIZATIONS.labels("NOFUNDS").inc()
    status, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == "HTTP/1.1 200 OK"
    text = body.decode()
    assert 'a2bd_authorizations_total{status="NOFUNDS"}' in text
    assert "a2bd_authorize_seconds_bucket" in text
    assert "# TYPE a2bd_agi_rejected_total counter" in text
    assert "# TYPE a2bd_agi_active_sessions gauge" in text


@pytest.mark.parametrize(("request_bytes", "expected"), [
    (b"GET /healthz HTTP/1.1\r\n\r\n", "HTTP/1.1 200 OK"),
    (b"GET /nope HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
    (b"POST /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 405 Method Not Allowed"),
    (b"garbage\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"),
])
async def test_other_requests(port: int, request_bytes: bytes, expected: str) -> None:
    status, _ = await http(port, request_bytes)
    assert status == expected
