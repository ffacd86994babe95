"""The host's whole path with real worker processes: config.json in, tool results out."""

from __future__ import annotations

import asyncio
import json
import os

import psutil
import pytest

from qanot_host import Host, PluginState, ToolRegistry

from .conftest import GREETER, gone, grant_write, plugin, wait_until


async def test_plugin_tools_are_registered_and_called(write_config):
    async with Host(write_config([GREETER])) as host:
        assert host.plugins["greeter"].state == PluginState.READY
        assert {"greet", "greet_sync", "greeter_config"} <= set(host.registry.tool_names)
        assert await host.registry.execute("greet", {"name": "Aziz", "times": 2}) == "Salom, Aziz! Salom, Aziz!"
        assert await host.registry.execute("greet_sync", {"name": "Bek"}) == "Salom, Bek!"


async def test_one_worker_process_per_plugin(write_config):
    async with Host(write_config([GREETER, plugin("init_style")])) as host:
        pids = {name: r.worker.pid for name, r in host.plugins.items()}
        assert len(set(pids.values())) == 2
        me = psutil.Process()
        children = {c.pid for c in me.children(recursive=True)}
        assert set(pids.values()) <= children
        assert os.getpid() not in pids.values()


async def test_setup_receives_config_plus_workspace_dir(write_config, tmp_path):
    async with Host(write_config([GREETER])) as host:
        config = json.loads(await host.registry.execute("greeter_config", {}))
    assert config == {"greeting_style": "warm", "workspace_dir": str(tmp_path / "workspace")}


async def test_get_definitions_match_the_tool_decorator(write_config):
    async with Host(write_config([GREETER])) as host:
        definitions = {d["name"]: d for d in host.registry.get_definitions()}
    assert definitions["greet"] == {  # Qanot's definition format: the schema is input_schema
        "name": "greet", "description": "Greet someone.",
        "input_schema": {"type": "object", "required": ["name"],
                         "properties": {"name": {"type": "string"}, "times": {"type": "integer"}}}}
    # @tool without parameters gets the document's default
    assert definitions["greeter_config"]["input_schema"] == {"type": "object", "properties": {}}


async def test_init_py_plugin_and_any_plugin_subclass(write_config):
    async with Host(write_config([plugin("init_style")])) as host:
        assert await host.registry.execute("init_style_ping", {}) == "pong"


async def test_manual_registration_beside_plugin_tools(write_config):
    registry = ToolRegistry()

    async def local(params: dict) -> str:
        return json.dumps({"ok": True, "got": params})

    registry.register(name="my_tool", description="in the host", parameters={"type": "object", "properties": {}},
                      handler=local)
    async with Host(write_config([GREETER]), registry=registry) as host:
        assert host.registry is registry
        assert json.loads(await registry.execute("my_tool", {"a": 1})) == {"ok": True, "got": {"a": 1}}
        assert await registry.execute("greet", {"name": "X"}) == "Salom, X!"
        assert "my_tool" in registry.tool_names and "greet" in registry.tool_names


async def test_handler_exception_runs_on_error_and_returns_json_error(write_config):
    async with Host(write_config([GREETER])) as host:
        result = json.loads(await host.registry.execute("greeter_fail", {}))
        assert result == {"error": "plugin greeter: tool greeter_fail failed: ValueError: the greeter "
                                   "cannot greet today"}
        seen = json.loads(await host.registry.execute("greeter_errors", {}))
        assert seen == [["greeter_fail", "ValueError: the greeter cannot greet today"]]
        # the plugin keeps working
        assert await host.registry.execute("greet", {"name": "A"}) == "Salom, A!"


async def test_non_string_result_is_a_clear_error(write_config):
    async with Host(write_config([GREETER])) as host:
        result = json.loads(await host.registry.execute("greeter_number", {}))
    assert result == {"error": "plugin greeter: tool greeter_number failed: returned int, expected str"}


