"""Settings: one frozen tree, from a TOML file with A2BD_ environment overrides, validated up front.

Every key has a default except where a real deployment must decide. Environment variables override the
file: `A2BD_<SECTION>_<KEY>` (for example `A2BD_AGI_PORT=4574`), plus the short forms `A2BD_PG_URL` and
`A2BD_REDIS_URL`. A bad value raises ConfigError naming the key; the CLI prints it on one line and exits 1.
"""

from __future__ import annotations

import dataclasses
import email.utils
import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from a2bd.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/a2bd/a2bd.toml")


@dataclass(frozen=True, slots=True)
class AgiSettings:
    host: str = "127.0.0.1"
    port: int = 4573
    max_connections: int = 2000  # over this, a new connection is closed at once (Asterisk then denies)
    env_timeout_s: float = 2.0  # the whole agi_* block must arrive within this
    command_timeout_s: float = 2.0  # each reply from Asterisk must arrive within this
    max_env_bytes: int = 16384  # a real block is ~600 bytes; anything near this is garbage
    pin_prompt: str = "a2b/enter-pin"  # sound file played by GET DATA when the caller is asked a PIN
    pin_timeout_ms: int = 6000
    pin_max_digits: int = 10
    pin_attempts: int = 3
    # Who else may connect: addresses or networks (CIDR), separated by commas or blanks, e.g.
    # "10.0.0.0/24, 192.0.2.7". 127.0.0.1, ::1 and the [[asterisk]] servers' agi_addresses always may;
    # a connection from anywhere else is closed before a byte of it is read. A SIGHUP applies a change.
    allow: str = ""
    # At max_connections, a connection still without its environment after this long is closed to make
    # room for a new one (Asterisk writes the block as soon as it connects). bench/agi_hostile.py: at 0.5 s
    # a flood kept every slot young enough that 102 of 4,000 honest calls were refused; at 0.1 s, 5.
    # A SIGHUP applies a change.
    shed_after_s: float = 0.1

    @property
    def allow_entries(self) -> tuple[str, ...]:
        """`allow` split into its addresses and networks, as written."""
        return tuple(entry for entry in re.split(r"[\s,]+", self.allow) if entry)

    def validate(self) -> None:
        _check(0 <= self.port <= 65535, "agi.port", "must be 0..65535")
        _check(self.max_connections >= 1, "agi.max_connections", "must be >= 1")
        _check(self.env_timeout_s > 0, "agi.env_timeout_s", "must be > 0")
        _check(self.command_timeout_s > 0, "agi.command_timeout_s", "must be > 0")
        _check(256 <= self.max_env_bytes <= 1 << 20, "agi.max_env_bytes", "must be 256..1048576")
        _check(1 <= self.pin_max_digits <= 32, "agi.pin_max_digits", "must be 1..32")
        _check(0 <= self.pin_attempts <= 10, "agi.pin_attempts", "must be 0..10")
        _check(self.shed_after_s > 0, "agi.shed_after_s", "must be > 0")
        for entry in self.allow_entries:
            try:
                ipaddress.ip_network(entry)
            except ValueError:
                try:
                    network = ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ConfigError(f"agi.allow: {entry!r} is not an IP address or network; give addresses "
                                      "or CIDRs separated by commas, e.g. \"10.0.0.0/24, 192.0.2.7\"") from None
                raise ConfigError(f"agi.allow: {entry!r} has host bits set; write the network, {network}") from None


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    timeout_s: float = 0.5  # a command that takes longer fails the call closed (A2B_STATUS=ERROR)
    max_connections: int = 64  # beyond this a command waits for a free connection (up to timeout_s)

    def validate(self) -> None:
        _check(1 <= self.max_connections <= 10000, "redis.max_connections", "must be 1..10000")
        _check(urlsplit(self.url).scheme in {"redis", "rediss", "unix"}, "redis.url",
               f"must be redis://, rediss:// or unix:// (got {_redact(self.url)!r})")
        _check(self.timeout_s > 0, "redis.timeout_s", "must be > 0")


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    url: str = field(default="postgresql://postgres@127.0.0.1:5432/a2bd", repr=False)
    min_pool: int = 1
    max_pool: int = 10

    def validate(self) -> None:
        _check(urlsplit(self.url).scheme in {"postgres", "postgresql"}, "postgres.url",
               f"must be postgresql:// (got {_redact(self.url)!r})")
        _check(1 <= self.min_pool <= self.max_pool, "postgres.min_pool", "must be 1..max_pool")


