"""The AMI (Asterisk Manager Interface) wire protocol, sans-I/O: bytes in, messages out; actions to bytes.

No asyncio and no sockets here (a2bd.ami.client owns those), so tests feed recorded bytes straight in.
Every rule was checked against the Asterisk 22.10.1 transcripts in tests/fixtures/asterisk/*.ami*.txt;
comments say which quirk each rule is for.

The stream, as Asterisk writes it:

1. On connect, one banner line ``Asterisk Call Manager/11.0.0\\r\\n`` with no blank line after it.
2. Then messages: ``Key: value\\r\\n`` lines ended by an empty line (``\\r\\n\\r\\n``). A message with an
   ``Event:`` header is an event; one with ``Response:`` (and the ``ActionID`` we sent) answers an action.
   ``OriginateResponse`` events carry both, so ``Event:`` is looked at first.
3. Empty values keep the separator: ``AccountCode: \\r\\n`` (trailing space), also on a message's last line
   (``NewAccountCode`` ends with ``OldAccountCode: ``).

Volume: one answered call is about 50 events with ``Events: call,cdr`` and 103 with all events, at
thousands of calls per second, so the parser splits with bytes methods and decodes each message once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, NoReturn, overload

from a2bd.errors import AmiValueError, ProtocolError

__all__ = [
    "BANNER_PREFIX",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "RAW_LINE_KEY",
    "AmiMessage",
    "AmiParser",
    "AmiValueError",
    "format_action",
    "parse_message",
]

# What every Asterisk since 1.0 writes first; the version after the slash is the protocol's, not Asterisk's
# (Asterisk 22 says 11.0.0).
BANNER_PREFIX: Final = "Asterisk Call Manager/"
# The biggest message in the transcripts is 923 bytes (a LocalBridge). A CoreShowChannels reply is one event
# per channel, never one message. So 1 MiB without a terminator is a broken or hostile peer, not data.
DEFAULT_MAX_MESSAGE_BYTES: Final = 1 << 20
# A line that is not "Key: value" (raw output of a legacy ``Response: Follows`` Command reply, or any
# garbage) is kept as a header with this empty key and the whole line as its value. Nothing is lost and
# no real header can collide with it (Asterisk never sends an empty key).
RAW_LINE_KEY: Final = ""

_TERMINATOR: Final = b"\r\n\r\n"
_EOL: Final = b"\r\n"


@dataclass(frozen=True, slots=True)
class AmiMessage:
    """One AMI message: its headers in the order received, duplicates kept.

    Lookups (`get`, ``[]``, ``in``) use the exact key and the first occurrence: Asterisk's own keys have a
    stable case (``Uniqueid`` in channel events but ``UniqueID`` in Cdr, both as sent); every value of a
    repeated key (``ChanVariable``) is in `headers` and `get_all`. Empty values are ``""``. `received_at` is
    when the client read the bytes (its clock, seconds; 0.0 when not set): AMI events carry no time of
    their own (``timestampevents = no``), so this is the only time an event has. It is not part of
    equality.
    """

    headers: tuple[tuple[str, str], ...]
    received_at: float = field(default=0.0, compare=False)
    # First occurrence of each key, built once: the tracker asks several keys of every event.
    _index: dict[str, str] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", _first_index(self.headers))

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]] | Mapping[str, str], received_at: float = 0.0) -> AmiMessage:
        """A message from (key, value) pairs or a mapping, e.g. to script a fake server in tests."""
        items = pairs.items() if isinstance(pairs, Mapping) else pairs
        return cls(tuple((str(k), str(v)) for k, v in items), received_at)

    @overload
    def get(self, key: str) -> str | None: ...

    @overload
    def get(self, key: str, default: str) -> str: ...

    @overload
    def get(self, key: str, default: None) -> str | None: ...

    def get(self, key: str, default: str | None = None) -> str | None:
        """The first value of `key` (exact case), or `default`."""
        return self._index.get(key, default)

    def get_all(self, key: str) -> list[str]:
        """Every value of `key` in order (``ChanVariable`` and the like repeat)."""
        return [v for k, v in self.headers if k == key]

    def __getitem__(self, key: str) -> str:
        return self._index[key]

    def __contains__(self, key: object) -> bool:
        return key in self._index

    @property
    def event(self) -> str | None:
        """The ``Event`` name (``Newchannel``, ``Cdr``, ...), None for a response."""
        return self._index.get("Event")

    @property
    def response(self) -> str | None:
        """The ``Response`` value (``Success``, ``Error``, ``Goodbye``, ``Follows``), None when absent.

        Note that an ``OriginateResponse`` event has one too (``Success``/``Failure``): use `is_event`.
        """
        return self._index.get("Response")

    @property
    def action_id(self) -> str | None:
        """The ``ActionID`` echoed from the action; list events (``CoreShowChannel``) carry it too."""
        return self._index.get("ActionID")

    @property
    def is_event(self) -> bool:
        """True for an event. ``Event:`` decides first: OriginateResponse carries ``Response:`` as well."""
        return "Event" in self._index

    @property
    def is_response(self) -> bool:
        """True for the reply to an action: a ``Response:`` header and no ``Event:`` header."""
        index = self._index
        return "Response" in index and "Event" not in index

    def as_dict(self) -> dict[str, str]:
        """Headers as a dict, first occurrence of each key winning (same as `get`)."""
        return dict(self._index)


def _first_index(headers: tuple[tuple[str, str], ...]) -> dict[str, str]:
    index: dict[str, str] = {}
    for key, value in headers:
        index.setdefault(key, value)
    return index


def _message(headers: tuple[tuple[str, str], ...], index: dict[str, str], received_at: float) -> AmiMessage:
    # The parser has the index already: skip __init__/__post_init__ (a third of the cost per event).
    message = object.__new__(AmiMessage)
    object.__setattr__(message, "headers", headers)
    object.__setattr__(message, "received_at", received_at)
    object.__setattr__(message, "_index", index)
    return message


def parse_message(block: bytes, received_at: float = 0.0) -> AmiMessage | None:
    """Parse one message (its bytes without the ``\\r\\n\\r\\n`` terminator); None when it has no line.

    UTF-8 with replacement: a Latin-1 caller name from a trunk becomes U+FFFD instead of killing the
    connection. ``Key: `` gives ``""`` wherever it is (the panoramisk bug lost it on the last line);
    ``Key:`` alone gives ``""`` too; any other line without ``": "`` is kept under RAW_LINE_KEY.
    """
    lines = block.decode("utf-8", "replace").split("\r\n")  # one decode per message
    # The hot loop of the tracker, as list comprehensions (about 10% faster than the loop in _parse_lines,
    # measured on the transcripts). Every real message takes this path: all lines "Key: value", no key twice.
    parts = [line.partition(": ") for line in lines]
    headers = tuple([(key, value) for key, sep, value in parts if sep])
    if len(headers) != len(parts):
        return _parse_lines(lines, received_at)  # a line without ": ", or an empty one
    index = dict(headers)
    if len(index) != len(headers):  # a repeated key (ChanVariable): the first one wins
        index = _first_index(headers)
    return _message(headers, index, received_at)


def _parse_lines(lines: list[str], received_at: float) -> AmiMessage | None:
    headers: list[tuple[str, str]] = []
    for line in lines:
        key, sep, value = line.partition(": ")
        if not sep:
            if not line:
                continue  # a stray CRLF between messages, not a header
            if line[-1] == ":":
                key, value = line[:-1], ""
            else:
                key, value = RAW_LINE_KEY, line
        headers.append((key, value))
    if not headers:
        return None
    frozen = tuple(headers)
    return _message(frozen, _first_index(frozen), received_at)


class AmiParser:
    """Incremental parser for the byte stream from Asterisk: ``feed()`` whatever a read returned.

    Bytes are buffered until a message's terminator arrives and only complete messages are decoded, so a
    UTF-8 character split across TCP reads stays intact. With `expect_banner` (the default, for a client
    socket) the first line must be the banner ``Asterisk Call Manager/...``, exposed as `banner`; pass
    False to parse a stream without one (what a client sends, for a fake server).

    A message that grows past `max_message_bytes` without its terminator raises ProtocolError, as does a
    first line that is not the banner; the connection must then be dropped: the parser lets go of what it
    held and refuses every later feed the same way. Between feeds it never holds more than
    `max_message_bytes` (tests/unit/ami/test_fuzz.py).
    """

    __slots__ = ("_buffer", "_events", "_expect_banner", "_max", "_refused", "_scan_from", "banner", "skipped")

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, expect_banner: bool = True,
                 events: frozenset[str] | None = None) -> None:
        self.banner: str | None = None
        # Only these events are decoded (None: all). Asterisk sends some 30 events per call, of which the
        # tracker reads four: the others are recognised by their first line and dropped undecoded, unless
        # they answer one of our actions (an ActionID: CoreShowChannel and its kin).
        self._events = None if events is None else frozenset(name.encode() for name in events)  # compared as bytes
        self.skipped = 0
        self._max = max_message_bytes
        self._expect_banner = expect_banner
        self._buffer = bytearray()  # an incomplete message (or banner line)
        self._scan_from = 0  # where in _buffer the terminator search resumes
        self._refused: tuple[str, bytes] | None = None  # why the stream was refused, raised by every feed

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the end of a message."""
        return len(self._buffer)

    def feed(self, data: bytes, received_at: float = 0.0) -> list[AmiMessage]:
        """Add bytes read from the socket; return the messages they complete, in order.

        `received_at` stamps each returned message (see AmiMessage). Raises ProtocolError on a missing
        banner, or once more than `max_message_bytes` are buffered without a terminator (when the bytes
        that overflow follow complete messages in the same feed, those are returned first and the next
        feed raises).
        """
        if self._refused is not None:  # refused already, or an oversized tail left by the last feed
            raise ProtocolError(*self._refused)
        buffer = self._buffer
        if buffer or self._expect_banner:
            buffer += data
            if self._expect_banner:
                if not self._take_banner():
                    return []
                if not buffer:
                    return []
            # Search only the new bytes (plus 3 for a terminator split across reads): a big message fed in
            # small pieces must not be rescanned from its start each time.
            if buffer.find(_TERMINATOR, max(self._scan_from - 3, 0)) < 0:
                self._scan_from = len(buffer)
                self._check_size()
                return []
            data = bytes(buffer)
            buffer.clear()
        elif _TERMINATOR not in data:
            buffer += data
            self._scan_from = len(buffer)
            self._check_size()
            return []
        blocks = data.split(_TERMINATOR)
        rest = blocks.pop()
        # An oversized tail is reported by the next feed(): raising now would lose the complete messages
        # before it. Its bytes are not kept meanwhile (a read can be larger than the limit).
        if len(rest) > self._max:
            self._refused = (self._too_long(), bytes(rest[:120]))
            rest = b""
        buffer += rest
        self._scan_from = len(rest)
        messages: list[AmiMessage] = []
        events = self._events
        for block in blocks:
            if events is not None and block.startswith(b"Event: "):
                end = block.find(b"\r\n")
                name = block[7:] if end < 0 else block[7:end]
                if name not in events and b"\r\nActionID: " not in block:
                    self.skipped += 1
                    continue
            message = parse_message(block, received_at)
            if message is not None:
                messages.append(message)
        return messages

    def _take_banner(self) -> bool:
        buffer = self._buffer
        end = buffer.find(_EOL)
        if end < 0:
            self._check_size()
            return False
        line = bytes(buffer[:end]).decode("utf-8", "replace")
        if not line.startswith(BANNER_PREFIX):
            self._refuse(f"not an AMI server: the first line is not '{BANNER_PREFIX}...' (wrong port?)",
                         bytes(buffer[:end]))
        self.banner = line
        self._expect_banner = False
        del buffer[: end + len(_EOL)]
        self._scan_from = 0
        return True

    def _check_size(self) -> None:
        if len(self._buffer) > self._max:
            self._refuse(self._too_long(), bytes(self._buffer[:120]))

    def _too_long(self) -> str:
        return f"AMI message longer than {self._max} bytes without its end (\\r\\n\\r\\n)"

    def _refuse(self, why: str, raw: bytes) -> NoReturn:
        self._refused = (why, raw)
        self._buffer.clear()
        raise ProtocolError(why, raw)


