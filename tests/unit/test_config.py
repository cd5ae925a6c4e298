"""Settings: TOML plus A2BD_ overrides, validated before any socket opens; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from a2bd.cli import main
from a2bd.config import Settings, load_settings
from a2bd.errors import ConfigError


def test_defaults_without_file_or_environment() -> None:
    s = load_settings(None, {})
    assert (s.agi.host, s.agi.port) == ("127.0.0.1", 4573)
    assert s == Settings()


def test_file_then_environment_overrides(tmp_path: Path) -> None:
    path = tmp_path / "a2bd.toml"
    path.write_text('[agi]\nport = 5000\nhost = "0.0.0.0"\n[redis]\nurl = "redis://10.0.0.1:6379/2"\n')
    env = {"A2BD_AGI_PORT": "4600", "A2BD_PG_URL": "postgresql://u:secret@db/a2bd",
           "A2BD_BILLING_FAIL_OPEN_LIMIT_MS": "60000", "A2BD_LOG_JSON": "yes", "A2BD_TEST_PG_URL": "ignored"}
    s = load_settings(path, env)
    assert (s.agi.host, s.agi.port) == ("0.0.0.0", 4600)
    assert s.redis.url == "redis://10.0.0.1:6379/2"
    assert s.postgres.url == "postgresql://u:secret@db/a2bd"
    assert s.billing.fail_open_limit_ms == 60000
    assert s.log.json is True


def test_secrets_stay_out_of_repr() -> None:
    s = load_settings(None, {"A2BD_PG_URL": "postgresql://u:hunter2@db/a2bd"})
    assert "hunter2" not in repr(s)


@pytest.mark.parametrize(("env", "message"), [
    ({"A2BD_AGI_PORT": "seventy"}, "agi.port: expected int, got 'seventy'"),
    ({"A2BD_AGI_PORT": "70000"}, "agi.port: must be 0..65535"),
    ({"A2BD_AGI_MAX_CONNECTIONS": "0"}, "agi.max_connections: must be >= 1"),
    ({"A2BD_REDIS_URL": "http://x"}, "redis.url: must be redis://"),
    ({"A2BD_PG_URL": "mysql://u:pw@x/db"}, "postgres.url: must be postgresql:// (got 'mysql://u:***@x/db')"),
    ({"A2BD_LOG_LEVEL": "loud"}, "log.level: must be debug"),
    ({"A2BD_LOG_JSON": "perhaps"}, "log.json: expected bool"),
    ({"A2BD_AGI_NOPE": "1"}, "agi.nope: unknown key"),
    ({"A2BD_BILLING_MAX_CALL_S": "1.5"}, "billing.max_call_s: expected int"),
    ({"A2BD_REDIS_TIMEOUT_S": "inf"}, "redis.timeout_s: expected float, got 'inf'"),
    ({"A2BD_AGI_ENV_TIMEOUT_S": "nan"}, "agi.env_timeout_s: expected float, got 'nan'"),
])
def test_bad_values_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env)
    assert message in str(info.value)
    assert "pw" not in str(info.value)


def test_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", {})
    broken = tmp_path / "broken.toml"
    broken.write_text("[agi\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken, {})
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[nonsense]\nx = 1\n")
    with pytest.raises(ConfigError, match="nonsense: unknown section"):
        load_settings(wrong, {})
    with pytest.raises(ConfigError, match=f"config file {tmp_path} cannot be read: Is a directory"):
        load_settings(tmp_path, {})


@pytest.mark.parametrize(("toml", "message"), [
    ("[redis]\ntimeout_s = [1]\n", "redis.timeout_s: expected float, got '[1]'"),
    ("[agi]\nport = [4573]\n", "agi.port: expected int, got '[4573]'"),
    ("[agi]\nport = {x = 1}\n", "agi.port: expected int"),
    ("[redis]\ntimeout_s = inf\n", "redis.timeout_s: expected float, got 'inf'"),
    ("agi = 1\n", "agi: expected a [agi] table"),
    ("asterisk = 1\n", "expected [[asterisk]] tables"),
    ('[[asterisk]]\nname = "pbx1"\nusername = "a2bd"\nsecret = "s"\nagi_addresses = "10.0.0.1"\n',
     "asterisk[pbx1].agi_addresses: expected a list of addresses"),
    ('[[asterisk]]\nname = "pbx1"\nusername = "a2bd"\nsecret = "s"\nsecret_file = "/run/s"\n',
     "asterisk[pbx1].secret: give exactly one of secret"),
    ('[[asterisk]]\nname = "pbx1"\nusername = "a2bd"\n', "asterisk[pbx1].secret: give exactly one of secret"),
    ('[[asterisk]]\nname = "pbx1"\nusername = "a2bd"\nsecret = "s"\n'
     '[[asterisk]]\nname = "pbx1"\nusername = "a2bd"\nsecret = "t"\n', "asterisk: server names must be unique"),
])
def test_values_of_the_wrong_shape_in_the_file_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "a2bd.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert message in str(info.value)


def test_cli_prints_one_line_and_exits_1_on_bad_settings(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("A2BD_AGI_PORT", "-1")
    assert main(["db", "migrate"]) == 1
    err = capsys.readouterr().err
    assert err == "a2bd: agi.port: must be 0..65535\n"


@pytest.mark.parametrize("argv", [
    ["--config", "/etc/a2bd/x.toml", "serve"],
    ["serve", "--config", "/etc/a2bd/x.toml"],
    ["account", "show", "1234", "--config", "/etc/a2bd/x.toml"],
])
def test_config_option_before_or_after_the_command(argv: list[str]) -> None:
    from a2bd.cli import build_parser

    assert build_parser().parse_args(argv).config == Path("/etc/a2bd/x.toml")


# -- [mail] ----------------------------------------------------------------------------------------------------


def test_mail_defaults_and_overrides(tmp_path: Path) -> None:
    from a2bd.config import MailSettings

    assert load_settings(None, {}).mail == MailSettings()
    path = tmp_path / "a2bd.toml"
    path.write_text('[mail]\nhost = "smtp.example.net"\nport = 587\nstarttls = true\nusername = "a2bd"\n'
                    'password_file = "/etc/a2bd/smtp.secret"\nsender = "Billing <billing@example.net>"\n')
    s = load_settings(path, {"A2BD_MAIL_MAX_ATTEMPTS": "3", "A2BD_MAIL_RETRY_BASE_S": "5"}).mail
    assert (s.host, s.port, s.starttls, s.use_tls) == ("smtp.example.net", 587, True, False)
    assert (s.username, s.password_file, s.sender) == ("a2bd", "/etc/a2bd/smtp.secret", "Billing <billing@example.net>")
    assert (s.max_attempts, s.retry_base_s, s.retry_max_s) == (3, 5.0, 3600.0)


def test_mail_password_from_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a2bd.toml"
    path.write_text('[mail]\nusername = "a2bd"\npassword_file = "/etc/a2bd/smtp.secret"\n')
    s = load_settings(path, {"A2BD_MAIL_PASSWORD": "hunter2"})
    assert (s.mail.password, s.mail.password_file, s.mail.read_password()) == ("hunter2", "", "hunter2")
    assert "hunter2" not in repr(s)


def test_mail_password_file_is_read_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "smtp.secret"
    secret.write_text("hunter2\n")
    s = load_settings(None, {"A2BD_MAIL_USERNAME": "a2bd", "A2BD_MAIL_PASSWORD_FILE": str(secret)})
    assert s.mail.read_password() == "hunter2"
    missing = load_settings(None, {"A2BD_MAIL_USERNAME": "a2bd", "A2BD_MAIL_PASSWORD_FILE": str(tmp_path / "no")})
    with pytest.raises(ConfigError, match=r"mail.password_file: cannot read .*/no"):
        missing.mail.read_password()


@pytest.mark.parametrize("sender", [
    "billing@example.net", "Example Billing <billing@example.net>", '"Billing, Inc." <billing@example.net>',
    "billing@localhost",
])
def test_mail_sender_accepts_an_address(sender: str) -> None:
    assert load_settings(None, {"A2BD_MAIL_SENDER": sender}).mail.sender == sender


@pytest.mark.parametrize(("env", "message"), [
    ({"A2BD_MAIL_HOST": ""}, "mail.host: must be a host name or address"),
    ({"A2BD_MAIL_PORT": "0"}, "mail.port: must be 1..65535"),
    ({"A2BD_MAIL_PORT": "65536"}, "mail.port: must be 1..65535"),
    ({"A2BD_MAIL_PORT": "smtp"}, "mail.port: expected int, got 'smtp'"),
    ({"A2BD_MAIL_USERNAME": "a2bd"}, "mail.username: username and a password"),
    ({"A2BD_MAIL_PASSWORD": "pw"}, "mail.username: username and a password"),
    ({"A2BD_MAIL_PASSWORD_FILE": "/etc/a2bd/smtp.secret"}, "mail.username: username and a password"),
    ({"A2BD_MAIL_STARTTLS": "yes", "A2BD_MAIL_USE_TLS": "yes"}, "mail.starttls: starttls and use_tls exclude"),
    ({"A2BD_MAIL_STARTTLS": "maybe"}, "mail.starttls: expected bool"),
    ({"A2BD_MAIL_TIMEOUT_S": "0"}, "mail.timeout_s: must be > 0"),
    ({"A2BD_MAIL_SENDER": "billing"}, "mail.sender: must be an e-mail address"),
    ({"A2BD_MAIL_SENDER": "a@example.net, b@example.net"}, "mail.sender: must be an e-mail address"),
    ({"A2BD_MAIL_SENDER": "a@example.net\r\nBcc: x@example.org"}, "mail.sender: must be an e-mail address"),
    ({"A2BD_MAIL_SENDER": ""}, "mail.sender: must be an e-mail address"),
    ({"A2BD_MAIL_MAX_ATTEMPTS": "0"}, "mail.max_attempts: must be 1..100"),
    ({"A2BD_MAIL_RETRY_BASE_S": "0"}, "mail.retry_base_s: must be > 0"),
    ({"A2BD_MAIL_RETRY_BASE_S": "-1"}, "mail.retry_base_s: must be > 0"),
    ({"A2BD_MAIL_RETRY_MAX_S": "10"}, "mail.retry_max_s: must be >= retry_base_s"),
    ({"A2BD_MAIL_NOPE": "1"}, "mail.nope: unknown key"),
])
def test_mail_bad_values_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env)
    assert message in str(info.value)


def test_mail_password_given_twice_in_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a2bd.toml"
    path.write_text('[mail]\nusername = "a2bd"\npassword = "hunter2"\npassword_file = "/etc/a2bd/smtp.secret"\n')
    with pytest.raises(ConfigError, match=r"mail\.password: give at most one of password") as info:
        load_settings(path, {})
    assert "hunter2" not in str(info.value)


def test_mail_password_of_the_wrong_type_is_not_shown(tmp_path: Path) -> None:
    path = tmp_path / "a2bd.toml"
    path.write_text('[mail]\nusername = "a2bd"\npassword = 98765432\n')
    with pytest.raises(ConfigError, match=r"mail.password: expected str, got '\*\*\*'") as info:
        load_settings(path, {})
    assert "98765432" not in str(info.value)
