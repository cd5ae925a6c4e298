"""The [agi] settings that guard the FastAGI port: who may connect (agi.allow) and when to shed (shed_after_s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from a2bd.config import AgiSettings, load_settings
from a2bd.errors import ConfigError


def test_defaults_allow_loopback_only() -> None:
    agi = load_settings(None, {}).agi
    assert agi.allow == "" and agi.allow_entries == ()
    assert agi.shed_after_s == 0.1


def test_allow_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "a2bd.toml"
    path.write_text('[agi]\nallow = "10.0.0.0/24, 192.0.2.7"\nshed_after_s = 0.2\n')
    agi = load_settings(path, {}).agi
    assert agi.allow_entries == ("10.0.0.0/24", "192.0.2.7")
    assert agi.shed_after_s == 0.2
    agi = load_settings(path, {"A2BD_AGI_ALLOW": " 2001:db8::/32,\t198.51.100.1 ,,fe80::1%eth0 "}).agi
    assert agi.allow_entries == ("2001:db8::/32", "198.51.100.1", "fe80::1%eth0")


@pytest.mark.parametrize(("env", "message"), [
    ({"A2BD_AGI_ALLOW": "pbx1.example.net"},
     "agi.allow: 'pbx1.example.net' is not an IP address or network; give addresses or CIDRs"),
    ({"A2BD_AGI_ALLOW": "10.0.0.0/24;10.0.1.0/24"}, "agi.allow: '10.0.0.0/24;10.0.1.0/24' is not an IP"),
    ({"A2BD_AGI_ALLOW": "10.0.0.1, 300.1.1.1"}, "agi.allow: '300.1.1.1' is not an IP address"),
    ({"A2BD_AGI_ALLOW": "10.0.0.0/33"}, "agi.allow: '10.0.0.0/33' is not an IP address"),
    ({"A2BD_AGI_ALLOW": "10.0.0.1/24"}, "agi.allow: '10.0.0.1/24' has host bits set; write the network, 10.0.0.0/24"),
    ({"A2BD_AGI_SHED_AFTER_S": "0"}, "agi.shed_after_s: must be > 0"),
    ({"A2BD_AGI_SHED_AFTER_S": "soon"}, "agi.shed_after_s: expected float"),
])
def test_bad_agi_guard_settings_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env)
    assert message in str(info.value)


def test_allow_is_a_string_in_the_file(tmp_path: Path) -> None:
    # The loader takes scalars only in sections (lists are for [[asterisk]] agi_addresses): one string.
    path = tmp_path / "a2bd.toml"
    path.write_text('[agi]\nallow = ["10.0.0.0/24"]\n')
    with pytest.raises(ConfigError, match=r"agi\.allow: expected str"):
        load_settings(path, {})


def test_validate_checks_a_settings_object_built_in_code() -> None:
    with pytest.raises(ConfigError, match="has host bits set"):
        AgiSettings(allow="127.0.0.1/8").validate()
    AgiSettings(allow="127.0.0.0/8 ::1").validate()
