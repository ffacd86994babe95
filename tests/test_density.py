"""Lazy activation and idle stop: plugins that cost nothing while idle, with real workers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from qanot_host import Host, PluginState
from qanot_host.errors import PluginUnavailable

from .conftest import FIXTURE_PLUGINS, GREETER, plugin, wait_until


def events(tmp_path) -> list[str]:
    path = tmp_path / "workspace" / "lazy_probe" / "events"
    return path.read_text().split() if path.exists() else []


def lazy_host(**extra) -> dict:
    return {"activation": "lazy", "limits_interval": 0.1, **extra}


async def test_a_lazy_plugin_lists_its_tools_once_then_costs_no_worker(write_config, tmp_path):
    config = write_config([plugin("lazy_probe"), GREETER], host=lazy_host())
    async with Host(config) as host:
        probe = host.plugins["lazy_probe"]
        # no cached tool list yet: started once to list its tools, then stopped (teardown() ran)
        assert probe.state == PluginState.IDLE and probe.worker is None
        assert "lazy_probe_pid" in host.registry.tool_names
        await wait_until(lambda: events(tmp_path)[-2:-1] == ["teardown"], what="the listing worker's teardown")
        status = probe.status()
        assert status["state"] == "idle" and status["pid"] is None and status["idle_stops"] == 1
        # the first call starts a worker and is answered by it
        pid = json.loads(await host.registry.execute("lazy_probe_pid", {}))["pid"]
        assert probe.state == PluginState.READY and probe.worker is not None and probe.activations == 1
        assert json.loads(await host.registry.execute("lazy_probe_pid", {}))["pid"] == pid
        assert probe.restarts == 0 and not probe.restart_reasons
    assert (tmp_path / "state" / "tool-cache" / "lazy_probe.msgpack").exists()


async def test_a_warm_tool_cache_starts_no_worker_at_all(write_config, tmp_path):
    config = write_config([plugin("lazy_probe")], host=lazy_host())
    async with Host(config):
        pass
    before = len(events(tmp_path))
    async with Host(config) as host:
        probe = host.plugins["lazy_probe"]
        assert probe.state == PluginState.IDLE and probe.idle_stops == 0  # listed from the cache
        assert "lazy_probe_pid" in host.registry.tool_names
        assert len(events(tmp_path)) == before  # no setup() ran
        await host.registry.execute("lazy_probe_pid", {})
        assert events(tmp_path)[before] == "setup" and probe.activations == 1


async def test_a_changed_config_entry_or_plugin_code_lists_the_tools_again(write_config, tmp_path):
    plugins_dir = tmp_path / "plugins"
    shutil.copytree(FIXTURE_PLUGINS / "lazy_probe", plugins_dir / "lazy_probe")
    config = write_config([plugin("lazy_probe")], host=lazy_host(), plugins_dir=str(plugins_dir))
    async with Host(config):
        pass
    config = write_config([plugin("lazy_probe", style="other")], host=lazy_host(), plugins_dir=str(plugins_dir))
    async with Host(config) as host:
        assert host.plugins["lazy_probe"].idle_stops == 1  # the cache did not fit: listed anew
    code = plugins_dir / "lazy_probe" / "plugin.py"
    code.write_text(code.read_text().replace('name="lazy_probe_pid"', 'name="lazy_probe_pid2"'))
    async with Host(config) as host:
        assert host.plugins["lazy_probe"].idle_stops == 1
        assert "lazy_probe_pid2" in host.registry.tool_names and "lazy_probe_pid" not in host.registry.tool_names


async def test_a_changed_value_of_a_granted_env_var_lists_the_tools_again(write_config, tmp_path, monkeypatch):
    """Attack pass 44: a plugin's tools may depend on a granted environment variable as on a secret;
    the cache was keyed by the names granted, not their values, and a tool named after one kept its
    old name after the variable changed (a call to it failed: no such tool in the worker)."""
    settings = {"lazy_probe": {"permissions": {"env_vars": ["QH_LAZY_MODE"]}}}
    config = write_config([plugin("lazy_probe")], host=lazy_host(plugins=settings))
    monkeypatch.setenv("QH_LAZY_MODE", "a")
    async with Host(config):
        pass
    async with Host(config) as host:
        assert host.plugins["lazy_probe"].idle_stops == 0  # the same value: the cache fits
    monkeypatch.setenv("QH_LAZY_MODE", "b")
    async with Host(config) as host:
        assert host.plugins["lazy_probe"].idle_stops == 1  # listed anew


async def test_an_idle_worker_is_stopped_with_teardown_and_restarted_by_the_next_call(write_config, tmp_path):
    config = write_config([plugin("lazy_probe")], host={"idle_timeout": 0.5, "limits_interval": 0.1})
    async with Host(config) as host:
        probe = host.plugins["lazy_probe"]
        assert probe.state == PluginState.READY  # eager: a worker from the start
        first = json.loads(await host.registry.execute("lazy_probe_pid", {}))["pid"]
        await wait_until(lambda: probe.state == PluginState.IDLE, what="the idle stop")
        await wait_until(lambda: events(tmp_path)[-2:] == ["teardown", str(first)], what="teardown")
        second = json.loads(await host.registry.execute("lazy_probe_pid", {}))["pid"]
        assert second != first and probe.activations == 1 and probe.idle_stops == 1
        assert probe.restarts == 0 and not probe.restart_reasons  # not a crash, nothing counted


async def test_status_shows_a_worker_stopped_when_idle_until_it_is_gone(write_config, caplog):
    """Attack pass 69: status showed no worker, and the log "stopped", while its teardown() still ran
    (841 MB held for seconds)."""
    caplog.set_level(logging.INFO, logger="qanot_host")
    config = write_config([plugin("misbehave", hang_in_teardown=True)],
                          host={"idle_timeout": 0.3, "limits_interval": 0.1, "teardown_timeout": 1.5})
    async with Host(config) as host:
        supervisor = host.plugins["misbehave"]
        pid = supervisor.worker.pid
        await wait_until(lambda: supervisor.state == PluginState.IDLE, what="the idle stop")
        status = supervisor.status()
        assert (status["pid"], status["stopping_pid"]) == (None, pid) and psutil.pid_exists(pid)
        from qanot_host.cli import _status_cell
        assert _status_cell(status, "pid") == f"{pid} (stopping)"  # `qanot-host status`'s PID column
        assert f"stopping worker pid {pid} (no call for 0.3 s)" in caplog.text
        await wait_until(lambda: supervisor.status()["stopping_pid"] is None, 5, "the worker gone")
        assert f"worker pid {pid} stopped (1." in caplog.text  # its teardown_timeout, and its exit


async def test_calls_kept_coming_keep_the_worker(write_config, tmp_path):
    config = write_config([plugin("lazy_probe")], host={"idle_timeout": 0.6, "limits_interval": 0.1})
    async with Host(config) as host:
        pids = set()
        for _ in range(10):
            pids.add(json.loads(await host.registry.execute("lazy_probe_pid", {}))["pid"])
            await asyncio.sleep(0.2)
        assert len(pids) == 1 and host.plugins["lazy_probe"].idle_stops == 0


async def test_concurrent_first_calls_start_one_worker(write_config, tmp_path):
    config = write_config([plugin("lazy_probe")], host=lazy_host())
    async with Host(config) as host:
        answers = await asyncio.gather(*(host.registry.execute("lazy_probe_pid", {}) for _ in range(8)))
        assert len({json.loads(a)["pid"] for a in answers}) == 1
        assert host.plugins["lazy_probe"].activations == 1


async def test_a_worker_that_fails_to_start_for_a_call_fails_that_call_only(write_config, tmp_path):
    config = write_config([plugin("lazy_probe"), GREETER], host=lazy_host())
    async with Host(config):
        pass  # the tool list is cached
    fail = tmp_path / "workspace" / "lazy_probe" / "fail"
    fail.write_text("setup() refuses while this is here")
    async with Host(config) as host:
        probe = host.plugins["lazy_probe"]
        assert probe.state == PluginState.IDLE
        with pytest.raises(PluginUnavailable, match="a file named fail is in its place"):
            await host.registry.invoke("lazy_probe_pid", {})
        answer = await host.registry.execute("lazy_probe_pid", {})
        assert "a file named fail is in its place" in answer  # execute() says it as Qanot's registry would
        assert "x" in await host.registry.invoke("greet", {"name": "x"})  # the others serve on
        assert host.plugins["greeter"].state == PluginState.READY
    # the restart policy bounds the retries: after max_restarts failures in its window, it gives up
    config = write_config([plugin("lazy_probe")], host=lazy_host(restart={"max_restarts": 2, "backoff_initial": 0}))
    async with Host(config) as host:
        for _ in range(3):
            with pytest.raises(PluginUnavailable):
                await host.registry.invoke("lazy_probe_pid", {})
        assert host.plugins["lazy_probe"].state == PluginState.FAILED


async def test_calls_that_shared_a_failed_start_share_its_error_and_the_next_start_waits_its_backoff(write_config,
                                                                                                      tmp_path):
    """Attack pass 69: 20 first calls to a plugin whose setup() failed ran it six times in 0.16 s (each
    caller that shared the failed start started another) and spent the restart intensity: failed."""
    config = write_config([plugin("lazy_probe")], host=lazy_host(restart={"backoff_initial": 1.0}))
    async with Host(config):
        pass  # the tool list is cached
    (tmp_path / "workspace" / "lazy_probe" / "events").unlink()
    (tmp_path / "workspace" / "lazy_probe" / "fail").write_text("setup() refuses while this is here")
    async with Host(config) as host:
        probe = host.plugins["lazy_probe"]
        answers = await asyncio.gather(*(host.registry.invoke("lazy_probe_pid", {}) for _ in range(20)),
                                       return_exceptions=True)
        assert all(isinstance(a, PluginUnavailable) and "its worker did not start: " in str(a)
                   and "a file named fail is in its place" in str(a) for a in answers), answers
        assert [e for e in events(tmp_path) if e == "setup"] == ["setup"]
        assert probe.state == PluginState.IDLE
        with pytest.raises(PluginUnavailable, match="a file named fail is in its place"):
            await host.registry.invoke("lazy_probe_pid", {})  # the next call tries again, at once (the first retry)
        started = asyncio.get_running_loop().time()
        with pytest.raises(PluginUnavailable, match="a file named fail is in its place"):
            await host.registry.invoke("lazy_probe_pid", {})  # and the next one after the policy's backoff
        assert asyncio.get_running_loop().time() - started >= 0.85  # 1 s, less the policy's jitter
        assert [e for e in events(tmp_path) if e == "setup"] == ["setup"] * 3
        (tmp_path / "workspace" / "lazy_probe" / "fail").unlink()
        await host.registry.invoke("lazy_probe_pid", {}, timeout=10)  # waits its backoff (2 s), then serves
        assert probe.state == PluginState.READY


async def test_a_slow_start_holds_back_the_tools_of_plugins_listed_after_it_for_two_seconds_at_most(write_config,
                                                                                                      caplog):
    """Attack pass 69: a lazy plugin (no cached tools) whose setup() hung left the tools of every plugin
    listed after it, eager ones too, "Unknown tool" for the whole setup_timeout."""
    config = write_config([plugin("misbehave", slow_start=5), GREETER], host={"setup_timeout": 10})
    host = Host(config)
    starting = asyncio.ensure_future(host.start())
    try:
        await wait_until(lambda: host.registry.get("greet") is not None, 4, "greeter's tools")
        assert not starting.done()  # misbehave's setup() still runs
        assert "x" in await host.registry.invoke("greet", {"name": "x"})
        assert "plugin misbehave still starting after 2 s: the tools of plugin greeter are registered meanwhile" \
            in caplog.text
        await starting
        assert host.plugins["misbehave"].state == PluginState.READY
    finally:
        await host.stop()


async def test_plugin_json_keep_running_opts_out_of_lazy_and_idle(write_config, tmp_path, caplog):
    config = write_config([plugin("keeps_running"), plugin("lazy_probe")],
                          host=lazy_host(idle_timeout=0.3))
    async with Host(config) as host:
        assert "plugin keeps_running: its plugin.json says keep_running" in caplog.text  # the operator is told
        keeper = host.plugins["keeps_running"]
        assert keeper.state == PluginState.READY and keeper.worker is not None
        pid = await host.registry.execute("keeps_running_pid", {})
        await asyncio.sleep(1.0)  # three idle timeouts
        assert keeper.state == PluginState.READY and await host.registry.execute("keeps_running_pid", {}) == pid
        assert keeper.status()["activation"] == "eager" and host.plugins["lazy_probe"].status()["activation"] == "lazy"


async def test_per_plugin_settings_override_the_hosts(write_config, tmp_path):
    settings = {"greeter": {"activation": "lazy"}, "lazy_probe": {"activation": "eager"}}
    config = write_config([GREETER, plugin("lazy_probe")], host={"plugins": settings})
    async with Host(config) as host:
        assert host.plugins["greeter"].state == PluginState.IDLE
        assert host.plugins["lazy_probe"].state == PluginState.READY


async def test_stopping_the_host_while_an_idle_plugin_starts_leaves_nothing(write_config, tmp_path):
    config = write_config([plugin("lazy_probe")], host=lazy_host())
    host = Host(config)
    await host.start()
    call = asyncio.ensure_future(host.registry.invoke("lazy_probe_pid", {}))
    await asyncio.sleep(0.01)
    await host.stop()
    await asyncio.gather(call, return_exceptions=True)
    probe = host.plugins["lazy_probe"]
    assert probe.worker is None or probe.worker.exited.done()
    assert probe.state == PluginState.STOPPED


async def test_an_operators_restart_during_a_start_for_a_call_lets_that_call_through(write_config):
    """Attack pass 43: `qanot-host restart` while a call's lazy start was under way stopped the new
    worker, and the call failed with "worker stopped"; a restart lets calls finish first. The start
    under way ends, the worker is replaced as a ready one would be, and the call is answered."""
    config = write_config([plugin("misbehave", slow_start=1.0)], host=lazy_host())
    async with Host(config) as host:
        sup = host.plugins["misbehave"]
        assert sup.state == PluginState.IDLE
        call = asyncio.ensure_future(host.registry.invoke("mb_ok", {}))
        await wait_until(lambda: sup.state == PluginState.STARTING, 5, "the call's start")
        status = await host.restart_plugin("misbehave")
        assert (await asyncio.wait_for(call, 10)).startswith("ok ")
        assert status["state"] == "ready"


async def test_a_call_waiting_for_a_start_that_a_reload_restarts_is_told_so(write_config):
    """Attack pass 43: a call waiting for a lazy plugin's start, which a reload then restarted, was
    told "plugin is stopped"; the README says such a call hears that a reload is restarting it."""
    config = write_config([plugin("misbehave", slow_start=1.0)], host=lazy_host())
    async with Host(config) as host:
        sup = host.plugins["misbehave"]
        call = asyncio.ensure_future(host.registry.invoke("mb_ok", {}))
        await wait_until(lambda: sup.state == PluginState.STARTING, 5, "the call's start")
        write_config([plugin("misbehave", slow_start=0.1)], host=lazy_host())  # changed: restarted
        await host.reload()
        with pytest.raises(PluginUnavailable, match="being restarted by a reload"):
            await asyncio.wait_for(call, 10)


def test_the_host_raises_its_open_files_limit_and_says_how_many_workers_fit():
    import subprocess
    import sys
    code = ("import logging, resource, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)); "
            "from qanot_host.fd_limit import raise_open_files_limit; raise_open_files_limit(); "
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = done.stdout.split("\n")
    assert int(lines[-2]) >= 4096  # at least the hard limit (as root, maybe the kernel's ceiling)
    assert "room for about" in done.stdout and "workers" in done.stdout


async def test_a_reload_asked_for_during_the_start_waits_for_it(write_config):
    """Else a plugin still starting was started a second time beside the first (two workers, one
    of them unsupervised and without its disk)."""
    config = write_config([plugin("misbehave", slow_start=1.5)])
    host = Host(config)
    starting = asyncio.ensure_future(host.start())
    try:
        await wait_until(lambda: "misbehave" in host.plugins, 10, "the start under way")
        write_config([plugin("misbehave", slow_start=0.1)])  # changed: the reload restarts it
        changes = await host.reload()
        assert starting.done() and changes["restarted"] == ["misbehave"]
        assert host.plugins["misbehave"].state == PluginState.READY
    finally:
        await asyncio.gather(starting, return_exceptions=True)
        await host.stop()


async def test_plugins_starting_together_are_fingerprinted_in_one_hop_to_a_thread(write_config, monkeypatch):
    """One hop each, a warm start of 2000 lazy plugins spent ~0.5 s handing them to the thread pool."""
    import qanot_host.host as host_module
    hops: list[int] = []
    each = host_module._fingerprint_each
    monkeypatch.setattr(host_module, "_fingerprint_each", lambda asked: (hops.append(len(asked)), each(asked))[1])
    config = write_config([GREETER, plugin("echo"), plugin("lazy_probe")], host=lazy_host())
    async with Host(config) as host:
        assert all(s.state == PluginState.IDLE for s in host.plugins.values())
    assert hops == [3], hops


async def test_a_plugin_whose_tools_change_at_activation_is_reported_and_config_order_decides(write_config, caplog):
    """Attack pass 22: a lazy plugin listed first offered a harmless tool to be cached, then, at its first
    call, another plugin's tool name; the log said the plugin listed first keeps a name, which was not
    what happened, and nothing said its tools had changed. One rule now, at any time: the plugin listed
    first among those offering a name has it, and every change of hands is logged, naming both."""
    config = write_config([plugin("echo"), plugin("shifty"), plugin("calc")],
                          host={"plugins": {"shifty": {"activation": "lazy"}}})
    async with Host(config):
        pass  # its first worker lists shifty_a, and is cached
    async with Host(config) as host:
        assert "shifty_a" in host.registry.tool_names and host.registry.get("echo").plugin == "echo"
        # its first call starts a later worker, which offers shifty_b and echo (listed before it: echo's)
        assert "no tool named 'shifty_a'" in await host.registry.execute("shifty_a", {})
        assert await host.registry.execute("shifty_b", {}) == "shifty answered"
        assert host.registry.get("echo").plugin == "echo"  # echo, listed first, keeps its name
        assert json.loads(await host.registry.execute("echo", {"text": "x"})) == {"text": "x"}
        assert "shifty_b" in host.registry.tool_names and "shifty_a" not in host.registry.tool_names
    text = caplog.text
    assert "plugin shifty now offers other tools than at its last listing: new: echo, shifty_b; gone: shifty_a" in text
    assert "plugin shifty: tool echo is not registered: plugin echo has it" in text


async def test_a_plugin_listed_first_takes_its_name_back_and_a_failed_ones_names_wait(write_config, caplog):
    """Attack pass 24: a plugin listed first failed in a reload; one listed after it that offered the
    same name took it at its next worker start, silently, and kept it once the first was fixed."""
    config = write_config([plugin("shifty"), plugin("echo"), plugin("calc")], host={"restart": {"max_restarts": 0}})
    async with Host(config) as host:
        shifty = host.plugins["shifty"]
        assert host.registry.get("echo").plugin == "echo"  # shifty's first worker offers shifty_a only
        os.kill(shifty.worker.pid, signal.SIGKILL)
        await wait_until(lambda: shifty.state == PluginState.FAILED, 10, "the failure")
        await host.restart_plugin("shifty")  # its next worker offers echo, and shifty is listed first
        assert host.registry.get("echo").plugin == "shifty"
        assert await host.registry.execute("echo", {}) == "shifty answered"
        assert "plugin echo: tool echo is no longer registered: plugin shifty, listed before it in config.json, " \
               "offers it now" in caplog.text
        # shifty fails: its names wait for it, and echo (listed after it) does not take them meanwhile
        os.kill(host.plugins["shifty"].worker.pid, signal.SIGKILL)
        await wait_until(lambda: host.plugins["shifty"].state == PluginState.FAILED, 10, "the failure")
        echo = host.plugins["echo"]
        os.kill(echo.worker.pid, signal.SIGKILL)  # echo's next worker registers anew
        await wait_until(lambda: echo.state == PluginState.FAILED, 10, "echo's failure")
        await host.restart_plugin("echo")
        assert host.registry.get("echo").plugin == "shifty"
        assert "plugin echo: tool echo is not registered: plugin shifty (it is failed now; the name waits for it)" \
            in caplog.text
        # shifty removed from config.json: echo, next in line, gets its name back
        data = json.loads(Path(config).read_text())
        data["plugins"] = [plugin("echo"), plugin("calc")]
        Path(config).write_text(json.dumps(data))
        await host.reload()
        assert host.registry.get("echo").plugin == "echo"
        assert json.loads(await host.registry.execute("echo", {"text": "y"})) == {"text": "y"}


async def test_a_lazy_plugin_activated_during_a_reload_gets_its_tools_registered(write_config):
    """Attack pass 22 left it untried: tools registered while a reload's plugins start are held for
    config.json's order, and a lazy plugin not among them, called meanwhile, was never registered."""
    config = write_config([plugin("shifty"), plugin("echo")], host={"plugins": {"shifty": {"activation": "lazy"}}})
    async with Host(config):
        pass  # shifty's first worker lists shifty_a, and is cached
    async with Host(config) as host:
        data = json.loads(Path(config).read_text())
        data["plugins"].append(plugin("misbehave", slow_start=3))
        Path(config).write_text(json.dumps(data))
        reloading = asyncio.ensure_future(host.reload())
        await wait_until(lambda: "misbehave" in host.plugins, 10, "the reload's start")
        # its first call starts a worker that offers shifty_b (and echo, which stays echo's)
        assert "no tool named 'shifty_a'" in await host.registry.execute("shifty_a", {})
        assert not reloading.done()
        await reloading
        assert "shifty_b" in host.registry.tool_names and "shifty_a" not in host.registry.tool_names
        assert await host.registry.execute("shifty_b", {}) == "shifty answered"


