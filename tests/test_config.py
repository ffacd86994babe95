"""config.json errors name the file and the key."""

from __future__ import annotations

import pytest

from qanot_host import ConfigError
from qanot_host.config import parse_config


@pytest.mark.parametrize("raw, message", [
    ("{", "c.json: not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("[]", "c.json: must hold a JSON object, not an array"),
    ('{"plugins": {}}', "c.json: plugins: Expected `array`, got `object`"),
    ('{"plugins": [{"enabled": true}]}', "c.json: plugins[0]: Object missing required field `name`"),
    ('{"plugins": [{"name": "a", "config": []}]}', "c.json: plugins[0].config: Expected `object`, got `array`"),
    ('{"plugins": [{"name": "../etc"}]}', "c.json: plugins[0].name: '../etc' is not a plugin directory name"),
    ('{"plugins": [{"name": "a"}, {"name": "a"}]}', "c.json: plugins[1].name: plugin 'a' is listed twice"),
    ('{"host": {"call_timout": 1}}', "c.json: host: Object contains unknown field `call_timout`"),
    ('{"host": {"call_timeout": 0}}', "c.json: host.call_timeout: Expected `float` > 0.0"),
    ('{"plugins": [], "host": {"plugins": {"x": {}}}}', "c.json: host.plugins.x: no plugin 'x' in plugins"),
    # the tool at fault named (msgspec's own words said `tool_timeouts[...]`: attack pass 49)
    ('{"plugins": [{"name": "a"}], "host": {"plugins": {"a": {"tool_timeouts": {"slow": 60, "echo": 0}}}}}',
     "c.json: host.plugins.a: tool_timeouts: echo: expected seconds > 0 (and under 1e+12), got 0"),
    ('{"plugins": [{"name": "a"}], "host": {"plugins": {"a": {"tool_timeouts": {"echo": "5"}}}}}',
     'c.json: host.plugins.a: tool_timeouts: echo: expected seconds > 0 (and under 1e+12), got "5"'),
    ('{"plugins": [{"name": "a"}], "host": {"plugins": {"a": {"tool_timeouts": {"echo": 1' + "0" * 400 + '}}}}}',
     "c.json: host.plugins.a: tool_timeouts: echo: expected seconds > 0 (and under 1e+12), got 1" + "0" * 79),
])
def test_config_errors(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "c.json")
    assert str(info.value) == message


def test_qanot_keys_defaults_and_relative_paths(tmp_path):
    path = tmp_path / "config.json"
    config = parse_config('{"model": "ignored", "plugins": [{"name": "a"}], "workspace_dir": "ws"}', str(path))
    assert config.plugins[0].enabled is True and config.plugins[0].config == {}
    assert config.plugins_dir == "/data/plugins"
    assert config.workspace_dir == str(tmp_path / "ws")
    assert config.host.state_dir == str(tmp_path / ".qanot-host")
    assert config.host.call_timeout == 30.0


def test_timeouts_per_tool_then_plugin_then_host(tmp_path):
    config = parse_config('{"plugins": [{"name": "a"}, {"name": "b"}], "host": {"call_timeout": 9, "plugins": '
                          '{"a": {"call_timeout": 5, "tool_timeouts": {"slow": 60}}}}}', str(tmp_path / "c.json"))
    assert config.call_timeout("a", "slow") == 60
    assert config.call_timeout("a", "fast") == 5
    assert config.call_timeout("b", "fast") == 9


def test_qanot_host_uid_base_is_the_default_of_configs_that_set_none(tmp_path, monkeypatch):
    """So that the test suite's configs (and an example's) can run beside another host."""
    from qanot_host.config import parse_config
    from qanot_host.errors import ConfigError
    monkeypatch.setenv("QANOT_HOST_UID_BASE", "1900000000")
    assert parse_config('{"plugins": []}', str(tmp_path / "c.json")).host.sandbox.uid_base == 1_900_000_000
    own = '{"plugins": [], "host": {"sandbox": {"uid_base": 1500000000}}}'
    assert parse_config(own, str(tmp_path / "c.json")).host.sandbox.uid_base == 1_500_000_000
    for wrong in ("lots", "5", "3000000000"):  # the variable named, not config.json
        monkeypatch.setenv("QANOT_HOST_UID_BASE", wrong)
        with pytest.raises(ConfigError, match=f"QANOT_HOST_UID_BASE='{wrong}' in the environment: not a whole"):
            parse_config('{"plugins": []}', str(tmp_path / "c.json"))
    monkeypatch.delenv("QANOT_HOST_UID_BASE")
    assert parse_config('{"plugins": []}', str(tmp_path / "c.json")).host.sandbox.uid_base == 2_000_000_000