@dataclass(frozen=True, slots=True)
class BillingSettings:
    # Credit granted to a post-paid account (credit_limit > 0) when Redis cannot be asked; 0 = fail closed.
    fail_open_limit_ms: int = 0
    # Reservations of calls never settled are dropped after their limit plus this slack.
    reservation_slack_s: int = 300
    # Longest A2B_LIMIT_MS ever given (Asterisk's L() takes ms in a signed 64-bit; operators want a cap).
    max_call_s: int = 4 * 3600
    # Ledger writes are batched: a commit every ledger_batch_ms or every ledger_batch_lines, first reached.
    ledger_batch_ms: int = 5
    ledger_batch_lines: int = 500
    # A call ends with a Hangup and a Cdr in either order; if one of them never comes (cdr_manager off,
    # events lost), the call is closed with what arrived after this many seconds.
    cdr_wait_s: float = 2.0
    # Live reservations are compared with Asterisk's channels (and the CDR table) this often (seconds).
    reconcile_interval_s: float = 120.0
    # A Cdr in the CDR table is rated by the reconciler only once it is this old (the AMI path goes first).
    reconcile_cdr_age_s: int = 60
    # ... and only when it is at most this old (how far back the reconciler looks).
    reconcile_cdr_window_s: int = 2 * 86400
    # The billing scheduler (recurring charges, invoice days, PDFs, e-mails) runs this often; 0 = not in
    # this daemon (run `a2bd billing run` from a timer instead). One daemon at a time runs it.
    scheduler_interval_s: float = 60.0

    def validate(self) -> None:
        _check(self.fail_open_limit_ms >= 0, "billing.fail_open_limit_ms", "must be >= 0")
        _check(self.reservation_slack_s >= 0, "billing.reservation_slack_s", "must be >= 0")
        _check(60 <= self.max_call_s <= 86400 * 7, "billing.max_call_s", "must be 60..604800")
        _check(1 <= self.ledger_batch_ms <= 1000, "billing.ledger_batch_ms", "must be 1..1000")
        _check(1 <= self.ledger_batch_lines <= 10000, "billing.ledger_batch_lines", "must be 1..10000")
        _check(0 < self.cdr_wait_s <= 60, "billing.cdr_wait_s", "must be > 0 and <= 60")
        _check(self.reconcile_interval_s >= 1, "billing.reconcile_interval_s", "must be >= 1")
        _check(self.reconcile_cdr_age_s >= 0, "billing.reconcile_cdr_age_s", "must be >= 0")
        _check(self.reconcile_cdr_window_s > self.reconcile_cdr_age_s, "billing.reconcile_cdr_window_s",
               "must be more than reconcile_cdr_age_s")
        _check(self.scheduler_interval_s == 0 or 1 <= self.scheduler_interval_s <= 3600,
               "billing.scheduler_interval_s", "must be 0 (off) or 1..3600")


@dataclass(frozen=True, slots=True)
class AmiSettings:
    """What every AMI connection shares; the servers themselves are the [[asterisk]] list."""

    request_timeout_s: float = 5.0
    ping_interval_s: float = 10.0  # a Ping is sent this often; no reply within ping_timeout_s = dead link
    ping_timeout_s: float = 5.0
    reconnect_max_s: float = 10.0
    queue_size: int = 10_000  # events waiting for the tracker; when full, reading waits (nothing dropped)

    def validate(self) -> None:
        _check(self.request_timeout_s > 0, "ami.request_timeout_s", "must be > 0")
        _check(self.ping_interval_s > 0, "ami.ping_interval_s", "must be > 0")
        _check(self.ping_timeout_s > 0, "ami.ping_timeout_s", "must be > 0")
        _check(self.reconnect_max_s > 0, "ami.reconnect_max_s", "must be > 0")
        _check(self.queue_size >= 10, "ami.queue_size", "must be >= 10")


