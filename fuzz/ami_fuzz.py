"""Coverage-guided fuzzing of the AMI wire protocol (a2bd/ami/protocol.py: AmiParser.feed, parse_message) with
atheris.

The same properties as tests/unit/ami/test_fuzz.py, for as long as you let it run: whatever the bytes and however
they are cut into reads, feed() returns messages or raises ProtocolError; between reads the parser holds at
most its limit; once it has refused a stream it refuses every later read; the limit and the cuts only cut the
stream short (the messages are a prefix of those of the whole stream parsed at once without a limit), and
change nothing when every message fits the limit; the event filter drops only events it was not asked for
that answer no action; every accessor of a message answers. Any other exception or a failed assert is a
finding: atheris stops and writes the input to crash-<sha1>.

Not collected by pytest (not under tests/, not named test_*) nor run by CI. See fuzz/README.md:

    .venv/bin/python fuzz/ami_fuzz.py --seed fuzz/corpus/ami        # once: the recorded connections as seeds
    .venv/bin/python fuzz/ami_fuzz.py fuzz/corpus/ami -max_total_time=120 -timeout=5 -rss_limit_mb=1024

An input is: one byte of settings (bits 0-2: the limit, LIMITS[n % 5]; bit 3: expect the banner; bit 4: filter
the events), then one byte per read size up to a 0 byte (none: one read), then the bytes of the stream.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["a2bd.ami.protocol"]):
    from a2bd.ami.protocol import DEFAULT_MAX_MESSAGE_BYTES, AmiMessage

    # The hypothesis tests' own helpers: one definition of the properties, run briefly in CI, at length here.
    from tests.unit.ami.test_fuzz import check, check_filter, reference

LIMITS = (8, 64, 300, 1000, DEFAULT_MAX_MESSAGE_BYTES)  # recorded messages are up to 923 bytes
BANNER, FILTER = 0x08, 0x10


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """`data` in pieces of `sizes` (cycled): the reads the parser gets."""
    chunks, position = [], 0
    for size in itertools.cycle(sizes):
        if position >= len(data):
            return chunks
        chunks.append(data[position : position + size])
        position += size
    raise AssertionError("unreachable")


def check_message(message: AmiMessage) -> None:
    assert message.headers
    for key, value in message.headers:
        assert isinstance(key, str) and isinstance(value, str)
        assert message.get(key) is not None and key in message and value in message.get_all(key)
    assert message.is_event != (message.event is None)
    assert not (message.is_event and message.is_response)
    message.as_dict()  # it must not raise
    _ = message.action_id


def test_one_input(data: bytes) -> None:
    if not data:
        return
    options, data = data[0], data[1:]
    end = data.find(b"\0")
    sizes = [b for b in data[:end]] if end > 0 else []
    stream = data[end + 1 :] if end >= 0 else data
    sizes = sizes or [len(stream) or 1]
    limit, banner = LIMITS[(options & 0x07) % len(LIMITS)], bool(options & BANNER)

    chunks = cut(stream, sizes)
    check(stream, chunks, limit, banner)
    for message in reference(stream, banner=banner).messages:
        check_message(message)
    if options & FILTER:
        check_filter(stream, chunks, banner=banner)


def seed(corpus: Path) -> None:
    """Write the recorded AMI connections (tests/fixtures/asterisk/*.ami*.txt) as seed inputs: each whole, as
    Asterisk's own reads, and in small reads, with the banner expected, under each limit."""
    from tests.transcripts import ami_files, load_capture

    corpus.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in ami_files():
        for capture in load_capture(path):
            reads = [min(len(chunk), 255) for _, chunk in capture.recv_chunks() if chunk][:200]
            for n, cuts in enumerate(([], reads, [1, 7, 64, 200])):
                options = BANNER | FILTER | (n + 2)  # limits 300, 1000, 1 MiB
                data = bytes([options, *cuts, 0]) + capture.received
                (corpus / f"{capture.path.name.partition('.')[0]}-{capture.index}-{n}").write_bytes(data)
                count += 1
    print(f"{count} seed inputs written to {corpus}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--seed":
        seed(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