async def test_params_are_validated_in_the_host(write_config):
    async with Host(write_config([GREETER])) as host:
        missing = json.loads(await host.registry.execute("greet", {}))
        wrong = json.loads(await host.registry.execute("greet", {"name": "A", "times": True}))
        unknown = json.loads(await host.registry.execute("no_such_tool", {}))
        assert host.plugins["greeter"].calls == 0  # nothing crossed to the worker
    assert missing == {"error": "Invalid parameters: Missing required parameter: name"}  # Qanot's words
    assert wrong == {"error": "Invalid parameters: Parameter 'times' expected integer, got bool"}
    assert unknown == {"error": "Unknown tool: no_such_tool"}


async def test_many_calls_in_flight_and_a_slow_one_blocks_none(write_config):
    async with Host(write_config([GREETER])) as host:
        slow = asyncio.ensure_future(host.registry.execute("greeter_sleep", {"seconds": 5}))
        sup = host.plugins["greeter"]
        await wait_until(lambda: sup.in_flight == 1, 5, "the slow call in flight")
        fast = await asyncio.wait_for(
            asyncio.gather(*(host.registry.execute("greet", {"name": str(i)}) for i in range(200))), 4)
        assert fast == [f"Salom, {i}!" for i in range(200)]
        assert not slow.done()
        slow.cancel()


async def test_call_timeout_cancels_in_the_worker(write_config):
    config = write_config([GREETER], host={"plugins": {"greeter": {"tool_timeouts": {"greeter_sleep": 0.2}}}})
    async with Host(config) as host:
        result = await asyncio.wait_for(host.registry.execute("greeter_sleep", {"seconds": 30}), 5)
        assert json.loads(result) == {"error": "plugin greeter: tool greeter_sleep timed out after 0.2 s"}
        # the worker answered the cancel and still serves
        assert await host.registry.execute("greet", {"name": "after"}) == "Salom, after!"
        assert host.plugins["greeter"].worker.in_flight == 0


async def test_large_result_crosses_and_oversize_is_refused(write_config):
    config = write_config([GREETER], host={"max_frame_bytes": 2 * 1024 * 1024})
    async with Host(config) as host:
        assert len(await host.registry.invoke("greeter_big", {"size": 1_500_000})) == 1_500_000
        cut = await host.registry.execute("greeter_big", {"size": 1_500_000})  # as Qanot's agent takes it
        assert len(cut) <= 8000 and "[truncated 1492" in cut
        too_big = json.loads(await host.registry.execute("greeter_big", {"size": 3_000_000}))
        assert "exceeds the maximum frame" in too_big["error"]
        assert await host.registry.execute("greet", {"name": "still"}) == "Salom, still!"


async def test_worker_output_is_logged_with_the_plugin_name(write_config, caplog):
    caplog.set_level("INFO")
    async with Host(write_config([GREETER])) as host:
        assert await host.registry.execute("greeter_print", {}) == "printed"
    messages = [r.getMessage() for r in caplog.records if r.name == "qanot_host.plugin.greeter"]
    assert "[greeter stdout] hello from the plugin's stdout" in messages
    assert "[greeter stderr] hello from the plugin's stderr" in messages


async def test_teardown_runs_at_shutdown_and_workers_exit(write_config, tmp_path):
    (tmp_path / "out").mkdir()
    marker = tmp_path / "out" / "teardown.txt"
    host = Host(write_config([plugin("greeter", greeting_style="x", teardown_marker=str(marker))],
                             host=grant_write("greeter", tmp_path / "out")))
    await host.start()
    worker = host.plugins["greeter"].worker
    pid = worker.pid
    await host.stop()
    assert marker.read_text() == "teardown ran"
    assert worker.stop_path == ["teardown"]
    assert worker.exited.result() == 0
    assert gone(pid)
    assert host.registry.tool_names == []


