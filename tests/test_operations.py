"""Operating a running host from outside: status, reload, SIGHUP, chaos, and a SIGKILLed host."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .conftest import GREETER, plugin, worker_processes
from .test_cli import REPO, assert_one_line_error, qanot_host


class RunningHost:
    """`qanot-host run` in the background, ready when its 'ready:' line is logged."""

    def __init__(self, config: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "qanot_host", "run", "--config", config],
                                     stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.wait_for("ready:")

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"host exited before logging {text!r}")
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {timeout} s")

    def workers(self, include_template: bool = False) -> list[psutil.Process]:
        return worker_processes(self.proc.pid, include_template)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()


@pytest.fixture
def running():
    hosts = []

    def start(config: str) -> RunningHost:
        hosts.append(RunningHost(config))
        return hosts[-1]

    yield start
    for host in hosts:
        host.close()


def test_status_and_reload_against_a_running_host(write_config, running):
    config = write_config([GREETER, plugin("init_style")])
    host = running(config)
    proc = qanot_host("status", "--config", config)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split()[:5] == ["PLUGIN", "STATE", "PID", "UPTIME", "RESTARTS"] and "EGRESS" in header.split()
    assert [r.split()[:2] for r in rows] == [["greeter", "ready"], ["init_style", "ready"]]
    pids = {p.pid for p in host.workers()}
    assert {int(r.split()[2]) for r in rows} == pids
    as_json = json.loads(qanot_host("status", "--config", config, "--json").stdout)
    assert [(row["plugin"], row["state"]) for row in as_json] == [("greeter", "ready"), ("init_style", "ready")]
    assert {row["pid"] for row in as_json} == pids

    data = json.loads(Path(config).read_text())
    data["plugins"] = [GREETER, plugin("echo")]
    Path(config).write_text(json.dumps(data))
    proc = qanot_host("reload", "--config", config)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["added: echo", "removed: init_style", "restarted: -", "unchanged: greeter"]
    rows = qanot_host("status", "--config", config).stdout.splitlines()[1:]
    assert [r.split()[:2] for r in rows] == [["greeter", "ready"], ["echo", "ready"]]


def test_sighup_reloads_and_a_broken_config_keeps_the_old_one(write_config, running):
    config = write_config([GREETER])
    host = running(config)
    data = json.loads(Path(config).read_text())
    data["plugins"].append(plugin("echo"))
    Path(config).write_text(json.dumps(data))
    host.proc.send_signal(signal.SIGHUP)
    host.wait_for("reloaded")
    Path(config).write_text("{broken")
    # the command refuses it before the host hears of it, and says the host runs on as it was
    assert_one_line_error(qanot_host("reload", "--config", config), "not valid JSON",
                          "nothing was sent: a running host keeps the config it runs")
    host.proc.send_signal(signal.SIGHUP)
    assert "not valid JSON" in host.wait_for("reload refused")
    assert len(host.workers()) == 2
    host.proc.send_signal(signal.SIGTERM)
    assert host.proc.wait(timeout=15) == 0


def test_status_without_a_running_host_is_one_line(write_config):
    assert_one_line_error(qanot_host("status", "--config", write_config([GREETER])), "no running qanot-host answers")


def test_a_second_host_on_the_same_state_dir_is_refused(write_config, running):
    config = write_config([GREETER])
    running(config)
    assert_one_line_error(qanot_host("run", "--config", config), "another qanot-host is running")


def test_a_second_host_is_refused_even_where_no_control_socket_can_be_made(write_config, running, tmp_path):
    """Attack pass 37: with a state_dir too long for a unix socket's path, two hosts ran on it at
    once (each warned of its socket), attaching one disk image twice and handing out the same uids."""
    state_dir = tmp_path / ("state_" + "x" * 110)
    config = write_config([GREETER], host={"state_dir": str(state_dir)})
    running(config)
    assert_one_line_error(qanot_host("run", "--config", config), "another qanot-host is running")


def test_a_stopping_host_holds_its_state_dir_until_it_has_stopped(write_config, running):
    """Attack pass 39: the lock went with the control socket, before the host's stop (calls in flight,
    teardown(), up to ~15 s): a host started 0.3 s after SIGTERM ran beside the stopping one, with
    the same uids, and its worker without its disk, which the other still held."""
    config = write_config([GREETER])
    host = running(config)
    slow = subprocess.Popen([sys.executable, "-m", "qanot_host", "call", "--config", config, "greeter_sleep",
                             '{"seconds": 4}'], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # the call is in flight: the host's stop waits for it
        host.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert_one_line_error(qanot_host("run", "--config", config, timeout=20), "another qanot-host is running")
        assert host.proc.wait(timeout=30) == 0
        assert slow.communicate(timeout=30)[0].strip() == "slept 4"
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.communicate()


def test_workers_exit_when_the_host_is_sigkilled(write_config, running):
    host = running(write_config([GREETER, plugin("init_style"), plugin("echo")]))
    workers = host.workers(include_template=True)
    assert len(workers) == 7  # the template, and each plugin's worker and its namespace's init
    host.proc.kill()
    host.proc.wait()
    deadline = time.monotonic() + 5.0  # they go at once (PDEATHSIG); a loaded machine may take a moment
    while time.monotonic() < deadline and any(_running(w) for w in workers):
        time.sleep(0.01)
    # Exited workers may linger as zombies of whoever adopted them; none may still run.
    assert not [w for w in workers if _running(w)]


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_chaos_command_reports_and_passes(write_config):
    config = write_config([GREETER, plugin("echo"), plugin("calc"), plugin("init_style")])
    proc = qanot_host("chaos", "--config", config, "--duration", "2", "--kill-every", "0.1", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    report = dict(line.rsplit(None, 1) for line in lines[:-1] if not line.startswith("recovery"))
    assert report["hung"] == "0" and report["leaked processes"] == "0" and report["leaked fds"] == "0", report
    assert lines[-1] == "PASS"
    assert int(report["workers killed"]) >= 5  # every 0.1 s for 2 s, on a loaded machine: some at least


# ---- the operator's commands against a running host ------------------------------------------------

def calls_of(config: str, plugin_name: str) -> int:
    rows = json.loads(qanot_host("status", "--config", config, "--json").stdout)
    return next(row["calls"] for row in rows if row["plugin"] == plugin_name)


def test_call_goes_through_the_running_host_unless_standalone(write_config, running):
    config = write_config([GREETER, plugin("echo")])
    running(config)
    done = qanot_host("call", "--config", config, "greet", '{"name": "x"}')
    assert (done.returncode, done.stdout) == (0, "Salom, x!\n"), done.stderr
    assert calls_of(config, "greeter") == 1  # counted there: it was that host's call
    big = {"text": "y" * 200_000}  # more than one argv entry may hold: from stdin, through the socket
    done = subprocess.run([sys.executable, "-m", "qanot_host", "call", "--config", config, "echo", "-"],
                          input=json.dumps(big), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout) == big, done.stderr[-500:]
    assert_one_line_error(qanot_host("call", "--config", config, "nope"), "Unknown tool: nope")  # the host's words
    # a standalone host beside it: greeter's disk is the running host's, so its worker does not start
    # (without its disk its files would be elsewhere, with no ceiling)
    done = qanot_host("call", "--config", config, "--standalone", "greet", '{"name": "y"}')
    assert_one_line_error(done, "Unknown tool: greet", "attached elsewhere", "; a qanot-host holds state_dir",
                          "without --standalone the call goes through it")
    assert calls_of(config, "greeter") == 1  # the standalone host's call is not the running one's


def test_restart_one_plugin_lets_its_calls_finish_and_leaves_the_others(write_config, running):
    config = write_config([plugin("misbehave"), GREETER])
    running(config)
    before = {row["plugin"]: row["pid"] for row in json.loads(qanot_host("status", "--config", config, "--json").stdout)}
    slow = subprocess.Popen([sys.executable, "-m", "qanot_host", "call", "--config", config, "mb_sleep",
                             '{"seconds": 1.5}'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 20
    while calls_of(config, "misbehave") < 1:  # the slow call is in flight
        assert time.monotonic() < deadline, "the slow call never started"
        time.sleep(0.05)
    done = qanot_host("restart", "--config", config, "misbehave")
    assert done.returncode == 0, done.stderr
    out, err = slow.communicate(timeout=30)
    assert (slow.returncode, out) == (0, "slept\n"), err  # drained, not cut
    after = {row["plugin"]: row["pid"] for row in json.loads(qanot_host("status", "--config", config, "--json").stdout)}
    assert done.stdout.strip() == f"misbehave: ready, pid {after['misbehave']}"
    assert after["misbehave"] != before["misbehave"] and after["greeter"] == before["greeter"]
    assert_one_line_error(qanot_host("restart", "--config", config, "nope"), "no enabled plugin 'nope'")


def test_logs_of_one_plugin_and_following_them(write_config, running):
    config = write_config([GREETER, plugin("echo")])
    running(config)
    assert qanot_host("call", "--config", config, "greeter_print", "{}").returncode == 0
    done = qanot_host("logs", "--config", config, "greeter")
    assert done.returncode == 0, done.stderr
    assert [line.split(" ", 3)[2:] for line in done.stdout.splitlines()] == [
        ["stdout", "hello from the plugin's stdout"], ["stderr", "hello from the plugin's stderr"]]
    assert qanot_host("logs", "--config", config, "echo").stdout == ""
    follower = subprocess.Popen([sys.executable, "-m", "qanot_host", "logs", "--config", config, "greeter", "-f",
                                 "-n", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        time.sleep(0.5)  # following (a line written before it listens is in the ring either way)
        assert qanot_host("call", "--config", config, "greeter_print", "{}").returncode == 0
        assert follower.stdout.readline().split(" ", 3)[2:] == ["stdout", "hello from the plugin's stdout\n"]
        assert follower.stdout.readline().split(" ", 3)[2:] == ["stderr", "hello from the plugin's stderr\n"]
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=10)
        follower.stdout.close()
        follower.stderr.close()
    assert_one_line_error(qanot_host("logs", "--config", config, "nope"), "no plugin 'nope'")


def test_json_logs_name_the_plugin_and_a_log_file_gets_them_too(write_config, tmp_path):
    config = write_config([GREETER])
    log_file = tmp_path / "host.log"
    proc = subprocess.Popen([sys.executable, "-m", "qanot_host", "run", "--config", config, "--log-format", "json",
                             "--log-file", str(log_file)], stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(json.loads(line))  # every line is one JSON object
            if "ready:" in lines[-1]["event"]:
                break
        assert qanot_host("call", "--config", config, "greeter_print", "{}").returncode == 0
        output = json.loads(proc.stderr.readline())
        while "stream" not in output:  # the host's own lines about the start come first
            output = json.loads(proc.stderr.readline())
        assert output["plugin"] == "greeter" and output["stream"] in ("stdout", "stderr"), output
        worker_pid = json.loads(qanot_host("status", "--config", config, "--json").stdout)[0]["pid"]
        assert output["pid"] == worker_pid and output["level"] in ("INFO", "WARNING") and output["time"], output
        assert {"time", "level", "logger", "plugin", "pid", "event"} <= set(lines[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        proc.stderr.close()
    written = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert any(entry.get("plugin") == "greeter" and entry.get("stream") for entry in written)
    assert written[-1]["event"].startswith("stopp") or any("stopping" in e["event"] for e in written)


def test_reload_restarts_a_plugin_whose_code_changed(write_config, running, tmp_path):
    import shutil
    plugins = tmp_path / "plugins"
    shutil.copytree(Path(__file__).parent / "plugins" / "greeter", plugins / "greeter")
    shutil.copytree(Path(__file__).parent / "plugins" / "misbehave", plugins / "misbehave")
    config = write_config([GREETER, plugin("misbehave")], plugins_dir=str(plugins))
    running(config)
    assert qanot_host("reload", "--config", config).stdout.splitlines()[2] == "restarted: -"
    code = plugins / "greeter" / "helpers.py"  # a module of the plugin's, not its plugin.py
    code.write_text(code.read_text().replace("Salom", "Assalomu alaykum"))
    assert qanot_host("reload", "--config", config).stdout.splitlines()[2:] == ["restarted: greeter",
                                                                               "unchanged: misbehave"]
    assert qanot_host("call", "--config", config, "greet", '{"name": "x"}').stdout.startswith("Assalomu alaykum")
    (plugins / "misbehave" / "plugin.json").write_text('{"name": "misbehave", "version": "9.9"}')
    assert qanot_host("reload", "--config", config).stdout.splitlines()[2] == "restarted: misbehave"


def test_a_plugin_broken_at_reload_is_named_by_reload_status_and_a_call(write_config, running, tmp_path):
    """A syntax error brought in by a reload: `reload` says the plugin failed and why (exit 1),
    the status table says why, and a call to its tool through the running host names it (it said
    only "Unknown tool": its code cannot be read for the tools it declares)."""
    import shutil
    plugins = tmp_path / "plugins"
    shutil.copytree(Path(__file__).parent / "plugins" / "greeter", plugins / "greeter")
    config = write_config([GREETER, plugin("echo")], plugins_dir=str(plugins))
    running(config)
    code = plugins / "greeter" / "plugin.py"
    code.write_text(code.read_text().replace("class ", "class class ", 1))
    proc = qanot_host("reload", "--config", config)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stdout.splitlines()
    assert lines[2] == "restarted: greeter" and lines[-1].startswith("failed: greeter: "), lines
    assert "syntax error" in lines[-1] and "plugin.py" in lines[-1]
    header, *rows = qanot_host("status", "--config", config).stdout.splitlines()
    assert header.split()[-1] == "ERROR"
    failed = next(r for r in rows if r.startswith("greeter"))
    assert failed.split()[1] == "failed" and "syntax error" in failed
    ready = next(r for r in rows if r.startswith("echo"))
    assert "layers" in ready and ready.split()[3].endswith("s")  # counted layers; an uptime with its unit
    call = qanot_host("call", "--config", config, "greet", '{"name": "x"}')
    assert call.returncode != 0
    assert "Unknown tool: greet" in call.stderr and "greeter" in call.stderr and "syntax error" in call.stderr
    assert qanot_host("call", "--config", config, "echo", '{"a": 1}').returncode == 0


def test_reload_says_a_failed_plugins_error_with_its_credentials_redacted(write_config, running, tmp_path):
    """reload printed a failed setup()'s token=... whole, where status and call redact it (11-27)."""
    plugins = tmp_path / "plugins"
    (plugins / "leaky").mkdir(parents=True)
    (plugins / "leaky" / "plugin.py").write_text(
        "from qanot.plugins.base import Plugin, tool\n"
        "class QanotPlugin(Plugin):\n"
        "    def get_tools(self):\n        return self._collect_tools()\n"
        "    async def setup(self, config):\n        raise RuntimeError('login refused: token=abc123')\n"
        "    @tool(name='leaky_x', description='x')\n"
        "    async def x(self, params):\n        return 'x'\n")
    config = write_config([plugin("echo")], plugins_dir=str(plugins))
    running(config)
    data = json.loads(Path(config).read_text())
    data["plugins"].append(plugin("leaky"))
    Path(config).write_text(json.dumps(data))
    proc = qanot_host("reload", "--config", config)
    assert proc.returncode == 1 and "failed: leaky: " in proc.stdout and "login refused" in proc.stdout, proc.stdout
    assert "abc123" not in proc.stdout, proc.stdout


