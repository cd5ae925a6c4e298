"""The FastAGI wire protocol, sans-I/O: bytes in, typed values out; commands back to bytes.

No asyncio and no sockets here (a2bd.agi.server owns those), so tests feed recorded bytes straight in.
Every rule below was checked against the Asterisk 22.10.1 transcripts in tests/fixtures/asterisk/*.agi.txt
and against res_agi.c; comments say which quirk each rule is for.

A FastAGI session, as Asterisk drives it:

1. Asterisk connects and writes the environment: ``agi_<name>: <value>`` lines, LF only, ended by an empty
   line. The values are raw (no escaping) and may be empty (``agi_accountcode: `` with a trailing space).
2. The server writes one command per line; Asterisk answers each with one reply line
   (``200 result=1 (value)``), or a multi-line ``520-`` usage block for a command with wrong arguments.
3. At any moment between replies Asterisk may write ``HANGUP`` when the caller hangs up (transcript 10),
   and it always writes one more ``HANGUP`` after the server half-closes.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from a2bd.errors import ProtocolError

__all__ = [
    "HANGUP",
    "MAX_COMMAND_BYTES",
    "MAX_COMMAND_WORDS",
    "MAX_USAGE_BYTES",
    "AgiEnvironment",
    "AgiReply",
    "Hangup",
    "OverrunError",
    "ReplyReader",
    "ReplyStream",
    "format_command",
    "get_variable",
    "parse_environment",
    "parse_reply_line",
    "quote_word",
    "set_variable",
    "split_command",
]

# res_agi.c reads a command with fgets() into a 2048-byte buffer (AGI_BUF_LEN): a longer line is cut there
# and its tail runs as a second command. So a line, LF included, must fit in 2047 bytes.
MAX_COMMAND_BYTES: Final = 2047
# res_agi.c parse_args() keeps at most MAX_ARGS - 1 = 127 words and silently drops the rest.
MAX_COMMAND_WORDS: Final = 127
# A real usage block is under 1 KB (transcript 09); bound it so a broken peer cannot make us buffer forever.
MAX_USAGE_BYTES: Final = 65536

_HANGUP_LINE: Final = b"HANGUP"


class OverrunError(ProtocolError):
    """A line or a usage block longer than its bound: the peer sends too much (the server's ``overrun``)."""


# --------------------------------------------------------------------------------------------------------
# Environment


@dataclass(frozen=True, slots=True)
class AgiEnvironment:
    """The ``agi_*`` block Asterisk sends first, in the order received.

    `variables` maps the full key (``agi_uniqueid``) to its raw value. Values are never unescaped or
    trimmed: ``agi_accountcode: `` gives ``""``, and Asterisk writes ``unknown`` for an absent caller ID,
    DNID or RDNIS. parse_environment() guarantees ``agi_network_script`` and ``agi_uniqueid``.
    """

    variables: Mapping[str, str]

    def get(self, key: str, default: str = "") -> str:
        """The value of `key` (full name, ``agi_...``), or `default` when Asterisk did not send it."""
        return self.variables.get(key, default)

    @property
    def script(self) -> str:
        """The path after ``agi://host:port/`` in the dialplan's AGI() URL, e.g. ``authorize``."""
        return self.variables.get("agi_network_script", "")

    @property
    def request(self) -> str:
        """The full AGI URL, e.g. ``agi://127.0.0.1:4573/authorize``."""
        return self.variables.get("agi_request", "")

    @property
    def channel(self) -> str:
        """The channel running the AGI (the billed leg), e.g. ``Local/2000@billing-00000014;2``."""
        return self.variables.get("agi_channel", "")

    @property
    def uniqueid(self) -> str:
        """That channel's Uniqueid: the key of its Cdr and Hangup events on AMI."""
        return self.variables.get("agi_uniqueid", "")

    @property
    def callerid(self) -> str:
        """Caller number (``unknown`` when the channel has none)."""
        return self.variables.get("agi_callerid", "")

    @property
    def calleridname(self) -> str:
        """Caller name (``unknown`` when the channel has none)."""
        return self.variables.get("agi_calleridname", "")

    @property
    def extension(self) -> str:
        """The dialplan extension the AGI runs in (the dialled number)."""
        return self.variables.get("agi_extension", "")

    @property
    def context(self) -> str:
        """The dialplan context the AGI runs in."""
        return self.variables.get("agi_context", "")

    @property
    def accountcode(self) -> str:
        """The channel's accountcode; empty unless something set it before the AGI."""
        return self.variables.get("agi_accountcode", "")

    @property
    def version(self) -> str:
        """Asterisk's version, e.g. ``22.10.1``."""
        return self.variables.get("agi_version", "")

    @property
    def arguments(self) -> tuple[str, ...]:
        """The AGI() arguments after the URL: ``agi_arg_1`` .. ``agi_arg_n`` in order."""
        args: list[str] = []
        variables = self.variables
        while (value := variables.get(f"agi_arg_{len(args) + 1}")) is not None:
            args.append(value)
        return tuple(args)


def _raw(block: bytes, index: int) -> bytes:
    """Line `index` of the block exactly as it came, for an error."""
    line = block.split(b"\n")[index]
    return line[:-1] if line.endswith(b"\r") else line


def parse_environment(block: bytes) -> AgiEnvironment:
    """Parse the environment block: every byte up to and including the empty line that ends it.

    Values are UTF-8; bytes that are not (a Latin-1 caller name from a SIP trunk) become U+FFFD rather
    than losing the call: a name is only displayed, and a number with such bytes matches no account or
    rate anyway. Raises ProtocolError, carrying the offending raw line, on: a key that is not ASCII, a
    line that is not
    ``key: value`` (``key:`` alone is accepted as an empty value), a key that does not start with ``agi_``,
    a duplicate key, a block that does not end with an empty line, and a block without
    ``agi_network_script`` or ``agi_uniqueid``.
    """
    # One decode for the whole block (this runs once per call). Asterisk sends LF only; a CR before
    # each LF (some proxies add one) is tolerated.
    text = block.decode("utf-8", "replace")
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    # A complete block ends "...\n\n", which splits into [..., "", ""].
    if len(lines) < 2 or lines[-1] != "" or lines[-2] != "":
        raise ProtocolError("AGI environment does not end with an empty line", block[-120:])
    variables: dict[str, str] = {}
    for index, line in enumerate(lines[:-2]):
        key, sep, value = line.partition(": ")
        if not sep:
            # "agi_accountcode: " keeps its trailing space on the wire; a proxy that strips trailing
            # blanks turns it into "agi_accountcode:", which still means an empty value.
            if not line.endswith(":") or ":" in line[:-1]:
                raise ProtocolError("AGI environment line is not 'key: value'", _raw(block, index))
            key, value = line[:-1], ""
        if not key.startswith("agi_") or not key.isascii():
            raise ProtocolError(f"AGI environment key {key!r} does not start with agi_", _raw(block, index))
        if key in variables:
            raise ProtocolError(f"AGI environment key {key!r} appears twice", _raw(block, index))
        variables[key] = value
    for required in ("agi_network_script", "agi_uniqueid"):
        if required not in variables:
            raise ProtocolError(f"AGI environment has no {required}", block[:120])
    return AgiEnvironment(types.MappingProxyType(variables))


# --------------------------------------------------------------------------------------------------------
# Replies


@dataclass(frozen=True, slots=True)
class Hangup:
    """Asterisk wrote ``HANGUP``: the channel hung up and the AGI now runs in dead mode."""


HANGUP: Final = Hangup()


@dataclass(frozen=True, slots=True)
class AgiReply:
    """One reply from Asterisk to one command.

    `code` is the status (200 ok, 510 unknown command, 511 not allowed on a dead channel, 520 usage).
    `result` is the value after ``result=`` (``"1"``, ``"-1"``, ``""`` in ``result= (timeout)``), or None
    when the line has none. `data` is the text inside the parentheses, taken raw: Asterisk does not
    escape it (``200 result=1 (say "hi" to Bob's phone, then wait)``). `extras` holds the ``key=value``
    words after it (``endpos=1234``, ``digit=5``). `text` is everything after the code on the first line;
    `usage` the help lines of a ``520-`` block; `raw` the reply's bytes without the final LF.
    """

    code: int
    result: str | None = None
    data: str | None = None
    extras: tuple[tuple[str, str], ...] = ()
    text: str = ""
    usage: tuple[str, ...] = ()
    raw: bytes = b""

    @property
    def ok(self) -> bool:
        """True for a 200 reply (the command ran; `result` says how it went)."""
        return self.code == 200

    def get(self, key: str) -> str | None:
        """The value of the ``key=value`` word after the data (e.g. ``endpos``), or None."""
        for name, value in self.extras:
            if name == key:
                return value
        return None

    @property
    def endpos(self) -> int | None:
        """The ``endpos=`` sample offset of the playback commands, or None."""
        value = self.get("endpos")
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        return int(value) if value is not None and _INTEGER.fullmatch(value) else None


# "endpos=1234 digit=5": the words res_agi.c appends after the parenthesised data.
_EXTRA_START = re.compile(r" [A-Za-z_][A-Za-z0-9_]*=")
_EXTRA_WORD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)")
_INTEGER = re.compile(r"-?[0-9]{1,19}")