async def test_a_lazy_plugins_failed_setup_reaches_callers_sanitised(write_config):
    """Attack pass 23: a lazy plugin's setup() failing at its activation reached execute() whole (774
    characters, a password, a path) and `qanot-host call` with its credential; only a tool's own
    exception was sanitised."""
    from qanot_host.control import ControlServer
    config = write_config([plugin("leaky_setup")], host={"plugins": {"leaky_setup": {"activation": "lazy"}}})
    async with Host(config):
        pass  # listed once, and cached
    async with Host(config) as host:
        answer = json.loads(await host.registry.execute("leaky_get", {}))["error"]
        assert "setup() failed" in answer and "[credential redacted]" in answer, answer
        assert "hunter2" not in answer and "/srv/app" not in answer and len(answer) < 600, answer
        # status and tools (not_ready) too (attack pass 47: they showed what call redacts)
        status = json.dumps(host.status())
        assert "hunter2" not in status and "[credential redacted]" in status, status
        assert "hunter2" not in host.not_ready()
        assert host.plugins["leaky_setup"].errors == 1  # a call its start failed is an error (it showed 0)
        control = ControlServer(host)
        await control.start()
        try:
            proc = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "qanot_host", "call", "--config", config, "leaky_get"],
                capture_output=True, text=True, timeout=60)
        finally:
            await control.close()
    assert proc.returncode != 0 and "setup() failed" in proc.stderr, proc.stderr
    assert "hunter2" not in proc.stderr and "[credential redacted]" in proc.stderr, proc.stderr


