"""Coverage-guided fuzzing of the FastAGI wire protocol (a2bd/agi/protocol.py) with atheris.

The same properties as tests/unit/agi/test_protocol_fuzz.py, for as long as you let it run: whatever the
bytes and however they are cut into reads, the parser gives a value or a ProtocolError (ValueError only
for what the API documents), every accessor of a parsed reply answers, the cuts change nothing, and the
bytes held stay under their bounds (a ReplyStream's max_bytes, MAX_USAGE_BYTES for a usage block). Any
other exception or a failed assert is a finding: atheris stops and writes the input to crash-<sha1>.

Not collected by pytest (not under tests/, not named test_*) nor run by CI. See fuzz/README.md:

    .venv/bin/python fuzz/agi_fuzz.py --seed fuzz/corpus/agi        # once: the recorded sessions as seeds
    .venv/bin/python fuzz/agi_fuzz.py fuzz/corpus/agi -max_total_time=120 -timeout=5 -rss_limit_mb=1024

The first byte of an input picks the target (its value mod 4): 0 the environment block, 1 the reply
stream, 2 one reply line, 3 a command built from words. For the reply stream the next two bytes give the
stream's max_bytes and how often the payload repeats (to reach the 64 KiB usage bound from short inputs),
then a byte per read size up to a 0 byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["a2bd.agi.protocol"]):
    from a2bd.agi.protocol import (
        MAX_COMMAND_BYTES,
        format_command,
        parse_reply_line,
        split_command,
    )
    from a2bd.errors import ProtocolError

    # The hypothesis tests' own helpers: one definition of the properties, run briefly in CI, at length here.
    from tests.unit.agi.test_protocol_fuzz import check_environment, check_reply, read_stream

ENVIRONMENT, STREAM, REPLY_LINE, COMMAND = range(4)


def fuzz_stream(data: bytes) -> None:
    if len(data) < 3:
        return
    max_bytes = 1 + data[0] * 64  # 1..16321
    payload_end = data.find(b"\0", 2)
    cuts = [b for b in data[2:payload_end]] if payload_end > 2 else [4096]
    payload = data[payload_end + 1 :] if payload_end > 0 else data[2:]
    if data[1] >= 0xF0 and payload:  # rarely, so that most runs stay short: repeated up to ~70 KB
        payload *= 1 + (data[1] - 0xEF) * (70_000 // 16 // len(payload))
    events, end = read_stream(payload, cuts, max_bytes)
    assert (events, end) == read_stream(payload, [len(payload) or 1], max_bytes), "the cuts changed the replies"
    for event in events:
        check_reply(event)


def fuzz_reply_line(line: bytes) -> None:
    try:
        reply = parse_reply_line(line)
    except ProtocolError:
        return
    assert reply.raw == line
    check_reply(reply)


def fuzz_command(data: bytes) -> None:
    words = data.decode("utf-8", "surrogateescape").split("\x01")
    try:
        line = format_command(*words)
    except ValueError:
        return
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and len(line) <= MAX_COMMAND_BYTES
    assert split_command(line[:-1].decode()) == words


def test_one_input(data: bytes) -> None:
    if not data:
        return
    target, payload = data[0] % 4, data[1:]
    if target == ENVIRONMENT:
        check_environment(payload)
    elif target == STREAM:
        fuzz_stream(payload)
    elif target == REPLY_LINE:
        fuzz_reply_line(payload)
    else:
        fuzz_command(payload)


def seed(corpus: Path) -> None:
    """Write the recorded FastAGI sessions (tests/fixtures/asterisk/*.agi.txt) as seed inputs."""
    from tests.transcripts import agi_files, load_capture

    corpus.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in agi_files():
        for capture in load_capture(path):
            end = capture.received.index(b"\n\n") + 2
            env, replies = capture.received[:end], capture.received[end:]
            seeds = [bytes([ENVIRONMENT]) + env, bytes([STREAM, 255, 0, 7, 1, 64, 0]) + replies,
                     bytes([COMMAND]) + b"\x01".join(capture.sent.split(b"\n")[0].split(b" "))]
            seeds += [bytes([REPLY_LINE]) + line for line in replies.split(b"\n") if line]
            for i, data in enumerate(seeds):
                (corpus / f"{capture.scenario}-{capture.index}-{i}").write_bytes(data)
                count += 1
    # Replies the recordings lack (playback commands): res_agi.c's formats, from tests/unit/agi.
    for i, line in enumerate((b"200 result=0 endpos=8000", b"200 result=1 (digit) digit=5 endpos=12",
                              b"200 result= (timeout)", b"503 result=-2 Memory allocation failure")):
        (corpus / f"synthetic-{i}").write_bytes(bytes([REPLY_LINE]) + line)
        (corpus / f"synthetic-stream-{i}").write_bytes(bytes([STREAM, 4, 0, 3, 0]) + line + b"\nHANGUP\n")
        count += 2
    print(f"{count} seed inputs written to {corpus}")


# The words of the protocol, handed to libFuzzer as a dictionary (-dict) unless one is given: mutations
# that splice whole tokens reach the parser's corners (an endpos=, a 520- block) far sooner than bytes do.
TOKENS = (
    b"agi_network_script: ", b"agi_uniqueid: ", b"agi_arg_1: ", b"agi_", b": ", b"\n\n", b"\r\n",
    b"200 result=", b"200 result=1", b" (", b")", b" endpos=", b" digit=", b"=", b"-", b"520-", b"520 ",
    b"510 ", b"511 ", b"HANGUP\n", b"\xc2\xb2", b"\xef\xbc\x91", b"\xff", b"\x00", b"\x01", b'"', b"\\",
)


def dictionary_file() -> str:
    import atexit
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="agi-", suffix=".dict")
    with os.fdopen(fd, "w") as fh:
        for token in TOKENS:
            fh.write('"' + "".join(f"\\x{b:02x}" for b in token) + '"\n')
    atexit.register(os.unlink, path)
    return path


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--seed":
        seed(Path(sys.argv[2]))
        return
    argv = list(sys.argv)
    if not any(arg.startswith("-dict=") for arg in argv):
        argv.append(f"-dict={dictionary_file()}")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
