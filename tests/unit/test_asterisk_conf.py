"""The shipped Asterisk configs (asterisk_conf/) and service files (systemd/) against the contract.

asterisklint checks extensions.conf only (`asterisklint dialplan-check FILE`): it has no checker for
pjsip.conf, manager.conf or the cdr files. Those are read here as plain `key = value` files and checked
for what a2bd depends on.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import pytest

from a2bd.cli import build_parser
from a2bd.config import AsteriskServer, Settings, load_settings
from a2bd.contract import DIALPLAN_VARIABLES, VAR_ROUTE_PREFIX

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "asterisk_conf"
EXTENSIONS = CONF / "extensions.conf"
UNIT = ROOT / "systemd" / "a2bd.service"
TOML_EXAMPLE = ROOT / "systemd" / "a2bd.toml.example"

# asterisklint messages tolerated in extensions.conf, code -> why it is harmless. Empty: the file lints
# clean, so any message at all fails the test.
ALLOWED_LINT: dict[str, str] = {}

# The AMI actions a2bd sends, and the write classes that allow each (any one of them is enough;
# main/manager.c registers Hangup as system|call, CoreShowChannels as system|reporting, Originate as
# originate). The events it reads: classes call and cdr ("Events: call,cdr" at login).
AMI_ACTION_CLASSES = {
    "Hangup": {"system", "call"},
    "CoreShowChannels": {"system", "reporting"},
    "Originate": {"originate"},
}
AMI_READ_CLASSES = {"call", "cdr"}
AMI_FORBIDDEN_WRITE = {"all", "system", "command", "config"}  # more than a2bd needs


# --- helpers ---------------------------------------------------------------------------------------


class LintMessage(NamedTuple):
    line: int
    code: str
    text: str


_LINT_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+) (?P<code>[EWH]_[A-Z0-9_]+): (?P<text>.*)$")


def _asterisklint() -> str:
    beside = Path(sys.executable).parent / "asterisklint"
    found = str(beside) if beside.exists() else shutil.which("asterisklint")
    if found is None:
        pytest.fail("asterisklint is not installed (it is in the [test] extra)")
    return found


def lint(path: Path) -> tuple[int, list[LintMessage]]:
    """Run `asterisklint dialplan-check`; it prints `FILE:LINE CODE: text` on stderr, exit 1 if any."""
    env = {k: v for k, v in os.environ.items() if k != "ALINT_IGNORE"}  # a user's mute list must not apply
    proc = subprocess.run(
        [_asterisklint(), "dialplan-check", "--func-odbc=", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    messages = []
    for raw in (proc.stdout + proc.stderr).splitlines():
        if not raw.strip():
            continue
        m = _LINT_LINE.match(raw)
        # Anything else (a traceback, a new output format) must not pass for "no messages".
        assert m is not None, f"unexpected asterisklint output: {raw!r}\n{proc.stderr}"
        messages.append(LintMessage(int(m["line"]), m["code"], m["text"]))
    return proc.returncode, messages


def strip_comments(text: str) -> str:
    """Asterisk config comments: `;--` .. `--;` blocks, and `;` to the end of the line unless `\\;`."""
    text = re.sub(r";--.*?--;", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        m = re.search(r"(?<!\\);", line)
        lines.append(line[: m.start()] if m else line)
    return "\n".join(lines)


def parse_conf(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every `key = value` or `key => value` line, in file order."""
    entries = []
    section = ""
    for line in strip_comments(text).splitlines():
        line = line.strip()
        if not line:
            continue
        header = re.fullmatch(r"\[([^\]]+)\](?:\(.*\))?", line)
        if header:
            section = header[1]
            continue
        m = re.fullmatch(r"([^=]+?)\s*=>?\s*(.*)", line)
        assert m is not None, f"not a key = value line: {line!r}"
        entries.append((section, m[1], m[2]))
    return entries


def section(entries: list[tuple[str, str, str]], name: str) -> dict[str, str]:
    values = {k: v for s, k, v in entries if s == name}
    assert values, f"no [{name}] section"
    return values


def pjsip_objects(text: str) -> dict[tuple[str, str], dict[str, list[str]]]:
    """pjsip.conf objects keyed (type, name): one name may be an endpoint and an aor."""
    objects: dict[tuple[str, str], dict[str, list[str]]] = {}
    for block in re.split(r"(?m)^(?=\[)", strip_comments(text)):
        entries = parse_conf(block)
        if not entries:
            continue
        values: dict[str, list[str]] = {}
        for _, k, v in entries:
            values.setdefault(k, []).append(v)
        objects[(values["type"][0], entries[0][0])] = values
    return objects