async def test_a_plugin_brought_back_from_failed_with_other_tools_is_warned_about(write_config, caplog):
    """Attack pass 23: a plugin that crashed itself into failed, restarted by the operator, offered
    new tools and no warning said so (the restart forgot what it had offered)."""
    config = write_config([plugin("echo"), plugin("shifty")], host={"restart": {"max_restarts": 0}})
    async with Host(config) as host:
        shifty = host.plugins["shifty"]
        assert "shifty_a" in host.registry.tool_names
        os.kill(shifty.worker.pid, signal.SIGKILL)
        await wait_until(lambda: shifty.state == PluginState.FAILED, 10, "the failure")
        await host.restart_plugin("shifty")
        assert "shifty_b" in host.registry.tool_names and host.registry.get("echo").plugin == "echo"
    assert "plugin shifty now offers other tools than at its last listing: new: echo, shifty_b; gone: " \
           "shifty_a" in caplog.text


async def test_a_lazy_plugin_that_listed_no_tools_lists_them_again(write_config, tmp_path, monkeypatch):
    """Attack pass 35: a lazy plugin that listed no tools once (its login failed, its service was
    down) kept that empty list for good: with no tool registered no call could start it, the
    cache's key took its secret as written, not its value, and an operator's restart used the
    cache too. No tools is never cached now, the key holds a digest of the secrets' values, and
    an operator's restart lists anew."""
    monkeypatch.setenv("QH_LOGIN_TOKEN", "wrong")
    entry = {"name": "login_tools", "config": {"token": {"env": "QH_LOGIN_TOKEN"}}}
    config = write_config([entry, GREETER], host={"activation": "lazy"})
    async with Host(config) as host:
        assert host.plugins["login_tools"].state == PluginState.IDLE
        assert "login_send" not in host.registry.tool_names
    monkeypatch.setenv("QH_LOGIN_TOKEN", "good")  # the secret fixed, config.json as it was
    down = tmp_path / "workspace" / "login_tools" / "down"
    async with Host(config) as host:
        assert "login_send" in host.registry.tool_names
        assert await host.registry.execute("login_send", {}) == "sent"
    down.write_text("")  # the service is down at the next listing: nothing cached changes
    monkeypatch.setenv("QH_LOGIN_TOKEN", "good ")  # (a new value: the list is made anew)
    async with Host(config) as host:
        assert "login_send" not in host.registry.tool_names
        down.unlink()  # up again: the operator restarts the plugin, which lists its tools anew
        await host.restart_plugin("login_tools")
        assert "login_send" in host.registry.tool_names


