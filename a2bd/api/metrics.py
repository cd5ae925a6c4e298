"""A minimal asyncio HTTP endpoint on the daemon's loop: GET /metrics, /healthz and /livez.

prometheus_client's own server runs in a thread; this one lives on the daemon's loop and shares its
shutdown. It reads one bounded request head and answers; anything else gets 404 or 400.

- ``/metrics``: Prometheus text exposition of a2bd's registry.
- ``/healthz`` (readiness): 200 and one ``name: ok`` line per check when every dependency answers, else 503
  with the reason of each that does not. The checks (api/health.py) are cached for a second and bounded
  in time, so a scraper or a load balancer asking often cannot load Redis or PostgreSQL, nor hang.
- ``/livez`` (liveness): 200 as long as the event loop runs, whatever the stores say. A supervisor that
  restarts on a failed liveness probe must not restart a2bd because Redis is down: that would cut the
  FastAGI sessions and the call tracking in flight and bring back a daemon no readier than before. A loop
  stuck in a blocking call cannot answer at all, which is what liveness is for.
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from a2bd.api.health import CachedHealth, HealthCheck
from a2bd.observability import REGISTRY

__all__ = ["health_body", "start_metrics_server"]

_TEXT = "text/plain; charset=utf-8"


def health_body(report: dict[str, str | None]) -> tuple[bool, bytes]:
    """Whether every check passed, and the text listing each: ``redis: ok`` or ``redis: <why not>``."""
    ready = all(reason is None for reason in report.values())
    lines = [f"{name}: {'ok' if reason is None else reason}" for name, reason in report.items()]
    return ready, ("\n".join(lines) + "\n").encode() if lines else b"ok\n"


class _Endpoint:
    def __init__(self, health: CachedHealth | None) -> None:
        self.health = health

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            path = path.split("?", 1)[0]
            if method != "GET":
                status, ctype, body = "405 Method Not Allowed", _TEXT, b"GET only\n"
            elif path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
            elif path == "/healthz":
                status, ctype, body = await self._healthz()
            elif path == "/livez":
                status, ctype, body = "200 OK", _TEXT, b"ok\n"
            else:
                status, ctype, body = "404 Not Found", _TEXT, b"not found\n"
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            status, ctype, body = "400 Bad Request", _TEXT, b"bad request\n"
        except ConnectionError:
            writer.close()
            return
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode("latin-1") + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _healthz(self) -> tuple[str, str, bytes]:
        if self.health is None:
            return "200 OK", _TEXT, b"ok\n"
        ready, body = health_body(await self.health())
        return ("200 OK" if ready else "503 Service Unavailable"), _TEXT, body


async def start_metrics_server(
    host: str,
    port: int,
    health: HealthCheck | None = None,
    *,
    health_ttl_s: float = 1.0,
    health_timeout_s: float = 2.5,
) -> asyncio.Server:
    """Serve /metrics, /healthz and /livez on `host`:`port` (0: a free port).

    `health` (e.g. api.health.daemon_health(...)) decides /healthz; it is run at most once per
    `health_ttl_s` and given `health_timeout_s` in all. Without it /healthz answers 200 while the loop runs.
    """
    cached = CachedHealth(health, ttl_s=health_ttl_s, timeout_s=health_timeout_s) if health is not None else None
    return await asyncio.start_server(_Endpoint(cached).serve, host, port, limit=8192)