def contexts(code: str) -> dict[str, list[str]]:
    """Dialplan contexts -> the application parts of their `exten =>` / `same =>` lines."""
    result: dict[str, list[str]] = {}
    for s, k, v in parse_conf(code):
        if k in {"exten", "same"}:
            app = v.split(",", 2)[-1] if k == "exten" else v.split(",", 1)[-1]
            result.setdefault(s, []).append(app)
    return result


_A2B_READ = re.compile(r"\$\{(A2B_[A-Z0-9_]*)(\$\{)?")


def a2b_reads(code: str) -> set[str]:
    """A2B_* variables read as ${NAME}; ${A2B_ROUTE_${i}} counts as the family A2B_ROUTE_n."""
    return {name + "n" if nested else name for name, nested in _A2B_READ.findall(code)}


def a2b_other_uses(code: str) -> list[str]:
    """A2B_* names that appear other than as a ${...} read: assignments, mostly."""
    return re.findall(r"\bA2B_[A-Z0-9_]*", _A2B_READ.sub("", code))


@pytest.fixture(scope="module")
def dialplan_text() -> str:
    return EXTENSIONS.read_text()


@pytest.fixture(scope="module")
def dialplan(dialplan_text: str) -> str:
    return strip_comments(dialplan_text)


# --- (a) asterisklint -------------------------------------------------------------------------------


def test_extensions_conf_lints_clean() -> None:
    rc, messages = lint(EXTENSIONS)
    unexpected = [m for m in messages if m.code not in ALLOWED_LINT]
    assert unexpected == []
    assert rc == (1 if messages else 0)


# Each mutation is a real mistake in the real file; asterisklint must report it with the given code,
# and the code must not be one of the tolerated ones. This is what keeps the test above from passing
# because the linter silently checks nothing.
@pytest.mark.parametrize(
    ("old", "new", "code"),
    [
        (" same => n,Dial(", " same => n,Dail(", "E_APP_MISSING"),  # misspelt application
        ("Goto(a2b-connect,", "Goto(a2b-conect,", "E_DP_GOTO_NOCONTEXT"),  # Goto to no context
        ("?refused)", "?refusd)", "W_DP_GOTO_CONTEXT_NOEXTEN"),  # GotoIf to a missing label
        (":60000))", ":60000)", "W_APP_BALANCE"),  # unbalanced parentheses in Dial's options
        ("${ISNULL(", "${ISNUL(", "E_FUNC_MISSING"),  # unknown dialplan function
        ("Set(ROUTE_I=1)", "Set(ROUTE_I = 1)", "W_ASSIGN_SPACES"),  # variable name with a space
    ],
)
def test_asterisklint_reports_a_broken_dialplan(
    tmp_path: Path, dialplan_text: str, old: str, new: str, code: str
) -> None:
    assert old in dialplan_text, f"mutation no longer applies: {old!r}"
    broken = tmp_path / "extensions.conf"
    broken.write_text(dialplan_text.replace(old, new, 1))
    rc, messages = lint(broken)
    assert rc == 1
    assert code in {m.code for m in messages if m.code not in ALLOWED_LINT}, messages


# --- (b) the contract variables, both ways ----------------------------------------------------------


def test_variable_scanner_reads_the_forms_the_dialplan_uses() -> None:
    code = strip_comments(
        "exten => _X.,1,Dial(${A2B_ROUTE_${ROUTE_I}},60,L(${A2B_LIMIT_MS})) ; ${A2B_IN_A_COMMENT}\n"
        " same => n,GotoIf($[${IF(${ISNULL(${A2B_ROUTES})}?1:0)}]?x)\n"
        " same => n,Set(A2B_STATUS=OK)\n"
        " same => n,Set(A2BD_URL=agi://h/authorize)\n"
    )
    assert a2b_reads(code) == {VAR_ROUTE_PREFIX + "n", "A2B_LIMIT_MS", "A2B_ROUTES"}
    assert a2b_other_uses(code) == ["A2B_STATUS"]


def test_dialplan_reads_nothing_a2bd_does_not_set(dialplan: str) -> None:
    assert a2b_reads(dialplan) - DIALPLAN_VARIABLES == set()


def test_dialplan_reads_everything_a2bd_sets(dialplan: str) -> None:
    assert DIALPLAN_VARIABLES - a2b_reads(dialplan) == set()


