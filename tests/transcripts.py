"""Load the Asterisk capture files in tests/fixtures/asterisk/ (format: that folder's README.md).

Every line of a capture is an annotation (``### ``), a line the recorder sent (``>>> ``, prefix added), or
bytes exactly as Asterisk sent them. Dropping the ``### `` and ``>>> `` lines gives back the received
stream; the ``>>> `` lines without their prefix give back the sent stream. Both are checked against the
length and sha256 in the capture's header. An AGI file may hold several sessions, each opened by a
``### ===== AGI session k of n`` line; AMI files hold one connection each. The same loader serves both.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

FIXTURES = Path(__file__).parent / "fixtures" / "asterisk"

SegmentKind = Literal["recv", "sent", "note"]

_STREAM = re.compile(rb"^### (received|sent) stream: (\d+) bytes, sha256 ([0-9a-f]{64})\n$")
_TIMED = re.compile(rb"^### t=\+(\d+\.\d+) (?!is )(.*)\n$")  # "t=+0.000 is <wall clock>" is header


class CaptureError(ValueError):
    """A capture file that does not match its own header (length or sha256)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """One piece of a capture's timeline, in file order.

    ``recv``: bytes from Asterisk read at `t_s` (one ``### t=... recv`` annotation: about one TCP read);
    ``sent``: one block the recorder wrote at `t_s`; ``note``: a recorder annotation (`data` is its text
    in UTF-8, e.g. ``client half-closed its side ...`` or ``EOF (Asterisk closed the connection)``).
    `t_s` is seconds since the scenario started, None when the annotation carried no time.
    """

    kind: SegmentKind
    t_s: float | None
    data: bytes


@dataclass(frozen=True, slots=True)
class Capture:
    """One recorded connection: what Asterisk sent (`received`), what the recorder sent (`sent`), and
    the timeline (`segments`). `header` holds the file's annotations before the timeline (scenario,
    description, this capture's ``=====`` line and stream checksums), without the ``### `` prefix."""

    path: Path
    index: int  # 1-based position in its file
    header: tuple[str, ...]
    received: bytes
    sent: bytes
    segments: tuple[Segment, ...] = field(repr=False)

    @property
    def scenario(self) -> str:
        """The scenario id and name, e.g. ``09-agi-misc-commands``."""
        for line in self.header:
            if line.startswith("scenario "):
                return line[len("scenario ") :].partition(":")[0]
        return self.path.name.partition(".")[0]

    def recv_chunks(self) -> list[tuple[float | None, bytes]]:
        """The received stream as (time, bytes) pieces, one per ``recv`` annotation, in order."""
        return [(s.t_s, s.data) for s in self.segments if s.kind == "recv"]

    def sent_lines(self) -> list[bytes]:
        """Each protocol line the recorder sent, with its line ending (LF for AGI, CRLF for AMI)."""
        return _split_lf(self.sent)

    def notes(self) -> list[tuple[float | None, str]]:
        """The recorder's timed notes (half-close, EOF, ...) as (time, text)."""
        return [(s.t_s, s.data.decode()) for s in self.segments if s.kind == "note"]


class _Builder:
    def __init__(self, header: list[str]) -> None:
        self.header = header
        self.expect: dict[str, tuple[int, str]] = {}
        self.segments: list[tuple[SegmentKind, float | None, bytearray]] = []
        self.timeline_started = False

    def add(self, kind: SegmentKind, t_s: float | None, data: bytes = b"") -> None:
        self.segments.append((kind, t_s, bytearray(data)))

    def append(self, kind: SegmentKind, data: bytes) -> None:
        if not self.segments or self.segments[-1][0] != kind:
            self.add(kind, None)
        self.segments[-1][2].extend(data)

    def build(self, path: Path, index: int, file_header: list[str]) -> Capture:
        segments = tuple(Segment(kind, t, bytes(data)) for kind, t, data in self.segments)
        received = b"".join(s.data for s in segments if s.kind == "recv")
        sent = b"".join(s.data for s in segments if s.kind == "sent")
        for name, stream in (("received", received), ("sent", sent)):
            if name not in self.expect:
                raise CaptureError(f"{path.name} capture {index}: no '{name} stream' header line")
            length, digest = self.expect[name]
            if len(stream) != length or hashlib.sha256(stream).hexdigest() != digest:
                raise CaptureError(
                    f"{path.name} capture {index}: {name} stream is {len(stream)} bytes, sha256 "
                    f"{hashlib.sha256(stream).hexdigest()}; the header says {length} bytes, sha256 {digest}"
                )
        return Capture(path, index, (*file_header, *self.header), received, sent, segments)


def load_capture(path: Path | str) -> list[Capture]:
    """Every connection recorded in `path`, each checked against its header's lengths and sha256.

    Raises CaptureError when a stream does not match its header.
    """
    path = Path(path)
    captures: list[Capture] = []
    file_header: list[str] = []  # scenario and description lines, shared by every capture of the file
    in_file_header = True
    current = _Builder([])
    for line in _split_lf(path.read_bytes()):
        if line.startswith(b"### "):
            text = line[4:].rstrip(b"\n").decode("utf-8")
            stream = _STREAM.match(line)
            timed = _TIMED.match(line)
            new_session = text.startswith("===== ")
            if new_session or stream or timed:
                in_file_header = False
            repeated = stream is not None and stream.group(1).decode() in current.expect
            if (new_session or stream) and (current.timeline_started or repeated):
                captures.append(current.build(path, len(captures) + 1, file_header))
                current = _Builder([])
            if stream:
                current.expect[stream.group(1).decode()] = (int(stream.group(2)), stream.group(3).decode())
                current.header.append(text)
            elif timed:
                current.timeline_started = True
                t_s = float(timed.group(1))
                what = timed.group(2).decode("utf-8")
                if what == "recv":
                    current.add("recv", t_s)
                elif what == "sent" or what.startswith("sent ("):
                    current.add("sent", t_s)
                else:
                    current.add("note", t_s, what.encode("utf-8"))
            elif current.timeline_started:
                current.add("note", None, text.encode("utf-8"))
            elif in_file_header:
                file_header.append(text)
            else:
                current.header.append(text)
        elif line.startswith(b">>> "):
            current.append("sent", line[4:])
        else:
            current.append("recv", line)
    captures.append(current.build(path, len(captures) + 1, file_header))
    return captures


def _split_lf(data: bytes) -> list[bytes]:
    """Split on LF only, keeping it (a CR belongs to the AMI protocol data)."""
    lines = data.split(b"\n")
    out = [line + b"\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1])
    return out


def agi_files() -> list[Path]:
    """Every FastAGI capture in the fixtures, sorted by name."""
    return sorted(FIXTURES.glob("*.agi.txt"))


def ami_files() -> list[Path]:
    """Every AMI capture in the fixtures (including the ``Events: call,cdr`` one), sorted by name."""
    return sorted(FIXTURES.glob("*.ami*.txt"))
