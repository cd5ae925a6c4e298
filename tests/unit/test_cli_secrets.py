"""Secrets come from files or the environment, never from the command line (ps, /proc and shell history show
arguments to anyone on the machine): no option or argument of any `a2bd` command may be named like a secret,
unless it names a file that holds one (`--pin-file`)."""

from __future__ import annotations

import argparse
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from a2bd.cli import _pin, build_parser
from a2bd.errors import InputError

SECRET_WORDS = frozenset({"secret", "secrets", "password", "passwd", "passphrase", "pwd", "token", "pin", "key",
                          "apikey", "credential", "credentials"})


def arguments(parser: argparse.ArgumentParser, command: str = "a2bd") -> Iterator[tuple[str, str]]:
    """(command, name) of every option string and positional argument of `parser` and its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from arguments(sub, f"{command} {name}")
        elif action.option_strings:
            for option in action.option_strings:
                yield command, option
            yield command, action.dest  # the name the code reads it by
        else:
            yield command, action.dest


def suggests_a_secret(name: str) -> bool:
    """A word of the name is a secret's, and the name is not that of a file holding it."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    return bool(words) and words[-1] != "file" and any(w in SECRET_WORDS for w in words)


@pytest.mark.parametrize(("name", "secret"), [
    ("--password", True), ("--db-password", True), ("--token", True), ("--api-key", True), ("--pin", True),
    ("--secret", True), ("--AMI_SECRET", True), ("passphrase", True), ("--auth-token", True),
    ("--pin-file", False), ("--password_file", False), ("pin_file", False), ("--secret-file", False),
    ("--spin", False), ("--keyword", False), ("--monkey", False), ("--number", False), ("--pinned", False),
    ("--file-password", True),  # a file named after it is not enough: it must be a path option
])
def test_the_rule(name: str, secret: bool) -> None:
    assert suggests_a_secret(name) is secret


def test_the_walk_reaches_every_subcommand_and_finds_an_offender() -> None:
    parser = argparse.ArgumentParser(prog="x")
    deep = parser.add_subparsers().add_parser("db").add_subparsers().add_parser("connect")
    deep.add_argument("--password")
    deep.add_argument("--host")
    found = [(c, n) for c, n in arguments(parser, "x") if suggests_a_secret(n)]
    assert found == [("x db connect", "--password"), ("x db connect", "password")]


def test_the_walk_sees_the_whole_a2bd_command() -> None:
    seen = set(arguments(build_parser()))
    commands = {command for command, _ in seen}
    assert {"a2bd serve", "a2bd db migrate", "a2bd account add", "a2bd invoice close", "a2bd billing run",
            "a2bd storm"} <= commands
    assert ("a2bd account add", "--pin-file") in seen
    assert ("a2bd invoice pdf", "invoice") in seen  # positionals too
    assert len(commands) > 25


def test_no_a2bd_option_takes_a_secret() -> None:
    offenders = sorted({f"{command} {name}" for command, name in arguments(build_parser())
                        if suggests_a_secret(name)})
    assert offenders == [], "secrets come from a *_file option or the environment, never an argument"


def test_the_pin_comes_from_a_file_or_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["account", "add", "--tariff", "retail", "--pin-file", "-"])
    assert args.pin_file == Path("-")
    monkeypatch.setattr("sys.stdin", io.StringIO("424242\n"))
    assert _pin(args.pin_file) == "424242"
    pin = tmp_path / "pin"
    pin.write_text(" 8080\n")
    assert _pin(pin) == "8080"


@pytest.mark.parametrize("content", ["12", "12ab", "1" * 33, "٤٤٤٤"])  # the last: Arabic-Indic digits
def test_a_bad_pin_is_refused_without_repeating_it(tmp_path: Path, content: str) -> None:
    pin = tmp_path / "pin"
    pin.write_text(content)
    with pytest.raises(InputError, match="4 to 32 digits") as raised:
        _pin(pin)
    assert content not in str(raised.value)


def test_a_pin_given_as_the_path_is_not_repeated(tmp_path: Path) -> None:
    # argparse takes `--pin 4242` for `--pin-file 4242` (an abbreviation): the error must not print it back
    with pytest.raises(InputError, match="cannot read") as raised:
        _pin(tmp_path / "4242")
    assert "4242" not in str(raised.value)
