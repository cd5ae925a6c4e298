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


# -- AMI (a2bd.ami) -----------------------------------------------------------------------------------------


class AmiValueError(InputError):
    """An AMI action field that cannot be sent: a CR or LF in a key or value (it would end the header and
    let the rest be read as a second action), or a key that is empty or holds ':'. Nothing was sent."""


class AmiAuthError(ConfigError):
    """The AMI server refused the username/secret (``Response: Error``, ``Authentication failed``).

    Retrying cannot fix a wrong secret, so the client stops instead of looping; fix manager.conf or the
    a2bd settings. The message names the user and the server, never the secret.
    """


class AmiUnavailable(A2bdError):
    """No usable AMI connection: not connected, the connection dropped while a request waited for its
    reply, or the client is closed. The request may or may not have reached Asterisk; nothing is re-sent."""


class AmiTimeout(A2bdError, TimeoutError):
    """No reply to an AMI action in time. Also a TimeoutError, so ``except TimeoutError`` catches it.
    A reply arriving later is discarded."""