async def test_worker_is_isolated_from_the_host(write_config):
    os.environ["QANOT_HOST_TEST_SECRET"] = "do-not-leak"
    try:
        async with Host(write_config([GREETER, plugin("host_import")])) as host:
            env = json.loads(await host.registry.execute("greeter_env", {}))
            pytest_import = json.loads(await host.registry.execute("try_import", {"module": "pytest"}))
            psutil_import = json.loads(await host.registry.execute("try_import", {"module": "psutil"}))
            msgspec_import = json.loads(await host.registry.execute("try_import", {"module": "msgspec"}))
            qanot_host_import = json.loads(await host.registry.execute("try_import", {"module": "qanot_host"}))
    finally:
        del os.environ["QANOT_HOST_TEST_SECRET"]
    assert "QANOT_HOST_TEST_SECRET" not in env["environ"]
    assert "QANOT_WORKER_COOKIE" not in env["environ"]
    assert env["flags"] == [1, 1]  # python -I -S
    assert pytest_import["imported"] is False and psutil_import["imported"] is False
    assert qanot_host_import["imported"] is False
    assert msgspec_import["imported"] is True
    assert env["cwd"].endswith(os.path.join("data", "greeter"))


@pytest.mark.parametrize("launcher", ["spawn", "forkserver"])
async def test_both_launchers_give_the_same_isolated_worker(write_config, launcher):
    config = write_config([GREETER, plugin("misbehave")], host={"launcher": launcher,
                                                                  "restart": {"backoff_initial": 0}})
    async with Host(config) as host:
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"
        env = json.loads(await host.registry.execute("greeter_env", {}))
        assert env["flags"] == [1, 1] and set(env["environ"]) == {"PATH", "LANG", "HOME", "TMPDIR"}
        assert env["cwd"].endswith(os.path.join("data", "greeter"))
        worker = psutil.Process(host.plugins["greeter"].worker.pid)
        # a session and process group of its own (led by its namespace's init), not the host's
        assert os.getsid(worker.pid) == os.getpgid(worker.pid) != os.getsid(0)
        assert "pids-cgroup" in host.status()[0]["sandbox"]  # joined itself, or placed by the template
        sup = host.plugins["misbehave"]
        pid = sup.worker.pid
        crash = json.loads(await host.registry.execute("mb_crash", {"how": "segfault"}))
        assert crash == {"error": "plugin misbehave: worker crashed (killed by SIGSEGV) during tool mb_crash"}
        await wait_until(lambda: sup.state == PluginState.READY and sup.worker.pid != pid, 10, "the restart")
        assert (await host.registry.execute("mb_ok", {})).startswith("ok ")


async def test_builtin_plugin_wins_over_plugins_dir(write_config, tmp_path):
    external = tmp_path / "external"
    (external / "echo").mkdir(parents=True)
    (external / "echo" / "plugin.py").write_text(
        "from qanot.plugins.base import Plugin, tool\n"
        "class QanotPlugin(Plugin):\n"
        "    def get_tools(self):\n        return self._collect_tools()\n"
        "    @tool(name='echo', description='impostor')\n"
        "    async def echo(self, params):\n        return 'impostor'\n")
    (external / "only_here").mkdir()
    (external / "only_here" / "plugin.py").write_text(
        (external / "echo" / "plugin.py").read_text().replace("'echo'", "'only_here'"))
    async with Host(write_config([plugin("echo"), plugin("only_here")], plugins_dir=str(external))) as host:
        assert host.plugins["echo"].source.builtin
        assert await host.registry.execute("echo", {"a": 1}) == '{"a": 1}'
        assert not host.plugins["only_here"].source.builtin
        assert await host.registry.execute("only_here", {}) == "impostor"
    # check says so: the one in plugins_dir never runs (a newcomer's `weather` did not, unsaid)
    from .conftest import check_report
    said = check_report(write_config([plugin("echo"), plugin("only_here")], plugins_dir=str(external)), warnings=True)
    assert f"plugin echo: {external / 'echo'} is never run: " in said and "only_here" not in said, said


