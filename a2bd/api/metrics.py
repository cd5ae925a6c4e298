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

/metrics and /healthz reveal business figures (authorizations, calls, ledger and invoice counts, per server)
and which dependency is failing; with a token (metrics.token_file or A2BD_METRICS_TOKEN) they answer only a
request carrying ``Authorization: Bearer <token>``, and 401 otherwise. /livez reveals nothing and stays
open, so that a supervisor's liveness probe needs no secret. The token is compared in constant time (as
SHA-256 digests, so not even its length leaks) and is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from a2bd.api.health import CachedHealth, HealthCheck
from a2bd.observability import REGISTRY, LogThrottle

__all__ = ["PROTECTED_PATHS", "health_body", "start_metrics_server"]

log = structlog.get_logger("a2bd.api")

_TEXT = "text/plain; charset=utf-8"
# What a token guards: the endpoints that reveal data. /livez is for probes and says only "ok".
PROTECTED_PATHS = frozenset({"/metrics", "/healthz"})


def health_body(report: dict[str, str | None]) -> tuple[bool, bytes]:
    """Whether every check passed, and the text listing each: ``redis: ok`` or ``redis: <why not>``."""
    ready = all(reason is None for reason in report.values())
    lines = [f"{name}: {'ok' if reason is None else reason}" for name, reason in report.items()]
    return ready, ("\n".join(lines) + "\n").encode() if lines else b"ok\n"


class _Endpoint:
    def __init__(self, health: CachedHealth | None, token: str) -> None:
        self.health = health
        self._token_digest = hashlib.sha256(token.encode()).digest() if token else None
        self._refused = LogThrottle()  # a guessing flood from one address is one line every 10 s

    def _authorized(self, head: bytes) -> bool:
        """Whether the request carries the token: exactly one ``Authorization: Bearer <token>`` header."""
        if self._token_digest is None:
            return True
        given = [value for name, sep, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
                 if sep and name.strip().lower() == b"authorization"]
        if len(given) != 1:
            return False
        scheme, _, credentials = given[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(hashlib.sha256(credentials.strip()).digest(), self._token_digest)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        challenge = ""
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            path = path.split("?", 1)[0]
            if method != "GET":
                status, ctype, body = "405 Method Not Allowed", _TEXT, b"GET only\n"
            elif path in PROTECTED_PATHS and not self._authorized(head):
                status, ctype, body = "401 Unauthorized", _TEXT, b"a bearer token is required\n"
                challenge = 'WWW-Authenticate: Bearer realm="a2bd"\r\n'
                peer = writer.get_extra_info("peername")
                address = peer[0] if isinstance(peer, tuple) else str(peer)
                suppressed = self._refused.allow(address)
                if suppressed is not None:
                    log.warning("metrics request refused: no valid bearer token", path=path, peer=address,
                                suppressed=suppressed)
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
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{challenge}"
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
    token: str = "",
    health_ttl_s: float = 1.0,
    health_timeout_s: float = 2.5,
) -> asyncio.Server:
    """Serve /metrics, /healthz and /livez on `host`:`port` (0: a free port).

    `health` (e.g. api.health.daemon_health(...)) decides /healthz; it is run at most once per
    `health_ttl_s` and given `health_timeout_s` in all. Without it /healthz answers 200 while the loop runs.
    With a `token`, /metrics and /healthz require ``Authorization: Bearer <token>`` (MetricsSettings decides
    when one is needed and reads it).
    """
    cached = CachedHealth(health, ttl_s=health_ttl_s, timeout_s=health_timeout_s) if health is not None else None
    return await asyncio.start_server(_Endpoint(cached, token).serve, host, port, limit=8192)
