"""Every way a plugin can be broken: a clear error naming it, and the other plugins keep working."""

from __future__ import annotations

import json
import shutil

import pytest

from qanot_host import Host, PluginState

from .conftest import FIXTURE_PLUGINS, GREETER, plugin, worker_processes

BROKEN = [
    ("missing_plugin", "not found: no "),
    ("syntax_error", "syntax error in "),
    ("import_error", "RuntimeError: import-time failure of the import_error fixture"),
    ("setup_fails", "setup() failed: ConnectionError: database at db.invalid refused the connection"),
    ("bad_tools_dict", "get_tools() failed: get_tools() returned dict, expected a list of ToolDef"),
    ("bad_tools_items", "get_tools() failed: get_tools()[0] is str, expected ToolDef"),
    ("no_class", "defines no Plugin subclass"),
    ("needs_newer", "min_qanot_version: needs Qanot plugin API 99.0.0, this host implements 2.0.4"),
    ("orphan_dep", "plugin_deps: 'not_configured' is not an enabled plugin in config.json"),
]


@pytest.mark.parametrize("name, expected", BROKEN, ids=[b[0] for b in BROKEN])
async def test_broken_plugin_is_reported_and_others_run(write_config, name, expected):
    async with Host(write_config([plugin(name), GREETER])) as host:
        broken = host.plugins[name]
        assert broken.state == PluginState.FAILED
        assert expected in broken.error
        assert broken.worker is None or broken.worker.exited.done()
        assert host.plugins["greeter"].state == PluginState.READY
        assert await host.registry.execute("greet", {"name": "ok"}) == "Salom, ok!"


async def test_a_failed_plugin_leaves_no_process(write_config):
    before = {c.pid for c in worker_processes()}
    async with Host(write_config([plugin("setup_fails"), plugin("import_error")])) as host:
        assert all(r.state == PluginState.FAILED for r in host.plugins.values())
        assert {c.pid for c in worker_processes()} == before


async def test_a_broken_plugin_json_refuses_the_plugin_with_its_reason(write_config, tmp_path):
    """Falling back to the default manifest would start it without its dependencies, to fail later
    with a ModuleNotFoundError whose real cause nobody sees."""
    extra = tmp_path / "extra"
    (extra / "string_deps").mkdir(parents=True)
    (extra / "string_deps" / "plugin.py").write_text("from qanot.plugins.base import Plugin\n"
                                                     "class QanotPlugin(Plugin):\n    pass\n")
    (extra / "string_deps" / "plugin.json").write_text('{"dependencies": "sympy"}')
    for source in ("broken_manifest", "greeter"):
        shutil.copytree(FIXTURE_PLUGINS / source, extra / source)
    config = write_config([plugin("broken_manifest"), plugin("string_deps"), GREETER], plugins_dir=str(extra))
    async with Host(config) as host:
        broken = host.plugins["broken_manifest"]
        assert broken.state == PluginState.FAILED
        assert "broken_manifest/plugin.json: not valid JSON" in broken.error
        assert "string_deps/plugin.json: dependencies: expected a list of requirements, got text" in \
            host.plugins["string_deps"].error
        assert host.plugins["greeter"].state == PluginState.READY
        assert "broken_manifest_ping" not in host.registry.tool_names


async def test_plugin_deps_start_order_and_failed_dependency(write_config):
    async with Host(write_config([plugin("dependent"), GREETER])) as host:
        assert host.plugins["dependent"].state == PluginState.READY
        assert host.plugins["greeter"].worker.started_at <= host.plugins["dependent"].worker.started_at
    # greeter without its required_config fails (strict), so dependent must not start
    async with Host(write_config([plugin("dependent"), plugin("greeter")],
                                 host={"strict_required_config": True})) as host:
        assert host.plugins["greeter"].state == PluginState.FAILED
        assert host.plugins["dependent"].error == "plugin_deps: 'greeter' failed to start"
    async with Host(write_config([plugin("dependent"), plugin("greeter", enabled=False)])) as host:
        assert "plugin_deps: 'greeter' is not an enabled plugin" in host.plugins["dependent"].error


async def test_tool_name_conflict_first_listed_plugin_wins(write_config, caplog):
    for order in (["conflict_a", "conflict_b"], ["conflict_b", "conflict_a"]):
        async with Host(write_config([plugin(n) for n in order])) as host:
            assert await host.registry.execute("shared_tool", {}) == f"answered by {order[0]}"
            assert host.plugins[order[1]].conflicts == ["shared_tool"]
            assert host.plugins[order[1]].state == PluginState.READY
    assert any("tool shared_tool is not registered: plugin conflict_b has it" in r.getMessage()
               for r in caplog.records)


async def test_disabled_plugins_do_not_start(write_config):
    async with Host(write_config([plugin("greeter", enabled=False), plugin("init_style")])) as host:
        assert list(host.plugins) == ["init_style"]


async def test_calls_to_a_failed_plugin_say_why(write_config):
    async with Host(write_config([plugin("setup_fails")])) as host:
        assert json.loads(await host.registry.execute("anything", {})) == {"error": "Unknown tool: anything"}


async def test_each_bad_tool_is_left_out_alone_and_the_others_are_served(write_config, caplog):
    """Attack pass 47: one ToolDef whose parameters were a list (or had no name) failed the whole
    plugin, none of its good tools registered."""
    async with Host(write_config([plugin("some_bad_tools"), GREETER])) as host:
        assert host.plugins["some_bad_tools"].state == PluginState.READY
        assert await host.registry.execute("sbt_good", {}) == "good"
        assert sorted(t for t in host.registry.tool_names if t.startswith("sbt_")) == ["sbt_good", "sbt_odd_description"]
        assert host.registry.get("sbt_odd_description").description == "half a pair: ?"
        assert await host.registry.execute("greet", {"name": "ok"}) == "Salom, ok!"
    for expected in ("get_tools()[1] is str, expected ToolDef", "get_tools()[2] has no name",
                     "get_tools()[3] ('sbt_list_schema'): parameters must be a dict, not list",
                     "get_tools()[4] ('sbt_not_callable'): handler is not callable",
                     "tool 'sbt_set_in_schema': its parameters cannot be sent to the host",
                     "get_tools()[6] ('sbt_surrogate_\\udcff'): its name cannot be sent (a lone surrogate in it)",
                     "get_tools()[7]: its name is int, not text"):
        assert f"{expected}" in caplog.text and "left out, the others are served" in caplog.text, expected


async def test_a_plugin_none_of_whose_tools_can_be_sent_fails_clearly(write_config, tmp_path):
    """Review: every tool left out at the last step (its schema cannot be encoded) made a ready
    plugin with no tools, where a list with nothing usable fails the plugin."""
    extra = tmp_path / "extra"
    (extra / "unsendable").mkdir(parents=True)
    (extra / "unsendable" / "plugin.py").write_text(
        "from qanot.plugins.base import Plugin, ToolDef\n"
        "async def run(params):\n    return 'x'\n"
        "class QanotPlugin(Plugin):\n"
        "    def get_tools(self):\n"
        "        return [ToolDef(name='unsendable_run', description='x', parameters={'default': object()}, "
        "handler=run)]\n")
    shutil.copytree(FIXTURE_PLUGINS / "greeter", extra / "greeter")
    async with Host(write_config([plugin("unsendable"), GREETER], plugins_dir=str(extra))) as host:
        assert host.plugins["unsendable"].state == PluginState.FAILED
        assert "no tool of get_tools() can be sent to the host" in host.plugins["unsendable"].error
        assert host.plugins["greeter"].state == PluginState.READY