async def test_a_huge_cache_file_is_not_read(write_config, tmp_path, caplog):
    """Attack pass 35: a 1.5 GB (sparse) cache file was read whole, and the host took 1.5 GB."""
    config = write_config([GREETER], host={"activation": "lazy"})
    cached = tmp_path / "state" / "tool-cache" / "greeter.msgpack"
    cached.parent.mkdir(parents=True)
    with open(cached, "wb") as f:
        f.truncate(1 << 30)
    before = psutil.Process().memory_info().rss
    async with Host(config) as host:
        assert "greet" in host.registry.tool_names  # listed anew
    assert psutil.Process().memory_info().rss - before < 200 * 2**20
    assert "its cached tool list is unusable (1073741824 bytes, over the " in caplog.text


@pytest.mark.parametrize("planted", ["fifo", "symlink"])
async def test_a_cache_file_that_is_no_regular_file_is_not_read(write_config, tmp_path, caplog, planted):
    """Attack pass 69: a FIFO in the cache's place held the host's event loop in open() until someone
    wrote to it; a symlink was followed."""
    config = write_config([GREETER], host={"activation": "lazy"})
    cached = tmp_path / "state" / "tool-cache" / "greeter.msgpack"
    cached.parent.mkdir(parents=True)
    if planted == "fifo":
        os.mkfifo(cached)
    else:
        (tmp_path / "elsewhere").write_bytes(b"\x80")
        cached.symlink_to(tmp_path / "elsewhere")
    host = Host(config)
    try:
        await asyncio.wait_for(host.start(), 20)
        assert "greet" in host.registry.tool_names  # listed anew
    finally:
        await host.stop()
    why = "not a regular file" if planted == "fifo" else "Too many levels of symbolic links"
    assert f"its cached tool list is unusable ({why})" in caplog.text