def _check_field(what: str, key: str, value: str) -> None:
    if not key or ":" in key or "\r" in key or "\n" in key:
        raise AmiValueError(f"AMI {what}: field name {key!r} is empty or holds ':', CR or LF; nothing was sent")
    if "\r" in value or "\n" in value:
        # A CR/LF would end the header line and let the rest be read as more headers, or (with a blank
        # line) a second action: a caller ID "x\r\n\r\nAction: Originate" must never reach Asterisk.
        raise AmiValueError(f"AMI {what}: the value of {key!r} holds a CR or LF; nothing was sent")


def format_action(
    action: str, action_id: str, fields: Mapping[str, str] | Iterable[tuple[str, str]] = ()
) -> bytes:
    """The bytes of one action: ``Action:``, ``ActionID:``, then `fields` in order, then a blank line.

    `fields` is a mapping or (key, value) pairs (pairs allow repeated keys such as ``Variable``). Values
    are sent as given (UTF-8). Any CR or LF in a key or value, or a key that is empty or holds ':', raises
    AmiValueError naming the field, before anything is built: this is the injection guard.
    """
    if not action:
        raise AmiValueError("AMI action: the action name is empty; nothing was sent")
    _check_field("action", "Action", action)
    _check_field(action, "ActionID", action_id)
    lines = [f"Action: {action}", f"ActionID: {action_id}"]
    items = fields.items() if isinstance(fields, Mapping) else fields
    for key, value in items:
        _check_field(action, key, value)
        lines.append(f"{key}: {value}")
    lines.append("\r\n")
    try:
        return "\r\n".join(lines).encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: text that did not come from valid UTF-8
        raise AmiValueError(f"AMI {action}: a field is not valid Unicode ({exc.reason}); nothing was sent") from exc