@dataclass(frozen=True, slots=True)
class AsteriskServer:
    """One Asterisk a2bd watches over AMI. Its `name` is part of every call's identity (name/uniqueid), so
    it must stay the same for the life of the server's calls."""

    name: str = ""
    host: str = "127.0.0.1"
    port: int = 5038
    username: str = "a2bd"
    secret: str = field(default="", repr=False)
    secret_file: str = ""  # read at start; better than `secret` in a file others may read
    # The addresses its FastAGI connections come from (default: `host`): how a FastAGI session is tied to
    # the server whose AMI events will follow the call.
    agi_addresses: tuple[str, ...] = ()
    # Its CDR table in a2bd's PostgreSQL (cdr_pgsql), e.g. "cdr"; empty when it writes none there.
    cdr_table: str = ""

    def validate(self) -> None:
        key = f"asterisk[{self.name or '?'}]"
        _check(bool(re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name)), f"{key}.name",
               "must be 1..64 letters, digits, '_', '.' or '-'")
        _check(0 < self.port <= 65535, f"{key}.port", "must be 1..65535")
        _check(bool(self.username), f"{key}.username", "must not be empty")
        _check(bool(self.secret) != bool(self.secret_file), f"{key}.secret",
               "give exactly one of secret (or A2BD_AMI_SECRET_<NAME>) and secret_file")
        _check(self.cdr_table == "" or bool(re.fullmatch(r"[a-z_][a-z0-9_]{0,62}(\.[a-z_][a-z0-9_]{0,62})?",
                                                          self.cdr_table)),
               f"{key}.cdr_table", "must be a plain (optionally schema-qualified) lower-case table name")

    @property
    def agi_sources(self) -> tuple[str, ...]:
        return self.agi_addresses or (self.host,)

    def read_secret(self) -> str:
        if self.secret:
            return self.secret
        try:
            return Path(self.secret_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"asterisk[{self.name}].secret_file: cannot read {self.secret_file}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = "info"
    json: bool = False

    def validate(self) -> None:
        _check(self.level in {"debug", "info", "warning", "error"}, "log.level",
               "must be debug, info, warning or error")


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    host: str = "127.0.0.1"
    port: int = 9573  # 0 disables the /metrics endpoint
    # A bearer token that /metrics and /healthz then require (they reveal business figures and failing
    # dependencies; /livez stays open for probes): token_file (read at start), or A2BD_METRICS_TOKEN in the
    # environment, never the command line. Required when `host` is not a loopback address.
    token: str = field(default="", repr=False)
    token_file: str = ""

    def validate(self) -> None:
        _check(0 <= self.port <= 65535, "metrics.port", "must be 0..65535")
        _check(not (self.token and self.token_file), "metrics.token",
               "give at most one of token (or A2BD_METRICS_TOKEN) and token_file")
        if self.token:
            self._check_token(self.token, "metrics.token")
        _check(self.port == 0 or bool(self.token or self.token_file) or self._loopback(), "metrics.token_file",
               f"the metrics endpoint listens on {self.host!r}, reachable from other machines, and would show them "
               "the business figures: give a token (token_file, or A2BD_METRICS_TOKEN) or listen on 127.0.0.1")

    def read_token(self) -> str:
        """The token the endpoint requires ("" for none): `token`, else token_file's content."""
        if not self.token_file:
            return self.token
        try:
            token = Path(self.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"metrics.token_file: cannot read {self.token_file}: {exc}") from exc
        self._check_token(token, f"metrics.token_file ({self.token_file})")
        return token

    def _loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name or "" (every interface): it may well be reachable
            return False

    @staticmethod
    def _check_token(token: str, key: str) -> None:
        # What goes in an HTTP header as a bearer token (RFC 6750 b64token); long enough not to be guessed.
        # The message never repeats the token.
        _check(len(token) >= 16 and re.fullmatch(r"[A-Za-z0-9._~+/-]+=*", token) is not None, key,
               "must be at least 16 characters of A-Z a-z 0-9 - . _ ~ + / (e.g. from `openssl rand -hex 32`)")


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    # The daemon's event loop: "auto" takes uvloop when it is installed (it is a dependency on Linux),
    # which cuts the loop's share of a FastAGI session's CPU; "asyncio" forces the standard one.
    loop: str = "auto"

    def validate(self) -> None:
        _check(self.loop in {"auto", "asyncio", "uvloop"}, "runtime.loop", "must be auto, asyncio or uvloop")


@dataclass(frozen=True, slots=True)
class MailSettings:
    """The SMTP relay that invoices and notices are handed to (a2bd.adapters.mailer)."""

    host: str = "127.0.0.1"
    port: int = 25
    # Login (AUTH) when username is set; then give the password, or password_file (read at start; better
    # than `password` in a file others may read), or A2BD_MAIL_PASSWORD in the environment.
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""
    starttls: bool = False  # True: STARTTLS after connecting, required; False: never (plain SMTP)
    use_tls: bool = False  # implicit TLS from the first byte (SMTPS, usually port 465)
    timeout_s: float = 10.0  # connecting and each reply of the server
    sender: str = "billing@localhost"  # the From: header and the envelope sender
    # A message the server defers (4xx, unreachable) is tried again after retry_base_s * 2**(attempts-1)
    # seconds, at most retry_max_s, and given up after max_attempts attempts.
    max_attempts: int = 8
    retry_base_s: float = 30.0
    retry_max_s: float = 3600.0

    def validate(self) -> None:
        _check(bool(self.host) and not _has_line_break(self.host), "mail.host", "must be a host name or address")
        _check(0 < self.port <= 65535, "mail.port", "must be 1..65535")
        _check(not (self.password and self.password_file), "mail.password",
               "give at most one of password (or A2BD_MAIL_PASSWORD) and password_file")
        _check(bool(self.username) == bool(self.password or self.password_file), "mail.username",
               "username and a password (password, password_file or A2BD_MAIL_PASSWORD) go together")
        _check(not _has_line_break(self.username), "mail.username", "must not hold CR or LF")
        _check(not (self.starttls and self.use_tls), "mail.starttls",
               "starttls and use_tls exclude each other (use_tls is TLS from the start, e.g. port 465)")
        _check(0 < self.timeout_s <= 600, "mail.timeout_s", "must be > 0 and <= 600")
        _check(_is_mail_address(self.sender), "mail.sender",
               f"must be an e-mail address such as billing@example.net or \"Billing <billing@example.net>\" "
               f"(got {self.sender!r})")
        _check(1 <= self.max_attempts <= 100, "mail.max_attempts", "must be 1..100")
        _check(self.retry_base_s > 0, "mail.retry_base_s", "must be > 0")
        _check(self.retry_max_s >= self.retry_base_s, "mail.retry_max_s", "must be >= retry_base_s")

    def read_password(self) -> str:
        """The password to log in with ("" without a username): `password`, else password_file's content."""
        if not self.password_file:
            return self.password
        try:
            return Path(self.password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"mail.password_file: cannot read {self.password_file}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Settings:
    agi: AgiSettings = AgiSettings()
    redis: RedisSettings = RedisSettings()
    postgres: PostgresSettings = PostgresSettings()
    billing: BillingSettings = BillingSettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    ami: AmiSettings = AmiSettings()
    mail: MailSettings = MailSettings()
    asterisk: tuple[AsteriskServer, ...] = ()

    def validate(self) -> Settings:
        for f in dataclasses.fields(self):
            if f.name != "asterisk":
                getattr(self, f.name).validate()
        names = [server.name for server in self.asterisk]
        for server in self.asterisk:
            server.validate()
        _check(len(set(names)) == len(names), "asterisk", "server names must be unique")
        return self

    def server_for_agi_peer(self) -> dict[str, str]:
        """FastAGI peer address -> the name of the Asterisk server it belongs to."""
        return {address: server.name for server in self.asterisk for address in server.agi_sources}


_SHORT_ENV = {"A2BD_PG_URL": ("postgres", "url"), "A2BD_REDIS_URL": ("redis", "url")}


def load_settings(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read `path` (or /etc/a2bd/a2bd.toml when it exists), apply A2BD_ overrides, validate."""
    environ = os.environ if environ is None else environ
    data: dict[str, dict[str, Any]] = {}
    servers: tuple[AsteriskServer, ...] = ()
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            with path.open("rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except OSError as exc:  # a directory, no permission to read it
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        for section, values in raw.items():
            if section == "asterisk":
                servers = _asterisk_servers(values, environ)
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: expected a [{section}] table")
            data[section] = dict(values)

    sections = {f.name: f.type for f in dataclasses.fields(Settings)}
    for key, value in environ.items():
        if key in _SHORT_ENV:
            section, name = _SHORT_ENV[key]
        elif key.startswith("A2BD_AMI_SECRET_"):
            continue  # a server's secret: read with the [[asterisk]] list
        elif key.startswith("A2BD_") and key.count("_") >= 2:
            section, _, name = key[5:].lower().partition("_")
            if section not in sections or section == "asterisk":
                continue  # A2BD_TEST_* and friends belong to the test suite, not to the daemon
        else:
            continue
        data.setdefault(section, {})[name] = value
    if "A2BD_MAIL_PASSWORD" in environ:  # the environment wins over the file, as for A2BD_AMI_SECRET_<NAME>
        data.get("mail", {}).pop("password_file", None)

    built: dict[str, Any] = {}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(sorted(sections))})")
        cls = _section_class(section)
        built[section] = _build(cls, section, values)
    return Settings(**built, asterisk=servers).validate()


def _asterisk_servers(raw: Any, environ: Mapping[str, str]) -> tuple[AsteriskServer, ...]:
    """The [[asterisk]] array of tables. A server's secret may come from A2BD_AMI_SECRET_<NAME> (name in
    upper case, '-' and '.' as '_'), which wins over the file."""
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError("asterisk: expected [[asterisk]] tables (one per Asterisk server)")
    servers = []
    for i, item in enumerate(raw):
        values = dict(item)
        name = str(values.get("name", ""))
        env_key = "A2BD_AMI_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()
        if env_key in environ:
            values["secret"] = environ[env_key]
            values.pop("secret_file", None)
        if "agi_addresses" in values:
            addresses = values.pop("agi_addresses")
            if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
                raise ConfigError(f"asterisk[{name or i}].agi_addresses: expected a list of addresses")
            server = _build(AsteriskServer, f"asterisk[{name or i}]", values)
            servers.append(dataclasses.replace(server, agi_addresses=tuple(addresses)))
        else:
            servers.append(_build(AsteriskServer, f"asterisk[{name or i}]", values))
    return tuple(servers)


def _section_class(section: str) -> type[Any]:
    hints = typing.get_type_hints(Settings)
    cls = hints[section]
    assert isinstance(cls, type)
    return cls


def _build(cls: type[Any], section: str, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"{section}.{name}: unknown key (known: {', '.join(sorted(known))})")
        kwargs[name] = _coerce(f"{section}.{name}", hints[name], value)
    return cls(**kwargs)


def _coerce(key: str, typ: Any, value: Any) -> Any:
    if isinstance(typ, types.UnionType):
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool | float | list | dict):
                raise ValueError(value)
            return int(str(value).strip(), 10)
        if typ is float:
            if isinstance(value, bool | list | dict):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number):  # an infinite timeout would never fail closed
                raise ValueError(value)
            return number
        if typ is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except ValueError as exc:
        if key.endswith((".password", ".secret")):
            shown = "***"
        else:
            shown = _redact(str(value)) if "url" in key else str(value)
        raise ConfigError(f"{key}: expected {typ.__name__}, got {shown!r}") from exc
    raise ConfigError(f"{key}: unsupported type {typ!r}")


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}")


def _has_line_break(text: str) -> bool:
    return "\r" in text or "\n" in text


def _is_mail_address(text: str) -> bool:
    """One `user@domain` or `Display Name <user@domain>`: what can go in a From: header and an envelope."""
    if _has_line_break(text):
        return False
    pairs = email.utils.getaddresses([text])
    return len(pairs) == 1 and bool(re.fullmatch(r"[^@\s<>()\[\],;:\"]+@[A-Za-z0-9.-]+", pairs[0][1]))


def _redact(url: str) -> str:
    """Hide a password in a URL before it is printed."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url
