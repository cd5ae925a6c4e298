"""A minimal asyncio HTTP endpoint for Prometheus: GET /metrics, GET /healthz.

prometheus_client's own server runs in a thread; this one lives on the daemon's loop and shares its
shutdown. It reads one bounded request head and answers; anything else gets 404 or 400.
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from a2bd.observability import REGISTRY


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if method != "GET":
            status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
        elif path == "/metrics":
            status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        elif path == "/healthz":
            status, ctype, body = "200 OK", "text/plain", b"ok\n"
        else:
            status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
    except ConnectionError:
        writer.close()
        return
    writer.write(
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode("latin-1") + body
    )
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


async def start_metrics_server(host: str, port: int) -> asyncio.Server:
    return await asyncio.start_server(_serve, host, port, limit=8192)