async def test_a_tool_name_that_looks_like_another_plugins_is_refused(write_config, tmp_path, caplog):
    """Attack pass 34: `victim_еcho` (a Cyrillic е) and `victim_echo٠` (an Arabic-Indic zero) are
    alphanumeric to Qanot's rule, so they took calls meant for victim_echo past the rule of who has
    a name. Names outside ASCII are refused, with an error; the plugin's other tools work."""
    plugins_dir = tmp_path / "offering"
    for name in ("victim", "spoof"):
        shutil.copytree(FIXTURE_PLUGINS / "offers", plugins_dir / name)
    config = write_config([plugin("victim", tools=["victim_echo"], me="victim"),
                           plugin("spoof", tools=["victim_\u0435cho", "victim_echo\u0660", "spoof_ok"], me="spoof")],
                          plugins_dir=str(plugins_dir))
    async with Host(config) as host:
        assert sorted(host.registry.tool_names) == ["spoof_ok", "victim_echo"]
        assert await host.registry.execute("spoof_ok", {}) == "spoof answered spoof_ok"
        assert sorted(host.plugins["spoof"].refused) == ["victim_echo\u0660", "victim_\u0435cho"]
    assert "has letters or digits outside ASCII" in caplog.text and "spoof" in caplog.text


async def test_who_has_a_tool_name_follows_config_order_through_reorders_and_changes(write_config, tmp_path, caplog):
    """Attack pass 25: a new order in config.json changed nothing; a name the first plugin stopped
    offering went to nobody; and a plugin that lost a name by a new order still answered its calls."""
    plugins_dir = tmp_path / "offering"
    for name in ("aa", "bb"):
        shutil.copytree(FIXTURE_PLUGINS / "offers", plugins_dir / name)
    aa, bb = plugin("aa", tools=["x", "a_only"], me="aa"), plugin("bb", tools=["x"], me="bb")
    config = write_config([aa, bb], plugins_dir=str(plugins_dir))

    def reload_with(*entries):
        data = json.loads(Path(config).read_text())
        data["plugins"] = list(entries)
        Path(config).write_text(json.dumps(data))
        return host.reload()

    async with Host(config) as host:
        assert await host.registry.execute("x", {}) == "aa answered x"
        await reload_with(bb, aa)  # the order alone changes
        assert await host.registry.execute("x", {}) == "bb answered x"
        assert "plugin aa: tool x is no longer registered: plugin bb, listed before it" in caplog.text \
            or "plugin aa: tool x is not registered: plugin bb has it" in caplog.text
        await host.restart_plugin("aa")  # its status and the registry agree
        assert await host.registry.execute("x", {}) == "bb answered x"
        assert host.plugins["aa"].conflicts == ["x"] and host.plugins["bb"].tools == ["x"]
        await reload_with(aa, bb)
        assert await host.registry.execute("x", {}) == "aa answered x"
        await reload_with(plugin("aa", tools=["a_only"], me="aa"), bb)  # aa no longer offers x: bb has it
        assert await host.registry.execute("x", {}) == "bb answered x"
        assert await host.registry.execute("a_only", {}) == "aa answered a_only"
        # attack pass 26: a new order that also restarts the plugin listed first before it
        await reload_with(aa, bb)
        assert await host.registry.execute("x", {}) == "aa answered x"
        await reload_with(bb, plugin("aa", tools=["x", "a_only"], me="aa2"))
        assert await host.registry.execute("x", {}) == "bb answered x"
        assert host.plugins["aa"].conflicts == ["x"] and host.plugins["bb"].tools == ["x"]
        await reload_with(aa, bb)
        await reload_with(bb, plugin("aa", tools=["x"], fail=True))  # ...which fails to start again
        assert host.plugins["aa"].state == PluginState.FAILED
        assert await host.registry.execute("x", {}) == "bb answered x"