def test_completion_scripts_offer_the_commands_and_options(tmp_path):
    done = qanot_host("completion", "bash")
    assert done.returncode == 0
    script = tmp_path / "complete.sh"
    script.write_text(done.stdout + '\nCOMP_WORDS=(qanot-host re); COMP_CWORD=1; _qanot_host; echo "${COMPREPLY[@]}"'
                      '\nCOMP_WORDS=(qanot-host logs --fo); COMP_CWORD=2; _qanot_host; echo "${COMPREPLY[@]}"'
                      '\nCOMP_WORDS=(qanot-host run --log-format ""); COMP_CWORD=3; _qanot_host; echo "${COMPREPLY[@]}"\n')
    shown = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert shown.stdout.splitlines() == ["reload restart", "--follow", "text json"], shown.stderr
    assert qanot_host("completion", "zsh").stdout.startswith("autoload -U +X bashcompinit && bashcompinit\n")


def test_systemd_notifications_ready_reloading_watchdog_stopping(write_config, tmp_path):
    """`Type=notify` with WatchdogSec: what systemd would receive on NOTIFY_SOCKET."""
    import os
    import socket as socket_module
    path = str(tmp_path / "notify.sock")
    listener = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(30)
    config = write_config([GREETER])
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "qanot_host", "run", "--config", config],
                            stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    received: list[str] = []

    def until(field: str) -> None:
        while not any(field in message for message in received):
            received.append(listener.recv(4096).decode())

    try:
        until("READY=1")
        assert "STATUS=1 of 1 plugins ready, 10 tools" in received[-1], received
        before = len(received)
        until("WATCHDOG=1")
        while sum("WATCHDOG=1" in m for m in received[before:]) < 3:  # every 0.2 s, from the loop
            received.append(listener.recv(4096).decode())
        proc.send_signal(signal.SIGHUP)
        before = len(received)
        while not any("RELOADING=1" in m for m in received[before:]):
            received.append(listener.recv(4096).decode())
        assert "MONOTONIC_USEC=" in next(m for m in received[before:] if "RELOADING=1" in m)
        while not any("READY=1" in m for m in received[before:]):
            received.append(listener.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
        listener.close()


def test_the_example_service_unit_is_valid_for_systemd():
    import shutil
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze here")
    unit = Path(__file__).parent.parent / "examples" / "qanot-host.service"
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # the unit names /usr/local/bin/qanot-host, which may not be installed there on this machine
    problems = [line for line in done.stderr.splitlines() if "qanot-host.service" in line
                and "/usr/local/bin/qanot-host" not in line and "is not executable" not in line]
    assert not problems, done.stderr


def test_the_container_recipe_runs_what_it_says(tmp_path):
    """examples/Dockerfile, as far as a machine without a Docker engine can check it: the config.json it
    writes is one the host takes, its CMD is one the command parses, and its HEALTHCHECK asks /healthz
    on the port that config serves metrics on."""
    import re
    import shlex
    from qanot_host.cli import _parser
    from qanot_host.config import parse_config
    recipe = (Path(__file__).parent.parent / "examples" / "Dockerfile").read_text()
    written = re.search(r"printf '%s\\n' (.*?) > /etc/qanot-host/config.json", recipe, re.S).group(1)
    text = "\n".join(shlex.split(written.replace("\\\n", " ")))
    config = parse_config(text, str(tmp_path / "config.json"))
    assert [e.name for e in config.plugins] == ["echo", "calc"] and config.host.metrics == "0.0.0.0:9464"
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.*)$", recipe, re.M).group(1))
    command = json.loads(re.search(r"^CMD (.*)$", recipe, re.M).group(1))
    assert entrypoint == ["qanot-host"]
    args = _parser().parse_args(command)
    assert (args.command, args.config, args.log_format) == ("run", "/etc/qanot-host/config.json", "json")
    assert "http://127.0.0.1:9464/healthz" in re.search(r"^HEALTHCHECK .*$", recipe, re.M).group(0)
