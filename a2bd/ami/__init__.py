"""AMI: the sans-I/O wire protocol (protocol) and the asyncio client that keeps one server logged in (client)."""

from a2bd.ami.client import AmiClient, AmiConnected, AmiDisconnected, AmiState, AmiStreamItem
from a2bd.ami.protocol import AmiMessage, AmiParser, format_action
from a2bd.errors import AmiAuthError, AmiTimeout, AmiUnavailable, AmiValueError

__all__ = [
    "AmiAuthError",
    "AmiClient",
    "AmiConnected",
    "AmiDisconnected",
    "AmiMessage",
    "AmiParser",
    "AmiState",
    "AmiStreamItem",
    "AmiTimeout",
    "AmiUnavailable",
    "AmiValueError",
    "format_action",
]