BARE_FORK_FAULTS = """
import os, sys, threading, time
import qanot_worker.forkserver  # the worker template's heap: what its forks share
from qanot_worker import linux

def faults(fork) -> int:
    pid = fork()
    if pid == 0:
        os._exit(7)
    _, status, usage = os.wait4(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7
    return usage.ru_minflt

plain = min(faults(os.fork) for _ in range(5))
bare = min(faults(linux.bare_fork) for _ in range(5))
other = threading.Thread(target=time.sleep, args=(1,))
other.start()  # with a second thread, a lock may be held: bare_fork is os.fork then
with_thread = min(faults(linux.bare_fork) for _ in range(5))
print(plain, bare, with_thread)
"""


def test_a_namespace_init_is_forked_without_pythons_at_fork_work():
    """Every worker's start forks its namespace's init from the template: os.fork()'s at-fork work
    (threading's, logging's, random's hooks, the interpreter's locks) dirtied ~100 pages of each
    process, copied for every worker. The init runs a few lines and leaves by os._exit: it is forked
    bare, unless the parent has another thread (whose locks a bare child could inherit held)."""
    done = subprocess.run([sys.executable, "-c", BARE_FORK_FAULTS], capture_output=True, text=True, check=True)
    plain, bare, with_thread = map(int, done.stdout.split())
    assert bare * 2 < plain, (plain, bare)
    assert with_thread * 2 > plain, (plain, with_thread)  # os.fork's own work again


