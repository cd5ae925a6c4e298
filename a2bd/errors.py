"""The error tree. A business refusal is never an exception (see domain.authorize.Decision)."""

from __future__ import annotations


class A2bdError(Exception):
    """Base of every error a2bd raises on purpose."""


class ConfigError(A2bdError):
    """Invalid settings: reported as one line naming the key, exit code 1."""


class ProtocolError(A2bdError):
    """Bytes from a peer that do not follow the protocol. Carries the offending raw bytes."""

    def __init__(self, message: str, raw: bytes = b"") -> None:
        super().__init__(message)
        self.raw = raw

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} (raw: {self.raw[:120]!r})" if self.raw else base


class StoreUnavailable(A2bdError):
    """Redis or PostgreSQL could not be reached in time. Raised `from` the driver's exception."""


class InputError(A2bdError):
    """Operator input (a CLI argument, a CSV file) that cannot be used; the message says what to fix."""