def test_dialplan_never_assigns_a2b_variables(dialplan: str) -> None:
    assert a2b_other_uses(dialplan) == []


# --- (c) AGI, accountcode, Dial ---------------------------------------------------------------------


def test_every_agi_goes_to_a2bd_authorize_with_the_number(dialplan: str) -> None:
    globals_ = section(parse_conf(dialplan), "globals")
    calls = [(ctx, app) for ctx, apps in contexts(dialplan).items() for app in apps if app.startswith("AGI(")]
    assert {ctx for ctx, _ in calls} == {"a2b-outbound", "a2b-callingcard-dial"}
    for ctx, app in calls:
        m = re.fullmatch(r"AGI\(([^,]+),(.*)\)", app)
        assert m is not None, app
        url = re.sub(r"\$\{(\w+)\}", lambda v: globals_[v[1]], m[1])
        parts = urlsplit(url)
        assert parts.scheme in {"agi", "hagi"}, url
        assert parts.hostname, url
        assert parts.path == "/authorize", url
        assert m[2] == "${EXTEN}", f"{ctx}: the number to dial is the AGI's argument"
        apps = contexts(dialplan)[ctx]
        assert "Set(AGISIGHUP=no)" in apps[: apps.index(app)], f"{ctx}: AGISIGHUP=no before the AGI"


def test_no_cdr_accountcode_anywhere(dialplan_text: str) -> None:
    # The CDR function form is deprecated (a WARNING per call, transcript 00a); a2bd uses CHANNEL().
    assert not re.search(r"CDR\(\s*accountcode\s*\)", dialplan_text, re.I)


def test_dialplan_leaves_the_accountcode_to_a2bd(dialplan: str) -> None:
    assert not re.search(r"CHANNEL\(\s*accountcode\s*\)", dialplan, re.I)


def test_every_dial_has_the_a2bd_duration_limit(dialplan: str) -> None:
    dials = [app for apps in contexts(dialplan).values() for app in apps if app.startswith("Dial(")]
    assert dials
    for app in dials:
        assert "L(${A2B_LIMIT_MS}" in app, app
        assert app.startswith("Dial(${A2B_ROUTE_${"), app


def test_failover_only_when_the_carrier_could_not_take_the_call(dialplan: str) -> None:
    retry = [
        app
        for apps in contexts(dialplan).values()
        for app in apps
        if app.startswith("GotoIf(") and "DIALSTATUS" in app
    ]
    assert len(retry) == 1, retry
    assert set(re.findall(r'"\$\{DIALSTATUS\}" = "(\w+)"', retry[0])) == {"CHANUNAVAIL", "CONGESTION"}


def test_refusal_hangs_up_with_a2bd_cause_or_21(dialplan: str) -> None:
    apps = contexts(dialplan)["a2b-connect"]
    assert 'Hangup(${IF($["${A2B_HANGUPCAUSE}" = ""]?21:${A2B_HANGUPCAUSE})})' in apps
    # an unreachable a2bd (AGISTATUS=FAILURE) is a refusal even if an old A2B_STATUS=OK lingers
    assert any('"${AGISTATUS}" != "SUCCESS"' in app and '"${A2B_STATUS}" != "OK"' in app for app in apps)


# --- manager.conf, cdr files, pjsip.conf -------------------------------------------------------------


def _classes(value: str) -> set[str]:
    return {c.strip().lower() for c in value.split(",") if c.strip()}


def test_manager_conf_grants_what_a2bd_needs_and_no_more() -> None:
    entries = parse_conf((CONF / "manager.conf").read_text())
    general = section(entries, "general")
    assert general["enabled"] == "yes"
    assert general["timestampevents"] == "no"  # the transcripts a2bd's parser is tested on
    user = section(entries, "a2bd")
    assert user["secret"]
    read, write = _classes(user["read"]), _classes(user["write"])
    assert read >= AMI_READ_CLASSES
    for action, classes in AMI_ACTION_CLASSES.items():
        assert write & classes, f"write = {user['write']} does not allow {action}"
    assert write & AMI_FORBIDDEN_WRITE == set()
    acl = [(k, v) for s, k, v in entries if s == "a2bd" and k in {"deny", "permit"}]
    assert acl[0] == ("deny", "0.0.0.0/0.0.0.0")
    assert ("permit", "127.0.0.1/255.255.255.255") in acl