def test_a_new_disk_image_holds_only_the_metadata_it_needs(tmp_path):
    """A new plugin's disk is a sparse copy of an empty file system: without the resize inode's
    reserved descriptor blocks (a 1 GB image grows offline, never mounted), 150 KB of metadata
    instead of 650 KB, written at every plugin's first start."""
    from qanot_host.disks import DiskImages
    images = DiskImages(str(tmp_path))
    if not images.available:
        pytest.skip(images.problem)
    path, problem = asyncio.run(images.image("p", 1024))
    assert not problem
    assert os.path.getsize(path) == 2**30
    assert os.stat(path).st_blocks * 512 < 300 * 1024, os.stat(path).st_blocks


async def test_an_operators_restart_whose_listing_fails_keeps_the_last_good_tool_list(write_config, tmp_path):
    """Attack passes 47 and 48: `qanot-host restart` of an idle lazy plugin dropped its cached tool
    list before listing anew; when that setup() failed (one that fails now and then), the plugin's
    tools were gone, "Unknown tool" at every call, through reloads too."""
    config = write_config([plugin("lazy_probe"), GREETER], host=lazy_host(restart={"max_restarts": 0}))
    async with Host(config):
        pass  # the tool list is cached
    fail = tmp_path / "workspace" / "lazy_probe" / "fail"
    async with Host(config) as host:
        assert host.plugins["lazy_probe"].state == PluginState.IDLE
        fail.write_text("setup() refuses while this is here")
        await host.restart_plugin("lazy_probe")  # its listing fails: its last list is served
        assert host.plugins["lazy_probe"].state == PluginState.IDLE
        assert "a file named fail is in its place" in await host.registry.execute("lazy_probe_pid", {})
        await host.reload()  # still failing: the same
        assert host.plugins["lazy_probe"].state == PluginState.IDLE
        assert "lazy_probe_pid" in host.registry.tool_names
        fail.unlink()  # it works again: the next call starts it
        assert "pid" in json.loads(await host.registry.invoke("lazy_probe_pid", {}))