def _decode(data: bytes, what: str, raw: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not UTF-8", raw) from exc


def _split_data(rest: str, raw: bytes) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """Split what follows ``result=X`` into (data, extras)."""
    if not rest:
        return None, ()
    if rest.startswith(" ("):
        body = rest[2:]
        # The data is raw and may itself hold ")" (a GET VARIABLE of "a) b" reads "(a) b)"). The data
        # ends at the last ")" that is followed by nothing or by key=value words: GET VARIABLE puts its
        # ")" last on the line, WAIT FOR DIGIT and friends write "(digit) digit=5 endpos=0".
        # Matched in place, not on a slice: a line of many ")" costs one pass, not one copy per ")".
        end = body.rfind(")")
        while end >= 0:
            if end + 1 == len(body) or _EXTRA_START.match(body, end + 1):
                return body[:end], tuple(_EXTRA_WORD.findall(body, end + 1))
            end = body.rfind(")", 0, end)
        raise ProtocolError("AGI reply data has no closing parenthesis", raw)
    if _EXTRA_START.match(rest):
        return None, tuple(_EXTRA_WORD.findall(rest))
    # Free text after the result, e.g. "503 result=-2 Memory allocation failure": kept in .text only.
    return None, ()


def parse_reply_line(line: bytes) -> AgiReply:
    """Parse one complete single-line reply (without its LF), e.g. ``200 result=1 (5551234)``.

    ``HANGUP`` and ``520-`` block lines are not replies: feed those to a ReplyReader. Raises ProtocolError
    on anything that is not ``NNN text``.
    """
    code, text = _code_and_text(line)
    if line[3:4] == b"-":
        raise ProtocolError("AGI reply opens a multi-line block; use ReplyReader", line)
    return _reply(code, text, line)


def _code_and_text(line: bytes) -> tuple[int, str]:
    head = line[:3]
    if len(head) != 3 or not head.isdigit() or line[3:4] not in (b"", b" ", b"-"):
        raise ProtocolError("AGI reply does not start with a 3-digit code", line)
    return int(head), _decode(line[4:], "AGI reply", line)


def _reply(code: int, text: str, raw: bytes, usage: tuple[str, ...] = ()) -> AgiReply:
    if text.startswith("result="):
        result, space, after = text[7:].partition(" ")
        data, extras = _split_data(space + after, raw)
        return AgiReply(code, result, data, extras, text, usage, raw)
    if code == 200:
        # Every 200 that res_agi.c writes carries result=; without it the line is not from Asterisk.
        raise ProtocolError("AGI 200 reply has no result=", raw)
    return AgiReply(code, None, None, (), text, usage, raw)


_RESULT_1_LINE = b"200 result=1"
_RESULT_1 = _reply(200, "result=1", _RESULT_1_LINE)


class ReplyReader:
    """Turns reply lines into replies, one line at a time.

    feed_line() takes one line without its LF and returns a complete AgiReply, HANGUP for a ``HANGUP``
    line, or None while a multi-line ``520-`` usage block is still open (it ends at the line that starts
    with ``520 ``). A ``HANGUP`` is never inside a block: res_agi.c writes both from the channel's own
    thread, between commands, so inside a block every line is usage text.
    """

    __slots__ = ("_block", "_block_code", "_block_end", "_block_size", "_block_text")

    def __init__(self) -> None:
        self._block: list[bytes] | None = None
        self._block_code = 0
        self._block_end = b""
        self._block_size = 0
        self._block_text = ""

    @property
    def in_block(self) -> bool:
        """True while a multi-line usage block is open (its reply is not complete yet)."""
        return self._block is not None

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an open usage block held so far (LFs counted): never more than MAX_USAGE_BYTES."""
        return self._block_size if self._block is not None else 0

    def feed_line(self, line: bytes) -> AgiReply | Hangup | None:
        """Take one line (without LF). Raises ProtocolError, carrying the line, when it is not a reply."""
        if line.endswith(b"\r"):
            line = line[:-1]  # Asterisk sends LF only; tolerate a proxy's CR as in the environment
        block = self._block
        if block is not None:
            size = self._block_size + len(line) + 1
            if line.startswith(self._block_end) or line == self._block_end[:3]:
                block.append(line)
                self._block = None
                self._block_size = 0
                usage = tuple(_decode(u, "AGI usage line", u) for u in block[1:-1])
                return _reply(self._block_code, self._block_text, b"\n".join(block), usage)
            if size > MAX_USAGE_BYTES:
                # Checked before the line is kept: what a block holds never passes MAX_USAGE_BYTES.
                raise OverrunError(f"AGI usage block longer than {MAX_USAGE_BYTES} bytes", line[:120])
            block.append(line)
            self._block_size = size
            return None
        if line == _RESULT_1_LINE:
            return _RESULT_1  # what every SET VARIABLE gets: the common case, parsed once
        if line == _HANGUP_LINE:
            return HANGUP
        code, text = _code_and_text(line)
        if line[3:4] == b"-":
            if len(line) + 1 > MAX_USAGE_BYTES:
                raise OverrunError(f"AGI usage block longer than {MAX_USAGE_BYTES} bytes", line[:120])
            # "520-Invalid command syntax.  Proper usage follows:" then usage lines (raw <literal>
            # markup, transcript 09), then "520 End of proper usage.".
            self._block = [line]
            self._block_code = code
            self._block_end = line[:3] + b" "
            self._block_size = len(line) + 1
            self._block_text = text
            return None
        return _reply(code, text, line)


class ReplyStream:
    """The reply side of a session as a byte stream: feed() each read, take events with next_event().

    This is the reassembly the server runs (AgiSession), kept here so that tests and fuzzers can cut the
    same bytes anywhere. Lines are parsed only when asked for: what Asterisk sends after the last reply a
    batch waits for (its HANGUP) stays as bytes for the next batch. The bytes held never exceed
    `max_bytes`: a caller feeds at most `room` bytes, and only after next_event() returned None, which it
    does only while no complete line is held; an unfinished line that fills all `max_bytes` raises
    OverrunError. A usage block is bounded separately (MAX_USAGE_BYTES, see ReplyReader).
    """

    __slots__ = ("_buffer", "_start", "max_bytes", "replies")

    def __init__(self, max_bytes: int = 16384) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 (got {max_bytes})")
        self.max_bytes = max_bytes
        self.replies = ReplyReader()
        self._buffer = b""
        self._start = 0  # bytes before this offset are parsed already

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet parsed into a reply line."""
        return len(self._buffer) - self._start

    @property
    def room(self) -> int:
        """How many bytes the next feed() may take."""
        return self.max_bytes - len(self._buffer) + self._start

    def feed(self, data: bytes) -> None:
        """Append the bytes of one read. Raises ValueError when `data` is longer than `room` (read at most
        `room` bytes)."""
        if len(data) > self.room:
            raise ValueError(f"fed {len(data)} bytes to a reply stream with room for {self.room}")
        self._buffer = self._buffer[self._start :] + data if self._start else self._buffer + data
        self._start = 0

    def next_event(self) -> AgiReply | Hangup | None:
        """The next reply or HANGUP, or None when more bytes are needed (feed them, up to `room`).

        Raises ProtocolError (carrying the line) for a line that is not a reply, and OverrunError for an
        unfinished line as long as `max_bytes` or a usage block past MAX_USAGE_BYTES; the stream is
        unusable afterwards.
        """
        buffer = self._buffer
        feed = self.replies.feed_line
        while True:
            start = self._start
            end = buffer.find(b"\n", start)
            if end < 0:
                if len(buffer) - start >= self.max_bytes:
                    raise OverrunError(f"AGI reply line longer than {self.max_bytes} bytes",
                                       buffer[start : start + 120])
                return None
            self._start = end + 1
            event = feed(buffer[start:end])
            if event is not None:
                return event


# --------------------------------------------------------------------------------------------------------
# Commands

_UNSAFE = re.compile(r"[\r\n\0]")
_BLANKS = re.compile(r"[ \t]+")
_NEEDS_QUOTES = re.compile(r'[ \t"\\]')


def quote_word(word: str) -> str:
    """One command word as res_agi.c's parse_args() reads it back.

    A word that is empty or holds a space, tab, double quote or backslash is put in double quotes, with
    ``"`` and ``\\`` escaped by a backslash (transcript 09: ``"say \\"hi\\" to Bob's phone, then wait"``
    stored ``say "hi" to Bob's phone, then wait``). CR, LF and NUL are refused: a newline would end the
    command early and let the rest of the word run as a second AGI command.
    """
    if word.isalnum():
        return word  # letters and digits only (statuses, numbers, limits): nothing to check or quote
    if _UNSAFE.search(word):
        raise ValueError(f"AGI command word contains CR, LF or NUL (it would inject a command): {word!r}")
    if word and not _NEEDS_QUOTES.search(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_command(*words: str) -> bytes:
    """One LF-terminated command line, e.g. ``format_command("GET", "VARIABLE", "CALLERID(num)")``.

    Raises ValueError for no words, more than 127 words, a word with CR/LF/NUL, or a line longer than
    2047 bytes (LF included): Asterisk would truncate or split those into other commands.
    """
    if not words:
        raise ValueError("an AGI command needs at least one word")
    if len(words) > MAX_COMMAND_WORDS:
        raise ValueError(f"an AGI command has at most {MAX_COMMAND_WORDS} words (got {len(words)})")
    line = (" ".join([quote_word(w) for w in words]) + "\n").encode("utf-8")
    if len(line) > MAX_COMMAND_BYTES:
        raise ValueError(
            f"AGI command line is {len(line)} bytes; Asterisk reads at most {MAX_COMMAND_BYTES} "
            f"and would run the rest as another command: {line[:60]!r}..."
        )
    return line


def set_variable(name: str, value: str) -> bytes:
    """``SET VARIABLE name value``: Asterisk answers ``200 result=1``. Raises ValueError as format_command."""
    if not name:
        raise ValueError("SET VARIABLE needs a variable name")
    # The answer to every call is a handful of these: skip format_command's generic checks, which
    # cannot fail for four words, and keep only the length limit.
    line = f"SET VARIABLE {quote_word(name)} {quote_word(value)}\n".encode()
    if len(line) > MAX_COMMAND_BYTES:
        return format_command("SET", "VARIABLE", name, value)  # raises with the full explanation
    return line


def get_variable(name: str) -> bytes:
    """``GET VARIABLE name``: ``200 result=1 (value)``, or ``200 result=0`` when the variable is unset."""
    if not name:
        raise ValueError("GET VARIABLE needs a variable name")
    return format_command("GET", "VARIABLE", name)


def split_command(line: str) -> list[str]:
    """Split a command line into words exactly as res_agi.c's parse_args() does (without the LF).

    Spaces and tabs separate words; double quotes group (and may open mid-word); a backslash makes the
    next character literal, inside quotes or not. Used by the simulator and to test quote_word().
    """
    if '"' not in line and "\\" not in line:
        return [word for word in _BLANKS.split(line) if word]  # the common case, without the state machine
    words: list[str] = []
    current: list[str] | None = None  # None: between words
    quoted = escaped = False
    for ch in line:
        if ch == '"' and not escaped:
            quoted = not quoted
            if quoted and current is None:
                current = []  # an opening quote after blanks starts a word, even an empty one
            continue
        if (ch == " " or ch == "\t") and not quoted and not escaped:
            if current is not None:
                words.append("".join(current))
                current = None
            continue
        if ch == "\\" and not escaped:
            escaped = True
            continue
        if current is None:
            current = []
        current.append(ch)
        escaped = False
    if current is not None:
        words.append("".join(current))
    return words
