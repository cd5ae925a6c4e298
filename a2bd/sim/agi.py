"""A simulated Asterisk FastAGI client, faithful to the Asterisk 22.10.1 transcripts.

It plays Asterisk's side of a FastAGI session against a server: connect, write the environment in a few
chunks, answer each command line the way res_agi.c does (the replies are the recorded ones), write
``HANGUP`` when the server closes and close. Tests, benchmarks and the call-storm tool drive a2bd with it,
so it stays lean: a plain asyncio.Protocol, one timeout per session, one write per batch of commands.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, cast

from a2bd.agi.protocol import split_command

__all__ = [
    "ASTERISK_VERSION",
    "SimResult",
    "encode_environment",
    "make_environment",
    "run_session",
    "split_chunks",
]

ASTERISK_VERSION: Final = "22.10.1"
# The thread id of a recorded session (transcript 09); servers must not care about it.
_THREADID: Final = "139740039321280"

# Replies exactly as recorded (transcripts 09 and 10).
_OK_1: Final = b"200 result=1\n"
_OK_0: Final = b"200 result=0\n"
_UNKNOWN: Final = b"510 Invalid or unknown command\n"
_DEAD: Final = b"511 Command Not Permitted on a dead channel or intercept routine\n"
_HANGUP: Final = b"HANGUP\n"
# GET VARIABLE without its argument (transcript 09): the usage text keeps res_agi's raw XML markup.
_GET_VARIABLE_USAGE: Final = (
    "Returns <literal>0</literal> if <replaceable>variablename</replaceable> is not set. Returns "
    "<literal>1</literal> if <replaceable>variablename</replaceable> is set and returns the variable in "
    "parentheses.\nExample return code: 200 result=1 (testvariable)\n"
)


def make_environment(
    *,
    uniqueid: str,
    channel: str,
    extension: str,
    callerid: str = "5551234",
    calleridname: str = "Test",
    accountcode: str = "",
    script: str = "authorize",
    host: str = "127.0.0.1",
    port: int = 4573,
    args: Sequence[str] = (),
    context: str = "billing",
) -> dict[str, str]:
    """The environment Asterisk 22 sends for ``AGI(agi://host:port/script,args...)``, keys in wire order.

    The order is res_agi.c's: ``agi_network`` and ``agi_network_script`` (FastAGI only), then setup_env()'s
    ``agi_request`` .. ``agi_threadid``, then ``agi_arg_1`` .. ``agi_arg_n`` after agi_threadid. Values
    not given are those of the recordings (``agi_type`` is the channel technology, ``Local`` there).
    """
    env = {
        "agi_network": "yes",
        "agi_network_script": script,
        "agi_request": f"agi://{host}:{port}/{script}",
        "agi_channel": channel,
        "agi_language": "en",
        "agi_type": channel.partition("/")[0],
        "agi_uniqueid": uniqueid,
        "agi_version": ASTERISK_VERSION,
        "agi_callerid": callerid,
        "agi_calleridname": calleridname,
        "agi_callingpres": "0",
        "agi_callingani2": "0",
        "agi_callington": "0",
        "agi_callingtns": "0",
        "agi_dnid": "unknown",
        "agi_rdnis": "unknown",
        "agi_context": context,
        "agi_extension": extension,
        "agi_priority": "4",
        "agi_enhanced": "0.0",
        "agi_accountcode": accountcode,
        "agi_threadid": _THREADID,
    }
    for n, arg in enumerate(args, 1):
        env[f"agi_arg_{n}"] = arg
    return env


def encode_environment(env: Mapping[str, str]) -> bytes:
    """The environment block as Asterisk writes it: ``key: value`` LF lines and an empty line.

    Values go out raw, as in Asterisk (an empty value keeps its trailing space: ``agi_accountcode: ``).
    """
    return "".join([f"{key}: {value}\n" for key, value in env.items()]).encode("utf-8") + b"\n"


def split_chunks(data: bytes, chunks: int) -> list[bytes]:
    """Cut `data` into `chunks` pieces of about equal size, only after an LF (Asterisk writes whole lines)."""
    if chunks <= 1:
        return [data]
    lines = data.splitlines(keepends=True)
    n = len(lines)
    bounds = sorted({round(n * k / chunks) for k in range(1, chunks)} - {0, n})
    pieces, start = [], 0
    for bound in [*bounds, n]:
        pieces.append(b"".join(lines[start:bound]))
        start = bound
    return pieces


@dataclass(slots=True)
class SimResult:
    """What one simulated session saw.

    `variables`: every SET VARIABLE the server sent, name → unquoted value, in order (a later SET of the
    same name wins). `commands`: each command line received, without its LF. `server_closed`: the server
    closed (or half-closed) the connection, as opposed to the session running out of `timeout_s`.
    `elapsed_s`: seconds from connect to close.
    """

    variables: dict[str, str] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    server_closed: bool = False
    elapsed_s: float = 0.0


_VAR_REF = re.compile(r"\$\{([^{}]*)\}")


class _Channel:
    """The channel's side: variables and how res_agi.c answers each command."""

    __slots__ = ("dead", "digits", "set_vars", "vars")

    def __init__(
        self, env: Mapping[str, str], channel_vars: Mapping[str, str] | None, digits: str, dead: bool
    ) -> None:
        # What a dialplan can read on the channel at AGI time; the caller's own variables on top.
        self.vars: dict[str, str] = {
            "CALLERID(num)": env.get("agi_callerid", ""),
            "CALLERID(name)": env.get("agi_calleridname", ""),
            "CHANNEL(accountcode)": env.get("agi_accountcode", ""),
            "CHANNEL(name)": env.get("agi_channel", ""),
            "UNIQUEID": env.get("agi_uniqueid", ""),
            "EXTEN": env.get("agi_extension", ""),
            "CONTEXT": env.get("agi_context", ""),
        }
        if channel_vars:
            self.vars.update(channel_vars)
        self.set_vars: dict[str, str] = {}
        self.digits = digits
        self.dead = dead

    def respond(self, line: str) -> bytes:
        argv = split_command(line)
        found = _find_command(argv)
        if found is None:
            return _UNKNOWN
        handler, dead_safe = found
        if self.dead and not dead_safe:
            return _DEAD
        return handler(self, argv)

    def _set_variable(self, argv: list[str]) -> bytes:
        if len(argv) != 4:
            return _usage("Sets a variable to the current channel.")
        name, value = argv[2], argv[3]
        # CDR(accountcode) is the deprecated spelling of the same field (transcript 00a).
        self.vars["CHANNEL(accountcode)" if name == "CDR(accountcode)" else name] = value
        self.set_vars[name] = value
        return _OK_1

    def _get_variable(self, argv: list[str]) -> bytes:
        if len(argv) != 3:
            return _usage(_GET_VARIABLE_USAGE)
        value = self.vars.get(argv[2])
        if value is None:
            return _OK_0
        return b"200 result=1 (" + value.encode("utf-8") + b")\n"

    def _get_full_variable(self, argv: list[str]) -> bytes:
        if len(argv) not in (4, 5):
            return _usage("Evaluates a channel expression.")
        if len(argv) == 5:
            return _OK_0  # another channel by name: the simulator has only this one
        # res_agi substitutes the whole expression and always answers result=1, empty for unset names.
        value = _VAR_REF.sub(lambda m: self.vars.get(m.group(1), ""), argv[3])
        return b"200 result=1 (" + value.encode("utf-8") + b")\n"

    def _verbose(self, argv: list[str]) -> bytes:
        if len(argv) < 2:
            return _usage("Logs a message to the asterisk verbose log.")
        return _OK_1

    def _get_data(self, argv: list[str]) -> bytes:
        if len(argv) < 3:
            return _usage("Prompts for DTMF on a channel.")
        digits = self.digits
        if len(argv) >= 5 and argv[4].isdigit() and int(argv[4]) > 0:
            digits = digits[: int(argv[4])]
        if not digits:
            return b"200 result= (timeout)\n"
        return b"200 result=" + digits.encode("ascii") + b"\n"

    def _answer(self, argv: list[str]) -> bytes:
        return _OK_0

    def _noop(self, argv: list[str]) -> bytes:
        return _OK_0


_Command = Callable[[_Channel, list[str]], bytes]

# Command words → (handler, dead-safe), as in res_agi.c's command table; anything else gets 510.
_COMMANDS: Final[dict[tuple[str, ...], tuple[_Command, bool]]] = {
    ("SET", "VARIABLE"): (_Channel._set_variable, True),
    ("GET", "VARIABLE"): (_Channel._get_variable, True),
    ("GET", "FULL", "VARIABLE"): (_Channel._get_full_variable, True),
    ("VERBOSE",): (_Channel._verbose, True),
    ("NOOP",): (_Channel._noop, True),
    ("GET", "DATA"): (_Channel._get_data, False),
    ("ANSWER",): (_Channel._answer, False),
}


def _find_command(argv: list[str]) -> tuple[_Command, bool] | None:
    # Like res_agi.c's find_command(): command words match case-insensitively, the rest are arguments.
    upper = [w.upper() for w in argv[:3]]
    for n in (3, 2, 1):
        if len(upper) >= n:
            found = _COMMANDS.get(tuple(upper[:n]))
            if found is not None:
                return found
    return None


def _usage(text: str) -> bytes:
    body = text if text.endswith("\n") else text + "\n"
    return (
        b"520-Invalid command syntax.  Proper usage follows:\n"
        + body.encode("utf-8")
        + b"520 End of proper usage.\n"
    )


class _SimProtocol(asyncio.Protocol):
    """Asterisk's end of the socket: answers every complete command line as it arrives."""

    def __init__(self, channel: _Channel, result: SimResult, pieces: list[bytes], dead: bool) -> None:
        self.channel = channel
        self.result = result
        self.pieces = pieces
        self.dead = dead
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not a subclass of asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        self._write_next_piece()

    def _write_next_piece(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(self.pieces.pop(0))
        if self.pieces:
            # One loop turn between pieces, so each leaves as its own segment like Asterisk's writes.
            asyncio.get_running_loop().call_soon(self._write_next_piece)
        elif self.dead:
            transport.write(_HANGUP)  # transcript 10: HANGUP right after the environment, before commands

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        if b"\n" not in buffer:
            self.buffer = buffer
            return
        *lines, self.buffer = buffer.split(b"\n")
        # The server pipelines its commands; the replies to one read go out in one write (the byte stream
        # is the one Asterisk sends, where the replies of pipelined commands often share a segment too).
        assert self.transport is not None
        self.transport.write(b"".join([self._answer(line) for line in lines]))

    def _answer(self, line: bytes) -> bytes:
        text = line.decode("utf-8", "replace")
        self.result.commands.append(text)
        return self.channel.respond(text)

    def eof_received(self) -> bool:
        # The server closed or half-closed. Asterisk's fgets() still runs a last line without LF, then
        # Asterisk writes HANGUP and closes (every recorded session ends this way).
        assert self.transport is not None
        tail = self._answer(self.buffer) if self.buffer else b""
        self.buffer = b""
        self.result.server_closed = True
        self.transport.write(tail + _HANGUP)
        self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.done.done():
            self.result.server_closed = True  # reset by the server: closed all the same
        if not self.done.done():
            self.done.set_result(None)


async def run_session(
    host: str,
    port: int,
    env: Mapping[str, str],
    *,
    channel_vars: Mapping[str, str] | None = None,
    digits: str = "",
    dead: bool = False,
    chunks: int = 2,
    timeout_s: float = 5.0,
) -> SimResult:
    """Play one FastAGI session as Asterisk against ``host:port`` and return what happened.

    The environment `env` (see make_environment) is written in `chunks` writes. Commands are answered as
    Asterisk does: SET VARIABLE → ``200 result=1``; GET VARIABLE → ``200 result=1 (value)`` or
    ``200 result=0``; GET FULL VARIABLE → ``200 result=1 (expanded)``; VERBOSE → ``200 result=1``;
    GET DATA → ``200 result=<digits>`` or ``200 result= (timeout)``; ANSWER → ``200 result=0``; a known
    command with wrong arguments → the 520 usage block; anything else → 510. `channel_vars` are variables
    the dialplan set before the AGI. With `dead`, the caller has hung up: ``HANGUP`` follows the
    environment and commands that are not dead-safe get 511. When the server closes, ``HANGUP`` is written
    and the connection closed. The whole session is bounded by `timeout_s` seconds; running out drops
    the connection and returns with ``server_closed=False``. Connection errors (refused) are raised.
    """
    result = SimResult()
    channel = _Channel(env, channel_vars, digits, dead)
    protocol = _SimProtocol(channel, result, split_chunks(encode_environment(env), chunks), dead)
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            await loop.create_connection(lambda: protocol, host, port)
            await protocol.done
    except TimeoutError:
        result.server_closed = False
        if protocol.transport is not None:
            protocol.transport.abort()
    finally:
        result.elapsed_s = time.perf_counter() - started
        result.variables = channel.set_vars
    return result