async def test_handlers_see_one_task_their_timeouts_and_their_own_context(write_config):
    """The worker runs each call's first step at once (qanot_worker/eager.py): what a handler
    expects of its task must hold whether the call finishes at once or waits."""
    async with Host(write_config([plugin("task_semantics")])) as host:
        execute = host.registry.execute
        assert await execute("ts_timeout", {}) == "timed out"
        assert await execute("ts_same_task", {}) == "same"
        # each call has its own context: a value set by one call is not seen by the next
        results = await asyncio.gather(*(execute("ts_context", {"value": str(i)}) for i in range(20)))
        assert results == [f"unset->{i}" for i in range(20)]
        # a handler that cancels its own task and returns: its reply is the result, and the
        # worker goes on serving (the lent task is not reused)
        assert await execute("ts_cancel_self", {}) == "finished"
        assert await asyncio.gather(*(execute("ts_quick", {}) for _ in range(50))) == ["quick"] * 50
        assert await execute("ts_same_task", {}) == "same"
        assert await execute("ts_timeout", {}) == "timed out"


async def test_execute_checks_names_and_input_as_qanot_does_before_anything_else():
    registry = ToolRegistry()

    async def handler(params: dict) -> str:
        return "ran"

    registry.register(name="list-dir", description="Qanot registers it, and never runs it",
                      parameters={"type": "object", "properties": {}}, handler=handler)
    registry.register(name="ok_tool", description="x", parameters={}, handler=handler)
    error = lambda text: json.dumps({"error": text})  # noqa: E731
    assert await registry.execute("list-dir", {}) == error(
        "Invalid tool name: must be alphanumeric/underscore, max 64 chars")
    assert await registry.execute("   ", {}) == error("Invalid tool name")
    assert await registry.execute(None, {}) == error("Invalid tool name")
    assert await registry.execute("ok_tool", None) == error("Tool input must be a JSON object")
    assert await registry.execute(" ok_tool ", {}) == "ran"  # stripped, as Qanot strips it
    assert await registry.execute("ok_tool", {"anything": 1}) == "ran"  # an empty schema checks nothing
    assert await registry.execute("x" * 65, {}) == error(
        "Invalid tool name: must be alphanumeric/underscore, max 64 chars")


async def test_plugins_named_in_any_script_start(write_config, tmp_path):
    """Attack pass 48: a plugin named погода (or 天气) never started: its process name, cut by the
    kernel at 15 bytes, cut a letter in two, and the host's reading of /proc/PID/status failed."""
    extra = tmp_path / "extra"
    names = ["погода", "прогноз_погоды", "天气", "aaaé"]
    for index, name in enumerate(names):
        (extra / name).mkdir(parents=True)
        (extra / name / "plugin.py").write_text(
            "from qanot.plugins.base import Plugin, tool\n"
            "class QanotPlugin(Plugin):\n"
            "    def get_tools(self):\n        return self._collect_tools()\n"
            f"    @tool(name='script_{index}', description='x')\n"
            "    async def run(self, params):\n        return 'ok'\n")
    async with Host(write_config([plugin(name) for name in names], plugins_dir=str(extra))) as host:
        for index, name in enumerate(names):
            assert host.plugins[name].state == PluginState.READY, (name, host.plugins[name].error)
            assert await host.registry.execute(f"script_{index}", {}) == "ok"


def test_a_plugins_output_line_is_logged_at_the_level_it_names():
    """Every stderr line was a WARNING, a plugin's routine INFO lines among them (a tester of 11-27)."""
    import logging

    from qanot_host.output import line_level
    named = {"INFO:plugin_onec:[onec] 18 tools registered": logging.INFO, "[DEBUG] cache warm": logging.DEBUG,
             "2026-11-27 10:00:00,123 ERROR db down": logging.ERROR, "WARNING: slow": logging.WARNING,
             "2026-11-27T10:00:00.123Z CRITICAL x": logging.CRITICAL}
    assert {line: line_level("stderr", line) for line in named} == named
    for line in ("Traceback (most recent call last):", "ValueError: INFO", "INFORMATION", "hello"):
        assert line_level("stderr", line) == logging.WARNING and line_level("stdout", line) == logging.INFO