def test_manager_conf_sends_a2bd_exactly_the_events_its_tracker_reads() -> None:
    # Filtering out an event the tracker reads would lose calls; sending more only costs both sides.
    from a2bd.services.tracker import TRACKED_EVENTS
    from a2bd.sim.ami import manager_event_names

    assert manager_event_names((CONF / "manager.conf").read_text(), "a2bd") == TRACKED_EVENTS


def test_cdr_conf_as_recorded() -> None:
    general = section(parse_conf((CONF / "cdr.conf").read_text()), "general")
    assert general["enable"] == "yes"
    assert general["unanswered"] == "yes"
    assert general["batch"] == "no"


def test_cdr_manager_sends_linkedid() -> None:
    entries = parse_conf((CONF / "cdr_manager.conf").read_text())
    assert section(entries, "general")["enabled"] == "yes"
    assert section(entries, "mappings") == {"linkedid": "LinkedID"}


def test_pjsip_contexts_exist_and_carriers_cannot_dial_out(dialplan: str) -> None:
    objects = pjsip_objects((CONF / "pjsip.conf").read_text())
    known = set(contexts(dialplan))
    endpoints = {name: obj for (kind, name), obj in objects.items() if kind == "endpoint"}
    customers = {n: o for n, o in endpoints.items() if "auth" in o}
    carriers = {n: o for n, o in endpoints.items() if "auth" not in o}
    assert customers and carriers
    for name, obj in customers.items():
        assert obj["context"] == ["a2b-outbound"], name
        assert obj["accountcode"][0].isdigit(), name
        assert ("auth", obj["auth"][0]) in objects and ("aor", obj["aors"][0]) in objects
    for name, obj in carriers.items():
        assert obj["context"][0] in known and obj["context"][0] != "a2b-outbound", name
        assert "accountcode" not in obj, f"{name}: a carrier's calls must not be billed to an account"
        assert any(k == "identify" and o["endpoint"] == [name] for (k, _), o in objects.items()), name
        assert objects[("aor", obj["aors"][0])]["contact"], name
    assert "carrier-a" in carriers
    for obj in endpoints.values():
        assert obj["direct_media"] == ["no"], "L() plays its warning in the media path"


# --- systemd ----------------------------------------------------------------------------------------


def _unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_unit_command_line_is_accepted_by_the_cli() -> None:
    unit = _unit()
    argv = shlex.split(unit["ExecStart"][0])
    assert argv[0] == "/opt/a2bd/.venv/bin/a2bd"
    args = build_parser().parse_args(argv[1:])
    assert args.command.__name__ == "cmd_serve"
    assert args.config == Path("/etc/a2bd/a2bd.toml")
    assert unit["Type"] == ["notify"]  # READY=1 and the watchdog come from the daemon (a2bd/systemd.py)
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["User"] == ["a2bd"]
    assert unit["LimitNOFILE"] == ["65536"]
    assert unit["TimeoutStopSec"] == ["30"]


def test_toml_example_loads_and_documents_every_key_with_its_default(tmp_path: Path) -> None:
    load_settings(TOML_EXAMPLE, environ={})  # the file as shipped
    text = TOML_EXAMPLE.read_text()
    commented = re.compile(r"^#([a-z_]+ = .*)$")
    # "#key = value" lines are the documented defaults; uncommented they must load and equal the defaults.
    shown_lines = [
        m[1] if (m := commented.match(line)) else line
        for line in text.splitlines()
        if line.startswith("[") or commented.match(line)
    ]
    shown = tomllib.loads("\n".join(shown_lines))
    everything = tmp_path / "all.toml"
    everything.write_text(
        "\n".join(m[1] if (m := commented.match(line)) else line for line in text.splitlines())
    )
    load_settings(everything, environ={})
    documented = tomllib.loads(everything.read_text())
    defaults = Settings()
    for sec in dataclasses.fields(Settings):
        if sec.name == "asterisk":  # a list of servers, shown by one complete example
            servers = documented["asterisk"]
            assert {f.name for f in dataclasses.fields(AsteriskServer)} - set(servers[0]) == {"secret"}
            continue
        for key in dataclasses.fields(getattr(defaults, sec.name)):
            assert key.name in documented.get(sec.name, {}), f"[{sec.name}] {key.name} is not in the example"
            if key.name in shown.get(sec.name, {}):
                default = getattr(getattr(defaults, sec.name), key.name)
                assert shown[sec.name][key.name] == default, f"[{sec.name}] {key.name}: default {default!r}"
