"""FastAGI: the sans-I/O wire protocol (protocol) and the asyncio server around it (server)."""

from a2bd.agi.protocol import (
    HANGUP,
    AgiEnvironment,
    AgiReply,
    Hangup,
    OverrunError,
    ReplyReader,
    ReplyStream,
    format_command,
    get_variable,
    parse_environment,
    set_variable,
    split_command,
)
from a2bd.agi.server import AgiServer, AgiSession, Handler

__all__ = [
    "HANGUP",
    "AgiEnvironment",
    "AgiReply",
    "AgiServer",
    "AgiSession",
    "Handler",
    "Hangup",
    "OverrunError",
    "ReplyReader",
    "ReplyStream",
    "format_command",
    "get_variable",
    "parse_environment",
    "set_variable",
    "split_command",
]
