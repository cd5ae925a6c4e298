"""Every CLI test talks to the test session's PostgreSQL and Redis, as an operator's environment would say."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, pg_url: str, redis_url: str) -> None:
    monkeypatch.setenv("A2BD_PG_URL", pg_url)
    monkeypatch.setenv("A2BD_REDIS_URL", redis_url)