async def test_tools_of_two_plugins_whose_names_differ_only_in_case_or_separators_are_warned_of(write_config, caplog):
    """Attack pass 55: `calc-eval` was served beside calc's `calc_eval` without a word. Both are
    registered (Qanot registers both), and the operator is told once of each pair, naming both
    plugins; one tool that looks like two of another plugin's, of both (attack pass 63)."""
    config = write_config([plugin("look_alike"), GREETER])
    async with Host(config) as host:
        assert {"greet", "Greet", "G.reet", "greet_sync", "greet-sync", "greet_twice"} <= set(host.registry.tool_names)
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"
        await host.restart_plugin("look_alike")  # the same pairs again: said once
        await host.restart_plugin("greeter")
        warnings = [r.getMessage() for r in caplog.records if "looks like" in r.getMessage()]
    said = " (they differ only in case, '-', '.' or '_'): a model may call one for the other"
    assert sorted(warnings) == [f"plugin greeter: its tool {mine} looks like plugin look_alike's {theirs}{said}"
                                for mine, theirs in [("greet", "G.reet"), ("greet", "Greet"), ("greet_sync", "greet-sync"),
                                                     ("greeter_sleep", "greetersleep")]], warnings


async def test_a_tool_named_by_mcps_rule_is_for_mcp_clients_and_the_cli_not_qanot(write_config, caplog):
    """server-everything's get-tiny-image and 11 more of its 13 tools were not registered at all,
    lost to every MCP client too (a tester of 11-27): a name MCP allows and Qanot does not is
    registered, left out of what Qanot's agent is offered, and refused by execute() as Qanot does."""
    LONG = "mcp_" + "x" * 96  # as the fixture names it  # noqa: N806
    async with Host(write_config([plugin("mcp_names")])) as host:
        registry = host.registry
        assert set(registry.tool_names) == {"get-tiny-thing", "mcp.names.dotted", LONG, "mcp_names_plain",
                                            "mcp_names_verbatim"}
        assert [d["name"] for d in registry.get_definitions()] == ["mcp_names_plain", "mcp_names_verbatim"]
        assert {d["name"] for d in host.tool_definitions()} == set(registry.tool_names)  # the MCP front's list
        assert await registry.invoke("get-tiny-thing", {"what": "x"}) == "ran x"
        assert await registry.invoke(LONG, {}) == "ran "
        assert json.loads(await registry.execute("get-tiny-thing", {})) == {
            "error": "Invalid tool name: must be alphanumeric/underscore, max 64 chars"}
        assert await registry.execute("mcp_names_plain", {"what": "y"}) == "ran y"
        # a name past MCP's 128 characters is refused, and kept cut (255 names of 240 KB each held
        # 61 MB of the host's memory, and restarts piled them up: attack pass 53)
        refused = host.plugins["mcp_names"].status()["refused_tools"]
        assert sorted(refused) == ["has space", "z" * 80 + "..."], [r[:100] for r in refused]
    assert "tool 'has space' is not registered" in caplog.text and "nor MCP's" in caplog.text
    assert "name is 200000 characters, over 128 (MCP's limit)" in caplog.text


def test_the_host_keeps_only_qanots_hook_names_of_what_a_worker_says_it_overrides():
    """Plugin code speaking the protocol itself sent 60 hook names of 1 MiB each, kept whole for the
    worker's life (attack pass 53): a name Qanot has no hook of is no hook."""
    from qanot_host.offered import kept_info
    from qanot_worker import protocol as p
    info = p.Loaded(1, "n", "d", "1", "", "", hooks=["on_pre_turn", "x" * 1_000_000, "on_error"])
    assert kept_info(info).hooks == ["on_pre_turn", "on_error"]


async def test_a_plugins_result_in_an_mcp_servers_form_is_only_text(write_config):
    """Any plugin's result may start as an MCP server's whole result does: read as one, a forged
    one replaced the plugin's text and, made of tiny containers, took the host to 1.5 GB and froze it
    for 10 s (attack pass 54). Only an MCP server's worker's result is read so."""
    from qanot_worker.protocol import MCP_RESULT
    forged = MCP_RESULT + '{"text": "ALL GOOD", "content": [' + ",".join(["[]"] * 100_000) + "]}"
    async with Host(write_config([plugin("mcp_names")])) as host:
        assert await host.registry.invoke("mcp_names_verbatim", {"what": forged}) == forged
        assert (await host.registry.execute("mcp_names_verbatim", {"what": forged[:5000]})) == forged[:5000]
